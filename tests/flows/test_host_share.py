"""HostShare on a real Dask cluster: a run's torch threads follow how many workers on its
host are busy, so the last run of a batch gets the whole machine."""

import threading

import pytest
import torch

BARRIER = threading.Barrier(2, timeout=60)


def _share(cores: int, wait: bool) -> int:
    from distributed import get_worker

    from tasks.jobs import HostShare

    if wait:
        BARRIER.wait()   # both runs are on their workers now
    HostShare(get_worker(), cores)()
    threads = torch.get_num_threads()
    if wait:
        BARRIER.wait()   # neither finishes before the other has looked
    return threads


@pytest.fixture
def client():
    from distributed import Client, LocalCluster

    # threads, not processes: the runs share this module's barrier
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        yield client


def test_a_lone_run_takes_every_core_and_two_runs_split_them(client):
    alone = client.submit(_share, 4, False, pure=False).result()
    both = client.gather([client.submit(_share, 4, True, pure=False) for _ in range(2)])
    assert alone == 4
    assert both == [2, 2]
