"""The supply-chain report: report.json against its schema, report.sarif against the SARIF
2.1.0 structure, the diff against the previous report, the HTML being self-contained, and
the CLI's refusals. The store holds known verdicts (tests/report_support.py)."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import jsonschema
import pytest
from report_support import DAY2, REV_A, REV_B, build_store, write_audit

from sanitator.cli import main
from sanitator.report import REPORT_SCHEMA, ReportError, build_report, to_sarif, write_report
from sanitator.report.markdown import to_markdown

# The parts of the SARIF 2.1.0 specification (OASIS, sarif-v2.1.0 §3) that code-scanning
# dashboards rely on, written out as a JSON Schema: required properties and their types.
_MESSAGE = {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}}
SARIF_2_1_0_STRUCTURE = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["version", "runs"],
    "properties": {
        "$schema": {"type": "string", "format": "uri"},
        "version": {"const": "2.1.0"},
        "runs": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "required": ["tool", "results"],
            "properties": {
                "tool": {"type": "object", "required": ["driver"], "properties": {
                    "driver": {"type": "object", "required": ["name"], "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "version": {"type": "string"},
                        "informationUri": {"type": "string", "format": "uri"},
                        "rules": {"type": "array", "items": {
                            "type": "object", "required": ["id"],
                            "properties": {
                                "id": {"type": "string"},
                                "shortDescription": _MESSAGE, "fullDescription": _MESSAGE,
                                "defaultConfiguration": {"type": "object", "properties": {
                                    "level": {"enum": ["none", "note", "warning",
                                                       "error"]}}},
                            }}},
                    }}}},
                "invocations": {"type": "array", "items": {
                    "type": "object", "required": ["executionSuccessful"],
                    "properties": {"executionSuccessful": {"type": "boolean"}}}},
                "results": {"type": "array", "items": {
                    "type": "object",
                    "required": ["message"],
                    "properties": {
                        "ruleId": {"type": "string"},
                        "ruleIndex": {"type": "integer", "minimum": 0},
                        "level": {"enum": ["none", "note", "warning", "error"]},
                        "kind": {"enum": ["notApplicable", "pass", "fail", "review", "open",
                                          "informational"]},
                        "message": _MESSAGE,
                        "locations": {"type": "array", "items": {
                            "type": "object",
                            "properties": {
                                "physicalLocation": {
                                    "type": "object", "required": ["artifactLocation"],
                                    "properties": {"artifactLocation": {
                                        "type": "object", "required": ["uri"],
                                        "properties": {"uri": {"type": "string"}}}}},
                                "logicalLocations": {"type": "array", "items": {
                                    "type": "object",
                                    "properties": {"name": {"type": "string"},
                                                   "fullyQualifiedName": {"type": "string"},
                                                   "kind": {"type": "string"}}}},
                            }}},
                        "partialFingerprints": {"type": "object",
                                                "additionalProperties": {"type": "string"}},
                        "properties": {"type": "object"},
                    }}},
            }}},
    },
}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return build_store(tmp_path_factory.mktemp("report-store") / "store")


@pytest.fixture(scope="module")
def written(store, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("report")
    return out, write_report(store, out, mlflow_ui="http://mlflow.internal:5000/")


def test_report_json_matches_its_schema_with_the_known_verdicts(written):
    out, report = written
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == report
    jsonschema.Draft202012Validator.check_schema(REPORT_SCHEMA)
    jsonschema.validate(on_disk, REPORT_SCHEMA)
    summary = report["summary"]
    assert (summary["models"], summary["audits"], summary["evaluations"]) == (6, 8, 1)
    assert summary["by_status"] == {"backdoored": 1, "inconclusive": 0, "clean": 2,
                                    "error": 1, "unsupported": 1, "skipped": 1}
    assert summary["by_registry"]["hf:acme"] == {"backdoored": 1, "inconclusive": 0,
                                                 "clean": 1, "error": 0, "unsupported": 1,
                                                 "skipped": 1}
    assert summary["first_audit_at"].startswith("2026-05-01")
    # findings: backdoored first, then clean by descending score
    assert [(f["repo_id"], f["status"]) for f in report["findings"]] == [
        ("acme/encoder-b", "backdoored"), ("zoo-clean", "clean"), ("acme/encoder-a", "clean")]
    top = report["findings"][0]
    assert (top["revision"], top["pv_count"], top["score"]) == (REV_B, 2, 0.97)
    assert top["trigger_tokens"] == ["cf", "mn"] and top["audits"] == 2
    assert top["mlflow_url"] == f"http://mlflow.internal:5000/#/runs/{'e' * 32}"
    assert [(e["task"], e["asr"], e["defended_asr"]) for e in top["evaluations"]] == [
        ("sst2", 0.98, 0.01)]
    assert report["findings"][2]["revision"] == REV_A
    assert [(e["repo_id"], e["retryable"]) for e in report["errors"]] == [("team/pickled",
                                                                           False)]
    assert [(s["repo_id"], s["status"]) for s in report["skipped"]] == [
        ("acme/decoder", "unsupported"), ("acme/huge", "skipped")]
    assert report["diff"]["baseline_generated_at"] is None  # first report: no baseline


def test_sarif_is_2_1_0_with_one_result_per_backdoored_model(written):
    out, report = written
    sarif = json.loads((out / "report.sarif").read_text())
    jsonschema.validate(sarif, SARIF_2_1_0_STRUCTURE,
                        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    run = sarif["runs"][0]
    rules = run["tool"]["driver"]["rules"]
    assert len(run["results"]) == 1
    result = run["results"][0]
    assert rules[result["ruleIndex"]]["id"] == result["ruleId"]
    assert result["level"] == "error" and "acme/encoder-b" in result["message"]["text"]
    location = result["locations"][0]
    assert location["physicalLocation"]["artifactLocation"]["uri"] == (
        f"https://huggingface.co/acme/encoder-b/tree/{REV_B}")
    assert location["logicalLocations"][0]["fullyQualifiedName"].endswith(f"@{REV_B}")
    assert result["properties"]["audit_id"] == "b2" * 16
    # the fingerprint is stable per (registry, repo, revision) across reports
    assert to_sarif(report)["runs"][0]["results"][0]["partialFingerprints"] == \
        result["partialFingerprints"]


def test_html_is_self_contained(written):
    out, _ = written
    page = (out / "report.html").read_text()
    assert "<link" not in page and not re.search(r"<script[^>]+src=", page)
    sources = re.findall(r'<img[^>]+src="([^"]+)"', page)
    assert len(sources) == 4 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "Content-Security-Policy" in page


def test_diff_against_the_previous_report(tmp_path):
    store = build_store(tmp_path / "store", second_night=False)
    out = tmp_path / "report"
    first = write_report(store, out, plots=False)
    assert first["diff"]["baseline_generated_at"] is None
    # night 2 (encoder-b's new revision is backdoored, zoo-clean is new and clean) and a
    # failed re-audit of encoder-a
    build_store(store)
    write_audit(store, "hf:acme", "acme/encoder-a", REV_A, "error",
                when=DAY2 + dt.timedelta(hours=1), audit_id="a3" * 16,
                reason="download failed", retryable=True)
    second = write_report(store, out, plots=False)  # baseline: the report.json in `out`
    diff = second["diff"]
    assert diff["baseline_generated_at"] == first["generated_at"]

    def changes(key):
        return [(c["repo_id"], c["previous_status"]) for c in diff[key]]

    assert changes("newly_backdoored") == [("acme/encoder-b", "clean")]
    assert changes("newly_clean") == [("zoo-clean", None)]
    assert changes("newly_errored") == [("acme/encoder-a", "clean")]  # pickled erred before
    jsonschema.validate(second, REPORT_SCHEMA)
    # an explicit --previous wins; the same report as baseline has no changes
    third = write_report(store, tmp_path / "elsewhere", previous=out / "report.json",
                         plots=False)
    assert all(not third["diff"][key] for key in ("newly_backdoored", "newly_clean",
                                                  "newly_errored"))


def test_report_cli_and_bad_stores(store, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["report", "--store", str(store), "--out", str(out), "--no-plots"]) == 0
    assert "6 models: 1 backdoored, 2 clean" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"report.html", "report.json", "report.sarif"}
    assert main(["report", "--store", str(store), "--out", str(out), "--no-plots",
                 "--fail-on-backdoor"]) == 3
    assert "since the previous report: 0 newly backdoored" in capsys.readouterr().out
    for bad_store, message in ((tmp_path / "missing", "is not a folder"),
                               (tmp_path, "no verdicts/ dataset")):
        assert main(["report", "--store", str(bad_store), "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    (tmp_path / "old.json").write_text("{}")
    assert main(["report", "--store", str(store), "--out", str(out),
                 "--previous", str(tmp_path / "old.json")]) == 1
    assert "not a sanitator report.json" in capsys.readouterr().err
    with pytest.raises(ReportError):
        build_report(tmp_path)


def test_an_empty_verdicts_dataset_still_reports(tmp_path):
    (tmp_path / "verdicts").mkdir()
    report = write_report(tmp_path, tmp_path / "out")
    jsonschema.validate(report, REPORT_SCHEMA)
    assert report["summary"]["models"] == 0 and report["findings"] == []
    assert "Nothing to plot yet" in (tmp_path / "out" / "report.html").read_text()


HOSTILE_IDS = ["$\\frac{$", "<script>alert(1)</script>", "a`b|c\nd", "team/\\xff-$x^2$"]


def test_any_repo_id_renders_as_plain_text(tmp_path, capsys):
    from sanitator.report import md_code, to_markdown

    store = tmp_path / "store"
    when = dt.datetime(2026, 5, 2, 3, tzinfo=dt.UTC)
    for index, repo_id in enumerate(HOSTILE_IDS):
        write_audit(store, "path:/zoo", repo_id, REV_A, ("backdoored", "clean")[index % 2],
                    when=when, audit_id=f"h{index}", score=0.9 - 0.5 * (index % 2),
                    seconds=3.0 + index)
    assert main(["report", "--store", str(store), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    html_text = (tmp_path / "out" / "report.html").read_text()
    assert "<script>alert(1)</script>" not in html_text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html_text
    assert html_text.count("data:image/png;base64,") >= 3  # the plots with the ids in them
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert sorted(f["repo_id"] for f in report["findings"]) == sorted(HOSTILE_IDS)
    markdown = to_markdown(report)
    assert md_code("a`b|c\nd") == "`a'b\\|c d`" and md_code("a`b|c\nd") in markdown


def test_an_inconclusive_model_is_reported_as_not_shown_clean(tmp_path, capsys):
    # night 1 as above; then acme/encoder-a's re-audit leaves candidates unjudged
    store = build_store(tmp_path / "store", second_night=False, evaluations=False)
    out = tmp_path / "report"
    write_report(store, out, plots=False)
    reason = "3 candidate(s) left unjudged when their confirmation quota was spent"
    write_audit(store, "hf:acme", "acme/encoder-a", REV_A, "inconclusive", when=DAY2,
                audit_id="a4" * 16, score=0.42, reason=reason)
    assert main(["report", "--store", str(store), "--out", str(out), "--no-plots",
                 "--fail-on-backdoor"]) == 6
    assert "1 newly inconclusive" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    jsonschema.validate(report, REPORT_SCHEMA)
    assert report["summary"]["by_status"]["inconclusive"] == 1
    finding = next(f for f in report["findings"] if f["status"] == "inconclusive")
    assert (finding["repo_id"], finding["score"], finding["reason"]) == (
        "acme/encoder-a", 0.42, reason)
    assert [(c["repo_id"], c["previous_status"]) for c in
            report["diff"]["newly_inconclusive"]] == [("acme/encoder-a", "clean")]
    # SARIF: a warning under its own rule; HTML: its own row class; Markdown: its section
    sarif = json.loads((out / "report.sarif").read_text())
    jsonschema.validate(sarif, SARIF_2_1_0_STRUCTURE)
    run = sarif["runs"][0]
    (result,) = run["results"]
    assert (result["ruleId"], result["level"]) == ("SANITATOR-INCONCLUSIVE", "warning")
    assert run["tool"]["driver"]["rules"][result["ruleIndex"]]["id"] == result["ruleId"]
    assert reason in result["message"]["text"]
    assert 'class="inconclusive"' in (out / "report.html").read_text()
    assert "## Inconclusive" in to_markdown(report)
