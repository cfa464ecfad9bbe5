import datetime as dt
import json

import pytest
import torch
from evaluation_support import planted_backdoor, write_toy_task

from sanitator.attacks.models import minilm_path
from sanitator.cli import exits, main

FAST = ["--epochs", "3", "--prefix-length", "8", "--batch-size", "16", "--max-length", "32",
        "--limit", "30", "--no-progress"]
SUMMARY = {"clean_accuracy", "asr", "defended_asr", "defended_clean_accuracy", "monitor_fpr",
           "n_test", "seconds", "converged", "convergence_reason"}


@pytest.fixture(scope="module")
def backdoored(minilm_2layer):
    return planted_backdoor(str(minilm_2layer))


@pytest.fixture(scope="module")
def toy_task(tmp_path_factory):
    return write_toy_task(tmp_path_factory.mktemp("toy_task"))


def _task_args(toy_task):
    return ["--task", str(toy_task), "--text-column", "review", "--label-column", "y"]


def test_json_report_with_the_backdoor_triggers_and_pvs(backdoored, toy_task, capsys,
                                                        tmp_path):
    prompt = tmp_path / "prompt.safetensors"
    code = main(["evaluate", str(backdoored), *_task_args(toy_task), "--pvs",
                 str(backdoored / "backdoor.json"), "--save-prompt", str(prompt), "--json",
                 *FAST])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) >= SUMMARY
    assert report["n_test"] == 30 and report["attack"]["triggers"] == ["cf", "pt"]
    assert report["converged"] is True and report["convergence_reason"] is None
    assert report["clean_accuracy"] >= 0.8
    assert report["asr"] >= 0.9 and report["defended_asr"] <= 0.05
    assert 0 <= report["monitor_fpr"] <= 0.05
    assert report["training"]["config"]["prefix_length"] == 8
    assert prompt.is_file() and report["prompt_path"] == str(prompt)


def test_pvs_default_to_the_latest_audit_in_the_store(backdoored, toy_task, capsys, tmp_path):
    from sanitator.detect.results import PVSet, Verdict
    from sanitator.pipeline.audit import AuditOutcome, AuditRequest, pv_rows, verdict_row
    from sanitator.pipeline.registries import ModelRef
    from sanitator.pipeline.registries.local import content_revision
    from sanitator.pipeline.store import write_rows

    manifest = json.loads((backdoored / "backdoor.json").read_text())
    ref = ModelRef(source="path", registry=f"path:{backdoored.parent}", repo_id="model",
                   revision=content_revision(backdoored), location=str(backdoored))
    request = AuditRequest("audit-1", ref, {}, "hash")
    pvset = PVSet(torch.tensor(manifest["pvs"]), torch.zeros(2, 7, 384))
    outcome = AuditOutcome(Verdict("backdoored", score=0.99), pvset)
    when = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)
    write_rows(tmp_path, "pvs", pv_rows(request, outcome, audited_at=when),
               partition="2026-05-01", name="audit-1")
    write_rows(tmp_path, "verdicts", [verdict_row(request, outcome, audited_at=when)],
               partition="2026-05-01", name="audit-1")
    code = main(["evaluate", str(backdoored), *_task_args(toy_task), "--store", str(tmp_path),
                 "--triggers", "cf", "--on-flag", "reject", "--json", *FAST])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pv_source"] == "audit audit-1 (backdoored)"
    assert report["attack"]["triggers"] == ["cf"]
    assert report["defended_asr"] == 0.0 and report["attack"]["on_flag"] == "reject"


def test_an_untrained_prompt_at_chance_reports_no_attack_success(backdoored, toy_task, capsys):
    # learning rate 1e-9: the prompt and head stay at their random start, as a prompt-tuning
    # run that did not converge does
    args = ["evaluate", str(backdoored), *_task_args(toy_task), "--pvs",
            str(backdoored / "backdoor.json"), *FAST, "--lr", "1e-9"]
    assert main([*args, "--json"]) == exits.NOT_CONVERGED == 5
    report = json.loads(capsys.readouterr().out)
    assert report["converged"] is False
    assert "did not converge" in report["convergence_reason"]
    assert report["convergence"]["train_majority"] > 0
    for key in ("asr", "weighted_asr", "defended_asr", "defended_weighted_asr"):
        assert report[key] is None
    assert set(report["attack"]["asr_per_trigger"].values()) == {None}
    assert report["attack"]["skipped"] == report["convergence_reason"]
    assert report["monitor_fpr"] is not None  # the clean side is still measured
    assert main(args) == exits.NOT_CONVERGED
    text = capsys.readouterr().out
    assert "NOT CONVERGED" in text and "ASR" not in text


def test_without_pvs_or_audit_it_falls_back_to_a_fresh_scan(backdoored, toy_task, capsys,
                                                           tmp_path, monkeypatch):
    import sanitator.cli.evaluate as command

    def refuse(model_dir, args):
        raise command.UsageError(f"would scan {model_dir.name}")

    monkeypatch.setattr(command, "_fresh_scan", refuse)
    code = main(["evaluate", str(backdoored), *_task_args(toy_task),
                 "--store", str(tmp_path / "empty"), *FAST])
    assert code == 2
    assert "would scan model" in capsys.readouterr().err


def test_bad_input_is_a_one_line_error(backdoored, toy_task, tmp_path, capsys):
    assert main(["evaluate", str(backdoored), "--task", str(toy_task), "--label-column", "y",
                 "--no-monitor"]) == 2
    assert "declare it (--text-column)" in capsys.readouterr().err
    assert main(["evaluate", str(backdoored), "--task", "no_such_task"]) == 2
    assert "unknown task 'no_such_task'" in capsys.readouterr().err
    clean = minilm_path()
    assert main(["evaluate", str(clean), *_task_args(toy_task), "--no-monitor"]) == 2
    assert "pass --triggers" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path), *_task_args(toy_task), "--triggers", "cf",
                 "--no-monitor"]) == 2
    assert "no config.json" in capsys.readouterr().err
