"""The audit flow end to end: real Prefect, Dask LocalCluster (2 processes), MLflow
(sqlite tracking, a real registry server), pyarrow and the local Hub server."""

import json
import os
import threading
import time

import pandas as pd
import pytest
from pipeline_servers import TINY_SCAN

from sanitator.cli import main
from sanitator.pipeline.store import latest_verdicts, read_pvs, read_verdicts

pytestmark = pytest.mark.slow(250)  # seconds, roughly: long modules start first

FAKE_SCANNER = "fake_scanners:by_name"
SCAN_OPTIONS = TINY_SCAN


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def first_run(four_model_zoo, store):
    from flows.audit_zoo import audit_zoo

    mp = pytest.MonkeyPatch()
    mp.setenv("HF_ENDPOINT", four_model_zoo["hub"].url)
    try:
        summary = audit_zoo(four_model_zoo["registries"], store, n_workers=2,
                            scan_options=SCAN_OPTIONS, per_model_timeout=600)
    finally:
        mp.undo()
    return summary


def test_four_models_over_three_registries_get_the_right_statuses(first_run, store):
    assert first_run["counts"] == {"clean": 1, "backdoored": 1, "inconclusive": 0, "error": 1,
                                   "unsupported": 1, "skipped": 0}
    verdicts = latest_verdicts(store).set_index("repo_id")
    assert verdicts.loc["acme/encoder-backdoor", "status"] == "backdoored"
    assert verdicts.loc["acme/encoder-backdoor", "source"] == "hf"
    assert verdicts.loc["zoo-clean-encoder", "status"] == "clean"
    assert verdicts.loc["zoo-clean-encoder", "revision"].startswith("v1-")
    assert verdicts.loc["acme/decoder", "status"] == "unsupported"
    assert verdicts.loc["team/pickled", "status"] == "error"
    assert "pickle" in verdicts.loc["team/pickled", "reason"]
    assert set(verdicts["config_hash"]) == {first_run_config_hash()}
    assert verdicts["batch_id"].nunique() == 1
    assert [b["repo_id"] for b in first_run["backdoored"]] == ["acme/encoder-backdoor"]
    assert verdicts.loc["acme/encoder-backdoor", "score"] >= 0.99  # 1 - alpha
    # detect mode mines no soft seed: a clean verdict rests on the hard-trigger searches
    assert verdicts.loc["zoo-clean-encoder", "seeds_tried"] == 0
    assert json.loads(verdicts.loc["zoo-clean-encoder", "evidence"])["searches"] > 0
    assert verdicts.loc["zoo-clean-encoder", "architecture"] == "bert"


def first_run_config_hash():
    from flows.audit_zoo import resolve_scan_config

    return resolve_scan_config("fast", SCAN_OPTIONS).config_hash()


def test_pv_rows_and_mlflow_runs_are_written(first_run, store):
    from mlflow import MlflowClient

    pvs = read_pvs(store, repo_id="acme/encoder-backdoor")
    backdoored = latest_verdicts(store).set_index("repo_id").loc["acme/encoder-backdoor"]
    assert len(pvs) == backdoored["pv_count"] > 0
    assert list(pvs["pv_index"]) == list(range(len(pvs)))
    assert ["cf"] in [list(tokens) for tokens in pvs["trigger_tokens"]]  # the planted trigger
    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    run = client.get_run(backdoored["mlflow_run_id"])
    assert run.data.tags["sanitator.status"] == "backdoored"
    assert "pvset.safetensors" in {a.path for a in client.list_artifacts(run.info.run_id)}
    parent = run.data.tags["mlflow.parentRunId"]
    children = [r for e in client.search_experiments()
                for r in client.search_runs([e.experiment_id])
                if r.data.tags.get("mlflow.parentRunId") == parent]
    assert len(children) == 4  # one run per model audit
    experiments = {e.name for e in client.search_experiments()}
    assert {"sanitator-audit/hf:acme", "sanitator-audit-batches"} <= experiments


def test_summary_artifact_is_published(first_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["audit-summary"])))
    assert artifacts and "acme/encoder-backdoor" in artifacts[-1].data
    assert "| backdoored | 1 |" in artifacts[-1].data


def test_rerun_through_the_cli_audits_nothing_and_adds_no_rows(first_run, four_model_zoo,
                                                               store, capsys, monkeypatch):
    files_before = sorted(p for p in store.rglob("*.parquet"))
    rows_before = len(read_verdicts(store))
    monkeypatch.setenv("HF_ENDPOINT", four_model_zoo["hub"].url)
    args = ["audit", "--out", str(store), "--workers", "2"]
    for spec in four_model_zoo["registries"]:
        args += ["--registry", spec]
    for key, value in SCAN_OPTIONS.items():
        args += ["--set", f"{key}={value}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "audited 0 model(s) (nothing new); 4 already audited" in out
    assert sorted(p for p in store.rglob("*.parquet")) == files_before
    assert len(read_verdicts(store)) == rows_before
    assert main(["verdicts", "--store", str(store)]) == 0
    assert capsys.readouterr().out.count("\n") == 5  # header + 4 models


def _worker_pids() -> list[int]:
    """The Dask worker processes: children of multiprocessing's forkserver (the server
    itself outlives the clusters it forked workers for)."""
    import psutil

    def forked(process) -> bool:
        try:
            parent = process.parent()
            return parent is not None and "multiprocessing.forkserver" in " ".join(
                parent.cmdline())
        except psutil.Error:  # gone meanwhile
            return False

    return [p.pid for p in psutil.Process().children(recursive=True) if forked(p)]


def _widen(folder, files: int = 12000) -> None:
    """Give a repo many files: each is listed in its audit request (and its siblings')."""
    extra = folder / "checkpoints"
    extra.mkdir()
    for index in range(files):
        (extra / f"step-{index:06d}-of-a-long-training-run.txt").touch()


def test_killed_worker_timeouts_and_hangs_still_account_for_every_model(
        tmp_path, tiny_encoders, monkeypatch):
    """Kill the worker running a slow model mid-run; a model over its timeout and a model
    stuck in uninterruptible code are still recorded; every model ends in one row.

    Two of the repos hold 12,000 files each, so the requests are about 5.5 MB: past the
    512 KiB Prefect allows a flow run's parameters (a registry of 1,000 models passes it
    too), so they must reach the fan-out some other way."""
    import shutil

    import flows.audit_zoo as audit_flow
    from sanitator.pipeline import fanout

    zoo = tmp_path / "zoo"
    names = ["lazy-1", "slow-1", "slow-2", "stuck-1"]
    for name in names:
        shutil.copytree(tiny_encoders["bert"], zoo / name)
    for name in ("slow-1", "slow-2"):
        _widen(zoo / name)
    markers = tmp_path / "markers"
    markers.mkdir()
    monkeypatch.setenv("FAKE_SCAN_MARKERS", str(markers))
    # long enough for a timed-out task to report back on this busy machine (under a load
    # of 3-5 on 2 cores, 8 and 12 s were not: the interrupted "lazy" audit read as hung), short
    # enough to keep the test short (60 s in production)
    monkeypatch.setattr(fanout, "HANG_GRACE_SECONDS", 20.0)
    killed: list[str] = []

    def kill_a_slow_worker():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            for marker in markers.iterdir():
                pid, _, name = marker.name.partition("-")
                if name.startswith("slow") and int(pid) in _worker_pids():
                    time.sleep(1.0)  # mid-scan
                    os.kill(int(pid), 9)
                    killed.append(name)
                    return
            time.sleep(0.2)

    def api_refuses(*args, **kwargs):
        raise RuntimeError("artifact too large")

    # the summary artifacts only show rows the store holds: failing them fails nothing
    monkeypatch.setattr(audit_flow, "create_table_artifact", api_refuses)
    killer = threading.Thread(target=kill_a_slow_worker, daemon=True)
    killer.start()
    summary = audit_flow.audit_zoo([f"path:{zoo}"], tmp_path / "store", n_workers=2,
                                   scanner=FAKE_SCANNER, scan_options=SCAN_OPTIONS,
                                   per_model_timeout=8, track=False)
    killer.join(timeout=5)
    assert killed, "no worker was killed: the test did not exercise worker loss"
    verdicts = read_verdicts(tmp_path / "store")
    assert sorted(verdicts["repo_id"]) == sorted(names)  # exactly one row each
    by_repo = verdicts.set_index("repo_id")
    for name in ("slow-1", "slow-2"):
        assert by_repo.loc[name, "status"] == "clean", by_repo.loc[name, "reason"]
    assert by_repo.loc["lazy-1", "status"] == "error"
    assert "(per-model timeout)" in by_repo.loc["lazy-1", "reason"]
    assert by_repo.loc["stuck-1", "status"] == "error"
    assert "hung" in by_repo.loc["stuck-1", "reason"]
    assert summary["counts"]["clean"] == 2 and summary["counts"]["error"] == 2
    assert not pd.isna(by_repo.loc["slow-1", "seconds"])
    # the killed run ran again elsewhere; the other finished once: the restart of the hung
    # run's worker did not recompute what that worker had finished (read, then forgotten)
    scans = [marker.name.partition("-")[2] for marker in markers.iterdir()]
    other = ({"slow-1", "slow-2"} - set(killed)).pop()
    assert scans.count(killed[0]) == 2 and scans.count(other) == 1, sorted(scans)
    assert _worker_pids() == []  # the cluster is gone with the flow

