"""The audit as a job: its plan hands out requests and the outcomes the listing settles,
and `record` writes an audit's PV rows before its verdict row."""

import dataclasses

import torch

from sanitator.detect.results import PVSet, Verdict
from sanitator.pipeline.audit import AuditOutcome, AuditPolicy
from sanitator.pipeline.audit_job import AuditJob
from sanitator.pipeline.jobs import record
from sanitator.pipeline.registries import ModelRef
from sanitator.pipeline.store import read_pvs, read_verdicts


def _ref(repo, revision="r1", model_type="bert"):
    files = (("config.json", 10), ("model.safetensors", 400), ("tokenizer.json", 5))
    return ModelRef("path", "path:/zoo", repo, revision, "/zoo/" + repo, files=files,
                    config={"model_type": model_type})


def test_the_plan_hands_out_requests_and_settles_what_the_listing_decides():
    job = AuditJob({"mode": "detect"}, "h1", "cpu", AuditPolicy(max_params=10_000))
    done = _ref("acme/done")
    broken = dataclasses.replace(_ref("acme/broken"), crawl_error="cannot read: boom")
    history = [{"source": "path", "repo_id": "acme/done", "revision": "r1",
                "config_hash": "h1", "status": "clean", "retryable": False}]
    plan = job.plan([_ref("acme/ok"), _ref("acme/gpt", model_type="gpt2"), broken, done],
                    history)
    (request,) = plan.todo
    assert request.ref.repo_id == "acme/ok" and request.config == {"mode": "detect"}
    assert (request.config_hash, request.policy.max_params) == ("h1", 10_000)
    settled = {r.ref.repo_id: o.verdict for r, o in plan.settled_now}
    assert settled["acme/gpt"].status == "unsupported"
    assert settled["acme/broken"].reason == "cannot read: boom"
    assert [ref.repo_id for ref in plan.settled] == ["acme/done"]
    assert len({r.audit_id for r, _ in plan.settled_now} | {request.audit_id}) == 3


def test_record_writes_the_pv_rows_and_the_verdict_row(tmp_path):
    job = AuditJob({}, "h1")
    request = job.request(_ref("acme/bad"))
    pvset = PVSet(torch.ones(2, 4), torch.zeros(2, 3, 4))
    row = record(job, request, AuditOutcome(Verdict("backdoored", score=0.99), pvset),
                 str(tmp_path))
    assert row["status"] == "backdoored" and row["pv_count"] == 2
    assert read_verdicts(tmp_path)["audit_id"].tolist() == [request.audit_id]
    assert read_pvs(tmp_path)["pv_index"].tolist() == [0, 1]
    timed_out = job.failure(TimeoutError(), 8)
    assert timed_out.verdict.reason == "timed out after 8 s (per-model timeout)"
    assert timed_out.retryable  # the next flow run audits it again
