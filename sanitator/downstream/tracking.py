"""MLflow side of the scheduled evaluations: one run per (encoder, task) pair in the
`sanitator-evaluations` experiment, through an `AuditTracker`'s client."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

from sanitator.downstream.runs import EvaluationOutcome, EvaluationRequest

EVALUATION_EXPERIMENT = "sanitator-evaluations"


def _metric_safe(trigger: str) -> str:
    """A trigger as an MLflow metric name part (letters, digits, _-. / and spaces allowed)."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", trigger) or "_"


def log_evaluation(tracker, request: EvaluationRequest, outcome: EvaluationOutcome,
                   row: dict[str, Any], parent_run_id: str | None = None) -> str:
    """One MLflow run per evaluation through an `AuditTracker`'s client: settings as params,
    the numbers as metrics, the trained prompt and the full result as artifacts."""
    from mlflow.entities import Param

    from sanitator.pipeline.audit_tracking import flatten

    ref = request.ref
    tags = {"sanitator.evaluation_id": request.evaluation_id, "sanitator.status": outcome.status,
            "sanitator.repo_id": ref.repo_id, "sanitator.revision": ref.revision,
            "sanitator.task": row["task"]}
    if request.audit_id:
        tags["sanitator.audit_id"] = request.audit_id
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    client = tracker.client
    run = client.create_run(tracker.experiment_id(EVALUATION_EXPERIMENT),
                            run_name=f"{ref.repo_id}@{ref.revision[:12]} {row['task']}",
                            tags=tags)
    run_id = run.info.run_id
    params = [Param(k, str(v)[:6000]) for k, v in flatten(request.config, "config.")]
    params += [Param(k, str(v)) for k, v in (("registry", ref.registry), ("encoder", ref.repo_id),
                                             ("revision", ref.revision), ("task", row["task"]),
                                             ("attack", outcome.attack),
                                             ("triggers", ",".join(outcome.triggers)))]
    tracker._log_params(run_id, params)
    metrics = {name: float(row[name]) for name in (
        "clean_accuracy", "asr", "weighted_asr", "defended_asr", "defended_weighted_asr",
        "defended_clean_accuracy", "monitor_fpr", "triggered_flag_rate", "n_test", "n_train",
        "seconds", "train_accuracy", "majority_rate") if row.get(name) is not None}
    if row.get("converged") is not None:
        metrics["converged"] = float(row["converged"])
    for item in row.get("per_trigger") or []:
        name = _metric_safe(item["trigger"])
        for key in ("asr", "defended_asr"):
            if item[key] is not None:
                metrics[f"{key}.{name}"] = float(item[key])
    tracker._log_metrics(run_id, metrics)
    client.log_dict(run_id, {"row": {k: str(v) for k, v in row.items()},
                             "result": outcome.result}, "evaluation.json")
    if outcome.prompt:
        with tempfile.TemporaryDirectory(prefix="sanitator-prompt-") as tmp:
            path = Path(tmp) / "prompt.safetensors"
            path.write_bytes(outcome.prompt)
            client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, "FINISHED" if outcome.status == "ok" else "FAILED")
    return run_id
