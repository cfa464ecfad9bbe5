"""The worker's side of references: fetched once per machine and flow run through the
registry that served them, preflighted, handed to the scan; what cannot be used is logged
in the verdict's evidence."""

import shutil
from types import SimpleNamespace

import pytest

from sanitator.detect.config import ScanConfig
from sanitator.detect.results import PVSet, Verdict
from sanitator.pipeline import reference_fetch
from sanitator.pipeline.audit import AuditRequest, run_audit
from sanitator.pipeline.reference_fetch import ReferenceCache, candidates
from sanitator.pipeline.references import PlannedReference
from sanitator.pipeline.registries import parse_registry
from sanitator.pipeline.registries.hubserver import HubServer
from sanitator.safety.model_policy import ModelRejected


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_encoders):
    """acme/model, acme/base, acme/s1..s3 (tiny BERTs) and acme/no-tokenizer."""
    root = tmp_path_factory.mktemp("refzoo")
    for name in ("model", "base", "s1", "s2", "s3", "no-tokenizer"):
        shutil.copytree(tiny_encoders["bert"], root / "acme" / name)
    for path in (root / "acme" / "no-tokenizer").glob("tokenizer*"):
        path.unlink()
    return root


@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = reference_fetch.fetch_ref

    def fetch(ref, dest, **kwargs):
        calls.append(ref.repo_id)
        return real(ref, dest, **kwargs)

    monkeypatch.setattr(reference_fetch, "fetch_ref", fetch)
    return calls


def test_a_hub_reference_is_fetched_once_and_a_refusal_is_remembered(folders, tmp_path,
                                                                     counted, monkeypatch):
    with HubServer(folders) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        refs = {r.repo_id: r for r in parse_registry("hf:acme").crawl()}
        cache = ReferenceCache(tmp_path / "run-1")
        first = cache.folder(refs["acme/base"])
        again = ReferenceCache(tmp_path / "run-1").folder(refs["acme/base"])  # another worker
        for _ in range(2):
            with pytest.raises(ModelRejected, match="tokenizer"):
                cache.folder(refs["acme/no-tokenizer"])
    assert first == again and first.is_relative_to(tmp_path / "run-1")
    assert (first / "model.safetensors").is_file()
    assert counted == ["acme/base", "acme/no-tokenizer"]


def test_stale_runs_are_swept_when_a_cache_opens(tmp_path):
    import os

    old, recent = tmp_path / "old-run", tmp_path / "recent-run"
    old.mkdir()
    recent.mkdir()
    os.utime(old, (0, 0))
    ReferenceCache(tmp_path / "this-run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recent-run", "this-run"]


def test_candidates_by_source_and_what_could_not_be_used(folders, tmp_path):
    refs = {r.repo_id: r for r in parse_registry(f"path:{folders}").crawl()}
    planned = (PlannedReference("declared", (refs["acme/base"],), "card"),
               PlannedReference("siblings", (refs["acme/s1"], refs["acme/s2"],
                                             refs["acme/no-tokenizer"])),
               PlannedReference("siblings", (refs["acme/s1"], refs["acme/s2"],
                                             refs["acme/s3"]), "median of 3"))
    found, problems = candidates(planned, ReferenceCache(tmp_path / "run"))
    assert [(c.source, c.ids, c.note) for c in found] == [
        ("declared", ("acme/base",), "card"),
        ("siblings", ("acme/s1", "acme/s2", "acme/s3"), "median of 3")]
    assert found[0].paths == (str(folders / "acme" / "base"),)   # a folder: read in place
    assert found[0].revisions == (refs["acme/base"].revision,)
    assert problems[0]["id"] == "acme/no-tokenizer" and "tokenizer" in problems[0]["refused"]
    assert problems[1]["unused"].startswith("2 of 3 siblings usable, fewer than 3")


def test_run_audit_hands_the_scan_its_candidates_and_records_the_resolution(folders,
                                                                           tmp_path):
    refs = {r.repo_id: r for r in parse_registry(f"path:{folders}").crawl()}
    calls = []

    def scan(path, config, **kwargs):
        calls.append(kwargs)
        chosen = kwargs["references"][0].describe() if "references" in kwargs else None
        return SimpleNamespace(verdict=Verdict("clean", score=0.01, evidence={
            "searches": 3, "reference": {**(chosen or {}), "relative_change": 0.02}}),
            pvset=PVSet.empty(32), info=None)

    config = ScanConfig.from_preset("fast")
    log = {"declared": [{"id": "acme/base", "from": "card", "status": "audited clean"}]}
    request = AuditRequest("a" * 32, refs["acme/model"], config.to_dict(),
                           config.config_hash(), references=(
                               PlannedReference("declared", (refs["acme/base"],), "card"),
                               PlannedReference("configured", (refs["acme/no-tokenizer"],))),
                           reference_log=log)
    outcome = run_audit(request, scan=scan, work_dir=tmp_path / "work",
                        reference_cache=tmp_path / "cache")
    [candidate] = calls[0]["references"]
    assert (candidate.source, candidate.ids) == ("declared", ("acme/base",))
    reference = outcome.verdict.evidence["reference"]
    assert reference["source"] == "declared" and reference["id"] == "acme/base"
    assert reference["revision"] == refs["acme/base"].revision
    assert reference["relative_change"] == 0.02 and outcome.verdict.evidence["searches"] == 3
    resolution = reference["resolution"]
    assert resolution["declared"] == log["declared"]
    assert [c["id"] for c in resolution["candidates"]] == ["acme/base"]
    assert resolution["unusable"][0]["id"] == "acme/no-tokenizer"
    assert resolution["fetch_seconds"] >= 0

    # nothing planned (no_reference): the scanner is called as before, nothing recorded
    bare = AuditRequest("b" * 32, refs["acme/model"], config.to_dict(), config.config_hash())
    outcome = run_audit(bare, scan=scan, work_dir=tmp_path / "work")
    assert "references" not in calls[1] and "resolution" not in outcome.verdict.evidence.get(
        "reference", {})
