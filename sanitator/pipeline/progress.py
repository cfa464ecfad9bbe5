"""An audit watched as it goes: per registry, models done of the total, the statuses so
far, the time elapsed and an estimate of what is left.

The flow publishes its plan (`publish_plan`) and `jobs.record` publishes every row it
writes (`publish`); whoever listens in this process (`listening`) sees both, as they
happen, on the thread that records. Two listeners are built here: `LogLines`, one log line
per audited model (what a scheduled run leaves in its log; the rows the plan settles from
the listing get one line per registry), and `TtyBars`, one line per registry redrawn in
place on a terminal (`sanitator audit` at a tty). Listeners never cost a row: an exception
in one is logged and dropped.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from sanitator.core.status import STATUSES

log = logging.getLogger(__name__)

Listener = Callable[[str, str, Any], None]   # (job kind, event, data)
_listeners: list[Listener] = []
_lock = threading.Lock()


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[Listener]:
    with _lock:
        _listeners.append(listener)
    try:
        yield listener
    finally:
        with _lock:
            _listeners.remove(listener)


def publish(kind: str, event: str, data: Any) -> None:
    """Hand an event to every listener; a failing listener is logged, never raised."""
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        try:
            listener(kind, event, data)
        except Exception as exc:  # watching must never cost the audit anything
            log.warning("progress listener failed: %s: %s", type(exc).__name__, exc)


def publish_plan(registries: Iterable[str], todo: Iterable[Any],
                 settled_now: Iterable[Any], settled: Iterable[Any],
                 notes: dict[str, str] | None = None) -> None:
    """The audit's plan, per registry: the requests to audit (`.ref.registry`,
    `.audit_id`), the requests the plan settles at once, the refs an earlier row settles,
    and a note for a registry that is not audited (listing failed, another audit holds it)."""
    plan: dict[str, dict[str, Any]] = {spec: {"audits": set(), "rows": 0, "already": 0}
                                       for spec in registries}

    def entry(spec: str) -> dict[str, Any]:
        return plan.setdefault(spec, {"audits": set(), "rows": 0, "already": 0})

    for request in todo:
        item = entry(request.ref.registry)
        item["audits"].add(request.audit_id)
        item["rows"] += 1
    for request in settled_now:
        entry(request.ref.registry)["rows"] += 1
    for ref in settled:
        entry(ref.registry)["already"] += 1
    publish("audit", "plan", {"registries": plan, "notes": dict(notes or {})})


def clock(seconds: float | None) -> str:
    """42s, 3m05s, 1h02m; `--` when unknown."""
    if seconds is None:
        return "--"
    seconds = round(max(0.0, seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def counts_text(counts: Counter) -> str:
    """`9 clean, 1 backdoored, 2 error`: every status with a row, in the one order."""
    known = [f"{counts[status]} {status}" for status in STATUSES if counts.get(status)]
    other = [f"{n} {status}" for status, n in sorted(counts.items()) if status not in STATUSES]
    return ", ".join(known + other) or "nothing yet"


@dataclass
class RegistryProgress:
    registry: str
    rows: int = 0                      # rows this run writes for it
    already: int = 0                   # settled by earlier rows: no new row
    audits: set[str] = field(default_factory=set)  # audit ids run on workers
    done: int = 0
    audited: int = 0
    counts: Counter = field(default_factory=Counter)
    started: float = 0.0               # when watching began
    audits_from: float = 0.0           # the plan: the audits begin then
    note: str | None = None

    @property
    def settled_rows(self) -> int:
        return self.rows - len(self.audits)

    def eta(self, now: float) -> float | None:
        """Seconds left: the audits so far at the rate they came in (none yet: unknown)."""
        left = len(self.audits) - self.audited
        if left <= 0:
            return 0.0
        if not self.audited:
            return None
        return (now - self.audits_from) / self.audited * left

    def status(self, now: float) -> str:
        """`3/40 models (+2 already audited): 3 clean; 1m05s elapsed, ETA 14m02s`."""
        already = f" (+{self.already} already audited)" if self.already else ""
        return (f"{self.done}/{self.rows} models{already}: {counts_text(self.counts)}; "
                f"{clock(now - self.started)} elapsed, ETA {clock(self.eta(now))}")

    def line(self, now: float, bar: int = 0) -> str:
        if self.note:
            return f"{self.registry}: {self.note}"
        drawn = ""
        if bar:
            filled = int(bar * self.done / self.rows) if self.rows else bar
            drawn = f" [{'#' * filled}{'.' * (bar - filled)}]"
        return f"{self.registry}{drawn} {self.status(now)}"


class AuditProgress:
    """The state both listeners draw from: fed with `(kind, event, data)`. `waiting`:
    registries to show before the plan arrives (the crawl is under way)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 waiting: Iterable[str] = ()):
        self.clock = clock
        self.started = clock()
        self.registries: dict[str, RegistryProgress] = {
            spec: RegistryProgress(spec, started=self.started,
                                   note="starting (Prefect API, Dask cluster), then the crawl")
            for spec in waiting}

    def __call__(self, kind: str, event: str, data: Any) -> RegistryProgress | None:
        if kind != "audit":
            return None
        if event == "plan":
            now = self.clock()
            self.registries = {}
            for spec, item in data["registries"].items():
                self.registries[spec] = RegistryProgress(
                    spec, rows=item["rows"], already=item["already"],
                    audits=set(item["audits"]), started=self.started, audits_from=now)
            for spec, note in data.get("notes", {}).items():
                self.registries.setdefault(spec, RegistryProgress(spec, started=self.started))
                self.registries[spec].note = note
            return None
        if event == "row":
            entry = self.registries.get(data["registry"])
            if entry is None:  # a row outside the plan (an evaluation, a test): not ours
                return None
            entry.done += 1
            entry.counts[str(data["status"])] += 1
            if data["audit_id"] in entry.audits:
                entry.audited += 1
            return entry
        return None


class LogLines:
    """One line per audited model on `logger` (and one per registry for the rows the
    plan settles from the listing, once they are written)."""

    def __init__(self, logger: Any, progress: AuditProgress | None = None):
        self.logger = logger
        self.progress = progress or AuditProgress()
        self.settled_seen: Counter = Counter()

    def __call__(self, kind: str, event: str, data: Any) -> None:
        entry = self.progress(kind, event, data)
        if entry is None or event != "row":
            return
        now = self.progress.clock()
        if data["audit_id"] in entry.audits:
            seconds = data.get("seconds")
            took = f" in {seconds:.1f} s" if isinstance(seconds, int | float) else ""
            self.logger.info("%s %s: %s%s; %s", entry.registry, data["repo_id"],
                             data["status"], took, entry.status(now))
            return
        self.settled_seen[entry.registry] += 1
        if self.settled_seen[entry.registry] == entry.settled_rows:
            self.logger.info("%s: %d row(s) settled from the listing without a download; %s",
                             entry.registry, entry.settled_rows, entry.status(now))


class TtyBars:
    """One line per registry on a terminal, redrawn in place as rows arrive and once a
    second (elapsed, ETA). Log records of this process are written above the lines."""

    BAR = 20

    def __init__(self, stream: TextIO, progress: AuditProgress | None = None,
                 interval: float = 1.0, width: int | None = None):
        self.stream = stream
        self.width = width             # None: the terminal's, asked at each draw
        self.progress = progress or AuditProgress()
        self.interval = interval
        self.drawn = 0                 # lines on screen now
        self.lock = threading.RLock()
        self.stop = threading.Event()
        self.ticker: threading.Thread | None = None
        self.patched: list[tuple[logging.Handler, Any]] = []

    def __call__(self, kind: str, event: str, data: Any) -> None:
        with self.lock:
            self.progress(kind, event, data)
            if kind == "audit":
                self.draw()

    def lines(self) -> list[str]:
        now = self.progress.clock()
        width = self.width or max(40, shutil.get_terminal_size((100, 20)).columns - 1)
        return [entry.line(now, self.BAR)[:width]
                for entry in self.progress.registries.values()]

    def erase(self) -> None:
        if self.drawn:
            self.stream.write(f"\x1b[{self.drawn}F\x1b[J")
            self.drawn = 0

    def draw(self) -> None:
        with self.lock:
            lines = self.lines()
            self.erase()
            if lines:
                self.stream.write("\n".join(lines) + "\n")
                self.drawn = len(lines)
            self.stream.flush()

    def _tick(self) -> None:
        while not self.stop.wait(self.interval):
            with contextlib.suppress(Exception):
                self.draw()

    def _around_logging(self) -> None:
        """Log records written by this process's handlers go above the lines."""
        for handler in logging.getLogger().handlers:
            if getattr(handler, "stream", None) is not self.stream:
                continue
            emit = handler.emit

            def wrapped(record, emit=emit):
                with self.lock:
                    self.erase()
                    emit(record)
                    self.draw()
            handler.emit = wrapped
            self.patched.append((handler, emit))

    def __enter__(self) -> TtyBars:
        self._around_logging()
        self.ticker = threading.Thread(target=self._tick, name="sanitator-progress",
                                       daemon=True)
        self.ticker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.ticker is not None:
            self.ticker.join(timeout=2 * self.interval)
        for handler, emit in self.patched:
            handler.emit = emit
        self.patched = []
        with self.lock:
            if self.progress.registries:
                self.draw()
            self.drawn = 0  # the last drawing stays on screen
