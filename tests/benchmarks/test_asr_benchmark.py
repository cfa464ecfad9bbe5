"""`benchmarks/asr.py --mined`: audit -> pv pull -> prompt-tune -> attack, per trigger, with
the oracle PVs beside the mined ones.

The audit's scan is stood in for by store rows holding chosen planted PVs (the audit CLI and
flow have their own tests, and a real scan takes minutes); `sanitator pv pull`, the
artifact, prompt-tuning and the attacks are the real ones, on a planted backdoor in a
2-layer MiniLM-L6 and a toy task."""

import datetime as dt
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from evaluation_support import TOY_TRIGGERS, planted_backdoor, write_toy_task
from scripts_support import load_script

from sanitator.cli import main


def fake_audit_runner(keep: list[int], calls: list[list[str]]):
    """Runs `sanitator pv pull` for real (in process); answers `sanitator audit` by writing
    a backdoored verdict whose PV set is the planted PVs numbered `keep`."""
    from sanitator.detect.results import PVSet, Verdict
    from sanitator.pipeline.audit import AuditOutcome, AuditRequest, pv_rows, verdict_row
    from sanitator.pipeline.registries.local import LocalRegistry
    from sanitator.pipeline.store import write_rows

    def runner(args: list[str]) -> subprocess.CompletedProcess:
        calls.append(args)
        if args[0] != "audit":
            return subprocess.CompletedProcess(args, main(args))
        root = Path(args[args.index("--registry") + 1].removeprefix("path:"))
        store = Path(args[args.index("--out") + 1])
        when = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)
        for ref in LocalRegistry(root).crawl():
            planted = json.loads((root / ref.repo_id / "backdoor.json").read_text())["pvs"]
            vectors = torch.tensor(planted)[keep]
            request = AuditRequest(f"audit-{len(calls)}-{ref.repo_id}", ref, {}, "hash")
            outcome = AuditOutcome(Verdict("backdoored", score=0.9, seeds_tried=3, steps=120),
                                   PVSet(vectors, torch.zeros(len(keep), 7, 384)), seconds=42.0)
            write_rows(store, "pvs", pv_rows(request, outcome, audited_at=when),
                       partition="2026-05-01", name=request.audit_id)
            write_rows(store, "verdicts", [verdict_row(request, outcome, audited_at=when)],
                       partition="2026-05-01", name=request.audit_id)
        return subprocess.CompletedProcess(args, 0)

    return runner


@pytest.fixture(scope="module")
def setup(tmp_path_factory, minilm_2layer):
    root = tmp_path_factory.mktemp("mined")
    shutil.copytree(planted_backdoor(str(minilm_2layer)), root / "zoo" / "toy-por")
    task = write_toy_task(root / "task", text_column="text", label_column="label")
    return root, task


def _run(setup, keep, tag, capsys):
    root, task = setup
    asr = load_script("benchmarks/asr.py")
    mined = load_script("benchmarks/asr_mined.py")
    calls: list[list[str]] = []
    args = asr.build_parser().parse_args([
        "--mined", "--zoo", str(root / "zoo"), "--store", str(root / f"store-{tag}"),
        "--tasks", str(task), "--train-size", "160", "--epochs", "2", "--prefix-length", "8",
        "--batch-size", "16",
        "--limit", "40", "--audit-set", "mode=search", "--out", str(root / f"{tag}.jsonl")])
    models = asr.zoo_models(args.zoo, None)
    assert mined.run_mined(args, models, runner=fake_audit_runner(keep, calls)) == 0
    table = capsys.readouterr().out
    rows = [json.loads(line) for line in (root / f"{tag}.jsonl").read_text().splitlines()]
    return calls, table, rows


def test_mined_pvs_that_cover_every_trigger_guard_like_the_oracle(setup, capsys):
    root, _ = setup
    calls, table, (row,) = _run(setup, [0, 1], "full", capsys)
    audit, pull = calls
    assert audit[:2] == ["audit", "--registry"]
    assert audit[2] == f"path:{root / 'store-full-work' / 'registry-cls'}"
    assert "mode=search" in audit and "feature=cls" not in audit  # CLS is the audit default
    assert pull[:2] == ["pv", "pull"] and (root / "store-full-work" / "toy-por.pvs.safetensors"
                                           ).is_file()
    assert row["best_agreement"] == [1.0, 1.0] and row["audit"]["seconds"] == 42.0
    mined, oracle = row["mined"], row["oracle"]
    assert mined["converged"] and mined["method"] == "ptv2"
    assert mined["attack"]["n_pvs"] == 2 and oracle["attack"]["n_pvs"] == 2
    assert mined["asr"] >= 0.9 and mined["defended_asr"] <= 0.05
    assert oracle["defended_asr"] <= 0.05 and mined["asr"] == oracle["asr"]
    # one table per audit, one row per trigger plus the any-trigger row
    assert "2/2" in table and "1.00 1.00" in table
    for trigger in (*TOY_TRIGGERS, "(any)"):
        assert any(line.split()[3] == trigger for line in table.splitlines()
                   if line.startswith("toy-por  ") and len(line.split()) > 3)


def test_a_pv_the_audit_missed_leaves_its_trigger_open(setup, capsys):
    _, _, (row,) = _run(setup, [0], "partial", capsys)
    assert row["best_agreement"][0] == 1.0 and row["best_agreement"][1] < 0.9
    mined, oracle = row["mined"]["attack"], row["oracle"]["attack"]
    # the planted PVs are opposite: each trigger flips the inputs of one class
    assert mined["asr_per_trigger"]["pt"] >= 0.3
    assert mined["defended_asr_per_trigger"]["cf"] <= 0.05
    assert mined["defended_asr_per_trigger"]["pt"] == mined["asr_per_trigger"]["pt"]
    assert oracle["defended_asr_per_trigger"]["pt"] <= 0.05


def test_the_asr_table_takes_a_token_task(tmp_path, minilm_1layer, capsys):
    """`benchmarks/asr.py --tasks FOLDER` on a token task: a clean and a token-POR member."""
    from evaluation_support import planted_token_backdoor, write_toy_ner_task

    zoo = tmp_path / "zoo"
    shutil.copytree(planted_token_backdoor(str(minilm_1layer)), zoo / "tokpor")
    shutil.copytree(minilm_1layer, zoo / "clean")
    task = write_toy_ner_task(tmp_path / "ner", 48, 8)
    asr = load_script("benchmarks/asr.py")
    assert asr.main(["--zoo", str(zoo), "--tasks", str(task), "--train-size", "48",
                     "--epochs", "2", "--lr", "2e-2", "--prefix-length", "4",
                     "--batch-size", "16", "--limit", "8"]) == 0
    table = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in table.splitlines()
             if line.startswith(("clean ", "tokpor "))}
    assert lines["tokpor"][1] == "tokpor" and lines["clean"][1] == "clean"
    assert "entity F1" in table


def test_reuse_finds_the_verdicts_an_earlier_run_stored(setup, tmp_path):
    """`--reuse-audits` skips a registry only when every member has a verdict there."""
    root, _ = setup
    mined = load_script("benchmarks/asr_mined.py")
    member = mined.Member(root / "zoo" / "toy-por", {"attack": "por"}, "cls")
    registry = f"path:{mined.stage([member], tmp_path / 'work')['cls'].resolve()}"
    store = tmp_path / "store"
    assert not mined.has_verdicts(store, registry, ["toy-por"])   # no store yet
    fake_audit_runner([0], [])(["audit", "--registry", registry, "--out", str(store)])
    assert mined.has_verdicts(store, registry, ["toy-por"])
    assert not mined.has_verdicts(store, registry, ["toy-por", "another"])
    assert not mined.has_verdicts(store, "path:/elsewhere", ["toy-por"])
