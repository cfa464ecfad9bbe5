"""Checkpoints where long work may re-size its share of the machine.

A scan runs for minutes. When the pipeline starts several scans on one host it gives each
cores / processes torch threads; once the others finish, the last scan would go on with
its small share while the rest of the machine idles. So the method calls `checkpoint()`
between pieces of work, and whoever runs it (the pipeline's job runner) may install a
pacer that looks at the machine and sets this thread's torch threads. Without a pacer a
checkpoint does nothing: the method never learns who runs it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_local = threading.local()


def checkpoint() -> None:
    """Let the installed pacer (if any) re-size this thread's share; never raises."""
    pacer: Callable[[], None] | None = getattr(_local, "pacer", None)
    if pacer is None:
        return
    try:
        pacer()
    except Exception:  # pacing is an optimisation: the work goes on at its current share
        _local.pacer = None


@contextmanager
def paced(pacer: Callable[[], None] | None) -> Iterator[None]:
    """Install `pacer` for the calling thread for the body's duration."""
    previous = getattr(_local, "pacer", None)
    _local.pacer = pacer
    try:
        yield
    finally:
        _local.pacer = previous
