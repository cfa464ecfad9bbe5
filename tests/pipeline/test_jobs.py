"""`Backlog` (sanitator/pipeline/jobs.py): what a plan settles is recorded on a thread while
the runs go on, one writer at a time, failures retried and then raised."""

import threading

import pytest

from sanitator.pipeline import jobs


def test_settled_outcomes_are_recorded_while_the_block_runs(monkeypatch):
    monkeypatch.setattr(jobs.Backlog, "RETRY_SECONDS", 0.0)
    started, threads, tries = threading.Event(), set(), {}

    def record_one(request, outcome):
        threads.add(threading.current_thread().name)
        tries[request] = tries.get(request, 0) + 1
        if request == "flaky" and tries[request] < 2:
            raise OSError("database is locked")
        with jobs._WRITING:  # the same lock `record` takes: re-entrant
            started.set()
            return {"id": request, "outcome": outcome}

    with jobs.Backlog([("a", 1), ("flaky", 2), ("b", 3)], record_one) as backlog:
        assert started.wait(30)  # recording began while the block (the fan-out) runs
    assert [row["id"] for row in backlog.rows] == ["a", "flaky", "b"]
    assert tries["flaky"] == 2 and threads == {"sanitator-backlog"}


def test_a_row_that_keeps_failing_stops_the_backlog_and_is_raised(monkeypatch):
    monkeypatch.setattr(jobs.Backlog, "RETRY_SECONDS", 0.0)
    calls = []

    def record_one(request, outcome):
        calls.append(request)
        if request == "bad":
            raise OSError("disk full")
        return {"id": request}

    with pytest.raises(OSError, match="disk full"), \
            jobs.Backlog([("a", 0), ("bad", 0), ("never", 0)], record_one):
        pass
    assert calls == ["a", "bad", "bad", "bad"]  # tried three times, the rest not begun
    with jobs.Backlog([], record_one) as empty:  # nothing settled: no thread at all
        pass
    assert empty.rows == [] and empty.thread.ident is None
