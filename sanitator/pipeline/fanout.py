"""The one fan-out of both flows: submit one run per request, record each outcome as soon
as it arrives, and give up on runs stuck past their timeout (the hang backstop).

It is written against `Executor`, the few things it needs from a cluster, so that it holds
no Prefect or Dask (flows/dask_jobs.py adapts Prefect tasks on Dask; the tests use a fake).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, Protocol

from sanitator.pipeline.jobs import Job

log = logging.getLogger(__name__)

# Extra time, beyond the per-item timeout, before a running job counts as hung: a task's
# own timeout fires between Python bytecodes and cannot stop a stuck C call.
HANG_GRACE_SECONDS = 60.0


class Executor(Protocol):
    def submit(self, request: Any) -> Hashable:
        """Start one run; returns its handle."""

    def wait(self, handles: Sequence[Hashable], timeout: float) -> Iterable[Hashable]:
        """The handles that finished, waiting at most `timeout` s for the first one; with
        0, those finished already, without waiting."""

    def outcome(self, handle: Hashable) -> Any:
        """The run's outcome, or the exception it ended with (never raises). Read once per
        handle: the executor may release the run then."""

    def running(self, handles: Sequence[Hashable]) -> dict[Hashable, float]:
        """Handles executing now on the worker where they announced their start, with that
        start (epoch seconds); a run rescheduled elsewhere is timed from its new start."""

    def abandon(self, handles: Sequence[Hashable]) -> None:
        """Stop waiting for these runs and free their workers (a restart)."""


def poll_seconds(timeout: float | None) -> float:
    """How often to look for hung runs: a fraction of the timeout, within [1 s, 30 s]."""
    return min(30.0, max(1.0, (timeout or 120.0) / 4))


def hung(executor: Executor, handles: Sequence[Hashable], timeout: float | None,
         now: float) -> list[Hashable]:
    """Handles whose run has been executing past timeout + grace on the same worker: the
    task's own timeout would have ended it by then, so only a worker restart frees it."""
    if not timeout or not handles:
        return []
    limit = timeout + HANG_GRACE_SECONDS
    return [handle for handle, started in executor.running(handles).items()
            if now - started > limit]


def fan_out(job: Job, requests: Iterable[Any], executor: Executor,
            record: Callable[[Any, Any], dict[str, Any]], *, timeout: float | None = None,
            logger: Any = None, clock: Callable[[], float] = time.time) -> list[dict[str, Any]]:
    """Run every request on `executor` and `record(request, outcome)` each as it finishes;
    returns the recorded rows. An exception instead of an outcome (timeout, spent retries,
    a lost worker) and a run hung past `timeout` + HANG_GRACE_SECONDS become the job's
    error outcomes, so every request ends in exactly one row. A request that waits for
    others (`job.waits_for`) is submitted once their rows are recorded (`job.ready`), in
    the same fan-out, so the workers run whatever else is ready meanwhile."""
    logger = logger or log
    waiting = []
    pending: dict[Hashable, Any] = {}
    for request in requests:
        if job.waits_for(request):
            waiting.append(request)
        else:
            pending[executor.submit(request)] = request
    needed = {rid for request in waiting for rid in job.waits_for(request)}
    results: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []

    def recorded(request: Any, row: dict[str, Any]) -> None:
        rows.append(row)
        if job.request_id(request) in needed:
            results[job.request_id(request)] = row

    def release() -> None:
        # once nothing runs, a request whose rows cannot come (an id not in this run)
        # goes with what there is rather than never
        for request in list(waiting):
            wanted = job.waits_for(request)
            if not pending or all(rid in results for rid in wanted):
                waiting.remove(request)
                request = job.ready(request, {rid: results.get(rid) for rid in wanted})
                pending[executor.submit(request)] = request

    def record_finished(wait_seconds: float) -> None:
        for handle in executor.wait(list(pending), wait_seconds):
            request = pending.pop(handle)
            outcome = executor.outcome(handle)
            if isinstance(outcome, BaseException):
                outcome = job.failure(outcome, timeout)
            recorded(request, record(request, outcome))

    release()
    while pending:
        record_finished(poll_seconds(timeout))
        stuck = hung(executor, list(pending), timeout, clock())
        for handle in stuck:
            request = pending.pop(handle)
            logger.error("%s still running %ss past its timeout; recorded as error",
                         job.label(request), HANG_GRACE_SECONDS)
            recorded(request, record(request, job.hung(timeout)))
        if stuck:
            # read what finished meanwhile first: a result left on a worker being
            # restarted is lost, and Dask would run it again
            record_finished(0)
            executor.abandon(stuck)
        release()
    return rows
