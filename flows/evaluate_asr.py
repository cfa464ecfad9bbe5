"""The weekly downstream evaluation: for each audited encoder (the latest verdicts of the
store, or given folders) and each task, prompt-tune it with the encoder frozen, attack it
with its backdoor's triggers, and measure clean accuracy and ASR with and without the PV
monitor of its audit. One Prefect task per (encoder, task) pair on Dask; rows go to the
store's `evaluations/` dataset and one MLflow run per pair carries the trained prompt.

    from flows.evaluate_asr import evaluate_asr
    summary = evaluate_asr("/data/sanitator", tasks=["sst2", "sms_spam"])

Docs: docs/evaluation.md ("Scheduled evaluation").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.dask_jobs import run_jobs
from sanitator.downstream.evaluation_job import evaluation_job
from sanitator.downstream.runs import (
    EVALUATED_STATUSES,
    TaskChoice,
    evaluation_config,
    read_evaluations,
    summarize_evaluations,
)
from sanitator.pipeline.registries import ModelRef
from sanitator.pipeline.store import latest_verdicts, new_audit_id
from sanitator.report.summaries import evaluation_summary_markdown, evaluations_table
from tasks.jobs import crawl_registry


def folder_ref(path: str | Path) -> ModelRef:
    """A model folder given by path, named as a `path:` registry of its parent names it."""
    from sanitator.pipeline.registries.local import LocalRegistry, content_revision

    folder = Path(path).expanduser().resolve()
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a model folder (no config.json)")
    registry = LocalRegistry(folder.parent)
    return registry._ref(folder, folder.name, content_revision(folder), {"layout": "folder"})


def audited_refs(store: str, registries: list[str] | None, statuses: list[str], logger
                 ) -> tuple[list[ModelRef], dict[str, str]]:
    """Refs of the models whose latest verdict is in `statuses`, crawled from their
    registries so that workers can fetch them at the audited revision."""
    latest = latest_verdicts(store)
    if latest.empty:
        return [], {}
    latest = latest[latest["status"].isin(statuses)]
    if registries:
        latest = latest[latest["registry"].isin(registries)]
    wanted = {(r["registry"], r["repo_id"]): r["revision"] for r in latest.to_dict("records")}
    refs, errors = [], {}
    for spec in sorted({registry for registry, _ in wanted}):
        try:
            crawled = crawl_registry(spec)
        except Exception as exc:  # one unreachable registry must not stop the others
            logger.error("crawling %s failed: %s", spec, exc)
            errors[spec] = f"{type(exc).__name__}: {exc}"
            continue
        refs += [ref for ref in crawled
                 if wanted.get((ref.registry, ref.repo_id)) == ref.revision]
    return refs, errors


@flow(name="evaluate-asr")
def evaluate_asr_flow(store: str = "sanitator-store",
                      tasks: list[str | dict[str, Any]] | None = None,
                      models: list[str] | None = None, registries: list[str] | None = None,
                      statuses: list[str] | None = None, method: str = "ptv2",
                      prompt_options: dict[str, Any] | None = None,
                      attack_options: dict[str, Any] | None = None, limit: int | None = 500,
                      triggers: list[str] | None = None, dask_address: str | None = None,
                      n_workers: int = 2, mlflow_uri: str | None = None, device: str = "cpu",
                      per_pair_timeout: float | None = 7200.0, force: bool = False,
                      work_dir: str | None = None, torch_threads: int | None = None,
                      track: bool = True, chance_margin: float | None = None
                      ) -> dict[str, Any]:
    """Evaluate every (audited encoder, task) pair not yet evaluated with these settings.

    Encoders: `models` (folders) when given, else those whose latest verdict in the store is
    in `statuses` (default clean and backdoored), optionally only from `registries`. Tasks:
    ready-made names or {"task": parquet, "text_column": ..., ...}. A prompt model whose
    train or clean accuracy is within `chance_margin` (default 0.10) of the majority-class
    rate is not attacked: its row has `converged` false, the reason, and no ASR. Returns the
    summary; each result carries its per-trigger ASR with and without the monitor.
    """
    from prefect.runtime import flow_run

    from sanitator.pipeline.audit_tracking import default_tracking_uri

    logger = get_run_logger()
    store = str(Path(store).resolve())
    choices = [TaskChoice.parse(t) for t in (tasks or ["sst2", "sms_spam"])]
    for choice in choices:
        choice.spec()  # fail fast on an unknown task or a missing column, before any work
    config = evaluation_config(prompt_options, attack_options, limit, method, chance_margin)
    batch_id = str(flow_run.get_id() or new_audit_id())
    if models:
        refs, registry_errors = [folder_ref(path) for path in models], {}
    else:
        refs, registry_errors = audited_refs(store, registries,
                                             list(statuses or EVALUATED_STATUSES), logger)
    job = evaluation_job(store, choices, config, statuses=statuses or EVALUATED_STATUSES,
                         triggers=triggers, device=device)
    plan = job.plan(refs, _done(store), force=force)
    logger.info("%d encoder(s), %d task(s): %d pair(s) to evaluate, %d already evaluated, "
                "%d encoder(s) unavailable", len(refs), len(choices), len(plan.todo),
                len(plan.settled), len(plan.unavailable))
    rows: list[dict[str, Any]] = []
    if plan.todo:
        tracking_uri = (mlflow_uri or default_tracking_uri(store)) if track else None
        rows = run_jobs(job, plan.todo, store, dask_address=dask_address,
                        n_workers=n_workers, torch_threads=torch_threads, device=device,
                        tracking_uri=tracking_uri, batch_id=batch_id, work_dir=work_dir,
                        timeout=per_pair_timeout)
    summary = summarize_evaluations(rows, plan)
    summary["registry_errors"] = registry_errors
    summary["store"] = store
    create_markdown_artifact(evaluation_summary_markdown(summary), key="evaluation-summary",
                             description="clean accuracy and attack success per pair")
    if summary["results"]:
        create_table_artifact(evaluations_table(summary), key="evaluations",
                              description="the evaluations written by this flow run (per "
                                          "trigger: ASR without/with the monitor)")
    return summary


def _done(store: str) -> list[dict[str, Any]]:
    frame = read_evaluations(store)
    return frame.to_dict("records") if not frame.empty else []


def evaluate_asr(store: str | Path = "sanitator-store", **options: Any) -> dict[str, Any]:
    """Run the evaluation flow from Python (options: evaluate_asr_flow's parameters)."""
    return evaluate_asr_flow(store=str(store), **options)
