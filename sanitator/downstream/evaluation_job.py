"""The downstream evaluation as a job (`sanitator.pipeline.jobs`): (encoder, task) pairs
planned from the latest verdicts, one prompt-tuning and attack per pair, its
`evaluations/` row and its MLflow run."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sanitator.core.status import Status
from sanitator.downstream.runs import (
    EVALUATED_STATUSES,
    EVALUATIONS,
    EVALUATIONS_SCHEMA,
    EvaluationOutcome,
    EvaluationRequest,
    TaskChoice,
    evaluation_row,
    plan_evaluations,
    run_evaluation,
)
from sanitator.pipeline.jobs import Job, JobPlan, Rows
from sanitator.pipeline.registries import ModelRef
from sanitator.pipeline.store import new_audit_id


@dataclass
class EvaluationJob(Job[EvaluationRequest, EvaluationOutcome]):
    """Evaluations of the encoders audited in `store` on `tasks` with one configuration
    (`runs.evaluation_config`). Plain data: it travels to the workers."""

    store: str = ""
    tasks: list[TaskChoice] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    statuses: tuple[str, ...] = EVALUATED_STATUSES
    triggers: tuple[str, ...] | None = None
    device: str = "cpu"

    kind = "evaluation"
    unit = "pair"
    timeout_retryable = False

    def plan(self, refs: Iterable[ModelRef], history: Iterable[dict[str, Any]], *,
             force: bool = False) -> JobPlan[EvaluationRequest, EvaluationOutcome]:
        """`history`: the store's evaluation rows (`runs.read_evaluations`)."""
        plan = plan_evaluations(Path(self.store), refs, self.tasks, self.config, done=history,
                                new_id=new_audit_id, statuses=list(self.statuses),
                                triggers=self.triggers, device=self.device, force=force)
        return JobPlan(todo=plan.todo, settled=plan.settled, unavailable=plan.unavailable)

    def run(self, request: EvaluationRequest, *, work_dir: str | None = None
            ) -> EvaluationOutcome:
        return run_evaluation(request, work_dir=work_dir)

    def failed(self, reason: str, *, retryable: bool) -> EvaluationOutcome:
        return EvaluationOutcome(Status.ERROR, reason, retryable=retryable)

    def rows(self, request: EvaluationRequest, outcome: EvaluationOutcome, *,
             at: dt.datetime, batch_id: str | None = None) -> Rows:
        return Rows(EVALUATIONS, evaluation_row(request, outcome, evaluated_at=at,
                                                batch_id=batch_id), EVALUATIONS_SCHEMA)

    def track(self, tracker, request: EvaluationRequest, outcome: EvaluationOutcome,
              row: dict[str, Any], parent_run_id: str | None = None) -> str:
        from sanitator.downstream.tracking import log_evaluation

        return log_evaluation(tracker, request, outcome, row, parent_run_id)

    def request_id(self, request: EvaluationRequest) -> str:
        return request.evaluation_id

    def label(self, request: EvaluationRequest) -> str:
        return f"{request.ref.label} on {request.task.task}"

    def reason(self, outcome: EvaluationOutcome) -> str | None:
        return outcome.reason


def evaluation_job(store: str | Path, tasks: Sequence[TaskChoice], config: dict[str, Any], *,
                   statuses: Sequence[str] = EVALUATED_STATUSES,
                   triggers: Sequence[str] | None = None, device: str = "cpu"
                   ) -> EvaluationJob:
    return EvaluationJob(str(store), list(tasks), config, tuple(statuses),
                         tuple(triggers) if triggers else None, device)
