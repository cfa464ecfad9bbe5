"""Both flows' fan-out on Dask: the task runner (a LocalCluster, flows/dask_cluster.py, or
a scheduler address), the Prefect-on-Dask side of `sanitator.pipeline.fanout.Executor`, and
the subflow that runs one job's requests through `sanitator.pipeline.fanout.fan_out`
(docs/pipeline.md)."""

from __future__ import annotations

import logging
import os
import threading
import uuid
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from typing import Any

import distributed
from prefect import flow, get_run_logger
from prefect_dask import DaskTaskRunner
from prefect_dask.task_runners import PrefectDaskFuture

from flows.dask_cluster import OWN_ADDRESSES, api_url, fresh_forkserver, local_cluster_kwargs
from sanitator.pipeline.audit_tracking import open_tracker
from sanitator.pipeline.fanout import fan_out
from sanitator.pipeline.jobs import Job
from tasks.jobs import JOB_START_TOPIC, WarmUp, record_task, run_task

log = logging.getLogger(__name__)


# the subflow's name per kind of job, as the Prefect UI has always shown it
SUBFLOW_NAMES = {"audit": "audit-models-on-dask", "evaluation": "evaluate-pairs-on-dask"}

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
    CPU each time here) and the subflow's parameters (which once held every request of
    the fan-out: each submission cost more the more models there were,
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
    url = os.environ.get("PREFECT_API_URL") or api_url()
    return KeyedDaskTaskRunner(cluster_class="distributed.LocalCluster",
                               cluster_kwargs=local_cluster_kwargs(n_workers, torch_threads,
                                                                   gpu, url))


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


# Requests reach the subflow through a handle, never as its parameters: Prefect refuses
# a flow run whose parameters exceed 512 KiB, and 1,000 requests (each with its
# references' file lists) are several MB. The subflow runs in this process, so a
# process-local table is enough.
_BATCHES: dict[str, list[Any]] = {}


@dataclass(frozen=True)
class RequestBatch:
    """What the subflow's parameters show of its requests: their count and a key."""

    key: str
    count: int


def _run_on_dask(job: Job, batch: RequestBatch, store: str, tracking_uri: str | None = None,
                parent_run_id: str | None = None, batch_id: str | None = None,
                work_dir: str | None = None, torch_threads: int | None = None,
                timeout: float | None = None, gpu: bool = False, pace: bool = False
                ) -> list[dict[str, Any]]:
    """Submit one run task per request to Dask; record each as soon as it finishes.
    `pace`: runs re-size their torch threads as others free the host (tasks/jobs.py)."""
    from prefect.context import FlowRunContext

    requests = _BATCHES[batch.key]
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


# The flow wraps a function that this module also names, so that cloudpickle ships it by
# reference: every task run carries the flow in its context, and a function pickled by
# value takes its globals along (the requests of the whole batch, for each of them).
run_on_dask = flow(name="run-jobs-on-dask", validate_parameters=False)(_run_on_dask)


def run_jobs(job: Job, requests: list[Any], store: str, *, dask_address: str | None,
             n_workers: int, torch_threads: int | None, device: str, **options: Any
             ) -> list[dict[str, Any]]:
    """`run_on_dask` on its own task runner, named for `job`'s kind."""
    gpu = device.startswith("cuda")
    runner = dask_runner(dask_address, n_workers, torch_threads, gpu)
    subflow = run_on_dask.with_options(name=SUBFLOW_NAMES[job.kind], task_runner=runner)
    # on a LocalCluster of our own (not a user's scheduler) a run takes the cores others free
    own = not dask_address or dask_address in OWN_ADDRESSES
    batch = RequestBatch(uuid.uuid4().hex, len(requests))
    _BATCHES[batch.key] = list(requests)
    try:
        return subflow(job, batch, store, torch_threads=torch_threads, gpu=gpu,
                       pace=own, **options)
    finally:
        _BATCHES.pop(batch.key, None)
