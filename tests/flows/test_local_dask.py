"""The LocalCluster `sanitator audit` starts beside its Prefect API (flows.dask_jobs)."""

import os
import sys

import distributed
import psutil
import pytest

from flows import dask_jobs


def test_local_dask_starts_warm_workers_in_the_background_and_is_ours(monkeypatch):
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    cluster = dask_jobs.LocalDask(dask_jobs.local_cluster_kwargs(
        1, torch_threads=1, gpu=False, api_url="http://127.0.0.1:9/api"))
    try:
        address = cluster.address()
        assert address in dask_jobs._OWN_ADDRESSES  # runs there are paced: the host is ours
        with distributed.Client(address) as client:
            assert len(client.scheduler_info()["workers"]) == 1
            keys = ("OMP_NUM_THREADS", "PREFECT_API_URL", "MALLOC_TRIM_THRESHOLD_")
            env = client.run(lambda: {key: os.environ.get(key) for key in keys})
            # glibc's own malloc thresholds, not Dask's trim setting (a 30 % slower scan)
            assert list(env.values()) == [{"OMP_NUM_THREADS": "1",
                                           "PREFECT_API_URL": "http://127.0.0.1:9/api",
                                           "MALLOC_TRIM_THRESHOLD_": None}]
            # the warm-up ran before the address was handed out
            assert list(client.run(lambda: "transformers" in sys.modules).values()) == [True]
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
    assert address not in dask_jobs._OWN_ADDRESSES
    cluster.close()  # twice is harmless: the CLI closes on every path


def test_a_cluster_that_cannot_start_says_so_when_its_address_is_asked():
    cluster = dask_jobs.LocalDask({"n_workers": 1, "processes": True,
                                   "dashboard_address": None, "no_such_option": True})
    with pytest.raises(RuntimeError, match="local Dask cluster did not start"):
        cluster.address()
    cluster.close()
