"""Worker-side helpers of tasks/jobs.py. HostShare, on a real Dask cluster: a run's torch
threads follow how many workers on its host are busy, so the last run of a batch gets the
whole machine. The heartbeat filter: a scheduler gone at shutdown is one line, not a
traceback."""

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


def test_a_heartbeat_that_finds_the_scheduler_gone_logs_one_line_without_a_traceback():
    import logging
    import sys

    from tasks.jobs import _quiet_heartbeat_failure

    try:
        raise OSError("Stream is closed")
    except OSError:
        info = sys.exc_info()
    heartbeat = logging.LogRecord("distributed.worker", logging.ERROR, __file__, 1,
                                  "Failed to communicate with scheduler during heartbeat.",
                                  None, info)
    other = logging.LogRecord("distributed.worker", logging.ERROR, __file__, 1,
                              "Compute Failed", None, info)
    assert _quiet_heartbeat_failure(heartbeat) and _quiet_heartbeat_failure(other)
    assert heartbeat.exc_info is None and "Traceback" not in logging.Formatter().format(heartbeat)
    assert other.exc_info is info  # every other record keeps its traceback


def test_prefects_worker_thread_timeout_warning_is_dropped_and_nothing_else():
    import logging

    from tasks.jobs import _quiet_thread_timeout_warning

    # the message as prefect.task_engine logs it (its %s is the task's timeout)
    thread = logging.LogRecord(
        "prefect.task_runs", logging.WARNING, __file__, 1,
        "Timeout of %s seconds configured for this task, but the task is running in a "
        "worker thread. Timeouts in worker threads cannot interrupt blocking operations",
        (3600.0,), None)
    other = logging.LogRecord("prefect.task_runs", logging.WARNING, __file__, 1,
                              "Task run %s timed out", ("audit x",), None)
    assert not _quiet_thread_timeout_warning(thread)
    assert _quiet_thread_timeout_warning(other)
