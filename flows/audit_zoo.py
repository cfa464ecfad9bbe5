"""The nightly audit: crawl registries, plan, fan out one Prefect task per model to Dask,
write verdicts and PV sets to the Parquet store and MLflow, publish a summary artifact.

    from flows.audit_zoo import audit_zoo
    summary = audit_zoo(registries=["hf:acme", "path:/models"], out="/data/sanitator")

`audit_zoo_flow` is the Prefect flow (deployment entrypoint, JSON parameters only);
`audit_zoo` is the Python entry point that also takes a ScanConfig object. Docs:
docs/pipeline.md (flow, deployments, scaling out, GPU), docs/store.md (the store).
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Failed

from flows.dask_jobs import run_jobs
from sanitator.pipeline import lease, progress
from sanitator.pipeline.audit import AuditPolicy, summarize
from sanitator.pipeline.audit_job import DEFAULT_SCANNER, AuditJob
from sanitator.pipeline.audit_tracking import open_tracker
from sanitator.pipeline.holder import this_process
from sanitator.pipeline.jobs import Backlog, record
from sanitator.pipeline.reference_fetch import cache_root
from sanitator.pipeline.registries import parse_registry
from sanitator.pipeline.store import completed_audits, new_audit_id
from sanitator.report.summaries import audit_summary_markdown, audit_verdicts_table
from tasks.jobs import crawl_registry, describe_registry, resolve_catalog


def resolve_scan_config(preset: str = "fast", scan_options: dict[str, Any] | None = None,
                        scan_config: dict[str, Any] | None = None):
    """A full config dict wins; otherwise the preset with flat overrides."""
    from sanitator.detect.config import ScanConfig
    from sanitator.pipeline.audit import scan_config_from_dict

    if scan_config:
        return scan_config_from_dict(scan_config)
    # an audit publishes PV artifacts: a backdoored verdict goes on to every PV (issue 15)
    return ScanConfig.from_preset(preset, **{"complete": True, **(scan_options or {})})


class RegistryUnavailable(RuntimeError):
    """A registry could not be listed at all: the flow fails after recording the others.
    `summary` is the flow's summary (the rows of the registries that could be listed)."""

    def __init__(self, summary: dict[str, Any]):
        failed = "; ".join(f"{spec}: {reason}"
                           for spec, reason in summary["registry_errors"].items())
        super().__init__(f"{len(summary['registry_errors'])} registry(ies) could not be "
                         f"listed: {failed}")
        self.summary = summary


class RegistryBusy(RuntimeError):
    """Another audit of the same store holds a registry (sanitator/pipeline/lease.py):
    that registry was left to it, the others were audited. `summary` as above."""

    def __init__(self, summary: dict[str, Any]):
        busy = "; ".join(f"{spec}: {reason}" for spec, reason in summary["registry_busy"].items())
        super().__init__(f"{len(summary['registry_busy'])} registry(ies) left to another "
                         f"audit of this store: {busy}")
        self.summary = summary


@flow(name="audit-zoo")
def audit_zoo_flow(registries: list[str], out: str = "sanitator-store",
                   dask_address: str | None = None, n_workers: int = 2,
                   mlflow_uri: str | None = None, preset: str = "fast",
                   scan_options: dict[str, Any] | None = None,
                   scan_config: dict[str, Any] | None = None, device: str = "cpu",
                   per_model_timeout: float | None = 3600.0, allow_pickle: bool = False,
                   max_params: int | None = None, force: bool = False,
                   work_dir: str | None = None, torch_threads: int | None = None,
                   scanner: str = DEFAULT_SCANNER, track: bool = True,
                   reference_catalog: list[str] | None = None,
                   lease_wait: float = 0.0) -> dict[str, Any]:
    """Audit every model of `registries` not yet audited with this config; see docs/pipeline.md.

    `reference_catalog`: configured Hub bases (`hf:ORG/NAME[@REV]`) every model may be
    diffed against (docs/pipeline.md, References).
    Returns the summary: counts per status, backdoored models, errors, store path. When a
    registry cannot be listed at all, the others are still audited and the run ends
    Failed (calling the flow raises RegistryUnavailable, which carries the summary). A
    registry another audit of this store holds (its lease, waited for up to `lease_wait`
    seconds) is left to that audit; the run then ends Failed too (RegistryBusy).
    """
    logger = get_run_logger()
    canonical = {}
    for spec in registries:  # fail fast on a malformed spec, before any work
        canonical.setdefault(parse_registry(spec).spec, spec)
    store = str(Path(out).resolve())
    Path(store).mkdir(parents=True, exist_ok=True)
    # one audit per store and registry at a time (sanitator/pipeline/lease.py)
    holding = lease.hold(store, canonical, wait=lease_wait)
    held = [canonical[spec] for spec in canonical if spec in holding.leases]
    busy = {canonical[spec]: reason for spec, reason in holding.busy_reasons(store).items()}
    for spec, reason in busy.items():
        logger.warning("%s is left to another audit: %s", spec, reason)
    for spec, how in holding.taken_over().items():
        logger.warning("took over the lease of %s %s", spec, how)
    try:
        with progress.listening(progress.LogLines(logger)):
            return _audit(held, store, busy, holding, dask_address=dask_address,
                          n_workers=n_workers, mlflow_uri=mlflow_uri, preset=preset,
                          scan_options=scan_options, scan_config=scan_config, device=device,
                          per_model_timeout=per_model_timeout, allow_pickle=allow_pickle,
                          max_params=max_params, force=force, work_dir=work_dir,
                          torch_threads=torch_threads, scanner=scanner, track=track,
                          reference_catalog=reference_catalog)
    finally:
        holding.release()


def _audit(registries: list[str], store: str, busy: dict[str, str], holding: lease.Holding, *,
           dask_address: str | None, n_workers: int, mlflow_uri: str | None, preset: str,
           scan_options: dict[str, Any] | None, scan_config: dict[str, Any] | None,
           device: str, per_model_timeout: float | None, allow_pickle: bool,
           max_params: int | None, force: bool, work_dir: str | None,
           torch_threads: int | None, scanner: str, track: bool,
           reference_catalog: list[str] | None):
    """The flow's body once the leases are taken: `registries` are the ones held."""
    from prefect.runtime import flow_run

    from sanitator.pipeline.audit_tracking import default_tracking_uri

    logger = get_run_logger()
    if not registries:  # every registry is another audit's: nothing to do, no batch run
        summary = summarize([], store=store)
        summary["registry_busy"] = busy
        failure = RegistryBusy(summary)
        logger.error("%s", failure)
        return Failed(message=str(failure), data=failure)
    config = resolve_scan_config(preset, scan_options, scan_config)
    config_dict, config_hash = config.to_dict(), config.config_hash()
    policy = AuditPolicy(allow_pickle=allow_pickle, max_params=max_params)
    batch_id = str(flow_run.get_id() or new_audit_id())
    tracking_uri = (mlflow_uri or default_tracking_uri(store)) if track else None
    tracker = open_tracker(tracking_uri, store)
    parent_run_id, killed = None, []
    if tracker is not None:
        killed = tracker.close_orphans(store, lease.live_holders(store))
        for run_id in killed:
            logger.warning("MLflow batch run %s was left RUNNING by a dead audit: closed as "
                           "KILLED (with its audit runs still RUNNING)", run_id)
        try:
            parent_run_id = tracker.start_batch(batch_id, {
                "registries": ",".join(registries), "config_hash": config_hash,
                "device": device, "allow_pickle": allow_pickle, "max_params": max_params,
                "config": config_dict}, store=store, holder=this_process())
        except Exception as exc:
            logger.warning("MLflow parent run not created: %s", exc)
            tracker = None

    job = AuditJob(config_dict, config_hash, device, policy, scanner, run_tag=batch_id)
    if job.uses_references and reference_catalog:
        catalog, problems = resolve_catalog(list(reference_catalog))
        job = replace(job, catalog=tuple(catalog), catalog_problems=problems)
    try:
        summary = _crawl_plan_audit(registries, store, job, force=force, tracker=tracker,
                                    parent_run_id=parent_run_id, batch_id=batch_id,
                                    dask_options={
                                        "dask_address": dask_address, "n_workers": n_workers,
                                        "torch_threads": torch_threads, "work_dir": work_dir,
                                        "timeout": per_model_timeout,
                                        "tracking_uri": tracking_uri})
    except BaseException:
        if tracker is not None and parent_run_id:  # never leave the batch run RUNNING
            tracker.close_failed(parent_run_id)
        raise
    finally:  # this run's fetched references on this machine (reference_fetch.py)
        shutil.rmtree(cache_root(work_dir, batch_id), ignore_errors=True)
    summary["registry_busy"] = busy
    summary["recovered"] = {"leases": holding.taken_over(), "mlflow_runs_killed": killed}
    if tracker is not None and parent_run_id:
        try:
            tracker.end_batch(parent_run_id, summary, failed=bool(summary["registry_errors"]))
        except Exception as exc:
            logger.warning("MLflow parent run not closed: %s", exc)
            tracker.close_failed(parent_run_id)
    if summary["registry_errors"]:
        # a Failed state rather than a raise: the run ends Failed with a plain message and
        # the caller gets RegistryUnavailable, without Prefect logging a traceback
        failure = RegistryUnavailable(summary)
        logger.error("%s", failure)
        return Failed(message=str(failure), data=failure)
    if busy:
        failure = RegistryBusy(summary)
        logger.error("%s", failure)
        return Failed(message=str(failure), data=failure)
    return summary


def _crawl_plan_audit(registries: list[str], store: str, job: AuditJob, *, force: bool,
                      tracker, parent_run_id: str | None, batch_id: str,
                      dask_options: dict[str, Any]) -> dict[str, Any]:
    """The flow's work: crawl, plan, record what the plan settles, audit the rest."""
    logger = get_run_logger()
    refs, registry_errors = [], {}
    for spec in registries:
        try:
            listed = crawl_registry(spec)
        except Exception as exc:  # one unlistable registry must not stop the others
            logger.error("listing %s failed: %s", spec, exc)
            registry_errors[spec] = f"{type(exc).__name__}: {exc}"
            continue
        if job.uses_references:  # declared bases, shapes, bases outside the listing
            try:
                listed = describe_registry(spec, listed)
            except Exception as exc:  # references are a help: audit without them
                logger.warning("the references of %s were not resolved: %s", spec, exc)
        refs.extend(listed)

    plan = job.plan(refs, completed_audits(store), force=force)
    logger.info("%d model(s): %d to audit, %d rejected from metadata, %d already audited",
                len(refs), len(plan.todo), len(plan.settled_now), len(plan.settled))
    canonical = {spec: parse_registry(spec).spec for spec in registries}  # rows carry these
    progress.publish_plan(canonical.values(), plan.todo, [r for r, _ in plan.settled_now],
                          plan.settled, notes={canonical[spec]: f"could not be listed: {reason}"
                                               for spec, reason in registry_errors.items()})
    rows = []
    # what the plan settles is recorded while the workers audit the rest (jobs.Backlog)
    with Backlog(plan.settled_now, lambda request, outcome: record(
            job, request, outcome, store, tracker, parent_run_id, batch_id)) as backlog:
        if plan.todo:
            options = dict(dask_options)
            tracking_uri = options.pop("tracking_uri")
            tracking_uri = tracking_uri if tracker else None
            rows = run_jobs(job, plan.todo, store, tracking_uri=tracking_uri,
                            parent_run_id=parent_run_id, batch_id=batch_id,
                            device=job.device, **options)
    rows = backlog.rows + rows

    summary = summarize(rows, settled=len(plan.settled), store=store,
                        registry_errors=registry_errors)
    try:  # a view of rows already in the store: a slow or failing API must not fail the audit
        create_markdown_artifact(audit_summary_markdown(summary), key="audit-summary",
                                 description="counts per status and the backdoored models")
        if rows:
            create_table_artifact(audit_verdicts_table(rows), key="audit-verdicts",
                                  description="the verdicts written by this flow run")
    except Exception as exc:
        logger.warning("the summary artifacts were not published (%s: %s); the rows are in "
                       "the store", type(exc).__name__, exc)
    return summary


def audit_zoo(registries: list[str], out: str | Path = "sanitator-store", *,
              scan_config: Any = None, **options: Any) -> dict[str, Any]:
    """Run the audit flow from Python. `scan_config` may be a ScanConfig, a dict from
    `ScanConfig.to_dict()`, or None (the preset named by `preset`, default fast).
    Other options are audit_zoo_flow's parameters (dask_address, n_workers, mlflow_uri,
    device, per_model_timeout, allow_pickle, max_params, force, work_dir, ...)."""
    if scan_config is not None and not isinstance(scan_config, dict):
        scan_config = scan_config.to_dict()
    return audit_zoo_flow(registries=list(registries), out=str(out), scan_config=scan_config,
                          **options)
