"""MLflow tracking of audits against a real sqlite backend."""

import datetime as dt

import pytest
import torch

from sanitator.detect.config import ScanConfig
from sanitator.detect.results import PVSet, Verdict
from sanitator.pipeline.audit import AuditOutcome, AuditRequest, verdict_row
from sanitator.pipeline.audit_job import AuditJob
from sanitator.pipeline.audit_tracking import (
    AUDIT_EXPERIMENT_PREFIX,
    BATCH_EXPERIMENT,
    AuditTracker,
    default_tracking_uri,
    metric_name,
)
from sanitator.pipeline.jobs import record
from sanitator.pipeline.registries import ModelRef
from sanitator.pipeline.store import read_verdicts


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One MLflow sqlite backend for the failure tests (a new one costs its migrations)."""
    root = tmp_path_factory.mktemp("tracked")
    uri = default_tracking_uri(root)
    return root, uri, AuditTracker(uri, root / "mlartifacts")


def test_one_run_per_audit_under_a_parent_run_per_batch(tracked, tmp_path):
    from mlflow import MlflowClient

    root, uri, tracker = tracked
    assert uri == f"sqlite:///{root.resolve() / 'mlflow.db'}"
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
    assert experiment.artifact_location.startswith((root / "mlartifacts").as_uri())
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


def _runs(uri, audit_id):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return [run for experiment in client.search_experiments()
            for run in client.search_runs([experiment.experiment_id], run_view_type=3)
            if run.data.tags.get("sanitator.audit_id") == audit_id]


def _hostile_request(audit_id, config=None):
    config = config if config is not None else ScanConfig.from_preset("fast").to_dict()
    ref = ModelRef("path", "path:/zoo", "team/\udcff-$\\frac{$" + "x" * 9000, "b" * 40, "/zoo",
                   config={"model_type": "bert"})
    return AuditRequest(audit_id, ref, config, "c" * 16)


def test_hostile_values_are_recorded_and_every_run_ends(tracked, tmp_path):

    _, uri, tracker = tracked
    outcome = AuditOutcome(Verdict("clean", score=float("nan"), reason="r" * 50_000),
                           info={"architecture": 7, "n_params": 2 ** 70})
    row = record(AuditJob(), _hostile_request("hostile"), outcome, str(tmp_path), tracker)
    stored = read_verdicts(tmp_path)
    assert len(stored) == 1 and stored.loc[0, "mlflow_run_id"] == row["mlflow_run_id"]
    assert stored.loc[0, "repo_id"].startswith("team/\\xff-$\\frac{$")
    assert [run.info.status for run in _runs(uri, "hostile")] == ["FINISHED"]


def test_a_run_that_cannot_be_logged_is_closed_and_the_row_still_written(tracked, tmp_path):

    _, uri, tracker = tracked
    request = _hostile_request("unloggable", {"bad$param": 1})  # MLflow refuses the name
    row = record(AuditJob(), request, AuditOutcome(Verdict("clean", score=0.1)), str(tmp_path),
                          tracker)
    assert row["mlflow_run_id"] is None and len(read_verdicts(tmp_path)) == 1
    assert [(r.info.status, r.info.lifecycle_stage) for r in _runs(uri, "unloggable")] == [
        ("FAILED", "deleted")]


def test_a_failed_store_write_leaves_no_mlflow_run_behind(tracked, tmp_path):

    _, uri, tracker = tracked
    not_a_folder = tmp_path / "store"
    not_a_folder.write_text("a file where the store should be")
    with pytest.raises(OSError):
        record(AuditJob(), _hostile_request("unwritable"), AuditOutcome(Verdict("clean")),
                        str(not_a_folder), tracker)
    assert [(r.info.status, r.info.lifecycle_stage) for r in _runs(uri, "unwritable")] == [
        ("FAILED", "deleted")]


def test_batch_runs_a_dead_audit_left_running_are_closed_as_killed(tracked, tmp_path):
    import subprocess
    import sys

    from mlflow import MlflowClient

    from sanitator.pipeline import holder

    _, uri, tracker = tracked
    client = MlflowClient(tracking_uri=uri)
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = holder.Holder("dead-audit", holder.this_process().host, int(done.stdout), 1.0)
    store, other = str(tmp_path / "store"), str(tmp_path / "other-store")
    orphan = tracker.start_batch("b-dead", {}, store=store, holder=dead)
    # an audit run the dead audit began and never ended
    child = client.create_run(tracker.experiment_id(AUDIT_EXPERIMENT_PREFIX + "path:/zoo"),
                              tags={"mlflow.parentRunId": orphan}).info.run_id
    live = tracker.start_batch("b-live", {}, store=store, holder=holder.this_process())
    elsewhere = tracker.start_batch("b-other", {}, store=other, holder=dead)

    assert tracker.close_orphans(store, set()) == [orphan]
    status = {run_id: client.get_run(run_id).info.status
              for run_id in (orphan, child, live, elsewhere)}
    assert status == {orphan: "KILLED", child: "KILLED", live: "RUNNING",
                      elsewhere: "RUNNING"}  # another store's batch is not this run's to judge
    assert tracker.close_orphans(store, set()) == []  # said once
    for run_id in (live, elsewhere):
        tracker.close_failed(run_id)
