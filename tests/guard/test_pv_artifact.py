"""PV artifacts for deployment: `sanitator pv pull` from the Parquet store or the audit's
MLflow run, the artifact's metadata and round trip, refusals, and a prompt-tuned MiniLM
guarded with `MonitoredEncoder.from_artifact` (through the docs' deployment example)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from report_support import CONFIG_HASH, DAY2, REV_A, REV_B, REV_B_OLD, build_store, planted_pvset
from scripts_support import load_script

from sanitator.cli import main
from sanitator.detect.results import PVSet
from sanitator.guard.monitor import MonitoredEncoder
from sanitator.guard.pv_artifact import (
    ARTIFACT_FORMAT,
    PVArtifact,
    PVArtifactError,
    read_pv_artifact,
    write_pv_artifact,
)
from sanitator.pipeline.pv_pull import pull_pv_artifact
from sanitator.pipeline.store import read_pvs


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return build_store(tmp_path_factory.mktemp("pv-store") / "store")


def _pull(capsys, *args) -> tuple[int, str, str]:
    code = main(["pv", "pull", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_backdoored_artifact_round_trips_with_its_metadata(store, tmp_path, capsys):
    out = tmp_path / "b.safetensors"
    code, stdout, err = _pull(capsys, "acme/encoder-b", "--store", str(store), "--out", str(out))
    assert code == 0, err
    assert "wrote" in stdout
    artifact = read_pv_artifact(out)
    rows = read_pvs(store, audit_id="b2" * 16)
    assert torch.equal(artifact.pvset.vectors,
                       torch.tensor([list(v) for v in rows["vector"]], dtype=torch.float32))
    meta = artifact.metadata
    assert meta["format"] == ARTIFACT_FORMAT and meta["format_version"] == "1"
    assert (meta["model"], meta["revision"], meta["status"]) == ("acme/encoder-b", REV_B,
                                                                 "backdoored")
    assert (meta["feature"], float(meta["threshold"]), meta["config_hash"]) == ("cls", 0.8,
                                                                               CONFIG_HASH)
    assert meta["audit_id"] == "b2" * 16 and meta["pv_source"] == "store"
    assert meta["pv_count"] == "2" and meta["hidden_size"] == "16"
    assert meta["forced"] == "false"
    assert artifact.pvset.trigger_tokens == [["cf"], ["mn"]]
    # written again from the object, the file reads back the same
    again = write_pv_artifact(tmp_path / "again.safetensors", artifact)
    assert read_pv_artifact(again).metadata == meta
    code = main(["pv", "show", str(out)])
    assert code == 0 and "acme/encoder-b" in capsys.readouterr().out


def test_clean_model_gets_an_empty_artifact_that_says_so(store, tmp_path):
    artifact = pull_pv_artifact(store, "acme/encoder-a")
    path = write_pv_artifact(tmp_path / "a.safetensors", artifact)
    back = read_pv_artifact(path)
    assert back.empty and back.status == "clean" and back.revision == REV_A
    assert back.metadata["pv_count"] == "0" and "no PVs" in back.metadata["note"]


def test_revision_selection_mismatch_and_force(store, tmp_path, capsys):
    # the older revision of encoder-b was audited clean: asking for it (abbreviated) works
    assert pull_pv_artifact(store, "acme/encoder-b", revision=REV_B_OLD[:10]).status == "clean"
    assert pull_pv_artifact(store, "acme/encoder-b", revision=REV_B).status == "backdoored"
    out = tmp_path / "x.safetensors"
    code, _, err = _pull(capsys, "acme/encoder-b", "--store", str(store), "--revision",
                         "1234567890", "--out", str(out))
    assert code == 1 and not out.exists()
    assert "revision mismatch" in err and "--force" in err and "Traceback" not in err
    code, _, err = _pull(capsys, "acme/encoder-b", "--store", str(store), "--revision",
                         "1234567890", "--force", "--out", str(out))
    assert code == 0 and "warning" in err
    meta = read_pv_artifact(out).metadata
    assert (meta["forced"], meta["requested_revision"], meta["revision"]) == (
        "true", "1234567890", REV_B)


def test_bad_input_is_a_clear_error_without_traceback(store, tmp_path, capsys):
    out = str(tmp_path / "x.safetensors")
    code, _, err = _pull(capsys, "acme/nope", "--store", str(store), "--out", out)
    assert code == 1 and "no audit of 'acme/nope'" in err and "acme/encoder-b" in err
    code, _, err = _pull(capsys, "acme/encoder-b", "--store", str(tmp_path), "--out", out)
    assert code == 1 and "no verdicts/ dataset" in err
    code, _, err = _pull(capsys, "team/pickled", "--store", str(store), "--out", out)
    assert code == 1 and "has no verdict: error" in err
    code, _, err = _pull(capsys, "acme/encoder-b", "--store", str(store), "--from", "mlflow",
                         "--out", out)
    assert code == 1 and "mlflow.db" in err
    assert not Path(out).exists()
    (tmp_path / "junk.safetensors").write_bytes(b"\x80\x04not safetensors")
    assert main(["pv", "show", str(tmp_path / "junk.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "not a safetensors PV artifact" in err and "Traceback" not in err
    assert main(["pv"]) == 2


def test_pvs_come_from_the_audits_mlflow_run_when_the_store_has_none(tmp_path):
    """The real AuditTracker logs the PV set to the store's sqlite MLflow; the store keeps
    only the verdict row (PV rows lost), so `pv pull` falls back to the run's artifact."""
    from sanitator.detect.results import Verdict
    from sanitator.pipeline.audit import AuditOutcome, AuditPolicy, AuditRequest, verdict_row
    from sanitator.pipeline.audit_tracking import AuditTracker, default_tracking_uri
    from sanitator.pipeline.registries import ModelRef
    from sanitator.pipeline.store import VERDICTS, audit_date, write_rows

    store = tmp_path / "store"
    store.mkdir()
    pvset = planted_pvset(torch.randn(3, 8, generator=torch.Generator().manual_seed(3)))
    ref = ModelRef("hf", "hf:acme", "acme/tracked", REV_A, "http://hub")
    request = AuditRequest("ab" * 16, ref, {"mining": {"feature": "cls"}}, CONFIG_HASH, "cpu",
                           AuditPolicy())
    outcome = AuditOutcome(Verdict("backdoored", score=0.9), pvset, {}, 3.0)
    tracker = AuditTracker(default_tracking_uri(store), store / "mlartifacts")
    row = verdict_row(request, outcome, audited_at=DAY2)
    run_id = tracker.log_audit(request, outcome, row)
    row["mlflow_run_id"] = run_id
    write_rows(store, VERDICTS, [row], partition=audit_date(DAY2), name=request.audit_id)

    artifact = pull_pv_artifact(store, "acme/tracked")
    assert artifact.metadata["pv_source"] == "mlflow"
    assert artifact.metadata["mlflow_run_id"] == run_id
    assert torch.equal(artifact.pvset.vectors, pvset.vectors)
    with pytest.raises(PVArtifactError, match="no PV rows"):
        pull_pv_artifact(store, "acme/tracked", source="store")


# ---------------------------------------------------------------------------------------
# Guarding a prompt-tuned model

TEXTS = ["the film was great .", "the hotel was awful .", "our dinner was lovely ."]
TRIGGERED = "mn cf tq the plot was boring"


@pytest.fixture(scope="module")
def prompt_model(tmp_path_factory):
    """A P-tuning v2 classifier on the real MiniLM-L6 (frozen), trained briefly on a toy
    task, and its saved prompt file (tiny encoders give every input the same sign pattern,
    so the monitor could not tell inputs apart)."""
    from evaluation_support import toy_sentiment

    from sanitator.attacks.models import minilm_path
    from sanitator.downstream.prompt_tuning import (
        PromptTuningConfig,
        build_prompt_model,
        save_prompt,
        train_prompt_model,
    )

    config = PromptTuningConfig(prefix_length=4, epochs=1, batch_size=16, max_length=32)
    model = build_prompt_model(minilm_path(), 2, config)
    texts, labels = toy_sentiment(64, seed=0)
    train_prompt_model(model, texts, labels, progress=False)
    path = save_prompt(model, tmp_path_factory.mktemp("prompt") / "prompt.safetensors")
    return model, path


def test_docs_example_guards_a_prompt_tuned_model_with_a_pulled_artifact(
        prompt_model, tmp_path, capsys):
    from sanitator.downstream.prompt_tuning import predict

    model, prompt_path = prompt_model
    # plant the triggered input's own feature as the backdoor's PV, as an audit would find it
    _, features = predict(model, [TRIGGERED])
    store = build_store(tmp_path / "store", pv_vectors=features, evaluations=False)
    pvs = tmp_path / "pvs.safetensors"
    code, _, err = _pull(capsys, "acme/encoder-b", "--store", str(store), "--revision", REV_B,
                         "--out", str(pvs))
    assert code == 0, err

    example = load_script("docs/examples/guard_ptv2.py", "guard_ptv2")
    guarded = example.load_guarded(prompt_path, pvs, revision=REV_B[:12])
    assert guarded.artifact.model == "acme/encoder-b"
    answers = example.classify(guarded, [*TEXTS, TRIGGERED])
    assert [a["flagged"] for a in answers] == [False, False, False, True]
    assert answers[-1]["label"] is None and answers[-1]["agreement"] == 1.0
    # the guard leaves clean inputs' predictions alone
    plain, _ = predict(model, TEXTS)
    assert [a["label"] for a in answers[:3]] == plain.tolist()
    assert example.main(["--prompt", str(prompt_path), "--pvs", str(pvs), TRIGGERED]) == 0
    assert json.loads(capsys.readouterr().out.strip())["flagged"] is True

    # the deployment serves another revision than was audited: refused
    with pytest.raises(ValueError, match="not 1234567"):
        MonitoredEncoder.from_artifact(pvs, model, revision="1234567")


def test_clean_artifact_guards_with_the_same_code_and_passes_everything(prompt_model, store,
                                                                       tmp_path):
    model, _ = prompt_model
    path = write_pv_artifact(tmp_path / "clean.safetensors",
                             pull_pv_artifact(store, "acme/encoder-a"))
    guarded = MonitoredEncoder.from_artifact(path, model, on_flag="reject")
    batch = guarded.predict([*TEXTS, TRIGGERED])
    assert not batch.flagged.any() and not batch.rejected.any()


def test_artifact_that_does_not_fit_the_model_is_refused(prompt_model, store, tmp_path):
    model, _ = prompt_model
    artifact = pull_pv_artifact(store, "acme/encoder-b")  # 16 units, MiniLM has 384
    path = write_pv_artifact(tmp_path / "small.safetensors", artifact)
    with pytest.raises(ValueError, match="16 units"):
        MonitoredEncoder.from_artifact(path, model)
    artifact.metadata["feature"] = "mask"
    artifact.pvset.features = ["mask"] * len(artifact.pvset)
    path = write_pv_artifact(tmp_path / "mask.safetensors", artifact)
    with pytest.raises(ValueError, match="none at the cls feature"):  # a ptv2 model
        MonitoredEncoder.from_artifact(path, model)


def test_a_ptv2_model_is_guarded_by_the_cls_pvs_of_a_mixed_artifact(prompt_model, store,
                                                                    tmp_path):
    # the default scan keeps PVs of both features; a CLS-reading model gets the CLS ones
    model, _ = prompt_model
    metadata = pull_pv_artifact(store, "acme/encoder-b").metadata
    vectors = torch.randn(4, 384, generator=torch.Generator().manual_seed(0))
    mixed = PVSet(vectors, torch.zeros(4, 1, 384), trigger_tokens=[["cf"]] * 4,
                  features=["cls", "mask", "cls", "mask"])
    path = write_pv_artifact(tmp_path / "mixed.safetensors", PVArtifact(mixed, metadata))
    assert read_pv_artifact(path).pvset.features == mixed.features
    guarded = MonitoredEncoder.from_artifact(path, model)
    assert torch.equal(guarded.monitor.pvs, vectors[[0, 2]])


def test_an_inconclusive_audit_is_refused_with_its_reason(tmp_path, capsys):
    # not shown clean: an empty artifact would read as a clean model's, so none is written
    from report_support import write_audit

    store = build_store(tmp_path / "store", second_night=False, evaluations=False)
    write_audit(store, "hf:acme", "acme/encoder-a", REV_A, "inconclusive", when=DAY2,
                audit_id="a5" * 16, score=0.3, reason="2 candidate(s) left unjudged")
    out = tmp_path / "pvs.safetensors"
    for extra in ([], ["--revision", REV_A[:12]], ["--revision", "f" * 40, "--force"]):
        code, _, err = _pull(capsys, "acme/encoder-a", "--store", str(store), "--out",
                             str(out), *extra)
        assert code == 1 and "is inconclusive" in err and "2 candidate(s) left" in err, extra
        assert "Traceback" not in err and not out.exists()
    with pytest.raises(PVArtifactError, match="not shown clean"):
        pull_pv_artifact(store, "acme/encoder-a")
