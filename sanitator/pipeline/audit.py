"""Audit orchestration logic without an orchestrator: plan, run one audit, build rows.

The Prefect tasks in `tasks/` and the flow in `flows/audit_zoo.py` are thin wrappers over
these functions, so the decisions (what to audit again, what a failure becomes, what a
row holds) are tested without Prefect or Dask.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

from sanitator import __version__
from sanitator.core.status import STATUSES, Status
from sanitator.detect.results import PVSet, Verdict
from sanitator.pipeline.reference_fetch import scan_references, with_resolution
from sanitator.pipeline.registries import FetchError, ModelRef, fetch_ref, is_transient_os_error
from sanitator.pipeline.store import VERDICT_FINAL, pack_signs
from sanitator.safety.model_policy import (
    ConfigFacts,
    ModelRejected,
    architecture_rejection,
    listed_size_rejection,
    short,
    size_rejection,
    weights_rejection,
)
from sanitator.safety.preflight import ModelInfo, preflight

log = logging.getLogger(__name__)

Scanner = Callable[..., Any]  # scan_model's signature: (path, config, device=, ...) -> ScanResult


@dataclass(frozen=True)
class AuditPolicy:
    """What the audit refuses before scanning; part of every row, not of the config hash."""

    allow_pickle: bool = False
    max_params: int | None = None


@dataclass(frozen=True)
class AuditRequest:
    """One model audit as shipped to a worker: plain data, picklable."""

    audit_id: str
    ref: ModelRef
    config: dict[str, Any]      # ScanConfig.to_dict()
    config_hash: str
    device: str = "cpu"
    policy: AuditPolicy = AuditPolicy()
    # clean bases planned for this model (pipeline/references.py): fetched by the worker
    references: tuple[Any, ...] = ()          # PlannedReference
    waits_for: tuple[str, ...] = ()           # request ids of bases audited first
    reference_log: dict[str, Any] | None = None  # how they were resolved (the evidence)


@dataclass
class AuditOutcome:
    """What a worker sends back: the verdict, the PV set and what the preflight learned."""

    verdict: Verdict
    pvset: PVSet | None = None
    info: dict[str, Any] = field(default_factory=dict)  # architecture, n_params, ...
    seconds: float = 0.0
    retryable: bool = False


class Rejection(NamedTuple):
    """A ref whose row the planner writes without a download."""

    ref: ModelRef
    status: str
    reason: str
    retryable: bool = False


@dataclass
class Plan:
    todo: list[ModelRef]                              # to audit on workers
    rejected: list[Rejection]                         # settled by metadata or the crawl
    settled: list[ModelRef]                           # already audited: no new row


# --- scan config ------------------------------------------------------------------------

def scan_config_from_dict(data: dict[str, Any]):
    """Rebuild a ScanConfig (nested stage configs included) from `ScanConfig.to_dict()`."""
    from sanitator.detect.config import ScanConfig

    defaults = ScanConfig()
    values: dict[str, Any] = {}
    for item in dataclasses.fields(ScanConfig):
        if item.name not in data:
            continue
        value = data[item.name]
        default = getattr(defaults, item.name)
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            value = type(default)(**value)
        values[item.name] = value
    unknown = set(data) - {item.name for item in dataclasses.fields(ScanConfig)}
    if unknown:
        raise TypeError(f"unknown scan config fields {sorted(unknown)}")
    return ScanConfig(**values)


# --- planning ---------------------------------------------------------------------------

def _model_dir_files(ref: ModelRef) -> dict[str, int | None]:
    """Files beside the shallowest config.json (the model folder inside the listing)."""
    configs = sorted((PurePosixPath(name) for name in ref.file_names
                      if PurePosixPath(name).name == "config.json"), key=lambda p: len(p.parts))
    base = configs[0].parent if configs else PurePosixPath(".")
    return {PurePosixPath(name).name: size for name, size in ref.files
            if PurePosixPath(name).parent == base}


def rejection_from_listing(ref: ModelRef, policy: AuditPolicy) -> tuple[str, str] | None:
    """Decide what the registry's metadata already settles, before any download.

    Applies the rules of `sanitator.safety.model_policy` that the preflight (which every worker
    still runs on the fetched folder) applies too: config types, unsupported
    architecture, missing or pickle-only weights, size limit. Returns (status, reason) or
    None when the model must be fetched and scanned.
    """
    config = ref.config or {}
    if config.get("invalid"):
        return (Status.ERROR.value, str(config["invalid"]))
    model_type = config.get("model_type")
    if model_type:
        rejected = architecture_rejection(ConfigFacts(model_type,
                                                      tuple(config.get("architectures") or ())))
        if rejected:
            return rejected
    if not ref.files:
        return None
    files = _model_dir_files(ref)
    if "config.json" not in files:
        return (Status.ERROR.value, "no config.json in the listing (not a model folder)")
    rejected = weights_rejection(files, policy.allow_pickle)
    if rejected:
        return rejected
    weight_bytes = sum(size for name, size in files.items()
                       if isinstance(size, int) and name.endswith((".safetensors", ".bin")))
    return listed_size_rejection(weight_bytes, policy.max_params)


def is_settled(row: dict[str, Any], policy: AuditPolicy) -> bool:
    """Does an earlier row stand for its (source, repo, revision, config hash)?

    A verdict (clean, backdoored, unsupported) always does; a rejection (error, skipped)
    only under the same policy, since allowing pickle or raising the size limit changes
    it; a retryable failure (timeout, lost worker, network) never does, nor does an
    inconclusive scan (not shown clean: every run audits it again, so it stays in the
    run's summary and gate, and a new reference base or a larger budget can decide it).
    """
    if row.get("retryable") or row["status"] == Status.INCONCLUSIVE:
        return False
    if row["status"] in VERDICT_FINAL:
        return True
    return (bool(row.get("allow_pickle")) == policy.allow_pickle
            and _none_if_nan(row.get("max_params")) == policy.max_params)


def _none_if_nan(value: Any) -> Any:
    return None if value is None or value != value else int(value)


def plan_audits(refs: Iterable[ModelRef], completed: Iterable[dict[str, Any]], config_hash: str,
                policy: AuditPolicy, *, force: bool = False) -> Plan:
    """Split crawled refs into: already settled, rejected from metadata, to audit.

    `completed` are rows from `sanitator.pipeline.store.completed_audits`. Duplicate refs (the same
    content listed twice by one registry) are audited once.
    """
    settled_keys = set()
    if not force:
        for row in completed:
            if row["config_hash"] == config_hash and is_settled(row, policy):
                settled_keys.add((row["source"], row["repo_id"], row["revision"]))
    plan = Plan([], [], [])
    seen: set[tuple[str, str, str]] = set()
    for ref in refs:
        if ref.key in seen:
            continue
        seen.add(ref.key)
        if ref.key in settled_keys:
            plan.settled.append(ref)
            continue
        if ref.crawl_error:
            plan.rejected.append(Rejection(ref, Status.ERROR.value, ref.crawl_error,
                                           ref.crawl_retryable))
            continue
        try:
            rejected = rejection_from_listing(ref, policy)
        except Exception as exc:  # a listing no rule foresaw: its repo's row, not the plan's
            log.exception("planning %s failed", ref.label)
            rejected = (Status.ERROR.value, f"cannot plan the audit ({type(exc).__name__}: "
                        f"{short(exc, 200)})")
        if rejected:
            plan.rejected.append(Rejection(ref, *rejected))
        else:
            plan.todo.append(ref)
    return plan


# --- one audit --------------------------------------------------------------------------

def _info_dict(info: ModelInfo | None) -> dict[str, Any]:
    if info is None:
        return {}
    return {"architecture": info.model_type, "n_params": info.n_params,
            "weights_format": info.weights_format, "weight_bytes": info.weight_bytes}


def is_transient(exc: BaseException) -> bool:
    """Can another try change this failure? Network, timeouts, memory pressure, I/O errors
    of the machine and a broken environment (an import failing) can; anything the model's
    own bytes cause cannot."""
    if isinstance(exc, FetchError):
        return exc.retryable
    if isinstance(exc, ConnectionError | TimeoutError | MemoryError | ImportError):
        return True
    if isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower():
        return True  # torch reports a full GPU as a RuntimeError (scan.is_out_of_memory)
    return is_transient_os_error(exc)


def run_audit(request: AuditRequest, *, scan: Scanner | None = None,
              work_dir: str | Path | None = None, progress: bool = False,
              reference_cache: str | Path | None = None) -> AuditOutcome:
    """Fetch, preflight and scan one model; every failure becomes an outcome, none raises.

    Downloads go to a temporary folder below `work_dir` that is removed afterwards; the
    planned references into `reference_cache` (shared by the flow run's audits on this
    machine; default: inside that temporary folder).
    Failures another try can change (network, server errors, machine I/O, memory) come
    back with `retryable=True`, and the Prefect task raises on those so that its retries
    apply; deterministic ones (the model's bytes, a crash of the scan on them) are
    permanent `error` rows.
    """
    started = time.monotonic()
    policy = request.policy

    def done(outcome: AuditOutcome) -> AuditOutcome:
        outcome.seconds = time.monotonic() - started
        return outcome

    if scan is None:
        from sanitator.detect.scan import scan_model as scan
    scratch: Path | None = None
    info: ModelInfo | None = None
    try:
        if work_dir is not None:
            Path(work_dir).mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix="sanitator-audit-", dir=work_dir))
        folder = fetch_ref(request.ref, scratch, allow_pickle=policy.allow_pickle)
        try:
            info = preflight(folder, allow_pickle=policy.allow_pickle)
        except ModelRejected as exc:
            return done(AuditOutcome(Verdict(exc.status, reason=exc.reason)))
        rejected = size_rejection(info.n_params, policy.max_params)
        if rejected:
            return done(AuditOutcome(Verdict(rejected[0], reason=rejected[1]),
                                     info=_info_dict(info)))
        config = scan_config_from_dict(request.config)
        options, resolution = scan_references(request.references, request.reference_log,
                                              reference_cache or scratch / "references")
        result = scan(folder, config, device=request.device, allow_pickle=policy.allow_pickle,
                      max_params=None, progress=progress, **options)
        info = result.info or info
        pvset = result.pvset if result.pvset is not None and len(result.pvset) else None
        verdict = result.verdict
        if resolution is not None:  # the pipeline's side of evidence.reference
            verdict = dataclasses.replace(verdict, evidence=with_resolution(verdict.evidence,
                                                                            resolution))
        return done(AuditOutcome(verdict, pvset, _info_dict(info)))
    except FetchError as exc:
        return done(AuditOutcome(Verdict(Status.ERROR, reason=short(exc, 1000)),
                                 info=_info_dict(info), retryable=exc.retryable))
    except Exception as exc:  # a crash is a row; another try only when it can change
        log.warning("audit of %s failed: %s: %s", request.ref.label, type(exc).__name__, exc)
        log.debug("audit of %s failed", request.ref.label, exc_info=True)
        return done(AuditOutcome(
            Verdict(Status.ERROR, reason=f"audit crashed: {type(exc).__name__}: {short(exc, 300)}"),
            info=_info_dict(info), retryable=is_transient(exc)))
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def failure_outcome(reason: str, *, retryable: bool) -> AuditOutcome:
    """The outcome of an audit that never reported back (timeout, lost worker)."""
    return AuditOutcome(Verdict(Status.ERROR, reason=reason), retryable=retryable)


def rejection_outcome(status: str, reason: str, retryable: bool = False) -> AuditOutcome:
    return AuditOutcome(Verdict(status, reason=reason), retryable=retryable)


# --- rows -------------------------------------------------------------------------------

def verdict_row(request: AuditRequest, outcome: AuditOutcome, *, audited_at: dt.datetime,
                batch_id: str | None = None, mlflow_run_id: str | None = None
                ) -> dict[str, Any]:
    """The `verdicts` row of one audit (schema: sanitator.pipeline.store.VERDICTS_SCHEMA)."""
    ref, verdict, info = request.ref, outcome.verdict, outcome.info
    return {
        "audit_id": request.audit_id, "batch_id": batch_id, "audited_at": audited_at,
        "source": ref.source, "registry": ref.registry, "repo_id": ref.repo_id,
        "revision": ref.revision,
        "architecture": info.get("architecture") or (ref.config or {}).get("model_type"),
        "n_params": info.get("n_params"), "weights_format": info.get("weights_format"),
        "weight_bytes": info.get("weight_bytes"),
        "status": verdict.status, "score": verdict.score,
        "pv_count": len(outcome.pvset) if outcome.pvset is not None else 0,
        "seeds_tried": verdict.seeds_tried, "steps": verdict.steps,
        "seconds": round(outcome.seconds, 3),
        "config_hash": request.config_hash,
        "config": json.dumps(request.config, sort_keys=True),
        "package_version": __version__, "device": request.device,
        "allow_pickle": request.policy.allow_pickle, "max_params": request.policy.max_params,
        "reason": verdict.reason, "retryable": outcome.retryable,
        "evidence": json.dumps(verdict.evidence, sort_keys=True, default=str)
        if verdict.evidence else None,
        "mlflow_run_id": mlflow_run_id,
    }


def pv_rows(request: AuditRequest, outcome: AuditOutcome, *, audited_at: dt.datetime
            ) -> list[dict[str, Any]]:
    """The `pvs` rows of one audit, one per accepted PV (schema: `store.PVS_SCHEMA`)."""
    pvset = outcome.pvset
    if pvset is None or len(pvset) == 0:
        return []
    ref = request.ref
    vectors = pvset.vectors.detach().float().cpu().numpy()
    triggers = pvset.triggers.detach().float().cpu().numpy()
    rows = []
    for index, vector in enumerate(vectors):
        trigger = triggers[index] if index < len(triggers) else None
        rows.append({
            "audit_id": request.audit_id, "audited_at": audited_at, "source": ref.source,
            "registry": ref.registry, "repo_id": ref.repo_id, "revision": ref.revision,
            "config_hash": request.config_hash, "pv_index": index,
            "feature": pvset.features[index],  # where the monitor reads this PV
            "hidden_size": int(vector.shape[0]), "vector": vector.tolist(),
            "sign_bits": pack_signs(vector),
            "seed": _item(pvset.seeds, index),
            "losses": json.dumps(_item(pvset.losses, index) or {}, sort_keys=True, default=float),
            "trigger_tokens": [str(t) for t in (_item(pvset.trigger_tokens, index) or [])],
            "trigger_shape": list(trigger.shape) if trigger is not None else None,
            "trigger": trigger.reshape(-1).tolist() if trigger is not None else None,
        })
    return rows


def _item(values: list[Any] | None, index: int) -> Any:
    return values[index] if values is not None and index < len(values) else None


# errors a summary lists (the CLI's, the flow's artifacts); the rest are counted in
# `more_errors` and listed by the store (`sanitator verdicts`)
SUMMARY_ERRORS = 20


def summarize(rows: list[dict[str, Any]], *, settled: int = 0, store: str | None = None,
              registry_errors: dict[str, str] | None = None,
              max_errors: int = SUMMARY_ERRORS) -> dict[str, Any]:
    """Counts per status, the backdoored and inconclusive models and the first
    `max_errors` failures of one flow run (`more_errors`: how many more)."""
    counts = Counter(row["status"] for row in rows)
    errors = [r for r in rows if r["status"] == Status.ERROR]
    return {
        "store": store,
        "audited": len(rows),
        "already_audited": settled,
        "counts": {status: counts.get(status, 0) for status in
                   STATUSES},
        "backdoored": [{"registry": r["registry"], "repo_id": r["repo_id"],
                        "revision": r["revision"], "score": r["score"],
                        "pv_count": r["pv_count"]}
                       for r in rows if r["status"] == Status.BACKDOORED],
        "inconclusive": [{"registry": r["registry"], "repo_id": r["repo_id"],
                          "revision": r["revision"], "score": r["score"], "reason": r["reason"]}
                         for r in rows if r["status"] == Status.INCONCLUSIVE],
        "errors": [{"registry": r["registry"], "repo_id": r["repo_id"], "reason": r["reason"],
                    "retryable": r["retryable"]} for r in errors[:max_errors]],
        "more_errors": max(0, len(errors) - max_errors),
        "registry_errors": dict(registry_errors or {}),
    }
