"""The audit as a job (`pipeline/jobs.py`): plan from the crawl and the store's history,
fetch-preflight-scan one model, its `pvs/` and `verdicts/` rows, its MLflow run."""

from __future__ import annotations

import datetime as dt
import importlib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
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
from sanitator.pipeline.reference_fetch import cache_root
from sanitator.pipeline.references import finalize, key_text, plan_references
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
    # configured Hub bases, resolved by the flow (references.resolve_catalog), and the
    # entries that could not be; the flow run's reference cache folder name on workers
    catalog: tuple[ModelRef, ...] = ()
    catalog_problems: dict[str, str] = field(default_factory=dict)
    run_tag: str | None = None

    kind = "audit"
    unit = "model"
    timeout_retryable = True  # a timeout says nothing about the model: audit it next run

    def request(self, ref: ModelRef) -> AuditRequest:
        return AuditRequest(new_audit_id(), ref, self.config, self.config_hash, self.device,
                            self.policy)

    @property
    def uses_references(self) -> bool:
        """Does the scan take references (a registry's bases, siblings, a catalog)?"""
        return not self.config.get("no_reference", False)

    def plan(self, refs: Iterable[ModelRef], history: Iterable[dict[str, Any]], *,
             force: bool = False) -> JobPlan[AuditRequest, AuditOutcome]:
        """`history`: the store's completed audits (`store.completed_audits`). With
        references, a model's clean bases are planned with it (pipeline/references.py)
        and a declared base audited in this run comes first."""
        refs, history = list(refs), list(history)
        plan = plan_audits(refs, history, self.config_hash, self.policy, force=force)
        todo = [self.request(ref) for ref in plan.todo]
        if self.uses_references:
            todo = self._with_references(todo, refs, [] if force else history,
                                         {r.ref.key: r.reason for r in plan.rejected})
        return JobPlan(
            todo=todo,
            settled_now=[(self.request(r.ref), rejection_outcome(r.status, r.reason,
                                                                 r.retryable))
                         for r in plan.rejected],
            settled=list(plan.settled))

    def _with_references(self, todo: list[AuditRequest], refs: list[ModelRef],
                         history: list[dict[str, Any]], refused: dict[tuple, str]
                         ) -> list[AuditRequest]:
        plans = plan_references([r.ref for r in todo], refs, history, refused,
                                self.config_hash, self.catalog, self.catalog_problems)
        ids = {key_text(r.ref.key): r.audit_id for r in todo}
        out = []
        for request in todo:
            plan = plans[request.ref.key]
            planned = tuple(replace(c, waits_for=ids.get(c.waits_for)) if c.waits_for
                            else c for c in plan.candidates)
            out.append(replace(request, references=planned, reference_log=plan.log,
                               waits_for=tuple(ids[key_text(k)] for k in plan.waits_for)))
        # bases first: what others wait for starts first and holds nobody up for long
        wanted = {rid for request in out for rid in request.waits_for}
        return sorted(out, key=lambda r: r.audit_id not in wanted)

    def waits_for(self, request: AuditRequest) -> tuple[str, ...]:
        return request.waits_for

    def ready(self, request: AuditRequest, rows: dict[str, dict[str, Any] | None]
              ) -> AuditRequest:
        references, log = finalize(request.references, request.reference_log or {}, rows)
        return replace(request, references=references, reference_log=log, waits_for=())

    def run(self, request: AuditRequest, *, work_dir: str | None = None) -> AuditOutcome:
        cache = cache_root(work_dir, self.run_tag) if self.run_tag else None
        return run_audit(request, scan=resolve_scanner(self.scanner), work_dir=work_dir,
                         reference_cache=cache)

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
