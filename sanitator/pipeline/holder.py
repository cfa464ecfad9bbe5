"""An audit process as a lease (sanitator/pipeline/lease.py) and a batch's MLflow run
record it, and whether it is still there: on this host by its pid (and the pid's start
time, so that a reused pid is another process, and the boot); elsewhere only the store's
live leases can tell."""

from __future__ import annotations

import os
import socket
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


@dataclass(frozen=True)
class Holder:
    """An audit process: what a lease (and the batch's MLflow run) records of it."""

    id: str
    host: str
    pid: int
    started: float | None    # the pid's start time: a reused pid is another process
    boot: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "host": self.host, "pid": self.pid, "started": self.started,
                "boot": self.boot}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Holder:
        return cls(str(data["id"]), str(data["host"]), int(data["pid"]),
                   None if data.get("started") is None else float(data["started"]),
                   data.get("boot"))

    def running(self) -> bool | None:
        """Is the process still there? None when it is on another host (unknown here)."""
        import psutil

        if self.host != socket.gethostname():
            return None
        if self.boot is not None and _boot_id() is not None and self.boot != _boot_id():
            return False  # the machine rebooted since
        try:
            process = psutil.Process(self.pid)
            if process.status() == psutil.STATUS_ZOMBIE:
                return False
            started = process.create_time()
        except psutil.Error:
            return False
        return self.started is None or abs(started - self.started) < 1.0

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}"


_this_holder: Holder | None = None
_holder_lock = threading.Lock()


def this_process() -> Holder:
    """This process as a holder (one id for every lease it takes)."""
    global _this_holder
    with _holder_lock:
        if _this_holder is None or _this_holder.pid != os.getpid():  # a forked child
            _this_holder = Holder(uuid.uuid4().hex, socket.gethostname(), os.getpid(),
                                  _process_start(os.getpid()), _boot_id())
        return _this_holder



def holder_gone(holder: dict[str, Any] | Holder, live: set[str]) -> bool:
    """Has this holder (a lease's, or a batch run's tag) ended? On this host by its pid;
    elsewhere by whether one of the store's live leases (`lease.live_holders`) still names it."""
    if not isinstance(holder, Holder):
        holder = Holder.from_dict(holder)
    running = holder.running()
    if running is not None:
        return not running
    return holder.id not in live
