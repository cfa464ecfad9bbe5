"""One contract for the audit and the downstream evaluation: plan -> run -> rows -> track.

A job is one kind of per-model work the flows fan out (`AuditJob` in `pipeline/audit_job.py`,
`EvaluationJob` in `downstream/evaluation_job.py`). Its steps:

- `plan(refs, history)`: what to run (requests), what the plan itself settles (an outcome
  recorded without a run) and what an earlier row already settles; a request may wait
  for other requests' rows (`waits_for`, then `ready` once they are in);
- `run(request)` on a worker: never raises; a failure is an error outcome with a reason and
  a `retryable` flag;
- `rows(request, outcome)`: the store rows, the last one the commit mark;
- `track(tracker, request, outcome, row)`: the MLflow run that mirrors the row.

`record` (here) and the fan-out (`pipeline/fanout.py`) are written once against this
contract; Prefect and Dask stay in tasks/ and flows/.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from sanitator.pipeline.progress import publish
from sanitator.pipeline.store import (
    SCHEMAS,
    StoreError,
    audit_date,
    to_table,
    utc_now,
    write_rows,
)

log = logging.getLogger(__name__)

R = TypeVar("R")  # a request: plain picklable data shipped to a worker
O = TypeVar("O")  # an outcome: what the worker sends back  # noqa: E741


class TransientJobError(RuntimeError):
    """A run whose outcome another try may change: the run task raises it so that the
    orchestrator's retries apply; once they are spent the fan-out records an error row.
    It lives here, not in tasks/, because the fan-out has to recognise it."""


@dataclass
class JobPlan(Generic[R, O]):
    todo: list[R] = field(default_factory=list)                # to run on workers
    settled_now: list[tuple[R, O]] = field(default_factory=list)  # recorded without a run
    settled: list[Any] = field(default_factory=list)           # an earlier row stands: no row
    unavailable: list[tuple[str, str]] = field(default_factory=list)  # (repo id, why): no row


@dataclass
class Rows:
    """What one outcome writes: `before` (dataset, rows, schema) first, then `row` into
    `dataset`; the last write is the commit mark of the job (sanitator.pipeline.store)."""

    dataset: str
    row: dict[str, Any]
    schema: Any = None                # None: the dataset's registered schema
    before: list[tuple[str, list[dict[str, Any]], Any]] = field(default_factory=list)

    def check(self) -> None:
        """Raise StoreError when a row does not fit its dataset's schema."""
        for dataset, rows, schema in [*self.before, (self.dataset, [self.row], self.schema)]:
            if rows:
                to_table(dataset, rows, schema if schema is not None else SCHEMAS[dataset])


class Job(ABC, Generic[R, O]):
    """One kind of per-model work; see the module docstring for the steps."""

    kind: ClassVar[str]               # "audit" | "evaluation": names its logs and reasons
    unit: ClassVar[str]               # what one request is ("model" | "pair"), in reasons
    # a timed-out run: retried by the next flow run? (an audit yes, an evaluation no)
    timeout_retryable: ClassVar[bool] = True

    @abstractmethod
    def plan(self, refs: Iterable[Any], history: Iterable[dict[str, Any]], *,
             force: bool = False) -> JobPlan[R, O]: ...

    @abstractmethod
    def run(self, request: R, *, work_dir: str | None = None) -> O:
        """Do the work on a worker; never raises."""

    @abstractmethod
    def failed(self, reason: str, *, retryable: bool) -> O:
        """The error outcome of a run that never reported back or cannot be stored."""

    @abstractmethod
    def rows(self, request: R, outcome: O, *, at: dt.datetime,
             batch_id: str | None = None) -> Rows: ...

    @abstractmethod
    def track(self, tracker: Any, request: R, outcome: O, row: dict[str, Any],
              parent_run_id: str | None = None) -> str:
        """Log the MLflow run of one outcome; returns its run id."""

    @abstractmethod
    def request_id(self, request: R) -> str: ...

    @abstractmethod
    def label(self, request: R) -> str: ...

    @abstractmethod
    def reason(self, outcome: O) -> str | None: ...

    def retryable(self, outcome: O) -> bool:
        return bool(getattr(outcome, "retryable", False))

    def waits_for(self, request: R) -> tuple[str, ...]:
        """Request ids whose rows this request needs before it runs (an audit waits for
        its declared base's verdict); the fan-out holds it back until they are recorded."""
        return ()

    def ready(self, request: R, rows: dict[str, dict[str, Any] | None]) -> R:
        """The request to run, given the rows it waited for (None: no row came)."""
        return request

    def failure(self, exc: BaseException, timeout: float | None) -> O:
        """The outcome of a run that ended in an exception instead of an outcome."""
        if isinstance(exc, TimeoutError):
            # not retried within this flow run: it would time out again on the same cluster
            return self.failed(f"timed out after {timeout:g} s (per-{self.unit} timeout)",
                               retryable=self.timeout_retryable)
        if isinstance(exc, TransientJobError):
            return self.failed(f"{exc} (retries exhausted)", retryable=True)
        return self.failed(f"worker lost or task crashed: {type(exc).__name__}: {exc}",
                           retryable=True)

    def hung(self, timeout: float) -> O:
        """The outcome of a run stuck past its timeout, whose worker the fan-out restarts."""
        return self.failed(f"timed out after {timeout:g} s and did not stop (hung in native "
                           "code); its worker was restarted", retryable=self.timeout_retryable)


# One writer at a time in a process, whichever thread records (`Backlog`): the store's
# files and a sqlite MLflow database see one write after another.
_WRITING = threading.RLock()


def record(job: Job, request: Any, outcome: Any, store: str, tracker: Any | None = None,
           parent_run_id: str | None = None, batch_id: str | None = None) -> dict[str, Any]:
    """Track one outcome in MLflow, then write its rows (atomically); returns the last row.

    Rows that do not fit the store's schemas become the job's plain error outcome, so every
    request leaves exactly one row. The MLflow run is logged only for rows that can be
    written, and deleted again when the write fails: MLflow never holds a run the store
    does not. A tracking failure never costs the row (`mlflow_run_id` stays null).
    """
    with _WRITING:
        return _record(job, request, outcome, store, tracker, parent_run_id, batch_id)


def _record(job: Job, request: Any, outcome: Any, store: str, tracker: Any | None,
            parent_run_id: str | None, batch_id: str | None) -> dict[str, Any]:
    at = utc_now()
    rows = job.rows(request, outcome, at=at, batch_id=batch_id)
    try:
        rows.check()
    except StoreError as exc:
        log.error("the rows of %s do not fit the store (%s); recording an error instead",
                  job.label(request), exc)
        outcome = job.failed(f"the {job.kind}'s result could not be stored: {exc}",
                             retryable=False)
        rows = job.rows(request, outcome, at=at, batch_id=batch_id)
    if tracker is not None:
        try:
            rows.row["mlflow_run_id"] = job.track(tracker, request, outcome, rows.row,
                                                  parent_run_id)
        except Exception as exc:  # tracking is a mirror of the store: never lose a row to it
            log.warning("MLflow logging of %s failed: %s", job.label(request), exc)
    partition, name = audit_date(at), job.request_id(request)
    try:
        for dataset, before, schema in rows.before:
            write_rows(store, dataset, before, partition=partition, name=name, schema=schema)
        write_rows(store, rows.dataset, [rows.row], partition=partition, name=name,
                   schema=rows.schema)
    except Exception:
        if tracker is not None and rows.row.get("mlflow_run_id"):
            tracker.discard(rows.row["mlflow_run_id"])
        raise
    publish(job.kind, "row", rows.row)  # whoever watches the run (pipeline/progress.py)
    return rows.row


class Backlog:
    """The outcomes a plan settled without a run, recorded on a thread of their own while
    the runs go on (`with Backlog(...) as backlog: <fan out>`, then `backlog.rows`).

    Each such row is an MLflow run and a Parquet file, about 0.2 s with a sqlite MLflow
    (benchmarks/load.py): recorded first, thousands of repos without weights in a
    registry kept the workers waiting for minutes. `record` takes one lock, so the store
    and the MLflow database still see one writer at a time. A row that fails to record is
    tried twice more (as the record task is); then the backlog stops and the error is
    raised when the block ends (at once, if the block raised itself)."""

    RETRIES, RETRY_SECONDS = 2, 2.0

    def __init__(self, items: Iterable[tuple[Any, Any]],
                 record_one: Callable[[Any, Any], dict[str, Any]]):
        self.items = list(items)
        self.record_one = record_one
        self.rows: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="sanitator-backlog", daemon=True)

    def _run(self) -> None:
        for request, outcome in self.items:
            for attempt in range(self.RETRIES + 1):
                if self.stop.is_set():
                    return
                try:
                    self.rows.append(self.record_one(request, outcome))
                    break
                except Exception as exc:
                    if attempt == self.RETRIES:
                        self.error = exc
                        return
                    log.warning("recording a settled outcome failed (%s); trying again", exc)
                    time.sleep(self.RETRY_SECONDS)

    def __enter__(self) -> Backlog:
        if self.items:
            self.thread.start()
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            self.stop.set()
        if self.thread.ident is not None:  # started
            self.thread.join()
        if kind is None and self.error is not None:
            raise self.error
