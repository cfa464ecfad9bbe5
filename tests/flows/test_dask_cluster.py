"""The LocalCluster `sanitator audit` starts beside its Prefect API (flows.dask_cluster)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import distributed
import psutil
import pytest

from flows import dask_cluster, dask_jobs

ROOT = Path(__file__).resolve().parents[2]


def _warmed_up() -> bool:
    """WarmUp.setup ran to its end: its imports done, its log filter in place."""
    import logging

    filters = logging.getLogger("distributed.worker").filters
    return "transformers.models.auto" in sys.modules and any(
        getattr(f, "__name__", "") == "_quiet_heartbeat_failure" for f in filters)


def test_local_dask_starts_warm_workers_in_the_background_and_is_ours(monkeypatch):
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    cluster = dask_cluster.LocalDask(dask_cluster.local_cluster_kwargs(
        1, torch_threads=1, gpu=False, api_url="http://127.0.0.1:9/api"))
    try:
        address = cluster.address()
        assert address in dask_cluster.OWN_ADDRESSES  # runs there are paced: the host is ours
        with distributed.Client(address) as client:
            assert len(client.scheduler_info()["workers"]) == 1
            keys = ("OMP_NUM_THREADS", "PREFECT_API_URL", "MALLOC_TRIM_THRESHOLD_")
            env = client.run(lambda: {key: os.environ.get(key) for key in keys})
            # glibc's own malloc thresholds, not Dask's trim setting (a 30 % slower scan)
            assert list(env.values()) == [{"OMP_NUM_THREADS": "1",
                                           "PREFECT_API_URL": "http://127.0.0.1:9/api",
                                           "MALLOC_TRIM_THRESHOLD_": None}]
            # the warm-up goes on in the background once the address is handed out
            deadline = time.monotonic() + 120
            while not all(client.run(_warmed_up).values()):
                assert time.monotonic() < deadline, "the workers were never warmed up"
                time.sleep(0.2)
            # forked from the server that imported torch once, not started afresh
            parent = client.run(lambda: " ".join(psutil.Process().parent().cmdline()))
            assert all("multiprocessing.forkserver" in line for line in parent.values())
            # a zero-second wait still reports what finished (the fan-out reads those
            # before it restarts a hung run's worker)
            done = client.submit(int, 1)
            done.result()
            executor = dask_jobs.DaskExecutor(client, None, None, {}, False, None)
            assert executor.wait([done], 0) == [done]
    finally:
        cluster.close()
    assert address not in dask_cluster.OWN_ADDRESSES
    cluster.close()  # twice is harmless: the CLI closes on every path


def test_a_cluster_that_cannot_start_says_so_when_its_address_is_asked():
    cluster = dask_cluster.LocalDask({"n_workers": 1, "processes": True,
                                   "dashboard_address": None, "no_such_option": True})
    with pytest.raises(RuntimeError, match="local Dask cluster did not start"):
        cluster.address()
    cluster.close()


def test_the_forkserver_ends_with_the_process_that_started_it(tmp_path):
    """Killed at exit (it has nothing to flush) rather than left to tear down its imports
    behind the command with the command's output still open."""
    script = ("import multiprocessing.forkserver as forkserver\n"
              "from flows import dask_cluster\n"
              "dask_cluster.fresh_forkserver()\n"
              "print(forkserver._forkserver._forkserver_pid)\n")
    out = tmp_path / "out.txt"
    with out.open("w") as stdout:  # waits for the process only, not for whoever holds stdout
        done = subprocess.run([sys.executable, "-c", script], stdout=stdout, cwd=ROOT,
                              timeout=300, check=False)
    assert done.returncode == 0
    pid = int(out.read_text().split()[-1])
    with pytest.raises(ProcessLookupError):  # stopped and reaped before its parent ended
        os.kill(pid, 0)
