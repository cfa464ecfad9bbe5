"""Prefect tasks of the audit flow: crawl a registry, audit one model, record one audit.

`audit_model` runs on Dask workers; the others run in the flow process (called directly,
not submitted), so the store and the MLflow backend only ever have one writer.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin
from prefect import task
from prefect.cache_policies import NONE

from sanitator.core.status import Status
from sanitator.pipeline.audit import (
    AuditOutcome,
    AuditRequest,
    pv_rows,
    rejection_outcome,
    run_audit,
    verdict_row,
)
from sanitator.pipeline.registries import ModelRef, RegistryError, parse_registry
from sanitator.pipeline.store import (
    PVS,
    PVS_SCHEMA,
    VERDICTS,
    VERDICTS_SCHEMA,
    StoreError,
    audit_date,
    to_table,
    utc_now,
    write_rows,
)

log = logging.getLogger(__name__)

DEFAULT_SCANNER = "sanitator.detect.scan:scan_model"
# Dask event topic: each audit announces its start on a worker, so the flow can tell an
# audit stuck in native code from one that a replacement worker only just picked up.
AUDIT_START_TOPIC = "sanitator-audit-start"


class TransientAuditError(RuntimeError):
    """An audit failed for a reason worth retrying (network, server error, crash)."""


def _transient_registry_error(exc: BaseException) -> bool:
    from sanitator.pipeline.registries.hf_hub import is_transient as hub_transient
    from sanitator.pipeline.registries.mlflow_registry import is_transient as mlflow_transient

    if isinstance(exc, RegistryError):
        return False
    return hub_transient(exc) or mlflow_transient(exc)


def _retry_if_transient(task, task_run, state) -> bool:
    """Retry condition: only transient failures; never a timeout (it would time out again)."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as error:  # the state may hold the exception itself
        exc = error
    if isinstance(exc, TimeoutError):
        return False
    return isinstance(exc, TransientAuditError) or _transient_registry_error(exc)


@task(name="crawl-registry", retries=3, retry_delay_seconds=[5, 30, 120],
      retry_condition_fn=_retry_if_transient, cache_policy=NONE, persist_result=False,
      task_run_name="crawl {spec}")
def crawl_registry(spec: str) -> list[ModelRef]:
    """Every model of one registry, pinned to revisions."""
    refs = list(parse_registry(spec).crawl())
    log.info("%s: %d model(s)", spec, len(refs))
    return refs


def resolve_scanner(name: str):
    """'module:function' -> the function (lets deployments plug another scanner)."""
    module, _, attribute = name.partition(":")
    if not module or not attribute:
        raise ValueError(f"scanner must be 'module:function', got {name!r}")
    return getattr(importlib.import_module(module), attribute)


def worker_threads(requested: int | None) -> int:
    """Torch threads for this worker process: cores / processes, never more (FINDINGS §2)."""
    if requested:
        return requested
    env = os.environ.get("OMP_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        from distributed import get_worker

        threads_per_process = get_worker().state.nthreads
    except (ImportError, ValueError):
        threads_per_process = 1
    return max(1, (os.cpu_count() or 1) // max(1, threads_per_process))


class WarmUp(WorkerPlugin):
    """Dask worker plugin: import what every audit needs (torch, transformers' model code,
    seconds of imports) when a worker starts, restarted workers included, so that an
    audit's timeout measures the audit and not the imports."""

    name = "sanitator-warm-up"
    idempotent = True

    def setup(self, worker) -> None:
        import torch  # noqa: F401
        from transformers import AutoModel, AutoTokenizer, BertModel  # noqa: F401


def _announce_start(audit_id: str) -> None:
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):  # not on a Dask worker
        return
    worker.log_event(AUDIT_START_TOPIC, {"audit_id": audit_id, "worker": worker.address})


@task(name="audit-model", retries=2, retry_delay_seconds=[10, 60],
      retry_condition_fn=_retry_if_transient, cache_policy=NONE, persist_result=False,
      task_run_name="audit {request.ref.repo_id}")
def audit_model(request: AuditRequest, work_dir: str | None = None,
                torch_threads: int | None = None, scanner: str = DEFAULT_SCANNER
                ) -> AuditOutcome:
    """Fetch and scan one model on a worker. Raises on transient failures (so Prefect
    retries); every other failure comes back as an outcome with status error/unsupported."""
    import torch

    _announce_start(request.audit_id)
    threads = worker_threads(torch_threads)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    outcome = run_audit(request, scan=resolve_scanner(scanner), work_dir=work_dir)
    if outcome.retryable:
        raise TransientAuditError(outcome.verdict.reason or "transient failure")
    return outcome


@task(name="record-audit", retries=2, retry_delay_seconds=2, cache_policy=NONE,
      persist_result=False, task_run_name="record {request.ref.repo_id}")
def record_audit(request: AuditRequest, outcome: AuditOutcome, store: str,
                 tracker: Any | None = None, parent_run_id: str | None = None,
                 batch_id: str | None = None) -> dict[str, Any]:
    """Log one audit to MLflow, then write its PV rows and verdict row (atomically).

    The rows are checked against the store's schemas first: rows that cannot be stored
    become one plain `error` row, so every audit leaves exactly one verdict row. The
    MLflow run is logged only for rows that can be written, and deleted again when the
    write fails, so MLflow never holds a run the store does not."""
    audited_at = utc_now()
    row = verdict_row(request, outcome, audited_at=audited_at, batch_id=batch_id)
    pvs = pv_rows(request, outcome, audited_at=audited_at)
    try:
        to_table(VERDICTS, [row], VERDICTS_SCHEMA)
        if pvs:
            to_table(PVS, pvs, PVS_SCHEMA)
    except StoreError as exc:
        log.error("the rows of %s do not fit the store (%s); recording an error instead",
                  request.ref.label, exc)
        outcome = rejection_outcome(Status.ERROR.value,
                                    f"the audit's result could not be stored: {exc}")
        row = verdict_row(request, outcome, audited_at=audited_at, batch_id=batch_id)
        pvs = []
    if tracker is not None:
        try:
            row["mlflow_run_id"] = tracker.log_audit(request, outcome, row, parent_run_id)
        except Exception as exc:  # tracking is a mirror of the store: never lose a row to it
            log.warning("MLflow logging of %s failed: %s", request.ref.label, exc)
    partition = audit_date(audited_at)
    try:
        # PVs first: a verdict row is the commit mark of its audit (sanitator.pipeline.store)
        write_rows(store, PVS, pvs, partition=partition, name=request.audit_id)
        write_rows(store, VERDICTS, [row], partition=partition, name=request.audit_id)
    except Exception:
        if tracker is not None and row.get("mlflow_run_id"):
            tracker.discard(row["mlflow_run_id"])
        raise
    return row
