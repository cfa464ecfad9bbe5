"""Both flows' fan-out on Dask: the task runner (a LocalCluster or a scheduler address),
the Prefect-on-Dask side of `sanitator.pipeline.fanout.Executor`, and the subflow that runs
one job's requests through `sanitator.pipeline.fanout.fan_out` (docs/pipeline.md)."""

from __future__ import annotations

import atexit
import logging
import multiprocessing.forkserver
import os
import signal
import sys
import threading
from contextlib import nullcontext, suppress
from typing import Any

import dask
import distributed
from prefect import flow, get_run_logger
from prefect_dask import DaskTaskRunner
from prefect_dask.task_runners import PrefectDaskFuture

from sanitator.pipeline.audit_tracking import open_tracker
from sanitator.pipeline.fanout import fan_out
from sanitator.pipeline.jobs import Job
from tasks.jobs import JOB_START_TOPIC, WarmUp, record_task, run_task

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


# the subflow's name per kind of job, as the Prefect UI has always shown it
SUBFLOW_NAMES = {"audit": "audit-models-on-dask", "evaluation": "evaluate-pairs-on-dask"}


def _api_url() -> str | None:
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


# per worker process: the flow's Prefect settings, validated once, and per worker thread
# one API client for them (see _run_task)
_SETTINGS: dict[str, Any] = {}
_CLIENTS = threading.local()


def _api_client(settings_key: str):
    """This thread's Prefect API client for the settings named `settings_key` (entered
    once, kept open for the next runs)."""
    from prefect.context import SyncClientContext

    held = getattr(_CLIENTS, "held", None)
    if held is not None and held[0] == settings_key:
        return held[1]
    if held is not None:
        with suppress(Exception):
            held[1].client.__exit__(None, None, None)
    context = SyncClientContext()  # its client reads the settings entered now
    context.client.__enter__()
    with suppress(Exception):  # what entering the context would check once
        context.client.raise_for_api_version_mismatch_once()
    _CLIENTS.held = (settings_key, context)
    return context


def _run_task(settings_key: str | None = None, **run_task_kwargs: Any) -> Any:
    """What a worker runs for one task run (prefect-dask's wrapper, for sync tasks).

    Prefect would rebuild its settings from the flow's serialised ones for every run (a
    validation of every settings model against the environment, the dotenv files and
    the given values: about 0.17 s of the worker's CPU) and open two API clients (each
    loads the system's certificate bundle: about 0.06 s), together most of Prefect's cost
    per run on a worker. The settings of one flow run are the same for each of its runs,
    so each worker validates them once (`settings_key` names them), enters a copy around
    every run, and gives every run the same client (one per worker thread)."""
    from prefect.context import SettingsContext, SyncClientContext
    from prefect.task_engine import run_task_sync

    context = dict(run_task_kwargs.get("context") or {})
    payload = context.pop("settings_context", None)
    if not payload or settings_key is None:
        return run_task_sync(**run_task_kwargs)
    settings = _SETTINGS.get(settings_key)
    if settings is None:
        if len(_SETTINGS) > 8:  # a long-lived worker serving many flow runs
            _SETTINGS.clear()
        settings = _SETTINGS[settings_key] = SettingsContext(**payload)
    with settings.model_copy():  # a copy: one instance cannot be entered twice
        # set, not entered: entering would close the client when the run ends
        token = SyncClientContext.__var__.set(_api_client(settings_key))
        try:
            return run_task_sync(**{**run_task_kwargs, "context": context})
        finally:
            SyncClientContext.__var__.reset(token)


class KeyedDaskTaskRunner(DaskTaskRunner):
    """prefect-dask's task runner, each run submitted under a fresh key and with the flow
    run's context serialised once.

    prefect-dask lets Dask name a run by hashing every argument (Prefect's serialised
    settings included: about a second of the flow process's CPU per run), and serialises
    the flow run's context again for every run: its settings (a third of a second of
    CPU each time here) and the subflow's parameters, which hold every request of the
    fan-out, so each submission cost more the more models there were, and every task
    shipped all the requests to its worker again (quadratic in the registry's size:
    benchmarks/load.py). Runs of our jobs take plain data (a job and a request, never
    futures), so here the context is serialised at the first submission, without the
    flow's parameters (a task reads them only for a cache key, and ours have no cache
    policy), and reused; each run adds only its own asset context. A submission that
    waits for other runs takes prefect-dask's own path."""

    @property
    def name(self) -> str:  # its logger's name, as before: prefect.task_runner.dask
        return "dask"

    def _flow_context(self) -> dict[str, Any]:
        if getattr(self, "_context", None) is None:
            from uuid import uuid4

            from prefect.context import serialize_context

            context = serialize_context()
            flow_run = dict(context.get("flow_run_context") or {})
            flow_run.pop("parameters", None)
            if isinstance(flow_run.get("flow_run"), dict):
                flow_run["flow_run"] = {**flow_run["flow_run"], "parameters": {}}
            self._context = {**context, "flow_run_context": flow_run}
            self._settings_key = uuid4().hex  # the workers validate these settings once
        return self._context

    def submit(self, task, parameters, wait_for=None, dependencies=None):
        if not self._started:
            raise RuntimeError("The task runner must be started before submitting work.")
        if wait_for or dependencies:
            future = self.client.submit(
                task, parameters=self._optimize_futures(parameters),
                wait_for=self._optimize_futures(wait_for) if wait_for else None,
                dependencies=dependencies, return_type="state", pure=False)
            return PrefectDaskFuture(wrapped_future=future, task_run_id=future.task_run_id)
        from uuid import uuid4

        from prefect.context import AssetContext

        task_run_id = uuid4()
        inputs: dict[str, set] = {name: set() for name in parameters}
        context = {**self._flow_context(), "asset_context": AssetContext.from_task_and_inputs(
            task=task, task_run_id=task_run_id, task_inputs=inputs,
            copy_to_child_ctx=True).serialize()}
        future = distributed.Client.submit(
            self.client, _run_task, settings_key=self._settings_key, task=task,
            task_run_id=task_run_id, wait_for=None, return_type="state",
            parameters=parameters, dependencies=inputs, context=context, pure=False)
        future.task_run_id = task_run_id
        return PrefectDaskFuture(wrapped_future=future, task_run_id=task_run_id)


def dask_runner(dask_address: str | None, n_workers: int, torch_threads: int | None,
                gpu: bool) -> KeyedDaskTaskRunner:
    """The task runner on an existing scheduler, or on a new LocalCluster."""
    if dask_address:
        return KeyedDaskTaskRunner(address=dask_address)
    fresh_forkserver()  # the runner starts its LocalCluster's workers from it
    # without it each worker process would start a temporary Prefect server of its own
    api_url = os.environ.get("PREFECT_API_URL") or _api_url()
    return KeyedDaskTaskRunner(cluster_class="distributed.LocalCluster",
                               cluster_kwargs=local_cluster_kwargs(n_workers, torch_threads,
                                                                   gpu, api_url))


# addresses of the clusters LocalDask started in this process: runs there are paced like
# runs on a LocalCluster the flow starts itself (the host is ours)
_OWN_ADDRESSES: set[str] = set()


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
        _OWN_ADDRESSES.add(address)
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
                _OWN_ADDRESSES.discard(cluster.scheduler_address)
                cluster.close()


def _executing(client) -> dict[str, str]:
    """Key -> worker address of every task executing right now (queued ones excluded)."""
    def executing(dask_worker):
        return [str(ts.key) for ts in dask_worker.state.executing]

    try:
        return {key: addr for addr, keys in client.run(executing).items() for key in keys}
    except Exception:  # a worker went away meanwhile: look again at the next poll
        return {}


def _mark_failed(task_run_id: Any, message: str) -> None:
    """Close a task run whose worker we abandon, so the UI does not show it running."""
    from prefect.client.orchestration import get_client
    from prefect.states import Failed

    try:
        with get_client(sync_client=True) as client:
            client.set_task_run_state(task_run_id, Failed(message=message), force=True)
    except Exception as exc:
        log.warning("cannot mark task run %s failed: %s", task_run_id, exc)


class DaskExecutor:
    """Prefect task runs of one job on the flow's Dask client; handles are Dask futures."""

    def __init__(self, client, job: Job, task, options: dict[str, Any], gpu: bool, logger):
        self.client, self.job, self.task = client, job, task
        self.options, self.gpu, self.logger = options, gpu, logger
        self.futures: dict[Any, Any] = {}       # Dask future -> Prefect future
        self.ids: dict[Any, str] = {}           # Dask future -> request id

    def submit(self, request):
        import dask

        # GPU runs only go to workers that declare a GPU resource (docs/pipeline.md)
        with dask.annotate(resources={"GPU": 1}) if self.gpu else nullcontext():
            future = self.task.submit(self.job, request, **self.options)
        self.futures[future.wrapped_future] = future
        self.ids[future.wrapped_future] = self.job.request_id(request)
        return future.wrapped_future

    def wait(self, handles, timeout):
        if timeout <= 0:  # a look, no wait: Dask's wait with timeout 0 gives up unlooked
            return [handle for handle in handles if handle.done()]
        try:
            with self.client.as_current():  # prefect-dask's client is not the default one
                done, _ = distributed.wait(list(handles), timeout=timeout,
                                           return_when="FIRST_COMPLETED")
        except (TimeoutError, distributed.TimeoutError):
            return []
        return list(done)

    def outcome(self, handle):
        future = self.futures.pop(handle)
        self.ids.pop(handle, None)
        try:
            return future.result(raise_on_failure=False)
        except Exception as exc:  # KilledWorker, CancelledError, lost scheduler
            return exc
        finally:
            # the scheduler forgets the run once read. Dropping our references is not
            # enough (Prefect keeps its own), and a result still held on a worker that is
            # restarted later (a hung run) is recomputed elsewhere: a second scan.
            with suppress(Exception):
                handle.cancel()

    def running(self, handles):
        executing = _executing(self.client)
        starts: dict[str, tuple[float, str]] = {}
        for stamp, message in self.client.get_events(JOB_START_TOPIC):
            starts[message["request_id"]] = (stamp, message["worker"])
        found = {}
        for handle in handles:
            worker = executing.get(str(handle.key))
            started, start_worker = starts.get(self.ids[handle], (None, None))
            if worker is not None and worker == start_worker:
                found[handle] = started
        return found

    def abandon(self, handles):
        keys = {str(handle.key) for handle in handles}
        workers = sorted({addr for key, addr in _executing(self.client).items() if key in keys})
        for handle in handles:
            handle.cancel()
            _mark_failed(self.futures.pop(handle).task_run_id,
                         "hung past its timeout; worker restarted")
            self.ids.pop(handle, None)
        try:
            if workers:
                self.client.restart_workers(workers)
        except Exception as exc:  # workers without a nanny cannot be restarted from here
            self.logger.warning("could not restart the workers of hung runs: %s", exc)


@flow(name="run-jobs-on-dask", validate_parameters=False)
def run_on_dask(job: Job, requests: list[Any], store: str, tracking_uri: str | None = None,
                parent_run_id: str | None = None, batch_id: str | None = None,
                work_dir: str | None = None, torch_threads: int | None = None,
                timeout: float | None = None, gpu: bool = False, pace: bool = False
                ) -> list[dict[str, Any]]:
    """Submit one run task per request to Dask; record each as soon as it finishes.
    `pace`: runs re-size their torch threads as others free the host (tasks/jobs.py)."""
    from prefect.context import FlowRunContext

    logger = get_run_logger()
    tracker = open_tracker(tracking_uri, store)
    client = FlowRunContext.get().task_runner.client
    try:  # before the first run, so that no run's timeout pays the imports
        # registered again where LocalDask already began it (WarmUp is not idempotent):
        # Dask answers once every worker's warm-up is done
        client.register_plugin(WarmUp())
    except Exception as exc:
        logger.warning("workers not warmed up (%s); first runs pay the imports", exc)
    executor = DaskExecutor(client, job, run_task(job, timeout),
                            {"work_dir": work_dir, "torch_threads": torch_threads,
                             "pace": pace}, gpu, logger)
    record = record_task(job)
    return fan_out(job, requests, executor,
                   lambda request, outcome: record(job, request, outcome, store, tracker,
                                                   parent_run_id, batch_id),
                   timeout=timeout, logger=logger)


def run_jobs(job: Job, requests: list[Any], store: str, *, dask_address: str | None,
             n_workers: int, torch_threads: int | None, device: str, **options: Any
             ) -> list[dict[str, Any]]:
    """`run_on_dask` on its own task runner, named for `job`'s kind."""
    gpu = device.startswith("cuda")
    runner = dask_runner(dask_address, n_workers, torch_threads, gpu)
    subflow = run_on_dask.with_options(name=SUBFLOW_NAMES[job.kind], task_runner=runner)
    # on a LocalCluster of our own (not a user's scheduler) a run takes the cores others free
    own = not dask_address or dask_address in _OWN_ADDRESSES
    return subflow(job, requests, store, torch_threads=torch_threads, gpu=gpu,
                   pace=own, **options)
