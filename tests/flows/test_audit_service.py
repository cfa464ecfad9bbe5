"""The nightly audit as a service, with real `sanitator audit` processes (each its private
Prefect API, a Dask LocalCluster forked from its forkserver, MLflow on sqlite): audits of
one registry started together, `kill -9` of the one that got it, the other taking over.

The audits use the fake scanner (tests/flows/fake_scanners.py: "slow" models take 4 s):
what costs time here is each audit's start-up, so the test runs two full audits and one
that is turned away before it starts anything.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from sanitator.cli import exits
from sanitator.pipeline import lease
from sanitator.pipeline.registries import parse_registry
from sanitator.pipeline.store import read_verdicts

pytestmark = pytest.mark.slow(90)  # seconds, roughly: long modules start first

HERE = Path(__file__).resolve().parent
NAMES = ["slow-1", "slow-2", "slow-3", "slow-4"]


def _audit(store: Path, zoo: Path, *options: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get(
        "PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)  # each audit starts its own private API
    command = [str(Path(sys.executable).with_name("sanitator")), "audit",
               "--registry", f"path:{zoo}", "--out", str(store), "--workers", "2",
               "--scanner", "fake_scanners:by_name", *options]
    # a session of its own, as a cron job or a shell would start it
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _running_mlflow_runs(store: Path) -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    return [f"{e.name}: {r.info.run_id}" for e in client.search_experiments()
            for r in client.search_runs([e.experiment_id],
                                        filter_string="attributes.status = 'RUNNING'")]


def test_audits_of_one_registry_started_together_and_kill_9_of_the_one_that_got_it(
        tmp_path, tiny_encoders):
    zoo, store = tmp_path / "zoo", tmp_path / "store"
    for name in NAMES:
        shutil.copytree(tiny_encoders["bert"], zoo / name)
    lease_file = lease.lease_path(store.resolve(), parse_registry(f"path:{zoo}").spec)
    started = [_audit(store, zoo, "--wait", "600", "--json") for _ in range(2)]
    ours: list[int] = []
    try:
        holder_pid = _wait_for(lambda: lease_file.exists() and json.loads(
            lease_file.read_text())["holder"]["pid"], 120, "one audit to take the lease")
        holder, waiter = started if started[0].pid == holder_pid else started[::-1]

        # a third audit of the same registry, not waiting: turned away before it starts
        # its Prefect API or cluster, with its own exit code and the holder named
        third = _audit(store, zoo)
        _, err = third.communicate(timeout=120)
        assert third.returncode == exits.BUSY, err
        assert f"is left to another audit: another audit holds it (pid {holder.pid} on" in err

        # kill -9 the audit that holds the registry once it has written a row; a kill of
        # the audit process alone is the harder case: its process group (the forkserver,
        # the workers) must then notice, while a group kill would end them directly; the
        # Prefect API runs in a session of its own in either case
        _wait_for(lambda: list((store / "verdicts").rglob("*.parquet")), 300, "a first row")
        ours = [holder.pid] + [child.pid for child in
                               psutil.Process(holder.pid).children(recursive=True)]
        commands = [" ".join(psutil.Process(pid).cmdline()) for pid in ours[1:]]
        assert any("uvicorn" in c for c in commands), commands   # the private API
        assert sum("forkserver" in c for c in commands) >= 3, commands  # server + workers
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        killed_at = time.monotonic()
        _wait_for(lambda: not _alive(ours), 10, f"every process of the killed audit to end "
                  f"(alive: {_alive(ours)})")
        assert time.monotonic() - killed_at <= 10

        # the waiting audit takes the dead one's lease over, closes its MLflow runs and
        # audits what it left
        out, err = waiter.communicate(timeout=600)
        assert waiter.returncode == exits.OK, err[-3000:]
        summary = json.loads(out)
        recovered = summary["recovered"]
        assert f"pid {holder.pid}" in recovered["leases"][parse_registry(f"path:{zoo}").spec]
        assert len(recovered["mlflow_runs_killed"]) == 1
        assert summary["audited"] + summary["already_audited"] == len(NAMES)
        assert summary["already_audited"] >= 1  # what the killed audit finished stays done
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()
        for pid in _alive(ours):
            os.kill(pid, signal.SIGKILL)
    verdicts = read_verdicts(store)
    assert sorted(verdicts["repo_id"]) == NAMES  # every model exactly one row
    assert set(verdicts["status"]) == {"clean"}
    assert _running_mlflow_runs(store) == []
    assert not lease_file.exists()  # given back by the audit that finished
