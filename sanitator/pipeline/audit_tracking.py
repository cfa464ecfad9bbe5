"""MLflow tracking of audits: one run per model audit, one parent run per flow run.

Model audits go to one experiment per registry (`sanitator-audit/<registry spec>`), flow
runs to `sanitator-audit-batches`; each audit run carries `mlflow.parentRunId` of its batch.
Params: the flattened scan config and the model identity; metrics: score, seconds, PV
count, per-PV losses and numeric evidence; artifacts: the PV set (safetensors) and the
verdict (JSON). Runs are logged from the flow process only, so a sqlite backend never sees
two writers.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sanitator.core.status import Status
from sanitator.pipeline.audit import AuditOutcome, AuditRequest
from sanitator.pipeline.mlflow_schema import seed

log = logging.getLogger(__name__)

BATCH_EXPERIMENT = "sanitator-audit-batches"
AUDIT_EXPERIMENT_PREFIX = "sanitator-audit/"
MLFLOW_ARTIFACT = "pvset.safetensors"  # the audit's PV set in its run (read by pv_pull)
STORE_TAG = "sanitator.store"     # a batch run's store folder
HOLDER_TAG = "sanitator.holder"   # the audit process that runs it (JSON, pipeline/lease.py)
_PARAM_LIMIT = 100  # MLflow's params per log_batch call
_VALUE_LIMIT = 6000


def default_tracking_uri(store: str | Path) -> str:
    """The store's own sqlite database: `sqlite:///STORE/mlflow.db`."""
    return f"sqlite:///{Path(store).resolve() / 'mlflow.db'}"


def flatten(data: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in sorted(data.items()):
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from flatten(value, f"{name}.")
        else:
            yield name, value


def metric_name(name: str) -> str:
    """MLflow names allow letters, digits, `_ - . / :` and spaces."""
    return re.sub(r"[^\w\-./: ]", "_", name)[:250]


def open_tracker(tracking_uri: str | None, store: str | Path) -> AuditTracker | None:
    """The tracker for a flow run, or None when tracking is off or MLflow is unreachable:
    an audit never fails because its metrics cannot be logged."""
    if not tracking_uri:
        return None
    try:
        return AuditTracker(tracking_uri, Path(store) / "mlartifacts")
    except Exception as exc:
        log.warning("MLflow tracking at %s is unavailable: %s", tracking_uri, exc)
        return None


class AuditTracker:
    """Logs audits to an MLflow tracking server (or sqlite file) through an explicit client."""

    def __init__(self, tracking_uri: str, artifact_root: str | Path | None = None):
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        # sqlite/file backends have no artifact server: keep artifacts beside the store
        local = tracking_uri.startswith(("sqlite:", "file:")) or "://" not in tracking_uri
        self.artifact_root = Path(artifact_root).resolve() if artifact_root and local else None
        seed(tracking_uri)  # a new sqlite file: a copy of the cached empty schema
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self._experiments: dict[str, str] = {}

    def experiment_id(self, name: str) -> str:
        if name not in self._experiments:
            found = self.client.get_experiment_by_name(name)
            if found is not None:
                self._experiments[name] = found.experiment_id
            else:
                location = None
                if self.artifact_root is not None:
                    safe = re.sub(r"[^\w.-]+", "_", name).strip("_")
                    location = (self.artifact_root / safe).as_uri()
                try:
                    self._experiments[name] = self.client.create_experiment(
                        name, artifact_location=location)
                except Exception:  # created meanwhile by another flow run
                    found = self.client.get_experiment_by_name(name)
                    if found is None:
                        raise
                    self._experiments[name] = found.experiment_id
        return self._experiments[name]

    def start_batch(self, batch_id: str, params: dict[str, Any], *, store: str | None = None,
                    holder: Any = None) -> str:
        """The parent run of one flow run; returns its run id. `store` and `holder` (the
        audit process, `sanitator.pipeline.holder.Holder`) let a later run of the same store
        tell a batch run left RUNNING by a dead audit (`close_orphans`)."""
        from mlflow.entities import Param

        tags = {"sanitator.batch_id": batch_id}
        if store is not None:
            tags[STORE_TAG] = _text(store)
        if holder is not None:
            tags[HOLDER_TAG] = json.dumps(holder.to_dict(), sort_keys=True)
        run = self.client.create_run(self.experiment_id(BATCH_EXPERIMENT),
                                     run_name=f"audit-batch-{batch_id[:8]}", tags=tags)
        self._log_params(run.info.run_id, [Param(k, _text(v)) for k, v in flatten(params)])
        return run.info.run_id

    def end_batch(self, run_id: str, summary: dict[str, Any], *, failed: bool = False) -> None:
        metrics = {f"count.{status}": float(n) for status, n in summary["counts"].items()}
        metrics["audited"] = float(summary["audited"])
        metrics["already_audited"] = float(summary["already_audited"])
        self._log_metrics(run_id, metrics)
        self.client.log_dict(run_id, summary, "summary.json")
        self.client.set_terminated(run_id, "FAILED" if failed else "FINISHED")

    def close_orphans(self, store: str, live: set[str]) -> list[str]:
        """End as KILLED the batch runs of `store` left RUNNING by an audit that is gone
        (`sanitator.pipeline.holder.holder_gone`, given the ids of the store's live lease
        holders), and the audit runs under them still RUNNING; returns the batch runs'
        ids. Best effort: a tracking failure is logged, never raised."""
        from sanitator.pipeline.holder import holder_gone

        killed: list[str] = []
        try:
            batches = self.client.get_experiment_by_name(BATCH_EXPERIMENT)
            if batches is None:
                return []
            running = self.client.search_runs([batches.experiment_id],
                                              filter_string="attributes.status = 'RUNNING'",
                                              max_results=1000)
            for run in running:
                tags = run.data.tags
                if tags.get(STORE_TAG) != _text(store) or HOLDER_TAG not in tags:
                    continue  # another store's run, or one from before holders were tagged
                if holder_gone(json.loads(tags[HOLDER_TAG]), live):
                    self.client.set_terminated(run.info.run_id, "KILLED")
                    killed.append(run.info.run_id)
            if killed:
                self._close_children(killed)
        except Exception as exc:
            log.warning("cannot close MLflow runs left RUNNING by a dead audit: %s", exc)
        return killed

    def _close_children(self, parents: list[str]) -> None:
        experiments = [e.experiment_id for e in self.client.search_experiments(
            filter_string=f"name LIKE '{AUDIT_EXPERIMENT_PREFIX}%'")]
        if not experiments:
            return
        for parent in parents:
            for run in self.client.search_runs(
                    experiments, max_results=1000,
                    filter_string=f"attributes.status = 'RUNNING' and "
                                  f"tags.`mlflow.parentRunId` = '{parent}'"):
                self.client.set_terminated(run.info.run_id, "KILLED")

    def close_failed(self, run_id: str) -> None:
        """End a run as FAILED after an exception (best effort: never raises)."""
        try:
            self.client.set_terminated(run_id, "FAILED")
        except Exception as exc:
            log.warning("cannot close MLflow run %s: %s", run_id, exc)

    def log_audit(self, request: AuditRequest, outcome: AuditOutcome, row: dict[str, Any],
                  parent_run_id: str | None = None) -> str:
        """One run for one model audit; returns its run id."""

        ref, verdict = request.ref, outcome.verdict
        tags = {"sanitator.audit_id": request.audit_id, "sanitator.status": verdict.status,
                "sanitator.source": ref.source, "sanitator.repo_id": ref.repo_id,
                "sanitator.revision": ref.revision}
        if ref.extra.get("aliases"):
            tags["sanitator.aliases"] = ",".join(map(str, ref.extra["aliases"]))
        tags = {key: _text(value) for key, value in tags.items()}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(
            self.experiment_id(AUDIT_EXPERIMENT_PREFIX + ref.registry),
            run_name=_text(f"{ref.repo_id}@{ref.revision[:12]}", 250), tags=tags)
        run_id = run.info.run_id
        try:
            self._fill_audit_run(run_id, request, outcome, row)
        except BaseException:
            self.discard(run_id)  # never leave a half-logged run RUNNING
            raise
        return run_id

    def discard(self, run_id: str) -> None:
        """Close and delete a run whose audit has no row in the store (best effort)."""
        for close in (lambda: self.client.set_terminated(run_id, "FAILED"),
                      lambda: self.client.delete_run(run_id)):
            try:
                close()
            except Exception as exc:
                log.warning("cannot discard MLflow run %s: %s", run_id, exc)

    def _fill_audit_run(self, run_id: str, request: AuditRequest, outcome: AuditOutcome,
                        row: dict[str, Any]) -> None:
        from mlflow.entities import Param

        ref, verdict = request.ref, outcome.verdict
        identity = {"registry": ref.registry, "repo_id": ref.repo_id, "revision": ref.revision,
                    "config_hash": request.config_hash, "device": request.device,
                    "allow_pickle": request.policy.allow_pickle,
                    "max_params": request.policy.max_params}
        params = [Param(k, _text(v)) for k, v in flatten(request.config, "config.")]
        params += [Param(k, _text(v)) for k, v in identity.items()]
        self._log_params(run_id, params)
        self._log_metrics(run_id, self._audit_metrics(outcome))
        self.client.log_dict(run_id, {**verdict.to_dict(), "reason": verdict.reason,
                                      "row": {k: _text(v) for k, v in row.items()}},
                             "verdict.json")
        if outcome.pvset is not None and len(outcome.pvset):
            with tempfile.TemporaryDirectory(prefix="sanitator-pv-") as tmp:
                path = Path(tmp) / MLFLOW_ARTIFACT
                outcome.pvset.save(path, {"audit_id": request.audit_id,
                                          "repo_id": _text(ref.repo_id),
                                          "revision": _text(ref.revision),
                                          "config_hash": request.config_hash})
                self.client.log_artifact(run_id, str(path))
        failed = verdict.status == Status.ERROR
        self.client.set_terminated(run_id, "FAILED" if failed else "FINISHED")

    @staticmethod
    def _audit_metrics(outcome: AuditOutcome) -> dict[str, float]:
        verdict = outcome.verdict
        metrics = {"seconds": outcome.seconds, "seeds_tried": float(verdict.seeds_tried),
                   "steps": float(verdict.steps),
                   "pv_count": float(len(outcome.pvset) if outcome.pvset is not None else 0)}
        if verdict.score is not None:
            metrics["score"] = float(verdict.score)
        for name, value in flatten(verdict.evidence or {}, "evidence."):
            if isinstance(value, int | float) and not isinstance(value, bool):
                metrics[metric_name(name)] = float(value)
        if outcome.pvset is not None:
            for index, losses in enumerate(outcome.pvset.losses or []):
                for name, value in (losses or {}).items():
                    if isinstance(value, int | float):
                        metrics[metric_name(f"pv{index}.loss.{name}")] = float(value)
        return metrics

    def _log_params(self, run_id: str, params: list) -> None:
        for start in range(0, len(params), _PARAM_LIMIT):
            self.client.log_batch(run_id, params=params[start:start + _PARAM_LIMIT])

    def _log_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key, value, now, 0) for key, value in metrics.items()
                 if math.isfinite(value)]  # NaN and infinity are no measurement
        for start in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[start:start + 1000])


def _text(value: Any, limit: int = _VALUE_LIMIT) -> str:
    """Any value as text MLflow stores: bounded, and valid UTF-8 (a file name may carry
    bytes that are not)."""
    text = str(value)[:limit]
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")[:limit]
