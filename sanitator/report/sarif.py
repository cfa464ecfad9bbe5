"""The report as SARIF 2.1.0: one result per backdoored model (an error) and per
inconclusive one (a warning: not shown clean), for code-scanning UIs."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from sanitator.core.status import Status

SARIF_RULE_ID = "SANITATOR-BACKDOOR"
SARIF_INCONCLUSIVE_RULE_ID = "SANITATOR-INCONCLUSIVE"
SARIF_SCHEMA_URI = "https://json.schemastore.org/sarif-2.1.0.json"
INFORMATION_URI = "https://github.com/sanitator/sanitator"


def _model_uri(row: dict[str, Any]) -> str:
    """Where the model lives, as a URI code-scanning dashboards can show."""
    source, registry, repo = row["source"], row["registry"], row["repo_id"]
    if source == "hf":
        return f"https://huggingface.co/{repo}/tree/{row['revision']}"
    if source == "mlflow":
        return f"models:/{repo}"
    root = registry.split(":", 1)[1] if ":" in registry else registry
    return Path(root, repo).resolve().as_uri()


def _rule(rule_id: str, name: str, short: str, full: str, help_text: str, *, level: str,
          severity: str, precision: str) -> dict[str, Any]:
    """One SARIF reportingDescriptor; `{code}` in the help is plain in its text and
    backquoted in its markdown."""
    return {
        "id": rule_id, "name": name,
        "shortDescription": {"text": short}, "fullDescription": {"text": full},
        "help": {"text": help_text.replace("{", "").replace("}", ""),
                 "markdown": help_text.replace("{", "`").replace("}", "`")},
        "defaultConfiguration": {"level": level},
        "properties": {"tags": ["security", "supply-chain", "backdoor"],
                       "security-severity": severity, "precision": precision},
    }


def to_sarif(report: dict[str, Any]) -> dict[str, Any]:
    """SARIF 2.1.0 log: one run, two rules, one result per backdoored or inconclusive
    model."""
    rule = _rule(
        SARIF_RULE_ID, "BackdooredPretrainedEncoder",
        "Task-agnostic backdoor in a pretrained encoder",
        "LMSanitator found predefined attack vectors (PVs) that a real trigger reproduces: "
        "any model prompt-tuned on this encoder inherits the backdoor.",
        "Do not prompt-tune or deploy this revision. If it must serve, guard it with its PV "
        "artifact (`sanitator pv pull`) and {MonitoredEncoder.from_artifact}.",
        level="error", severity="9.0", precision="high")
    inconclusive_rule = _rule(
        SARIF_INCONCLUSIVE_RULE_ID, "InconclusiveBackdoorScan",
        "Backdoor scan inconclusive: not shown clean",
        "The scan could not judge every candidate trigger it found (a confirmation quota "
        "was spent) and accepted none, so the encoder is not shown free of a task-agnostic "
        "backdoor.",
        "Treat this revision as unsafe until reviewed: audit it again with a larger "
        "confirmation budget or a known clean base, or inspect the unjudged candidates in "
        "the audit's evidence. It has no PV artifact.",
        level="warning", severity="5.0", precision="medium")
    results = []
    for finding in report["findings"]:
        if finding["status"] not in (Status.BACKDOORED, Status.INCONCLUSIVE):
            continue
        score = finding["score"]
        backdoored = finding["status"] == Status.BACKDOORED
        text = (f"{finding['repo_id']} @ {finding['revision'][:12]} ({finding['registry']}) is "
                f"{finding['status']}: score {score if score is None else round(score, 3)}, "
                f"{finding['pv_count']} PV(s)")
        if finding["trigger_tokens"]:
            text += ", trigger tokens " + ", ".join(finding["trigger_tokens"])
        if not backdoored and finding.get("reason"):
            text += f"; {finding['reason']}"
        identity = f"{finding['registry']}|{finding['repo_id']}|{finding['revision']}"
        results.append({
            "ruleId": SARIF_RULE_ID if backdoored else SARIF_INCONCLUSIVE_RULE_ID,
            "ruleIndex": 0 if backdoored else 1,
            "level": "error" if backdoored else "warning", "kind": "fail",
            "message": {"text": text + "."},
            "locations": [{
                "physicalLocation": {"artifactLocation": {"uri": _model_uri(finding)}},
                "logicalLocations": [{
                    "name": finding["repo_id"], "kind": "module",
                    "fullyQualifiedName": f"{finding['registry']}/{finding['repo_id']}"
                                          f"@{finding['revision']}"}],
            }],
            "partialFingerprints": {
                "sanitatorModel/v1": hashlib.sha256(identity.encode()).hexdigest()},
            "properties": {key: finding[key] for key in (
                "registry", "repo_id", "revision", "score", "pv_count", "trigger_tokens",
                "audit_id", "audited_at", "config_hash", "mlflow_run_id", "mlflow_url")},
        })
    return {
        "$schema": SARIF_SCHEMA_URI,
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {"name": "sanitator", "version": report["package_version"],
                                "semanticVersion": report["package_version"],
                                "informationUri": INFORMATION_URI,
                                "rules": [rule, inconclusive_rule]}},
            "automationDetails": {"id": "sanitator/supply-chain/"},
            "invocations": [{"executionSuccessful": True,
                             "endTimeUtc": report["generated_at"]}],
            "results": results,
            "properties": {"summary": report["summary"]},
        }],
    }
