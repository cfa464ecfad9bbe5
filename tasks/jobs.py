"""Prefect tasks of both flows: crawl a registry, run one job, record one job's outcome.

`run_job` runs on Dask workers; `crawl_registry` and `record_job` run in the flow process
(called directly, not submitted), so the store and the MLflow backend only ever have one
writer. The job itself (sanitator.pipeline.jobs) holds no Prefect: what is Prefect's here
is retries, timeouts and names.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin
from prefect import task
from prefect.cache_policies import NONE

from sanitator.core.pacing import paced
from sanitator.pipeline.jobs import Job, TransientJobError, record
from sanitator.pipeline.registries import ModelRef, RegistryError, parse_registry

log = logging.getLogger(__name__)

# Dask event topic: each run announces its start on a worker, so the flow can tell a run
# stuck in native code from one that a replacement worker only just picked up.
JOB_START_TOPIC = "sanitator-job-start"

# Per kind of job: the task names the UI shows and the retries of a transient failure.
TASK_OPTIONS: dict[str, dict[str, dict[str, Any]]] = {
    "audit": {
        "run": {"name": "audit-model", "task_run_name": "audit {request.ref.repo_id}",
                "retries": 2, "retry_delay_seconds": [10, 60]},
        "record": {"name": "record-audit", "task_run_name": "record {request.ref.repo_id}"},
    },
    "evaluation": {
        "run": {"name": "evaluate-pair", "retries": 1, "retry_delay_seconds": [30],
                "task_run_name": "evaluate {request.ref.repo_id} on {request.task.task}"},
        "record": {"name": "record-evaluation",
                   "task_run_name": "record {request.ref.repo_id} on {request.task.task}"},
    },
}


def _transient_registry_error(exc: BaseException) -> bool:
    from sanitator.pipeline.registries.hf_hub import is_transient as hub_transient
    from sanitator.pipeline.registries.mlflow_registry import is_transient as mlflow_transient

    if isinstance(exc, RegistryError):
        return False
    return hub_transient(exc) or mlflow_transient(exc)


def retry_if_transient(task, task_run, state) -> bool:
    """The one retry condition: only transient failures; never a timeout (it would time
    out again)."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as error:  # the state may hold the exception itself
        exc = error
    if isinstance(exc, TimeoutError):
        return False
    return isinstance(exc, TransientJobError) or _transient_registry_error(exc)


@task(name="crawl-registry", retries=3, retry_delay_seconds=[5, 30, 120],
      retry_condition_fn=retry_if_transient, cache_policy=NONE, persist_result=False,
      task_run_name="crawl {spec}")
def crawl_registry(spec: str) -> list[ModelRef]:
    """Every model of one registry, pinned to revisions."""
    refs = list(parse_registry(spec).crawl())
    log.info("%s: %d model(s)", spec, len(refs))
    return refs


@task(name="describe-registry", retries=3, retry_delay_seconds=[5, 30, 120],
      retry_condition_fn=retry_if_transient, cache_policy=NONE, persist_result=False,
      task_run_name="describe {spec}")
def describe_registry(spec: str, refs: list[ModelRef]) -> list[ModelRef]:
    """The refs with their declared bases and shapes, and the declared bases the listing
    lacks (sanitator.pipeline.registries.describe)."""
    from sanitator.pipeline.registries.describe import describe_refs

    return describe_refs(parse_registry(spec), refs)


@task(name="resolve-reference-catalog", retries=3, retry_delay_seconds=[5, 30, 120],
      retry_condition_fn=retry_if_transient, cache_policy=NONE, persist_result=False)
def resolve_catalog(entries: list[str]) -> tuple[list[ModelRef], dict[str, str]]:
    """The configured Hub bases, pinned (sanitator.pipeline.registries.describe)."""
    from sanitator.pipeline.registries.describe import resolve_catalog as resolve

    return resolve(entries)


def worker_threads(requested: int | None) -> int:
    """Torch threads for this worker process: cores / processes, never more (FINDINGS §2)."""
    if requested:
        return requested
    env = os.environ.get("OMP_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        from distributed import get_worker

        threads_per_process = get_worker().state.nthreads
    except (ImportError, ValueError):
        threads_per_process = 1
    return max(1, (os.cpu_count() or 1) // max(1, threads_per_process))


class WarmUp(WorkerPlugin):
    """Dask worker plugin: import what every run needs (torch, transformers' model code,
    seconds of imports) when a worker starts, restarted workers included, so that a run's
    timeout measures the run and not the imports; and quiet two harmless messages: the
    heartbeat failure of a cluster shutting down (`_quiet_heartbeat_failure`) and Prefect's
    per-run warning about timeouts in worker threads (`_quiet_thread_timeout_warning`).
    Not idempotent: registered again, it runs again (its imports are cached by then) and
    the registration answers only once every worker is done (flows.dask_jobs.run_on_dask)."""

    name = "sanitator-warm-up"

    def setup(self, worker) -> None:
        import torch  # noqa: F401
        from transformers import AutoModel, AutoTokenizer, BertModel  # noqa: F401

        logging.getLogger("distributed.worker").addFilter(_quiet_heartbeat_failure)
        logging.getLogger("prefect.task_runs").addFilter(_quiet_thread_timeout_warning)


def _quiet_heartbeat_failure(record) -> bool:
    """A heartbeat that finds the scheduler gone (a cluster closing under its workers) is
    retried by Dask and harmless; keep its one line, drop the traceback that reads like a
    crash in every audit's output."""
    if record.getMessage().startswith("Failed to communicate with scheduler during heartbeat"):
        record.exc_info, record.exc_text = None, None
    return True


def _quiet_thread_timeout_warning(record) -> bool:
    """Prefect warns, once per run, that a timeout cannot interrupt a task in a worker
    thread: a warning per audited model in a nightly log. The fan-out's hang backstop
    (sanitator.pipeline.fanout) is what ends such a run, so the warning is dropped."""
    return "configured for this task, but the task is running in a worker thread" \
        not in str(record.msg)


# How often a run re-reads how many runs share its host (a scheduler round trip each).
PACE_SECONDS = 15.0


class ForeignLoad:
    """Cores busy with other processes' work (this process's own CPU time left out),
    averaged since the previous answer (the first covers the time since construction)."""

    def __init__(self):
        import psutil  # distributed's own dependency

        self.process = psutil.Process()
        self.last = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        import psutil

        host = psutil.cpu_times()
        busy = sum(getattr(host, field, 0.0) for field in
                   ("user", "nice", "system", "irq", "softirq", "steal"))
        own = self.process.cpu_times()
        return time.monotonic(), busy, own.user + own.system

    def __call__(self) -> float | None:
        """None while under a second has passed (CPU times tick at 10 ms: too coarse)."""
        now = self._sample()
        wall = now[0] - self.last[0]
        if wall < 1.0:
            return None
        host, own = now[1] - self.last[1], now[2] - self.last[2]
        self.last = now
        return max(0.0, (host - own) / wall)


class HostShare:
    """Pacer (sanitator.core.pacing) for runs on a LocalCluster: this run's torch threads
    = the host's cores / the workers on this host that are running something, so the last
    audit of a batch gets the whole machine instead of its 1/n share (issue 17); but never
    more than the cores other processes left idle since the last look (`load`): on a host
    that also runs other work, more torch threads than free cores is a many-fold slowdown
    (FINDINGS.md §2; 2 threads beside one busy process ran a 2-layer MiniLM 1.7x and a tiny
    BERT 5x slower than 1 thread)."""

    def __init__(self, worker, cores: int, load=None):
        self.worker, self.cores, self.next = worker, cores, 0.0
        self.load = load if load is not None else ForeignLoad()

    def __call__(self) -> None:
        import torch
        from distributed import get_client

        now = time.monotonic()
        if now < self.next:
            return
        self.next = now + PACE_SECONDS
        address = self.worker.address

        def busy(dask_scheduler) -> int:  # runs on the scheduler (pickled by value)
            host = dask_scheduler.workers[address].host
            return sum(1 for ws in dask_scheduler.workers.values()
                       if ws.host == host and ws.processing)

        running = get_client().run_on_scheduler(busy)
        share = self.cores // max(1, int(running))
        foreign = self.load()   # busy siblings count as others' load too
        current = torch.get_num_threads()
        free = current if foreign is None else int(self.cores - foreign + 0.5)
        threads = max(1, min(share, free))
        if current != threads:
            torch.set_num_threads(threads)


def _host_share(pace: bool):
    """A HostShare pacer when this run is on a Dask worker and pacing is wanted."""
    if not pace:
        return None
    try:
        from distributed import get_worker

        # the same count of cores as worker_threads and the LocalCluster's split
        return HostShare(get_worker(), os.cpu_count() or 1)
    except (ImportError, ValueError):  # not on a Dask worker
        return None


def _announce_start(request_id: str) -> None:
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):  # not on a Dask worker
        return
    worker.log_event(JOB_START_TOPIC, {"request_id": request_id, "worker": worker.address})


@task(name="run-job", retry_condition_fn=retry_if_transient, cache_policy=NONE,
      persist_result=False)
def run_job(job: Job, request: Any, work_dir: str | None = None,
            torch_threads: int | None = None, pace: bool = False) -> Any:
    """Run one request of `job` on a worker. Raises TransientJobError on a retryable
    outcome (so Prefect retries); every other failure comes back as an error outcome.
    `pace`: re-size the run's torch threads to its share of the host as others finish."""
    import torch

    _announce_start(job.request_id(request))
    threads = worker_threads(torch_threads)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with paced(_host_share(pace and not torch_threads)):
        outcome = job.run(request, work_dir=work_dir)
    if job.retryable(outcome):
        raise TransientJobError(job.reason(outcome) or "transient failure")
    return outcome


@task(name="record-job", retries=2, retry_delay_seconds=2, cache_policy=NONE,
      persist_result=False)
def record_job(job: Job, request: Any, outcome: Any, store: str, tracker: Any | None = None,
               parent_run_id: str | None = None, batch_id: str | None = None
               ) -> dict[str, Any]:
    """Track one outcome in MLflow and write its rows (`sanitator.pipeline.jobs.record`)."""
    return record(job, request, outcome, store, tracker, parent_run_id, batch_id)


def run_task(job: Job, timeout: float | None = None):
    """`run_job` named and retried as `job`'s kind wants, with a per-run timeout."""
    return run_job.with_options(timeout_seconds=timeout, **TASK_OPTIONS[job.kind]["run"])


def record_task(job: Job):
    return record_job.with_options(**TASK_OPTIONS[job.kind]["record"])
