"""Worker-side helpers of tasks/jobs.py. HostShare, on a real Dask cluster: a run's torch
threads follow how many workers on its host are busy, so the last run of a batch gets the
whole machine, but never cores that other processes keep busy. The heartbeat filter: a
scheduler gone at shutdown is one line, not a traceback."""

import threading

import pytest
import torch

BARRIER = threading.Barrier(2, timeout=60)
THREADS = torch.get_num_threads()


def _share(cores: int, wait: bool, foreign: float | None = 0.0) -> int:
    from distributed import get_worker

    from tasks.jobs import HostShare

    if wait:
        BARRIER.wait()   # both runs are on their workers now
    HostShare(get_worker(), cores, load=lambda: foreign)()
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


def test_a_lone_run_leaves_the_cores_other_processes_use(client):
    torch.set_num_threads(1)  # in-process workers: the runs share this process's setting
    try:
        # one of two cores busy elsewhere: a second thread would fight it (FINDINGS.md §2)
        assert client.submit(_share, 2, False, 1.0, pure=False).result() == 1
        assert client.submit(_share, 4, False, 1.0, pure=False).result() == 3
        # no measurement yet (under a second since the last): no growth on a guess
        assert client.submit(_share, 4, False, None, pure=False).result() == 1
    finally:
        torch.set_num_threads(THREADS)


def test_foreign_load_counts_a_busy_child_process():
    import subprocess
    import sys

    from tasks.jobs import ForeignLoad

    load = ForeignLoad()
    assert load() is None  # too soon to tell
    spin = "import time\nend = time.time() + 2.0\nwhile time.time() < end: pass"
    subprocess.run([sys.executable, "-c", spin], check=True, timeout=60)
    assert load() >= 0.5  # the child kept about one core busy for most of the window


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
