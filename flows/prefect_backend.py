"""A private Prefect API for one `sanitator audit` run, when no Prefect API is configured.

Without PREFECT_API_URL, Prefect starts a temporary API server that keeps its bookkeeping
in PREFECT_HOME/prefect.db: one sqlite file, shared with every other Prefect process of the
user, written at once by the API handlers, the server's own services and (through the API)
every Dask worker. SQLite allows one writer; a transaction that read before another
writer committed cannot wait for the lock (busy_timeout does not apply to it) and fails
with "database is locked". The server logs that with a traceback on the audit's terminal
and the API call fails; it also prints tracebacks when it is stopped while still flushing
events. Prefect's maintainers call sqlite locking with the temporary server hard to avoid
(PrefectHQ/prefect#18934, #19771).

`private_prefect_api` starts the same server (uvicorn on
`prefect.server.api.server:create_app`, as Prefect's temporary server does) with two
differences: its database is an in-memory sqlite behind a single connection (Prefect's
own set-up for ":memory:" URLs), so every write waits for the connection instead of
failing on a lock and no other process can share it; and its output goes to a log file
beside the store instead of the terminal. The history of the run is lost when it ends; the
store and MLflow hold the audit's record. A configured API (PREFECT_API_URL, a real
`prefect server start`, as the deployments use) is used as it is.

`flow_backend` is what the CLI runs a flow on: that API and, unless a Dask scheduler is
given, a LocalCluster started while the API boots (flows.dask_cluster.LocalDask).
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

MEMORY_DATABASE = "sqlite+aiosqlite:///:memory:"
STOP_SECONDS = 15.0
# Server services this API has no use for: nobody reads its event history (it ends with
# the run), no automation is defined on it, no UI subscribes to its event stream. Each
# task run sends it a handful of events, and storing and matching them cost the server
# more CPU per audited model than recording the task runs (benchmarks/load.py). The task
# run recorder stays: task runs and their states are still there while the run lasts.
QUIET_SERVICES = {"PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED": "false",
                  "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
                  "PREFECT_SERVER_EVENTS_STREAM_OUT_ENABLED": "false"}

# The server runs in a session of its own (a Ctrl-C at the terminal reaches the audit,
# which stops it), so a signal to the audit's process group misses it: it must end by
# itself when the audit is gone, however the audit ends (kill -9 included). Its stdin is
# a pipe whose writing end only the audit holds: when the audit is gone the pipe reads
# end-of-file and the server leaves at once (its database is in memory: nothing to
# keep). On Linux the kernel also kills it when the audit dies (PR_SET_PDEATHSIG), which
# needs no thread of its own in the server. argv: parent pid, then uvicorn's arguments.
SERVE_UNTIL_PARENT_EXITS = r"""
import os, sys, threading
parent = int(sys.argv.pop(1))
try:
    import ctypes, signal
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
except Exception:
    pass
if os.getppid() != parent:  # the audit died before the line above
    os._exit(0)
def _watch():
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    os._exit(0)
threading.Thread(target=_watch, name="parent-watch", daemon=True).start()
sys.argv[0] = "uvicorn"
from uvicorn.main import main
main()
"""


@contextmanager
def flow_backend(log_file: str | Path, *, dask_address: str | None, n_workers: int,
                 torch_threads: int | None, device: str, flow_module: str,
                 preload: tuple[str, ...] = (), quiet: bool = True) -> Iterator[str | None]:
    """The Prefect API (`private_prefect_api`) and, without `dask_address`, a LocalCluster
    of our own (flows.dask_cluster.LocalDask), started together; `flow_module` and the
    modules in `preload` are imported meanwhile. Yields the Dask address to run the flow's
    jobs on. `quiet`: Dask's INFO logging (a traceback when a worker connection closes at
    shutdown) down to warnings."""
    clusters = []

    def start(url: str) -> None:
        import distributed  # noqa: F401  (its import sets its loggers' levels)

        if quiet:
            logging.getLogger("distributed").setLevel(logging.WARNING)
        if not dask_address:
            from flows.dask_cluster import LocalDask, local_cluster_kwargs

            clusters.append(LocalDask(local_cluster_kwargs(
                n_workers, torch_threads, device.startswith("cuda"), url)))
        importlib.import_module(flow_module)
        for module in preload:  # only to save time later: one that is not there is skipped
            with suppress(ImportError):
                importlib.import_module(module)

    try:
        with private_prefect_api(log_file, while_starting=start):
            try:
                yield clusters[0].address() if clusters else dask_address
            finally:  # before the API stops: the workers still report to it
                for cluster in clusters:
                    cluster.close()
    finally:  # the API did not start: the cluster may have
        for cluster in clusters:
            cluster.close()


def _listening_socket() -> socket.socket:
    """A loopback socket already bound and listening, handed to the server by descriptor:
    a port chosen here and bound by the server later could be taken in between (by a Dask
    worker of the cluster starting beside it, or another run), and the API would not start."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _configured_api_url() -> str | None:
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    if "prefect" in sys.modules:  # a profile or an enclosing settings context may set it
        from prefect.settings import PREFECT_API_URL

        return PREFECT_API_URL.value() or None
    return None


def _wait_ready(process: subprocess.Popen, url: str, log_file: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_file.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the private Prefect API exited with {process.returncode} "
                               f"while starting; its log ({log_file}) ends:\n{tail}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"the private Prefect API did not answer within {timeout:g} s "
                       f"(log: {log_file})")


def _drain_to_api() -> None:
    """Send the logs and events still queued for the API before it stops (otherwise
    Prefect reports "Error logging to API" when the process exits)."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with suppress(Exception):  # best effort: the audit's record is in the store
            worker.drain_all(timeout=STOP_SECONDS)


@contextmanager
def _use_api(url: str) -> Iterator[None]:
    """Point this process (every thread) and its children at `url`."""
    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    with ExitStack() as stack:
        imported = "prefect" in sys.modules  # if so, its settings were read from env already
        from prefect.context import refresh_global_settings_context
        from prefect.settings import (
            PREFECT_API_URL,
            PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
            temporary_settings,
        )

        if imported:
            refresh_global_settings_context()
        # no flow-run heartbeats: they let a long-lived server mark crashed runs, and this
        # API ends with the run; each flow's end waited up to a second for its heartbeat
        # thread's next tick
        stack.enter_context(temporary_settings({PREFECT_API_URL: url,
                                                PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}))
        try:
            yield
        finally:
            _drain_to_api()
            if previous is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = previous
            if "prefect" in sys.modules:
                from prefect.context import refresh_global_settings_context

                refresh_global_settings_context()


@contextmanager
def private_prefect_api(log_file: str | Path,
                        while_starting: Callable[[str], object] | None = None
                        ) -> Iterator[str | None]:
    """Run the body against a private Prefect API (see the module doc); yields its URL,
    or None when an API is configured and used instead. `while_starting(url)` runs while
    the server boots (about 20 s on a 2-core machine), with the URL it will answer at."""
    configured = _configured_api_url()
    if configured:
        if while_starting is not None:
            while_starting(configured)
        yield None
        return
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    sock = _listening_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/api"
    env = {**os.environ, "PREFECT_API_DATABASE_CONNECTION_URL": MEMORY_DATABASE,
           # what Prefect's own temporary server sets: no UI, ephemeral services only
           "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
           "PREFECT__SERVER_FINAL": "1", **QUIET_SERVICES}
    env.pop("PREFECT_API_URL", None)
    timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS") or 120)
    with log_file.open("ab") as log, sock:
        process = subprocess.Popen(
            [sys.executable, "-c", SERVE_UNTIL_PARENT_EXITS, str(os.getpid()), "--factory",
             "prefect.server.api.server:create_app", "--fd", str(sock.fileno()),
             "--log-level", "error", "--lifespan", "on"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.PIPE, env=env,
            pass_fds=(sock.fileno(),),
            start_new_session=True)  # a Ctrl-C reaches the audit, which stops it
    try:
        if while_starting is not None:
            while_starting(url)
        _wait_ready(process, url, log_file, timeout)
        with _use_api(url):
            yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        with suppress(OSError):
            process.stdin.close()
