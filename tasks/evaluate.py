"""Prefect tasks of the evaluation flow: evaluate one (encoder, task) pair, record it.

`evaluate_pair` runs on Dask workers; `record_evaluation` runs in the flow process (called
directly), so the store and the MLflow backend only ever have one writer.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from sanitator.downstream.runs import (
    EVALUATIONS,
    EVALUATIONS_SCHEMA,
    EvaluationOutcome,
    EvaluationRequest,
    evaluation_row,
    run_evaluation,
)
from sanitator.downstream.tracking import log_evaluation
from sanitator.pipeline.store import audit_date, utc_now, write_rows
from tasks.audit import worker_threads

log = logging.getLogger(__name__)


class TransientEvaluationError(RuntimeError):
    """An evaluation failed for a reason worth retrying (fetch error, crash)."""


def _retry_if_transient(task, task_run, state) -> bool:
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as error:
        exc = error
    return isinstance(exc, TransientEvaluationError)


@task(name="evaluate-pair", retries=1, retry_delay_seconds=[30],
      retry_condition_fn=_retry_if_transient, cache_policy=NONE, persist_result=False,
      task_run_name="evaluate {request.ref.repo_id} on {request.task.task}")
def evaluate_pair(request: EvaluationRequest, work_dir: str | None = None,
                  torch_threads: int | None = None) -> EvaluationOutcome:
    """Prompt-tune and attack one encoder on one task on a worker. Raises on transient
    failures (so Prefect retries); every other failure comes back as an error outcome."""
    import torch

    threads = worker_threads(torch_threads)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    outcome = run_evaluation(request, work_dir=work_dir)
    if outcome.retryable:
        raise TransientEvaluationError(outcome.reason or "transient failure")
    return outcome


@task(name="record-evaluation", retries=2, retry_delay_seconds=2, cache_policy=NONE,
      persist_result=False, task_run_name="record {request.ref.repo_id} on {request.task.task}")
def record_evaluation(request: EvaluationRequest, outcome: EvaluationOutcome, store: str,
                      tracker: Any | None = None, parent_run_id: str | None = None,
                      batch_id: str | None = None) -> dict[str, Any]:
    """Log one evaluation to MLflow (trained prompt as artifact), then write its row."""
    evaluated_at = utc_now()
    row = evaluation_row(request, outcome, evaluated_at=evaluated_at, batch_id=batch_id)
    if tracker is not None:
        try:
            row["mlflow_run_id"] = log_evaluation(tracker, request, outcome, row, parent_run_id)
        except Exception as exc:  # tracking mirrors the store: never lose a row to it
            log.warning("MLflow logging of %s on %s failed: %s", request.ref.label,
                        row["task"], exc)
    write_rows(store, EVALUATIONS, [row], partition=audit_date(evaluated_at),
               name=request.evaluation_id, schema=EVALUATIONS_SCHEMA)
    return row
