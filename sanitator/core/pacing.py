"""Checkpoints where long work may re-size its share of the machine.

A scan runs for minutes. When the pipeline starts several scans on one host it gives each
cores / processes torch threads; once the others finish, the last scan would go on with
its small share while the rest of the machine idles. So the method calls `checkpoint()`
between pieces of work, and whoever runs it (the pipeline's job runner) may install a
pacer that looks at the machine and sets this thread's torch threads. Without a pacer a
checkpoint does nothing: the method never learns who runs it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_local = threading.local()

# torch's OpenMP threads sleep while they wait for work instead of spinning (libgomp's
# default). A spinning thread holds a core: beside another busy process on 2 cores, two
# 2-thread scans took 139-145 s each spinning and 66 s passive (docs/pipeline.md).
# libgomp reads it once, when torch loads: set it in a process's environment before that.
OPENMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def openmp_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """OPENMP_ENV, except what `environ` (default: this process's) sets already."""
    environ = os.environ if environ is None else environ
    return {key: environ.get(key) or value for key, value in OPENMP_ENV.items()}


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
