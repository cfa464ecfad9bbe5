"""Planning, one audit and row building, without Prefect or Dask."""

import dataclasses
import datetime as dt
import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from sanitator.detect.config import ScanConfig
from sanitator.detect.results import PVSet, Verdict
from sanitator.pipeline import store
from sanitator.pipeline.audit import (
    AuditOutcome,
    AuditPolicy,
    AuditRequest,
    is_settled,
    plan_audits,
    pv_rows,
    rejection_from_listing,
    run_audit,
    scan_config_from_dict,
    summarize,
    verdict_row,
)
from sanitator.pipeline.registries import ModelRef, parse_registry

NOW = dt.datetime(2026, 5, 1, 2, tzinfo=dt.UTC)


def _ref(repo="acme/a", revision="r1", files=None, model_type="bert", source="path"):
    files = files if files is not None else (("config.json", 10), ("model.safetensors", 400),
                                             ("tokenizer.json", 5))
    return ModelRef(source, f"{source}:/zoo", repo, revision, "/zoo/" + repo,
                    files=tuple(files), config={"model_type": model_type} if model_type else None)


def _row(ref, status, config_hash="h1", retryable=False, allow_pickle=False, max_params=None):
    return {"source": ref.source, "repo_id": ref.repo_id, "revision": ref.revision,
            "config_hash": config_hash, "status": status, "retryable": retryable,
            "allow_pickle": allow_pickle, "max_params": max_params}


# --- planning ---------------------------------------------------------------------------

def test_listing_rejections_mirror_the_preflight():
    policy = AuditPolicy()
    assert rejection_from_listing(_ref(), policy) is None
    status, reason = rejection_from_listing(_ref(model_type="gpt2"), policy)
    assert status == "unsupported" and "gpt2" in reason
    pickled = _ref(files=[("config.json", 1), ("pytorch_model.bin", 400)])
    status, reason = rejection_from_listing(pickled, policy)
    assert status == "error" and "only pickle weights" in reason
    assert rejection_from_listing(pickled, AuditPolicy(allow_pickle=True)) is None
    status, reason = rejection_from_listing(_ref(files=[("config.json", 1)]), policy)
    assert status == "error" and "no weights" in reason
    status, _ = rejection_from_listing(_ref(files=[("model.safetensors", 1)]), policy)
    assert status == "error"


def test_size_limit_skips_before_download_using_a_safe_lower_bound():
    ref = _ref(files=[("config.json", 1), ("model.safetensors", 4_000)])  # >= 1,000 params
    assert rejection_from_listing(ref, AuditPolicy(max_params=1_000)) is None
    status, reason = rejection_from_listing(ref, AuditPolicy(max_params=999))
    assert status == "skipped" and "size limit" in reason


def test_model_folder_nested_in_the_listing_is_found():
    ref = _ref(files=[("MLmodel", 1), ("model/config.json", 1), ("model/model.safetensors", 9)])
    assert rejection_from_listing(ref, AuditPolicy()) is None


def test_unknown_metadata_defers_to_the_worker():
    assert rejection_from_listing(_ref(files=(), model_type=None), AuditPolicy()) is None


def test_settled_rows():
    ref, policy = _ref(), AuditPolicy()
    assert is_settled(_row(ref, "clean"), policy)
    assert is_settled(_row(ref, "unsupported", allow_pickle=True), policy)
    assert not is_settled(_row(ref, "error", retryable=True), policy)
    assert is_settled(_row(ref, "error"), policy)
    # a rejection decided under another policy is decided again
    assert not is_settled(_row(ref, "error"), AuditPolicy(allow_pickle=True))
    assert not is_settled(_row(ref, "skipped", max_params=10), AuditPolicy(max_params=10**9))
    assert is_settled(_row(ref, "skipped", max_params=10.0), AuditPolicy(max_params=10))
    # not shown clean: audited again on every run, whatever the policy
    assert not is_settled(_row(ref, "inconclusive"), policy)


def test_plan_skips_what_is_settled_for_this_config_only():
    a, b, c = _ref("acme/a"), _ref("acme/b"), _ref("acme/c", model_type="gpt2")
    completed = [_row(a, "clean"), _row(b, "backdoored", config_hash="other"),
                 _row(_ref("acme/a", revision="r0"), "clean")]
    plan = plan_audits([a, b, c, a], completed, "h1", AuditPolicy())
    assert [r.repo_id for r in plan.settled] == ["acme/a"]
    assert [r.repo_id for r in plan.todo] == ["acme/b"]  # b's verdict is for another config
    assert [(r.ref.repo_id, r.status) for r in plan.rejected] == [("acme/c", "unsupported")]
    forced = plan_audits([a], completed, "h1", AuditPolicy(), force=True)
    assert [r.repo_id for r in forced.todo] == ["acme/a"]


def test_new_revision_is_audited_again():
    completed = [_row(_ref(revision="r1"), "clean")]
    plan = plan_audits([_ref(revision="r2")], completed, "h1", AuditPolicy())
    assert [r.revision for r in plan.todo] == ["r2"]


def test_scan_config_round_trips_through_its_dict():
    config = ScanConfig.from_preset("fast", steps_per_seed=7, seed=3)
    again = scan_config_from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.config_hash() == config.config_hash()
    with pytest.raises(TypeError, match="unknown"):
        scan_config_from_dict({"colour": "red"})


# --- one audit --------------------------------------------------------------------------

def _scanner(status="backdoored", k=2):
    calls = []

    def scan(path, config, **kwargs):
        calls.append((path, config, kwargs))
        pvset = PVSet(torch.randn(k, 32), torch.randn(k, 3, 32), seeds=list(range(k)),
                      losses=[{"distance": -0.5}] * k, trigger_tokens=[["a"]] * k)
        return SimpleNamespace(verdict=Verdict(status, score=0.9, seeds_tried=k),
                               pvset=pvset if status == "backdoored" else PVSet.empty(32),
                               info=None)
    scan.calls = calls
    return scan


@pytest.fixture
def zoo(tmp_path, tiny_encoders):
    root = tmp_path / "zoo"
    shutil.copytree(tiny_encoders["bert"], root / "acme" / "enc")
    return root


def _request(ref, **kwargs):
    config = ScanConfig.from_preset("fast")
    return AuditRequest("a" * 32, ref, config.to_dict(), config.config_hash(), **kwargs)


def test_run_audit_scans_the_fetched_folder(zoo, tmp_path):
    ref = next(iter(parse_registry(f"path:{zoo}").crawl()))
    scan = _scanner()
    outcome = run_audit(_request(ref), scan=scan, work_dir=tmp_path / "work")
    assert outcome.verdict.status == "backdoored" and len(outcome.pvset) == 2
    assert outcome.info["architecture"] == "bert" and outcome.info["n_params"] > 0
    assert outcome.seconds > 0 and not outcome.retryable
    path, config, kwargs = scan.calls[0]
    assert path == zoo / "acme" / "enc" and isinstance(config, ScanConfig)
    assert kwargs["device"] == "cpu" and kwargs["allow_pickle"] is False
    assert list((tmp_path / "work").iterdir()) == []  # scratch removed


def test_run_audit_turns_failures_into_outcomes(zoo, tmp_path):
    ref = next(iter(parse_registry(f"path:{zoo}").crawl()))

    def crash(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    crashed = run_audit(_request(ref), scan=crash)
    assert crashed.verdict.status == "error" and crashed.retryable  # memory can free up
    assert "out of memory" in crashed.verdict.reason

    def deterministic(*args, **kwargs):
        raise ValueError("shapes do not match")

    broken = run_audit(_request(ref), scan=deterministic)  # the same bytes fail again
    assert broken.verdict.status == "error" and not broken.retryable
    assert "ValueError: shapes do not match" in broken.verdict.reason
    skipped = run_audit(_request(ref, policy=AuditPolicy(max_params=10)), scan=_scanner())
    assert skipped.verdict.status == "skipped" and "size limit" in skipped.verdict.reason
    (zoo / "acme" / "enc" / "model.safetensors").unlink()
    gone = run_audit(_request(ref), scan=_scanner())  # content changed since the crawl
    assert gone.verdict.status == "error" and not gone.retryable
    assert "changed since the crawl" in gone.verdict.reason


def test_run_audit_reports_preflight_rejections(tmp_path, tiny_encoders):
    shutil.copytree(tiny_encoders["gpt2"], tmp_path / "zoo" / "dec")
    ref = next(iter(parse_registry(f"path:{tmp_path / 'zoo'}").crawl()))
    outcome = run_audit(_request(ref), scan=_scanner())
    assert outcome.verdict.status == "unsupported" and "gpt2" in outcome.verdict.reason


# --- rows -------------------------------------------------------------------------------

def test_rows_fit_the_store_schemas(tmp_path):
    ref = _ref()
    request = _request(ref, device="cuda:0")
    pvset = PVSet(torch.tensor([[1.0, -2.0, 0.0]]), torch.ones(1, 2, 4), seeds=[7],
                  losses=[{"distance": -0.5}], trigger_tokens=[["cf", "mn"]])
    outcome = AuditOutcome(Verdict("backdoored", score=0.9, seeds_tried=3, steps=40,
                                   evidence={"support": 3}), pvset,
                           {"architecture": "bert", "n_params": 1000}, seconds=1.23456)
    row = verdict_row(request, outcome, audited_at=NOW, batch_id="b1", mlflow_run_id="m1")
    pvs = pv_rows(request, outcome, audited_at=NOW)
    assert store.write_rows(tmp_path, store.VERDICTS, [row], partition="2026-05-01", name="x")
    assert store.write_rows(tmp_path, store.PVS, pvs, partition="2026-05-01", name="x")
    assert (row["pv_count"], row["seconds"], row["device"]) == (1, 1.235, "cuda:0")
    assert json.loads(row["evidence"]) == {"support": 3}
    assert json.loads(row["config"]) == json.loads(json.dumps(request.config))
    assert pvs[0]["sign_bits"] == store.pack_signs([1.0, -2.0, 0.0])
    assert pvs[0]["trigger_shape"] == [2, 4] and len(pvs[0]["trigger"]) == 8
    assert (pvs[0]["seed"], pvs[0]["trigger_tokens"]) == (7, ["cf", "mn"])
    clean = AuditOutcome(Verdict("clean"), PVSet.empty(3))
    assert pv_rows(request, clean, audited_at=NOW) == []


def test_summary_counts_and_lists():
    rows = [{"status": s, "registry": "hf:acme", "repo_id": f"acme/{i}", "revision": "r",
             "score": 0.9, "pv_count": 1, "reason": "why", "retryable": False}
            for i, s in enumerate(["clean", "backdoored", "error", "clean", "inconclusive"])]
    summary = summarize(rows, settled=5, store="/s", registry_errors={"hf:x": "down"})
    assert summary["counts"] == {"clean": 2, "backdoored": 1, "inconclusive": 1, "error": 1,
                                 "unsupported": 0, "skipped": 0}
    assert [b["repo_id"] for b in summary["backdoored"]] == ["acme/1"]
    assert [i["repo_id"] for i in summary["inconclusive"]] == ["acme/4"]
    assert [e["repo_id"] for e in summary["errors"]] == ["acme/2"]
    assert (summary["audited"], summary["already_audited"]) == (5, 5)
    assert summary["registry_errors"] == {"hf:x": "down"}


def test_a_summary_lists_the_first_errors_and_counts_the_rest():
    rows = [{"status": "error", "registry": "path:/z", "repo_id": f"z/{i}", "revision": "r",
             "score": None, "pv_count": 0, "reason": "no weights", "retryable": False}
            for i in range(25)]
    summary = summarize(rows, max_errors=20)
    assert summary["counts"]["error"] == 25
    assert [e["repo_id"] for e in summary["errors"]] == [f"z/{i}" for i in range(20)]
    assert summary["more_errors"] == 5
    assert summarize(rows[:3])["more_errors"] == 0


def test_crawl_errors_and_bad_listed_configs_become_their_repos_rows():
    broken = dataclasses.replace(_ref("acme/broken"), crawl_error="cannot read: boom")
    flaky = dataclasses.replace(_ref("acme/flaky"), crawl_error="hub answered 503",
                                crawl_retryable=True)
    listed = dataclasses.replace(_ref("acme/listed"), config={
        "model_type": None, "architectures": None, "invalid": "model_type is a list"})
    plan = plan_audits([broken, flaky, listed, _ref("acme/ok")], [], "h1", AuditPolicy())
    assert [(r.ref.repo_id, r.status, r.reason, r.retryable) for r in plan.rejected] == [
        ("acme/broken", "error", "cannot read: boom", False),
        ("acme/flaky", "error", "hub answered 503", True),
        ("acme/listed", "error", "model_type is a list", False)]
    assert [r.repo_id for r in plan.todo] == ["acme/ok"]


def test_only_failures_another_try_can_change_are_retryable():
    import errno

    from sanitator.pipeline.audit import is_transient
    from sanitator.pipeline.registries import FetchError

    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError())
    assert is_transient(MemoryError()) and is_transient(OSError(errno.EIO, "I/O error"))
    assert is_transient(FetchError("503", retryable=True))
    for permanent in (FetchError("404", retryable=False), ValueError("bad shape"),
                      KeyError("weight"), OSError(errno.ENOENT, "gone"),
                      RecursionError("deep")):
        assert not is_transient(permanent), permanent
