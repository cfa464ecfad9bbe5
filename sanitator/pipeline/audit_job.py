"""The audit as a job (`pipeline/jobs.py`): plan from the crawl and the store's history,
fetch-preflight-scan one model, its `pvs/` and `verdicts/` rows, its MLflow run."""

from __future__ import annotations

import datetime as dt
import importlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sanitator.pipeline.audit import (
    AuditOutcome,
    AuditPolicy,
    AuditRequest,
    failure_outcome,
    plan_audits,
    pv_rows,
    rejection_outcome,
    run_audit,
    verdict_row,
)
from sanitator.pipeline.jobs import Job, JobPlan, Rows
from sanitator.pipeline.registries import ModelRef
from sanitator.pipeline.store import PVS, VERDICTS, new_audit_id

DEFAULT_SCANNER = "sanitator.detect.scan:scan_model"


def resolve_scanner(name: str):
    """'module:function' -> the function (lets deployments plug another scanner)."""
    module, _, attribute = name.partition(":")
    if not module or not attribute:
        raise ValueError(f"scanner must be 'module:function', got {name!r}")
    return getattr(importlib.import_module(module), attribute)


@dataclass
class AuditJob(Job[AuditRequest, AuditOutcome]):
    """Audits with one scan config and policy. Plain data: it travels to the workers, which
    resolve `scanner` there (a name, so that a deployment can plug in its own)."""

    config: dict[str, Any] = field(default_factory=dict)   # ScanConfig.to_dict()
    config_hash: str = ""
    device: str = "cpu"
    policy: AuditPolicy = field(default_factory=AuditPolicy)
    scanner: str = DEFAULT_SCANNER

    kind = "audit"
    unit = "model"
    timeout_retryable = True  # a timeout says nothing about the model: audit it next run

    def request(self, ref: ModelRef) -> AuditRequest:
        return AuditRequest(new_audit_id(), ref, self.config, self.config_hash, self.device,
                            self.policy)

    def plan(self, refs: Iterable[ModelRef], history: Iterable[dict[str, Any]], *,
             force: bool = False) -> JobPlan[AuditRequest, AuditOutcome]:
        """`history`: the store's completed audits (`store.completed_audits`)."""
        plan = plan_audits(refs, history, self.config_hash, self.policy, force=force)
        return JobPlan(
            todo=[self.request(ref) for ref in plan.todo],
            settled_now=[(self.request(r.ref), rejection_outcome(r.status, r.reason,
                                                                 r.retryable))
                         for r in plan.rejected],
            settled=list(plan.settled))

    def run(self, request: AuditRequest, *, work_dir: str | None = None) -> AuditOutcome:
        return run_audit(request, scan=resolve_scanner(self.scanner), work_dir=work_dir)

    def failed(self, reason: str, *, retryable: bool) -> AuditOutcome:
        return failure_outcome(reason, retryable=retryable)

    def rows(self, request: AuditRequest, outcome: AuditOutcome, *, at: dt.datetime,
             batch_id: str | None = None) -> Rows:
        # PVs first: a verdict row is the commit mark of its audit (sanitator.pipeline.store)
        return Rows(VERDICTS, verdict_row(request, outcome, audited_at=at, batch_id=batch_id),
                    before=[(PVS, pv_rows(request, outcome, audited_at=at), None)])

    def track(self, tracker, request: AuditRequest, outcome: AuditOutcome,
              row: dict[str, Any], parent_run_id: str | None = None) -> str:
        return tracker.log_audit(request, outcome, row, parent_run_id)

    def request_id(self, request: AuditRequest) -> str:
        return request.audit_id

    def label(self, request: AuditRequest) -> str:
        return request.ref.label

    def reason(self, outcome: AuditOutcome) -> str | None:
        return outcome.verdict.reason
