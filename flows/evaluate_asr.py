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

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import as_completed

from flows.audit_zoo import dask_runner
from sanitator.core.status import Status
from sanitator.downstream.runs import (
    EVALUATED_STATUSES,
    EvaluationOutcome,
    EvaluationRequest,
    TaskChoice,
    evaluation_config,
    plan_evaluations,
    read_evaluations,
    summarize_evaluations,
)
from sanitator.pipeline.audit_tracking import open_tracker
from sanitator.pipeline.registries import ModelRef
from sanitator.pipeline.store import latest_verdicts, new_audit_id
from tasks.audit import crawl_registry
from tasks.evaluate import TransientEvaluationError, evaluate_pair, record_evaluation

log = logging.getLogger(__name__)


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


def _failure(exc: BaseException, timeout: float | None) -> EvaluationOutcome:
    if isinstance(exc, TimeoutError):
        return EvaluationOutcome(Status.ERROR, f"timed out after {timeout:g} s (per-pair timeout)")
    if isinstance(exc, TransientEvaluationError):
        return EvaluationOutcome(Status.ERROR, f"{exc} (retries exhausted)", retryable=True)
    return EvaluationOutcome(Status.ERROR, f"worker lost or task crashed: {type(exc).__name__}: "
                             f"{exc}", retryable=True)


@flow(name="evaluate-pairs-on-dask", validate_parameters=False)
def evaluate_on_dask(requests: list[EvaluationRequest], store: str,
                     tracking_uri: str | None = None, batch_id: str | None = None,
                     work_dir: str | None = None, torch_threads: int | None = None,
                     per_pair_timeout: float | None = None, gpu: bool = False
                     ) -> list[dict[str, Any]]:
    """Submit one evaluation task per pair to Dask; record each as soon as it finishes."""
    import dask

    tracker = open_tracker(tracking_uri, store)
    task = evaluate_pair.with_options(timeout_seconds=per_pair_timeout)
    futures = {}
    for request in requests:
        with dask.annotate(resources={"GPU": 1}) if gpu else nullcontext():
            future = task.submit(request, work_dir=work_dir, torch_threads=torch_threads)
        futures[future] = request
    rows = []
    for future in as_completed(list(futures)):
        try:
            outcome = future.result(raise_on_failure=False)
        except Exception as exc:  # KilledWorker, CancelledError, lost scheduler
            outcome = exc
        if isinstance(outcome, BaseException):
            outcome = _failure(outcome, per_pair_timeout)
        rows.append(record_evaluation(futures[future], outcome, store, tracker,
                                      batch_id=batch_id))
    return rows


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _per_trigger_text(result: dict[str, Any]) -> str:
    """`cf 100.0%/0.0%, mn ...`: ASR without/with the monitor per trigger."""
    if result.get("converged") is False:
        return "not converged"
    return ", ".join(f"{item['trigger']} {_pct(item['asr'])}/{_pct(item['defended_asr'])}"
                     for item in result.get("per_trigger") or [])


def _summary_markdown(summary: dict[str, Any]) -> str:
    pct = _pct
    lines = ["# Downstream evaluation", "",
             "| encoder | task | attack | clean acc | ASR | defended ASR | defended clean acc "
             "| monitor FPR |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| `{r['encoder']}` | {r['task']} | {r['attack']} | {pct(r['clean_accuracy'])} "
              f"| {pct(r['asr'])} | {pct(r['defended_asr'])} | "
              f"{pct(r['defended_clean_accuracy'])} | {pct(r['monitor_fpr'])} |"
              for r in summary["results"]] or ["| none | | | | | | | |"]
    unconverged = [r for r in summary["results"] if r.get("converged") is False]
    if unconverged:
        lines += ["", "## Not converged (no ASR reported)", ""]
        lines += [f"- `{r['encoder']}` {r['task']}: {r['reason']}" for r in unconverged]
    per_trigger = [(r, item) for r in summary["results"] if r.get("converged") is not False
                   for item in r.get("per_trigger") or []]
    if per_trigger:
        lines += ["", "## Per trigger", "", "| encoder | task | trigger | ASR | defended ASR |",
                  "|---|---|---|---|---|"]
        lines += [f"| `{r['encoder']}` | {r['task']} | `{item['trigger']}` | {pct(item['asr'])} "
                  f"| {pct(item['defended_asr'])} |" for r, item in per_trigger]
    lines += ["", f"Already evaluated with these settings: {summary['already_evaluated']}"]
    for title, key, field in (("Errors", "errors", "reason"),
                              ("Not evaluated", "unavailable", "reason")):
        if summary[key]:
            lines += ["", f"## {title}", ""]
            lines += [f"- `{item['encoder']}` {item.get('task', '')}: {item[field]}"
                      for item in summary[key]]
    return "\n".join(lines)


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
    plan = plan_evaluations(store, refs, choices, config, done=_done(store),
                            new_id=new_audit_id, statuses=list(statuses or EVALUATED_STATUSES),
                            triggers=triggers, device=device, force=force)
    logger.info("%d encoder(s), %d task(s): %d pair(s) to evaluate, %d already evaluated, "
                "%d encoder(s) unavailable", len(refs), len(choices), len(plan.todo),
                len(plan.settled), len(plan.unavailable))
    rows: list[dict[str, Any]] = []
    if plan.todo:
        tracking_uri = (mlflow_uri or default_tracking_uri(store)) if track else None
        runner = dask_runner(dask_address, n_workers, torch_threads, device.startswith("cuda"))
        rows = evaluate_on_dask.with_options(task_runner=runner)(
            plan.todo, store, tracking_uri, batch_id, work_dir, torch_threads,
            per_pair_timeout, device.startswith("cuda"))
    summary = summarize_evaluations(rows, plan)
    summary["registry_errors"] = registry_errors
    summary["store"] = store
    create_markdown_artifact(_summary_markdown(summary), key="evaluation-summary",
                             description="clean accuracy and attack success per pair")
    if summary["results"]:
        table = [{**{k: v for k, v in r.items() if k != "per_trigger"},
                  "per_trigger": _per_trigger_text(r)} for r in summary["results"]]
        create_table_artifact(table, key="evaluations",
                              description="the evaluations written by this flow run (per "
                                          "trigger: ASR without/with the monitor)")
    return summary


def _done(store: str) -> list[dict[str, Any]]:
    frame = read_evaluations(store)
    return frame.to_dict("records") if not frame.empty else []


def evaluate_asr(store: str | Path = "sanitator-store", **options: Any) -> dict[str, Any]:
    """Run the evaluation flow from Python (options: evaluate_asr_flow's parameters)."""
    return evaluate_asr_flow(store=str(store), **options)
