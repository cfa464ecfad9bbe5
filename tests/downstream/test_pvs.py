"""resolve_pvs: the one place a downstream evaluation gets its PVs from (an artifact, the
attack's backdoor.json, an audit in a store, or the newest audit of a folder)."""

import datetime as dt
import json

import pytest
import torch

from sanitator.detect.results import PVSet, Verdict
from sanitator.downstream.asr import read_backdoor_manifest
from sanitator.downstream.pvs import resolve_pvs
from sanitator.guard.pv_artifact import ARTIFACT_FORMAT, PVArtifact, write_pv_artifact
from sanitator.pipeline.audit import AuditOutcome, AuditRequest, pv_rows, verdict_row
from sanitator.pipeline.registries.local import LocalRegistry
from sanitator.pipeline.store import write_rows


def test_pv_artifacts_and_manifests(tmp_path):
    pvset = PVSet(torch.ones(3, 8), torch.zeros(3, 7, 4), feature="mask")
    pvset.save(tmp_path / "pvs.safetensors")
    found = resolve_pvs(tmp_path / "pvs.safetensors")
    assert found.vectors.shape == (3, 8) and found.feature == "mask"
    assert found.source == str(tmp_path / "pvs.safetensors")
    assert read_backdoor_manifest(tmp_path) is None
    (tmp_path / "backdoor.json").write_text('{"triggers": ["cf"]}')
    with pytest.raises(ValueError, match="no PVs"):
        resolve_pvs(tmp_path)
    with pytest.raises(FileNotFoundError):
        resolve_pvs(tmp_path / "missing.safetensors")
    (tmp_path / "backdoor.json").write_text(json.dumps({"triggers": ["cf"],
                                                       "pvs": [[1.0, -1.0]]}))
    oracle = resolve_pvs(tmp_path)  # a model folder: the attack's own targets
    assert oracle.vectors.tolist() == [[1.0, -1.0]] and oracle.feature == "cls"


def test_a_pulled_artifact_carries_its_audit(tmp_path):
    pvset = PVSet(torch.ones(2, 8), torch.zeros(2, 7, 4))
    path = write_pv_artifact(tmp_path / "a.safetensors", PVArtifact(pvset, {
        "format": ARTIFACT_FORMAT, "format_version": "1", "audit_id": "a1",
        "status": "backdoored", "feature": "cls"}))
    found = resolve_pvs(path)
    assert found.audit_id == "a1" and found.verdict_status == "backdoored"
    assert found.vectors.shape == (2, 8)


def _audit(store, ref, audit_id, outcome, day):
    when = dt.datetime(2026, 5, day, tzinfo=dt.UTC)
    request = AuditRequest(audit_id, ref, {}, "hash")
    write_rows(store, "pvs", pv_rows(request, outcome, audited_at=when),
               partition=f"2026-05-0{day}", name=audit_id)
    write_rows(store, "verdicts", [verdict_row(request, outcome, audited_at=when)],
               partition=f"2026-05-0{day}", name=audit_id)


def test_the_newest_audit_of_a_folder_or_a_given_audit(tmp_path, tiny_encoders):
    import shutil

    zoo, store = tmp_path / "zoo", tmp_path / "store"
    shutil.copytree(tiny_encoders["bert"], zoo / "m")
    assert resolve_pvs(store=store, model_dir=zoo / "m") is None  # no store yet
    (ref,) = LocalRegistry(zoo).crawl()
    vectors = torch.tensor([[1.0, -2.0, 3.0], [-1.0, 2.0, -3.0]])
    _audit(store, ref, "old", AuditOutcome(Verdict("clean", score=0.1)), 1)
    _audit(store, ref, "new", AuditOutcome(Verdict("backdoored", score=0.99),
                                           PVSet(vectors, torch.zeros(2, 1, 3))), 2)
    latest = resolve_pvs(store=store, model_dir=zoo / "m")
    assert latest.source == "audit new (backdoored)" and latest.audit_id == "new"
    assert torch.equal(latest.vectors, vectors) and latest.as_lists() == vectors.tolist()
    clean = resolve_pvs(store=store, audit_id="old")
    assert clean.vectors is None and clean.as_lists() == []  # an audit that found none
    config = json.loads((zoo / "m" / "config.json").read_text())
    (zoo / "m" / "config.json").write_text(json.dumps({**config, "note": "changed"}))
    # another content: no audit of it
    assert resolve_pvs(store=store, model_dir=zoo / "m") is None
