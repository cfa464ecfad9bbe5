"""Watching an audit (sanitator/pipeline/progress.py): per-registry counts from the plan and
each recorded row, the log lines of a scheduled run, the lines redrawn on a terminal."""

import io
import logging

from sanitator.core.status import STATUSES
from sanitator.pipeline import progress
from sanitator.pipeline.audit import AuditOutcome, AuditPolicy, AuditRequest
from sanitator.pipeline.audit_job import AuditJob
from sanitator.pipeline.jobs import record
from sanitator.pipeline.registries import ModelRef


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _request(repo, registry="path:/zoo", audit_id=None):
    ref = ModelRef("path", registry, repo, "r" * 40, f"/zoo/{repo}")
    return AuditRequest(audit_id or f"id-{repo}", ref, {}, "c" * 16)


def _row(request, status, seconds=2.0):
    return {"audit_id": request.audit_id, "registry": request.ref.registry,
            "repo_id": request.ref.repo_id, "status": status, "seconds": seconds}


class Lines(list):
    def info(self, message, *args):
        self.append(message % args)


def _plan_and_listen(listener):
    """Two audits and two rows settled from the listing in one registry, one registry
    that could not be listed; the plan published as the flow publishes it."""
    todo = [_request("a"), _request("b")]
    settled_now = [_request("no-weights-1"), _request("no-weights-2")]
    already = [_request("old").ref]
    with progress.listening(listener):
        progress.publish_plan(["path:/zoo", "hf:gone"], todo, settled_now, already,
                              notes={"hf:gone": "could not be listed: 503"})
        yield todo, settled_now


def test_one_log_line_per_audited_model_and_one_for_the_listings_rows():
    clock, lines = Clock(), Lines()
    listener = progress.LogLines(lines, progress.AuditProgress(clock))
    plan = _plan_and_listen(listener)
    todo, settled_now = next(plan)
    for request in settled_now:
        clock.now += 0.5
        progress.publish("audit", "row", _row(request, "error", 0.0))
    assert lines == ["path:/zoo: 2 row(s) settled from the listing without a download; "
                     "2/4 models (+1 already audited): 2 error; 1s elapsed, ETA --"]
    clock.now += 29
    progress.publish("audit", "row", _row(todo[0], "clean", 29.5))
    progress.publish("evaluation", "row", {"registry": "path:/zoo"})  # not an audit's
    clock.now += 30
    progress.publish("audit", "row", _row(todo[1], "backdoored", 29.0))
    assert lines[1:] == [
        "path:/zoo a: clean in 29.5 s; 3/4 models (+1 already audited): 1 clean, 2 error; "
        "30s elapsed, ETA 30s",
        "path:/zoo b: backdoored in 29.0 s; 4/4 models (+1 already audited): 1 clean, "
        "1 backdoored, 2 error; 1m00s elapsed, ETA 0s"]
    plan.close()


def test_the_terminal_shows_one_line_per_registry_redrawn_in_place():
    clock, stream = Clock(), io.StringIO()
    bars = progress.TtyBars(stream, progress.AuditProgress(clock, waiting=["path:/zoo"]),
                            interval=60, width=200)
    assert bars.lines() == ["path:/zoo: starting (Prefect API, Dask cluster), then the crawl"]
    plan = _plan_and_listen(bars)
    todo, _ = next(plan)
    handler = logging.StreamHandler(stream)
    logging.getLogger().addHandler(handler)
    try:
        with bars:
            clock.now += 10
            progress.publish("audit", "row", _row(todo[0], "clean"))
            logging.getLogger("sanitator.test").warning("a warning meanwhile")
    finally:
        logging.getLogger().removeHandler(handler)
    plan.close()
    screen = stream.getvalue()
    last = screen.split("\x1b[J")[-1].splitlines()
    # the warning went above the lines, which were drawn again below it
    assert last == ["path:/zoo [#####...............] 1/4 models (+1 already audited): "
                    "1 clean; 10s elapsed, ETA 10s",
                    "hf:gone: could not be listed: 503"]
    assert "\x1b[2F\x1b[Ja warning meanwhile\npath:/zoo [#####" in screen
    assert handler.emit.__func__ is logging.StreamHandler.emit  # given back at the end


def test_every_status_is_counted_in_the_one_order():
    counts = progress.counts_text(progress.Counter({s: 1 for s in reversed(STATUSES)}))
    assert counts == ", ".join(f"1 {s}" for s in STATUSES)
    assert progress.counts_text(progress.Counter()) == "nothing yet"
    assert [progress.clock(s) for s in (None, 42, 185, 3725)] == ["--", "42s", "3m05s", "1h02m"]


def test_record_publishes_each_row_it_writes_and_a_failing_listener_costs_nothing(tmp_path):
    seen = []

    def broken(kind, event, data):
        raise RuntimeError("a listener bug")

    job = AuditJob({}, "c" * 16, "cpu", AuditPolicy())
    request = _request("a")
    from sanitator.detect.results import Verdict

    with progress.listening(broken), progress.listening(lambda *e: seen.append(e)):
        row = record(job, request, AuditOutcome(Verdict("error", reason="no weights")),
                     str(tmp_path))
    assert seen == [("audit", "row", row)] and row["status"] == "error"
    assert list((tmp_path / "verdicts").rglob("*.parquet"))
