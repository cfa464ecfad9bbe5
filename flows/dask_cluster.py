"""The LocalCluster an audit starts: Dask's settings for it, the warm forkserver its
workers fork from, its keyword arguments, and `LocalDask`, which starts it in the
background while the flow starts the rest (docs/pipeline.md). The fan-out on it is
flows/dask_jobs.py."""

from __future__ import annotations

import atexit
import logging
import multiprocessing.forkserver
import os
import signal
import sys
import threading
from contextlib import suppress
from typing import Any

import dask
import distributed

from tasks.jobs import WarmUp

log = logging.getLogger(__name__)

# Dask's nannies start workers with MALLOC_TRIM_THRESHOLD_=65536 (to hand freed memory back
# to the OS). Any explicit threshold turns off glibc's adaptive mmap threshold, so every
# tensor over 128 KiB is a fresh mmap, page-faulted and zeroed by the kernel again each
# time: a quarter of a scanning worker's CPU went to the kernel (docs/pipeline.md). Workers
# of the clusters started here keep glibc's defaults, like a plain `sanitator scan`.
dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})

# Dask's background work, for a dashboard we do not start: the event loops' tick every
# 20 ms (it only warns of a loop blocked for seconds), the workers' statistical profiler
# sampling the scanning thread every 10 ms, the nannies' and workers' memory checks every
# 100 ms and the system monitors every 500 ms. An idle LocalCluster of 2 workers cost the
# flow process (scheduler and nannies) 5.5 % of a core and each worker 3.7 %; with these,
# 0.9 % and 2.6 % (benchmarks/load.py's section in docs/pipeline.md). The memory limits
# are still enforced, checked once a second.
dask.config.set({"distributed.admin.tick.interval": "1s",
                 "distributed.worker.profile.enabled": False,
                 "distributed.worker.memory.monitor-interval": "1s",
                 "distributed.admin.system-monitor.interval": "2s"})

# Workers fork from one server process that imported torch and the model code once
# (multiprocessing's forkserver) instead of each importing them afresh (~9 CPU-seconds
# per worker): a second cluster in the same process now starts in under a second, and a
# restarted worker (a hung run's backstop) is back at once. Prefect is not preloaded: it
# reads its API URL when imported, and a worker learns it only at start.
# Each run still sets its torch threads (tasks/jobs.py), so the server's own thread
# setting does not carry over.
FORKSERVER_PRELOAD = ("distributed", "numpy", "pandas", "torch",
                      "transformers.models.bert.modeling_bert")
dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"})
# after Dask's first call, which sets a preload list of its own
distributed.utils.get_mp_context().set_forkserver_preload(list(FORKSERVER_PRELOAD))
_forkserver_lock = threading.Lock()
_forkserver_started_in: tuple | None = None


def _surroundings() -> tuple:
    """What a worker inherits from the process that starts it: the environment (less
    the variables Dask itself sets in it before every worker start), sys.path, the
    working folder."""
    own = set(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k not in own))
    return env, tuple(sys.path), os.getcwd()


def fresh_forkserver() -> None:
    """Make the forkserver the next workers fork from one started in this process's
    present surroundings. Forked workers see the environment, sys.path and folder the
    server started in (and the Hub endpoint the preloaded libraries read then), not the
    caller's now, where a spawned worker would see the change; so a server started in
    other surroundings is stopped first, and the next worker start starts a new one."""
    global _forkserver_started_in
    surroundings = _surroundings()
    with _forkserver_lock:
        server = multiprocessing.forkserver._forkserver
        if surroundings != _forkserver_started_in and server._forkserver_pid is not None:
            server._stop()
        multiprocessing.forkserver.ensure_running()
        _forkserver_started_in = surroundings


@atexit.register
def _stop_forkserver() -> None:
    """At exit, end the forkserver at once. Its workers are gone by then, and on its own it
    would notice this process's end and tear down its imports (torch, transformers: 1.6 s
    on a 2-core machine), holding this process's stdout open meanwhile, so a caller
    reading the command's output waited for it."""
    server = multiprocessing.forkserver._forkserver
    with _forkserver_lock:
        if server._forkserver_pid is None:
            return
        with suppress(OSError):  # it has nothing to flush: SIGTERM ends it where it is
            os.kill(server._forkserver_pid, signal.SIGTERM)
        with suppress(Exception):
            server._stop()


def api_url() -> str | None:
    """The Prefect API this flow reports to, for LocalCluster workers to report to as well
    (without it each worker process would start a temporary server of its own)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url)


def local_cluster_kwargs(n_workers: int, torch_threads: int | None, gpu: bool,
                         api_url: str | None) -> dict[str, Any]:
    """A LocalCluster of processes with one task thread each and cores / processes torch
    threads (FINDINGS.md §2), its workers reporting to `api_url`."""
    threads = torch_threads or max(1, (os.cpu_count() or 1) // max(1, n_workers))
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    if api_url:
        env["PREFECT_API_URL"] = api_url
    kwargs: dict[str, Any] = {"n_workers": n_workers, "threads_per_worker": 1,
                              "processes": True, "dashboard_address": None, "env": env}
    if gpu:
        kwargs["resources"] = {"GPU": 1}
    return kwargs


# addresses of the clusters LocalDask started in this process: runs there are paced like
# runs on a LocalCluster the flow starts itself (the host is ours)
OWN_ADDRESSES: set[str] = set()


class LocalDask:
    """A LocalCluster started in a background thread, its workers importing torch and the
    model code (WarmUp) while the caller starts the rest: the Prefect API, the flow's
    imports, MLflow, the crawl. Those start-up seconds used to come one after another
    before the first scan (docs/pipeline.md, What the pipeline costs around the scans).
    `cluster_kwargs`: LocalCluster's, usually `local_cluster_kwargs(...)`."""

    def __init__(self, cluster_kwargs: dict[str, Any]):
        self._kwargs = cluster_kwargs
        self._cluster = None
        self._closing = False
        self._lock = threading.Lock()
        self._up = threading.Event()  # the cluster exists (or could not be started)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._start, name="sanitator-local-dask",
                                        daemon=True)
        self._thread.start()

    def _start(self) -> None:
        try:
            fresh_forkserver()
            cluster = distributed.LocalCluster(**self._kwargs)
            with self._lock:
                self._cluster = cluster
                closing = self._closing
            self._up.set()
            if closing:  # nothing to run after all: `close` closes it
                return
            with distributed.Client(cluster) as client:
                client.register_plugin(WarmUp())
        except BaseException as exc:
            if self._up.is_set():  # the first run registers WarmUp again and says so
                log.warning("the local Dask workers' warm-up failed: %s", exc)
            else:  # raised to the caller by `address`
                self._error = exc
        finally:
            self._up.set()

    def address(self) -> str:
        """The scheduler's address once the cluster is up; raises what the start raised.
        The workers may still be importing: the flow's own start (crawl, plan, MLflow)
        goes on meanwhile, and a worker runs nothing before its warm-up is done."""
        self._up.wait()
        with self._lock:
            cluster = self._cluster
        if cluster is None:
            raise RuntimeError(f"the local Dask cluster did not start: {self._error}"
                               ) from self._error
        address = cluster.scheduler_address
        OWN_ADDRESSES.add(address)
        return address

    def close(self) -> None:
        """Close the cluster; one closed before its workers started skips their warm-up
        (a run with nothing to audit does not wait for imports it will never use)."""
        with self._lock:
            self._closing = True
        self._thread.join()  # a warm-up under way finishes: cutting it short is noisy
        with self._lock:
            cluster, self._cluster = self._cluster, None
        if cluster is not None:
            with suppress(Exception):  # closing is best effort: the results are written
                OWN_ADDRESSES.discard(cluster.scheduler_address)
                cluster.close()
