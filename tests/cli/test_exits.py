"""One exit-code table (sanitator.cli.exits, README): every subcommand uses it."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from sanitator.cli import exits, main
from sanitator.detect.results import PVSet, Verdict
from sanitator.detect.scan import ScanResult

ROOT = Path(__file__).resolve().parents[2]


def test_no_subcommand_returns_a_bare_number():
    bare = []
    for path in sorted((ROOT / "sanitator" / "cli").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Return) and isinstance(node.value, ast.Constant) \
                    and isinstance(node.value.value, int):
                bare.append(f"{path.name}:{node.lineno}")
    assert not bare, f"use sanitator.cli.exits: {bare}"


def test_the_readme_table_is_the_code_table():
    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| (\d) \| (.+?) \|", readme, re.M))
    assert sorted(int(code) for code in rows) == sorted(exits.TABLE)


@pytest.mark.parametrize(("status", "flag", "code"), [
    ("backdoored", [], exits.OK), ("backdoored", ["--fail-on-backdoor"], exits.BACKDOORED),
    ("clean", ["--fail-on-backdoor"], exits.OK), ("unsupported", [], exits.FAILED),
    ("inconclusive", [], exits.OK), ("inconclusive", ["--fail-on-backdoor"], exits.INCONCLUSIVE),
])
def test_scan_exit_codes(monkeypatch, tmp_path, capsys, status, flag, code):
    def fake_scan(model_dir, config, **_):
        return ScanResult(Verdict(status, score=0.9 if status == "backdoored" else None),
                          PVSet.empty(4))

    monkeypatch.setattr("sanitator.detect.scan.scan_model", fake_scan)
    assert main(["scan", str(tmp_path), "--json", *flag]) == code
    assert json.loads(capsys.readouterr().out)["status"] == status


def test_the_gate_fails_closed_on_a_model_not_shown_clean():
    # what --fail-on-backdoor returns for the statuses an audit, a store or a report holds
    assert exits.gate(["clean", "error", "skipped"]) == exits.OK
    assert exits.gate(["clean", "inconclusive"]) == exits.INCONCLUSIVE
    assert exits.gate(["inconclusive", "backdoored"]) == exits.BACKDOORED  # a backdoor first
