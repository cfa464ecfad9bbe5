"""The evaluation as a job: its rows through the shared `record`, and through the shared
fan-out a pair hung past its timeout becomes an `error` row while the others finish."""

import pytest

from sanitator.downstream.evaluation_job import EvaluationJob
from sanitator.downstream.runs import (
    EvaluationOutcome,
    EvaluationRequest,
    TaskChoice,
    evaluation_config,
    read_evaluations,
)
from sanitator.pipeline import fanout
from sanitator.pipeline.jobs import record
from sanitator.pipeline.registries import ModelRef

CONFIG = evaluation_config()


def _request(name: str) -> EvaluationRequest:
    ref = ModelRef("path", "path:/zoo", name, "r" * 40, f"/zoo/{name}")
    return EvaluationRequest(f"eval-{name}", ref, TaskChoice("sst2"), CONFIG, "hash", None)


class StuckExecutor:
    """`stuck*` pairs never finish; the others finish on the first wait (40 s a wait)."""

    def __init__(self):
        self.now, self.abandoned = 0.0, []

    def submit(self, request):
        return request.ref.repo_id

    def wait(self, handles, timeout):
        self.now += 40.0
        return [h for h in handles if "stuck" not in h]

    def outcome(self, handle):
        return EvaluationOutcome("ok", result={"clean_accuracy": 0.9}, attack="none",
                                 triggers=["cf"])

    def running(self, handles):
        return {h: 0.0 for h in handles if "stuck" in h}

    def abandon(self, handles):
        self.abandoned += handles


def test_a_hung_pair_is_an_error_row_and_the_others_are_written(tmp_path, monkeypatch):
    monkeypatch.setattr(fanout, "HANG_GRACE_SECONDS", 60.0)
    job, executor = EvaluationJob(str(tmp_path), [TaskChoice("sst2")], CONFIG), StuckExecutor()
    rows = fanout.fan_out(job, [_request(n) for n in ("fine-1", "stuck-1", "fine-2")],
                          executor, lambda r, o: record(job, r, o, str(tmp_path)),
                          timeout=30.0, clock=lambda: executor.now)
    stored = read_evaluations(tmp_path).set_index("encoder")
    assert sorted(stored.index) == ["fine-1", "fine-2", "stuck-1"] and len(rows) == 3
    assert (stored.loc[["fine-1", "fine-2"], "status"] == "ok").all()
    stuck = stored.loc["stuck-1"]
    assert stuck["status"] == "error" and "hung in native code" in stuck["reason"]
    assert not stuck["retryable"]  # as an evaluation's timeout: not evaluated again
    assert executor.abandoned == ["stuck-1"]


def test_timeouts_and_spent_retries_read_as_before():
    job = EvaluationJob()
    assert job.failure(TimeoutError(), 60).reason == "timed out after 60 s (per-pair timeout)"
    assert not job.failure(TimeoutError(), 60).retryable
    from sanitator.pipeline.jobs import TransientJobError

    spent = job.failure(TransientJobError("fetch failed"), 60)
    assert spent.reason == "fetch failed (retries exhausted)" and spent.retryable


def test_a_row_that_does_not_fit_the_schema_becomes_an_error_row(tmp_path):
    class OddJob(EvaluationJob):
        def rows(self, request, outcome, *, at, batch_id=None):
            rows = super().rows(request, outcome, at=at, batch_id=batch_id)
            if outcome.status == "ok":
                rows.row["surprise"] = 1  # a column the schema does not know
            return rows

    row = record(OddJob(), _request("odd"), EvaluationOutcome("ok"), str(tmp_path))
    assert row["status"] == "error" and "could not be stored" in row["reason"]
    assert read_evaluations(tmp_path)["status"].tolist() == ["error"]


def test_a_failed_write_raises_and_tracks_nothing_behind(tmp_path):
    class Tracker:
        def __init__(self):
            self.discarded = []

        def discard(self, run_id):
            self.discarded.append(run_id)

    class TrackedJob(EvaluationJob):
        def track(self, tracker, request, outcome, row, parent_run_id=None):
            return "run-1"

    not_a_folder = tmp_path / "store"
    not_a_folder.write_text("a file where the store should be")
    tracker = Tracker()
    with pytest.raises(OSError):
        record(TrackedJob(), _request("x"), EvaluationOutcome("ok"), str(not_a_folder),
               tracker)
    assert tracker.discarded == ["run-1"]
