"""MLflow tracking of audits against a real sqlite backend."""

import datetime as dt

import torch

from sanitator.audit import AuditOutcome, AuditRequest, verdict_row
from sanitator.audit_tracking import (
    AUDIT_EXPERIMENT_PREFIX,
    BATCH_EXPERIMENT,
    AuditTracker,
    default_tracking_uri,
    metric_name,
)
from sanitator.config import ScanConfig
from sanitator.registries import ModelRef
from sanitator.results import PVSet, Verdict


def test_one_run_per_audit_under_a_parent_run_per_batch(tmp_path):
    from mlflow import MlflowClient

    uri = default_tracking_uri(tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    tracker = AuditTracker(uri, tmp_path / "mlartifacts")
    config = ScanConfig.from_preset("fast")
    parent = tracker.start_batch("batch-1", {"registries": "hf:acme",
                                             "config": config.to_dict()})
    ref = ModelRef("hf", "hf:acme", "acme/enc", "a" * 40, "http://hub",
                   extra={"aliases": ["prod"]})
    request = AuditRequest("id1", ref, config.to_dict(), config.config_hash())
    pvset = PVSet(torch.randn(2, 8), torch.randn(2, 3, 8), seeds=[1, 2],
                  losses=[{"distance": -0.4, "diversity": -3.4}, {"distance": -0.3}])
    outcome = AuditOutcome(Verdict("backdoored", score=0.93, seeds_tried=4,
                                   evidence={"support": 3, "rule": "calibrated"}),
                           pvset, seconds=2.5)
    row = verdict_row(request, outcome, audited_at=dt.datetime.now(dt.UTC))
    run_id = tracker.log_audit(request, outcome, row, parent)
    failed = tracker.log_audit(request, AuditOutcome(Verdict("error", reason="boom")), row,
                               parent)
    tracker.end_batch(parent, {"counts": {"backdoored": 1, "error": 1}, "audited": 2,
                               "already_audited": 0})

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == AUDIT_EXPERIMENT_PREFIX + "hf:acme"
    assert experiment.artifact_location.startswith((tmp_path / "mlartifacts").as_uri())
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["sanitator.aliases"] == "prod"
    assert run.data.params["config.mining.steps_per_seed"] == str(
        config.mining.steps_per_seed)
    assert run.data.params["revision"] == "a" * 40
    metrics = run.data.metrics
    assert metrics["score"] == 0.93 and metrics["pv_count"] == 2 and metrics["seconds"] == 2.5
    assert metrics["pv0.loss.distance"] == -0.4 and metrics["evidence.support"] == 3
    assert "evidence.rule" not in metrics
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert artifacts == {"pvset.safetensors", "verdict.json"}
    local = client.download_artifacts(run_id, "pvset.safetensors", str(tmp_path))
    assert torch.equal(PVSet.load(local).vectors, pvset.vectors)
    assert run.info.status == "FINISHED"
    assert client.get_run(failed).info.status == "FAILED"
    batch = client.get_run(parent)
    assert client.get_experiment(batch.info.experiment_id).name == BATCH_EXPERIMENT
    assert batch.data.metrics["count.backdoored"] == 1
    # a second tracker on the same backend reuses the experiments
    assert AuditTracker(uri).experiment_id(BATCH_EXPERIMENT) == batch.info.experiment_id


def test_metric_names_are_sanitised():
    assert metric_name("pv0.loss.dist(ance)") == "pv0.loss.dist_ance_"
