"""The nightly audit: crawl registries, plan, fan out one Prefect task per model to Dask,
write verdicts and PV sets to the Parquet store and MLflow, publish a summary artifact.

    from flows.audit_zoo import audit_zoo
    summary = audit_zoo(registries=["hf:acme", "path:/models"], out="/data/sanitator")

`audit_zoo_flow` is the Prefect flow (deployment entrypoint, JSON parameters only);
`audit_zoo` is the Python entry point that also takes a ScanConfig object. Docs:
docs/pipeline.md (flow, deployments, scaling out, GPU), docs/store.md (the store).
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import distributed
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Failed

from sanitator.pipeline.audit import (
    AuditPolicy,
    AuditRequest,
    failure_outcome,
    plan_audits,
    rejection_outcome,
    summarize,
)
from sanitator.pipeline.audit_tracking import open_tracker
from sanitator.pipeline.registries import parse_registry
from sanitator.pipeline.store import completed_audits, new_audit_id
from sanitator.report import md_code
from tasks.audit import (
    AUDIT_START_TOPIC,
    DEFAULT_SCANNER,
    TransientAuditError,
    WarmUp,
    audit_model,
    crawl_registry,
    record_audit,
)

log = logging.getLogger(__name__)

# Extra time, beyond the per-model timeout, before a running audit counts as hung: the
# task's own timeout fires between Python bytecodes and cannot stop a stuck C call.
HANG_GRACE_SECONDS = 60.0


def resolve_scan_config(preset: str = "fast", scan_options: dict[str, Any] | None = None,
                        scan_config: dict[str, Any] | None = None):
    """A full config dict wins; otherwise the preset with flat overrides."""
    from sanitator.detect.config import ScanConfig
    from sanitator.pipeline.audit import scan_config_from_dict

    if scan_config:
        return scan_config_from_dict(scan_config)
    # an audit publishes PV artifacts: a backdoored verdict goes on to every PV (issue 15)
    return ScanConfig.from_preset(preset, **{"complete": True, **(scan_options or {})})


def _api_url() -> str | None:
    """The Prefect API this flow reports to, for LocalCluster workers to report to as well
    (without it each worker process would start a temporary server of its own)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url)


def dask_runner(dask_address: str | None, n_workers: int, torch_threads: int | None,
                gpu: bool):
    """A DaskTaskRunner on an existing scheduler, or on a LocalCluster of processes with
    one task thread each and cores / processes torch threads (FINDINGS.md §2)."""
    from prefect_dask import DaskTaskRunner

    if dask_address:
        return DaskTaskRunner(address=dask_address)
    threads = torch_threads or max(1, (os.cpu_count() or 1) // max(1, n_workers))
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    if not os.environ.get("PREFECT_API_URL"):
        env["PREFECT_API_URL"] = _api_url() or ""
    cluster_kwargs: dict[str, Any] = {"n_workers": n_workers, "threads_per_worker": 1,
                                      "processes": True, "dashboard_address": None, "env": env}
    if gpu:
        cluster_kwargs["resources"] = {"GPU": 1}
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=cluster_kwargs)


class RegistryUnavailable(RuntimeError):
    """A registry could not be listed at all: the flow fails after recording the others.
    `summary` is the flow's summary (the rows of the registries that could be listed)."""

    def __init__(self, summary: dict[str, Any]):
        failed = "; ".join(f"{spec}: {reason}"
                           for spec, reason in summary["registry_errors"].items())
        super().__init__(f"{len(summary['registry_errors'])} registry(ies) could not be "
                         f"listed: {failed}")
        self.summary = summary


def _failure_from_exception(exc: BaseException, timeout: float | None):
    if isinstance(exc, TimeoutError):
        # not retried within this run (it would time out again on the same busy cluster),
        # but audited again next run: a timeout says nothing about the model
        return failure_outcome(f"timed out after {timeout:g} s (per-model timeout)",
                               retryable=True)
    if isinstance(exc, TransientAuditError):
        return failure_outcome(f"{exc} (retries exhausted)", retryable=True)
    return failure_outcome(f"worker lost or task crashed: {type(exc).__name__}: {exc}",
                           retryable=True)


def _executing(client) -> dict[str, str]:
    """Key -> worker address of every task executing right now (queued ones excluded)."""
    def executing(dask_worker):
        return [str(ts.key) for ts in dask_worker.state.executing]

    try:
        return {key: addr for addr, keys in client.run(executing).items() for key in keys}
    except Exception:  # a worker went away meanwhile: look again at the next poll
        return {}


def _hung(client, pending: dict, per_model_timeout: float | None) -> list:
    """Dask futures whose audit has been running on its current worker for longer than the
    timeout plus a grace. The task's own timeout fires between Python bytecodes and would
    have ended it by then, so it is stuck in native code and only a worker restart frees
    the worker. The clock starts at the audit's own start signal on that worker (after
    the worker's imports), so a rescheduled audit is not judged by its first attempt."""
    if not per_model_timeout:
        return []
    executing = _executing(client)
    starts: dict[str, tuple[float, str]] = {}
    for stamp, message in client.get_events(AUDIT_START_TOPIC):
        starts[message["audit_id"]] = (stamp, message["worker"])
    limit = per_model_timeout + HANG_GRACE_SECONDS
    now = time.time()
    hung = []
    for dask_future, (request, _) in pending.items():
        worker = executing.get(str(dask_future.key))
        started, start_worker = starts.get(request.audit_id, (now, None))
        if worker is not None and worker == start_worker and now - started > limit:
            hung.append(dask_future)
    return hung


def _mark_failed(task_run_id: Any, message: str) -> None:
    """Close a task run whose worker we abandon, so the UI does not show it running."""
    from prefect.client.orchestration import get_client
    from prefect.states import Failed

    try:
        with get_client(sync_client=True) as client:
            client.set_task_run_state(task_run_id, Failed(message=message), force=True)
    except Exception as exc:
        log.warning("cannot mark task run %s failed: %s", task_run_id, exc)


def _restart_workers_of(client, dask_futures: list, logger) -> None:
    keys = {str(f.key) for f in dask_futures}
    try:
        workers = sorted({addr for key, addr in _executing(client).items() if key in keys})
        if workers:
            client.restart_workers(workers)
    except Exception as exc:  # workers without a nanny cannot be restarted from here
        logger.warning("could not restart the workers of hung audits: %s", exc)


@flow(name="audit-models-on-dask", validate_parameters=False)
def audit_on_dask(requests: list[AuditRequest], store: str, tracking_uri: str | None = None,
                  parent_run_id: str | None = None, batch_id: str | None = None,
                  work_dir: str | None = None, torch_threads: int | None = None,
                  scanner: str = DEFAULT_SCANNER, per_model_timeout: float | None = None,
                  gpu: bool = False) -> list[dict[str, Any]]:
    """Submit one audit task per model to Dask; record each as soon as it finishes."""
    import dask
    from prefect.context import FlowRunContext

    logger = get_run_logger()
    tracker = open_tracker(tracking_uri, store)
    task = audit_model.with_options(timeout_seconds=per_model_timeout)
    client = FlowRunContext.get().task_runner.client
    try:  # before the first audit, so that no audit's timeout pays the imports
        client.register_plugin(WarmUp())
    except Exception as exc:
        logger.warning("workers not warmed up (%s); first audits pay the imports", exc)
    pending = {}
    for request in requests:
        # GPU audits only go to workers that declare a GPU resource (docs/pipeline.md)
        with dask.annotate(resources={"GPU": 1}) if gpu else nullcontext():
            future = task.submit(request, work_dir=work_dir, torch_threads=torch_threads,
                                 scanner=scanner)
        pending[future.wrapped_future] = (request, future)
    # how often to look for hung audits: a fraction of the timeout, within [1 s, 30 s]
    poll = min(30.0, max(1.0, (per_model_timeout or 120.0) / 4))
    rows: list[dict[str, Any]] = []

    def record(request, outcome):
        rows.append(record_audit(request, outcome, store, tracker, parent_run_id, batch_id))

    while pending:
        try:
            with client.as_current():  # prefect-dask's client is not the default one
                done, _ = distributed.wait(list(pending), timeout=poll,
                                           return_when="FIRST_COMPLETED")
        except (TimeoutError, distributed.TimeoutError):
            done = set()
        for dask_future in done:
            request, future = pending.pop(dask_future)
            try:
                outcome = future.result(raise_on_failure=False)
            except Exception as exc:  # KilledWorker, CancelledError, lost scheduler
                outcome = exc
            if isinstance(outcome, BaseException):
                outcome = _failure_from_exception(outcome, per_model_timeout)
            record(request, outcome)
        hung = _hung(client, pending, per_model_timeout)
        for dask_future in hung:
            request, future = pending.pop(dask_future)
            dask_future.cancel()
            _mark_failed(future.task_run_id, "hung past its timeout; worker restarted")
            logger.error("%s still running %ss past its timeout; recorded as error",
                         request.ref.label, HANG_GRACE_SECONDS)
            record(request, failure_outcome(
                f"timed out after {per_model_timeout:g} s and did not stop (hung in native "
                "code); its worker was restarted", retryable=True))
        if hung:
            _restart_workers_of(client, hung, logger)
    return rows


def _summary_markdown(summary: dict[str, Any]) -> str:
    """Repo ids and reasons come from the audited repos: each is one code span."""
    lines = ["# Audit summary", "", "| status | models |", "|---|---|"]
    lines += [f"| {status} | {n} |" for status, n in summary["counts"].items()]
    lines += ["", f"Already audited (unchanged): {summary['already_audited']}", "",
              "## Backdoored", ""]
    lines += [f"- {md_code(b['repo_id'])} @ {md_code(b['revision'][:12])} "
              f"({md_code(b['registry'])}), score "
              f"{b['score'] if b['score'] is not None else 'n/a'}, {b['pv_count']} PV(s)"
              for b in summary["backdoored"]] or ["none"]
    if summary["errors"]:
        lines += ["", "## Errors", ""]
        lines += [f"- {md_code(e['repo_id'])} ({md_code(e['registry'])}): {md_code(e['reason'])}"
                  for e in summary["errors"]]
    if summary["registry_errors"]:
        lines += ["", "## Registries that could not be listed", ""]
        lines += [f"- {md_code(spec)}: {md_code(reason)}"
                  for spec, reason in summary["registry_errors"].items()]
    return "\n".join(lines)


@flow(name="audit-zoo")
def audit_zoo_flow(registries: list[str], out: str = "sanitator-store",
                   dask_address: str | None = None, n_workers: int = 2,
                   mlflow_uri: str | None = None, preset: str = "fast",
                   scan_options: dict[str, Any] | None = None,
                   scan_config: dict[str, Any] | None = None, device: str = "cpu",
                   per_model_timeout: float | None = 3600.0, allow_pickle: bool = False,
                   max_params: int | None = None, force: bool = False,
                   work_dir: str | None = None, torch_threads: int | None = None,
                   scanner: str = DEFAULT_SCANNER, track: bool = True) -> dict[str, Any]:
    """Audit every model of `registries` not yet audited with this config; see docs/pipeline.md.

    Returns the summary: counts per status, backdoored models, errors, store path. When a
    registry cannot be listed at all, the others are still audited and the run ends
    Failed (calling the flow raises RegistryUnavailable, which carries the summary).
    """
    from prefect.runtime import flow_run

    from sanitator.pipeline.audit_tracking import default_tracking_uri

    logger = get_run_logger()
    for spec in registries:
        parse_registry(spec)  # fail fast on a malformed spec, before any work
    store = str(Path(out).resolve())
    Path(store).mkdir(parents=True, exist_ok=True)
    config = resolve_scan_config(preset, scan_options, scan_config)
    config_dict, config_hash = config.to_dict(), config.config_hash()
    policy = AuditPolicy(allow_pickle=allow_pickle, max_params=max_params)
    batch_id = str(flow_run.get_id() or new_audit_id())
    tracking_uri = (mlflow_uri or default_tracking_uri(store)) if track else None
    tracker = open_tracker(tracking_uri, store)
    parent_run_id = None
    if tracker is not None:
        try:
            parent_run_id = tracker.start_batch(batch_id, {
                "registries": ",".join(registries), "config_hash": config_hash,
                "device": device, "allow_pickle": allow_pickle, "max_params": max_params,
                "config": config_dict})
        except Exception as exc:
            logger.warning("MLflow parent run not created: %s", exc)
            tracker = None

    try:
        summary = _crawl_plan_audit(registries, store, config_dict, config_hash, policy,
                                    force=force, device=device, tracker=tracker,
                                    parent_run_id=parent_run_id, batch_id=batch_id,
                                    dask_options={
                                        "dask_address": dask_address, "n_workers": n_workers,
                                        "torch_threads": torch_threads, "work_dir": work_dir,
                                        "scanner": scanner,
                                        "per_model_timeout": per_model_timeout,
                                        "tracking_uri": tracking_uri})
    except BaseException:
        if tracker is not None and parent_run_id:  # never leave the batch run RUNNING
            tracker.close_failed(parent_run_id)
        raise
    if tracker is not None and parent_run_id:
        try:
            tracker.end_batch(parent_run_id, summary, failed=bool(summary["registry_errors"]))
        except Exception as exc:
            logger.warning("MLflow parent run not closed: %s", exc)
            tracker.close_failed(parent_run_id)
    if summary["registry_errors"]:
        # a Failed state rather than a raise: the run ends Failed with a plain message and
        # the caller gets RegistryUnavailable, without Prefect logging a traceback
        failure = RegistryUnavailable(summary)
        logger.error("%s", failure)
        return Failed(message=str(failure), data=failure)
    return summary


def _crawl_plan_audit(registries: list[str], store: str, config_dict: dict[str, Any],
                      config_hash: str, policy: AuditPolicy, *, force: bool, device: str,
                      tracker, parent_run_id: str | None, batch_id: str,
                      dask_options: dict[str, Any]) -> dict[str, Any]:
    """The flow's work: crawl, plan, record what the plan settles, audit the rest."""
    logger = get_run_logger()
    refs, registry_errors = [], {}
    for spec in registries:
        try:
            refs.extend(crawl_registry(spec))
        except Exception as exc:  # one unlistable registry must not stop the others
            logger.error("listing %s failed: %s", spec, exc)
            registry_errors[spec] = f"{type(exc).__name__}: {exc}"

    plan = plan_audits(refs, completed_audits(store), config_hash, policy, force=force)
    logger.info("%d model(s): %d to audit, %d rejected from metadata, %d already audited",
                len(refs), len(plan.todo), len(plan.rejected), len(plan.settled))

    def request(ref):
        return AuditRequest(new_audit_id(), ref, config_dict, config_hash, device, policy)

    rows = [record_audit(request(r.ref), rejection_outcome(r.status, r.reason, r.retryable),
                         store, tracker, parent_run_id, batch_id)
            for r in plan.rejected]
    if plan.todo:
        options = dict(dask_options)
        runner = dask_runner(options.pop("dask_address"), options.pop("n_workers"),
                             options["torch_threads"], device.startswith("cuda"))
        tracking_uri = options.pop("tracking_uri")
        tracking_uri = tracking_uri if tracker else None
        rows += audit_on_dask.with_options(task_runner=runner)(
            [request(ref) for ref in plan.todo], store, tracking_uri, parent_run_id,
            batch_id, gpu=device.startswith("cuda"), **options)

    summary = summarize(rows, settled=len(plan.settled), store=store,
                        registry_errors=registry_errors)
    create_markdown_artifact(_summary_markdown(summary), key="audit-summary",
                             description="counts per status and the backdoored models")
    if rows:
        create_table_artifact(
            [{"registry": r["registry"], "repo_id": r["repo_id"], "revision": r["revision"],
              "status": r["status"], "score": r["score"], "pv_count": r["pv_count"],
              "reason": r["reason"]} for r in rows],
            key="audit-verdicts", description="the verdicts written by this flow run")
    return summary


def audit_zoo(registries: list[str], out: str | Path = "sanitator-store", *,
              scan_config: Any = None, **options: Any) -> dict[str, Any]:
    """Run the audit flow from Python. `scan_config` may be a ScanConfig, a dict from
    `ScanConfig.to_dict()`, or None (the preset named by `preset`, default fast).
    Other options are audit_zoo_flow's parameters (dask_address, n_workers, mlflow_uri,
    device, per_model_timeout, allow_pickle, max_params, force, work_dir, ...)."""
    if scan_config is not None and not isinstance(scan_config, dict):
        scan_config = scan_config.to_dict()
    return audit_zoo_flow(registries=list(registries), out=str(out), scan_config=scan_config,
                          **options)
