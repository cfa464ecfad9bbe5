"""A small audit store with known verdicts, written through the project's own row builders
(`sanitator.pipeline.audit.verdict_row` / `pv_rows`, `store.write_rows`), so its schema is
the real one. Used by the report, PV-artifact and report-flow tests."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import torch

from sanitator.detect.results import PVSet, Verdict
from sanitator.downstream.runs import EVALUATIONS, EVALUATIONS_SCHEMA
from sanitator.pipeline.audit import AuditOutcome, AuditPolicy, AuditRequest, pv_rows, verdict_row
from sanitator.pipeline.registries import ModelRef
from sanitator.pipeline.store import PVS, VERDICTS, audit_date, write_rows

REV_A = "a" * 40
REV_B_OLD = "b" * 40
REV_B = "c" * 40
CONFIG_HASH = "0123456789abcdef"
HIDDEN = 16


def _ref(registry: str, repo_id: str, revision: str) -> ModelRef:
    source = registry.split(":", 1)[0]
    return ModelRef(source=source, registry=registry, repo_id=repo_id, revision=revision,
                    location=f"{registry}/{repo_id}")


def write_audit(store: Path, registry: str, repo_id: str, revision: str, status: str, *,
                when: dt.datetime, audit_id: str, score: float | None = None,
                pvset: PVSet | None = None, reason: str | None = None,
                retryable: bool = False, seconds: float = 12.5,
                mlflow_run_id: str | None = None) -> dict:
    """One audit as the flow records it: PV rows first, then the verdict row."""
    request = AuditRequest(audit_id, _ref(registry, repo_id, revision), {"preset": "fast"},
                           CONFIG_HASH, "cpu", AuditPolicy())
    verdict = Verdict(status, score=score, reason=reason, seeds_tried=4, steps=400,
                      seconds=seconds)
    outcome = AuditOutcome(verdict, pvset, {"architecture": "bert", "n_params": 1000,
                                            "weights_format": "safetensors",
                                            "weight_bytes": 4000}, seconds, retryable)
    partition = audit_date(when)
    write_rows(store, PVS, pv_rows(request, outcome, audited_at=when), partition=partition,
               name=audit_id)
    row = verdict_row(request, outcome, audited_at=when, mlflow_run_id=mlflow_run_id)
    write_rows(store, VERDICTS, [row], partition=partition, name=audit_id)
    return row


def planted_pvset(vectors: torch.Tensor | None = None, feature: str = "cls") -> PVSet:
    vectors = vectors if vectors is not None else torch.randn(
        2, HIDDEN, generator=torch.Generator().manual_seed(0))
    triggers = torch.zeros(len(vectors), 3, 4)
    return PVSet(vectors.float(), triggers, seeds=list(range(len(vectors))),
                 losses=[{"distance": 0.01}] * len(vectors),
                 trigger_tokens=[["cf"]] + [["mn"]] * (len(vectors) - 1), feature=feature)


DAY1 = dt.datetime(2026, 5, 1, 2, 10, tzinfo=dt.UTC)
DAY2 = dt.datetime(2026, 5, 2, 2, 10, tzinfo=dt.UTC)


def build_store(store: Path, *, pv_vectors: torch.Tensor | None = None,
                second_night: bool = True, evaluations: bool = True) -> Path:
    """Night 1: encoder-a and encoder-b clean, a pickle-only model errors, a decoder is
    unsupported. Night 2: encoder-b has a new revision, which is backdoored (2 PVs,
    triggers cf / mn), an MLflow model is clean, an oversized model is skipped, and the
    pickle-only model still errors. One evaluation of encoder-b on sst2."""
    hub, local, mlflow = "hf:acme", "path:/srv/models", "mlflow:http://127.0.0.1:5000"
    write_audit(store, hub, "acme/encoder-a", REV_A, "clean", when=DAY1, audit_id="a1" * 16,
                score=0.04, seconds=30.0, mlflow_run_id="f" * 32)
    write_audit(store, hub, "acme/encoder-b", REV_B_OLD, "clean", when=DAY1,
                audit_id="b1" * 16, score=0.08, seconds=31.0)
    write_audit(store, local, "team/pickled", "d" * 40, "error", when=DAY1,
                audit_id="c1" * 16, reason="pickle-only weights; pass --allow-pickle")
    write_audit(store, hub, "acme/decoder", "e" * 40, "unsupported", when=DAY1,
                audit_id="d1" * 16, reason="gpt2 is a decoder")
    if not second_night:
        return store
    write_audit(store, hub, "acme/encoder-b", REV_B, "backdoored", when=DAY2,
                audit_id="b2" * 16, score=0.97, pvset=planted_pvset(pv_vectors),
                seconds=95.0, mlflow_run_id="e" * 32)
    write_audit(store, mlflow, "zoo-clean", "v3-0badc0de", "clean", when=DAY2,
                audit_id="e2" * 16, score=0.11, seconds=44.0)
    write_audit(store, hub, "acme/huge", "9" * 40, "skipped", when=DAY2, audit_id="f2" * 16,
                reason="2000000000 parameters > --max-params 1000000000")
    write_audit(store, local, "team/pickled", "d" * 40, "error", when=DAY2,
                audit_id="c2" * 16, reason="pickle-only weights; pass --allow-pickle")
    if evaluations:
        row = {"evaluation_id": "77" * 16, "evaluated_at": DAY2 + dt.timedelta(hours=2),
               "source": "hf", "registry": hub, "encoder": "acme/encoder-b",
               "revision": REV_B, "task": "sst2", "method": "ptv2", "status": "ok",
               "audit_id": "b2" * 16, "verdict_status": "backdoored", "attack": "por",
               "triggers": ["cf"], "n_pvs": 2, "on_flag": "purge", "clean_accuracy": 0.81,
               "asr": 0.98, "weighted_asr": 0.97, "defended_asr": 0.01,
               "defended_weighted_asr": 0.01, "defended_clean_accuracy": 0.80,
               "monitor_fpr": 0.003, "triggered_flag_rate": 0.99, "n_test": 300,
               "n_train": 1000, "seconds": 380.0, "config_hash": "ab" * 8,
               "package_version": "0.1.0", "retryable": False}
        write_rows(store, EVALUATIONS, [row], partition=audit_date(DAY2),
                   name=row["evaluation_id"], schema=EVALUATIONS_SCHEMA)
    return store
