"""One audit per store and registry at a time: a lease file in the store.

`STORE/.leases/<digest of the registry spec>.json` names the audit that holds the
registry (its holder, `sanitator.pipeline.holder`: a random id, host, pid, the pid's start
time, the boot), when it took
it, its last heartbeat and when the lease expires without one. Readers of the store skip
the folder (its name starts with a dot).

- **Taken** by an atomic create: the record is written under a temporary name and linked
  to the lease's name (`os.link` fails when the name exists), so two audits started
  together cannot both take it, and nobody ever reads half a record.
- **Kept** by a heartbeat thread that rewrites the record every `ttl / 4` seconds.
- **Given back** (the file removed) when the audit ends.
- **Stale** when its holder is gone: on this host, its pid is not running (or runs another
  program since, or the machine rebooted); on another host, the heartbeat is older than
  its expiry. A stale lease is taken over, and the audit says so.

Takeovers, heartbeats and releases hold an exclusive `flock` on `<name>.lock` for the few
milliseconds they take, so two audits that find the same stale lease cannot both take it
over, and a holder never rewrites a lease another audit took over from it (it notices and
says so instead). Across hosts this relies on the filesystem's locks (NFSv4 has them).

A process holds a registry's lease once: a second `hold` of it in the same process (the
CLI takes the leases before it starts the Prefect API and the cluster; the flow takes them
again, as a deployment's flow run must) shares the first one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sanitator.pipeline.holder import Holder, this_process

log = logging.getLogger(__name__)

LEASE_FOLDER = ".leases"
TTL_SECONDS = 120.0         # a lease without a heartbeat for this long is stale
WAIT_POLL_SECONDS = 2.0     # how often a waiting audit looks again
VERSION = 1


# --- the lease record ---------------------------------------------------------------------

def lease_path(store: str | Path, registry: str) -> Path:
    digest = hashlib.sha256(registry.encode("utf-8", "surrogateescape")).hexdigest()[:24]
    return Path(store) / LEASE_FOLDER / f"{digest}.json"


def _stamp(seconds: float | None) -> str:
    if seconds is None:
        return "an unknown time"
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass(frozen=True)
class Record:
    registry: str
    holder: Holder
    since: float
    heartbeat: float
    ttl: float

    @property
    def expires(self) -> float:
        return self.heartbeat + self.ttl

    def to_json(self) -> str:
        return json.dumps({"version": VERSION, "registry": self.registry,
                           "holder": self.holder.to_dict(), "since": self.since,
                           "heartbeat": self.heartbeat, "expires": self.expires,
                           "ttl": self.ttl}, sort_keys=True)

    @classmethod
    def read(cls, path: Path) -> Record | None:
        """The record at `path`; None when there is none. A file that is no record (a
        damaged store) reads as a record of nobody, stale once its mtime is a ttl old."""
        try:
            text = path.read_text(encoding="utf-8")
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            data = json.loads(text)
            return cls(str(data["registry"]), Holder.from_dict(data["holder"]),
                       float(data["since"]), float(data["heartbeat"]), float(data["ttl"]))
        except (ValueError, KeyError, TypeError):
            return cls("?", Holder("unreadable", "?", 0, None), mtime, mtime, TTL_SECONDS)

    def stale(self, now: float | None = None) -> bool:
        """Its holder is gone: not running here, or silent past the expiry elsewhere."""
        running = self.holder.running()
        if running is not None:
            return not running
        return (now if now is not None else time.time()) > self.expires

    def describe(self) -> str:
        age = max(0.0, time.time() - self.heartbeat)
        return (f"{self.holder.describe()}, started {_stamp(self.since)}, last heartbeat "
                f"{age:.0f} s ago")


class LeaseLost(RuntimeError):
    """The lease file no longer names this holder (another audit took it over)."""


@contextlib.contextmanager
def _guard(path: Path) -> Iterator[None]:
    """An exclusive flock on `<lease>.lock`: takeovers, heartbeats and releases one at a
    time. Without fcntl (not POSIX) the atomic create alone protects."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield
        return
    fd = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_new(path: Path, record: Record) -> bool:
    """Create the lease file holding `record`, atomically; False when it exists."""
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    temp.write_text(record.to_json(), encoding="utf-8")
    try:
        os.link(temp, path)
        return True
    except FileExistsError:
        return False
    except OSError as exc:  # a filesystem without hard links: O_EXCL is atomic too
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(record.to_json())
        return True
    finally:
        temp.unlink(missing_ok=True)


def _replace(path: Path, record: Record) -> None:
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        temp.write_text(record.to_json(), encoding="utf-8")
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


# --- taking, keeping and giving back ------------------------------------------------------

@dataclass
class Lease:
    """This process's hold on one registry of one store."""

    path: Path
    registry: str
    record: Record
    taken_over: Record | None = None   # the stale lease this one replaced
    taken_over_note: str | None = None  # its holder, as it was when taken over
    users: int = 1
    lost: str | None = None            # why the lease was lost, if it was

    def beat(self) -> None:
        """Renew the heartbeat; raises LeaseLost when another audit took the lease over."""
        with _guard(self.path):
            current = Record.read(self.path)
            if current is None or current.holder.id != self.record.holder.id:
                who = current.holder.describe() if current else "nobody"
                raise LeaseLost(f"the lease of {self.registry} now names {who}")
            now = time.time()
            self.record = Record(self.registry, self.record.holder, self.record.since, now,
                                 self.record.ttl)
            _replace(self.path, self.record)

    def give_back(self) -> None:
        """Remove the lease file if it still names this holder."""
        with _guard(self.path):
            current = Record.read(self.path)
            if current is not None and current.holder.id == self.record.holder.id:
                self.path.unlink(missing_ok=True)


class _Held:
    """Every lease this process holds, and the one heartbeat thread that keeps them."""

    def __init__(self):
        self.lock = threading.Lock()
        self.leases: dict[Path, Lease] = {}
        self.thread: threading.Thread | None = None
        self.wake = threading.Event()

    def beat_all(self) -> None:
        with self.lock:
            leases = list(self.leases.values())
        for lease in leases:
            if lease.lost:
                continue
            try:
                lease.beat()
            except LeaseLost as exc:
                lease.lost = str(exc)
                log.error("%s; this audit goes on, but another one may audit the same "
                          "models", exc)
            except OSError as exc:  # the store is briefly unreachable: try again next beat
                log.warning("cannot renew the lease of %s: %s", lease.registry, exc)

    def run(self) -> None:
        while True:
            with self.lock:
                if not self.leases:
                    self.thread = None
                    return
                interval = min(lease.record.ttl for lease in self.leases.values()) / 4
            self.wake.wait(interval)
            self.wake.clear()
            self.beat_all()

    def ensure_thread(self) -> None:
        with self.lock:
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self.run, name="sanitator-lease",
                                               daemon=True)
                self.thread.start()


_HELD = _Held()


def _take(path: Path, registry: str, ttl: float) -> tuple[Lease | None, Record | None]:
    """One attempt: (the lease, None) or (None, the live record of its holder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = this_process()
    while True:
        now = time.time()
        record = Record(registry, holder, now, now, ttl)
        if _write_new(path, record):
            return Lease(path, registry, record), None
        current = Record.read(path)
        if current is None:  # given back meanwhile: try again
            continue
        if current.holder.id == holder.id:  # ours from an earlier hold in this process
            return Lease(path, registry, current), None
        if not current.stale():
            return None, current
        with _guard(path):  # take a stale lease over, one taker at a time
            again = Record.read(path)
            if again is not None and again.holder.id == current.holder.id and again.stale():
                _replace(path, record)
                return Lease(path, registry, record, taken_over=again,
                             taken_over_note=again.describe()), None
        # someone else took it over, or its holder came back: look again


def acquire(store: str | Path, registry: str, *, wait: float = 0.0, ttl: float = TTL_SECONDS,
            poll: float | None = None) -> tuple[Lease | None, Record | None]:
    """This process's lease on `registry` in `store`, waiting up to `wait` seconds for
    a live holder to give it back; (None, the holder's record) when it did not."""
    path = lease_path(store, registry)
    with _HELD.lock:
        held = _HELD.leases.get(path)
        if held is not None and not held.lost:
            held.users += 1
            return held, None
    deadline = time.monotonic() + max(0.0, wait)
    while True:
        lease, holder = _take(path, registry, ttl)
        if lease is not None:
            if lease.taken_over is not None:
                log.info("took over the lease of %s from a dead audit (%s)", registry,
                         lease.taken_over_note)
            with _HELD.lock:
                _HELD.leases[path] = lease
            _HELD.ensure_thread()
            return lease, None
        if time.monotonic() >= deadline:
            return None, holder
        time.sleep(min(poll or WAIT_POLL_SECONDS, max(0.05, deadline - time.monotonic())))


def release(lease: Lease) -> None:
    """Give one hold back; the last one in this process removes the lease file."""
    with _HELD.lock:
        lease.users -= 1
        if lease.users > 0:
            return
        if _HELD.leases.get(lease.path) is lease:
            del _HELD.leases[lease.path]
    _HELD.wake.set()
    try:
        lease.give_back()
    except OSError as exc:  # a stale lease of a dead holder is taken over next time
        log.warning("cannot give back the lease of %s: %s", lease.registry, exc)


@dataclass
class Holding:
    """The outcome of `hold`: the registries held, and the live holders of the others."""

    leases: dict[str, Lease] = field(default_factory=dict)
    busy: dict[str, Record] = field(default_factory=dict)

    @property
    def held(self) -> list[str]:
        return list(self.leases)

    def busy_reasons(self, store: str | Path) -> dict[str, str]:
        return {spec: f"another audit holds it ({record.describe()}; lease "
                      f"{lease_path(store, spec)})" for spec, record in self.busy.items()}

    def taken_over(self) -> dict[str, str]:
        return {spec: f"from a dead audit ({lease.taken_over_note})"
                for spec, lease in self.leases.items() if lease.taken_over is not None}

    def release(self) -> None:
        for lease in self.leases.values():
            release(lease)
        self.leases = {}


def hold(store: str | Path, registries: Iterable[str], *, wait: float = 0.0,
         ttl: float = TTL_SECONDS) -> Holding:
    """Take the lease of each registry (in a fixed order, so that two audits of several
    registries cannot wait on each other in a circle); `wait` seconds in all for the
    busy ones."""
    holding = Holding()
    deadline = time.monotonic() + max(0.0, wait)
    for spec in sorted(dict.fromkeys(registries)):
        lease, record = acquire(store, spec, ttl=ttl,
                                wait=max(0.0, deadline - time.monotonic()))
        if lease is not None:
            holding.leases[spec] = lease
        else:
            holding.busy[spec] = record
    return holding


def live_holders(store: str | Path) -> set[str]:
    """Ids of the holders of this store's leases that are not stale."""
    folder = Path(store) / LEASE_FOLDER
    if not folder.is_dir():
        return set()
    live = set()
    for path in folder.glob("*.json"):
        record = Record.read(path)
        if record is not None and not record.stale():
            live.add(record.holder.id)
    return live
