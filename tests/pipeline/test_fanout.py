"""The one fan-out (sanitator.pipeline.fanout) on a fake executor: outcomes are recorded as
they arrive, exceptions become error outcomes, and a run stuck past its timeout is given
up as an error row while the others finish (the hang backstop)."""

from dataclasses import dataclass

from sanitator.pipeline import fanout
from sanitator.pipeline.jobs import Job, TransientJobError


@dataclass
class Outcome:
    status: str
    reason: str | None = None
    retryable: bool = False


class EchoJob(Job):
    kind, unit = "echo", "item"

    def plan(self, refs, history, *, force=False): ...
    def run(self, request, *, work_dir=None): ...
    def rows(self, request, outcome, *, at, batch_id=None): ...
    def track(self, tracker, request, outcome, row, parent_run_id=None): ...

    def failed(self, reason, *, retryable):
        return Outcome("error", reason, retryable)

    def request_id(self, request):
        return request

    def label(self, request):
        return request

    def reason(self, outcome):
        return outcome.reason


class FakeExecutor:
    """Requests named `stuck*` run forever on their worker; `lost*` end in an exception;
    the others finish on the first wait. Time moves 40 s per wait."""

    def __init__(self):
        self.now, self.abandoned, self.started = 0.0, [], {}

    def clock(self):
        return self.now

    def submit(self, request):
        self.started[request] = self.now
        return request

    def wait(self, handles, timeout):
        self.now += 40.0
        return [h for h in handles if not h.startswith("stuck")]

    def outcome(self, handle):
        if handle.startswith("lost"):
            return TransientJobError("fetch failed")
        return Outcome("ok")

    def running(self, handles):
        return {h: self.started[h] for h in handles if h.startswith("stuck")}

    def abandon(self, handles):
        self.abandoned += handles


def test_a_hung_run_ends_as_an_error_row_while_the_others_finish(monkeypatch):
    monkeypatch.setattr(fanout, "HANG_GRACE_SECONDS", 60.0)
    executor, recorded = FakeExecutor(), []
    rows = fanout.fan_out(EchoJob(), ["a", "stuck-1", "lost-1", "b"], executor,
                          lambda request, outcome: recorded.append((request, outcome)) or
                          {"request": request, "status": outcome.status},
                          timeout=30.0, clock=executor.clock)
    by_request = dict(recorded)
    assert sorted(by_request) == ["a", "b", "lost-1", "stuck-1"]  # one row each
    assert by_request["a"].status == by_request["b"].status == "ok"
    assert by_request["lost-1"] == Outcome("error", "fetch failed (retries exhausted)", True)
    stuck = by_request["stuck-1"]
    assert stuck.status == "error" and "hung in native code" in stuck.reason
    assert stuck.retryable  # the next run tries again
    assert executor.abandoned == ["stuck-1"]
    assert executor.now >= 30.0 + 60.0  # given up only past timeout + grace
    assert len(rows) == 4


class LateExecutor(FakeExecutor):
    """`late*` runs finish just after the hung run was found and before its worker's
    restart, on that same worker."""

    def __init__(self):
        super().__init__()
        self.events, self.late_done = [], False

    def wait(self, handles, timeout):
        self.now += 40.0 if timeout else 0.0
        return [h for h in handles if not h.startswith("stuck")
                and (self.late_done or not h.startswith("late"))]

    def running(self, handles):
        found = super().running(handles)
        self.late_done = self.late_done or any(self.now - t > 90.0 for t in found.values())
        return found

    def outcome(self, handle):
        self.events.append(("read", handle))
        return super().outcome(handle)

    def abandon(self, handles):
        self.events.append(("restart", list(handles)))
        super().abandon(handles)


def test_runs_finished_when_a_hung_worker_restarts_are_read_first(monkeypatch):
    """A result still unread on a restarted worker is lost and Dask would scan it again."""
    monkeypatch.setattr(fanout, "HANG_GRACE_SECONDS", 60.0)
    executor = LateExecutor()
    rows = fanout.fan_out(EchoJob(), ["late-1", "stuck-1"], executor,
                          lambda request, outcome: {"request": request,
                                                    "status": outcome.status},
                          timeout=30.0, clock=executor.clock)
    assert executor.events == [("read", "late-1"), ("restart", ["stuck-1"])]
    assert {row["request"]: row["status"] for row in rows} == {"late-1": "ok",
                                                               "stuck-1": "error"}


def test_without_a_timeout_nothing_counts_as_hung():
    executor = FakeExecutor()
    executor.submit("stuck-1")
    assert fanout.hung(executor, ["stuck-1"], None, now=1e9) == []
    assert fanout.hung(executor, ["stuck-1"], 10.0, now=69.0) == []
    assert fanout.hung(executor, ["stuck-1"], 10.0, now=71.0) == ["stuck-1"]


def test_failures_name_the_job_unit_and_say_whether_to_retry():
    job = EchoJob()
    timed_out = job.failure(TimeoutError(), 8)
    assert timed_out == Outcome("error", "timed out after 8 s (per-item timeout)", True)
    crashed = job.failure(RuntimeError("boom"), 8)
    assert crashed.reason == "worker lost or task crashed: RuntimeError: boom"
    assert crashed.retryable


def test_poll_is_a_fraction_of_the_timeout_within_bounds():
    assert fanout.poll_seconds(None) == 30.0
    assert fanout.poll_seconds(2) == 1.0
    assert fanout.poll_seconds(40) == 10.0


class WaitingJob(EchoJob):
    """`a<-b` waits for `a`; what it was given is kept."""

    def __init__(self):
        self.given = {}

    def waits_for(self, request):
        return tuple(request.split("<-")[1].split("+")) if "<-" in request else ()

    def ready(self, request, rows):
        self.given[request] = rows
        return request


class OrderedExecutor(FakeExecutor):
    """Finishes one run per wait, oldest first; records the submission order."""

    def __init__(self):
        super().__init__()
        self.submitted = []

    def submit(self, request):
        self.submitted.append(request)
        return super().submit(request)

    def wait(self, handles, timeout):
        self.now += 1.0
        return handles[:1]


def test_a_request_waits_for_the_rows_it_needs_while_the_rest_run():
    executor, job = OrderedExecutor(), WaitingJob()
    rows = fanout.fan_out(job, ["ft<-base", "base", "other", "ft2<-base+other", "orphan<-gone"],
                          executor, lambda request, outcome: {"request": request,
                                                              "status": outcome.status},
                          clock=executor.clock)
    # the independent runs go first; each waiting one as soon as its rows are in, and one
    # waiting for a request this fan-out does not hold goes once nothing else runs
    assert executor.submitted == ["base", "other", "ft<-base", "ft2<-base+other",
                                  "orphan<-gone"]
    assert job.given["ft<-base"] == {"base": {"request": "base", "status": "ok"}}
    assert set(job.given["ft2<-base+other"]) == {"base", "other"}
    assert job.given["orphan<-gone"] == {"gone": None}
    assert len(rows) == 5
