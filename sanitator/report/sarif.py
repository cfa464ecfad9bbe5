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


def to_sarif(report: dict[str, Any]) -> dict[str, Any]:
    """SARIF 2.1.0 log: one run, two rules, one result per backdoored or inconclusive
    model."""
    rule = {
        "id": SARIF_RULE_ID,
        "name": "BackdooredPretrainedEncoder",
        "shortDescription": {"text": "Task-agnostic backdoor in a pretrained encoder"},
        "fullDescription": {"text": "LMSanitator found predefined attack vectors (PVs) that "
                                    "a real trigger reproduces: any model prompt-tuned on "
                                    "this encoder inherits the backdoor."},
        "help": {"text": "Do not prompt-tune or deploy this revision. If it must serve, "
                         "guard it with its PV artifact (`sanitator pv pull`) and "
                         "MonitoredEncoder.from_artifact.",
                 "markdown": "Do not prompt-tune or deploy this revision. If it must serve, "
                             "guard it with its PV artifact (`sanitator pv pull`) and "
                             "`MonitoredEncoder.from_artifact`."},
        "defaultConfiguration": {"level": "error"},
        "properties": {"tags": ["security", "supply-chain", "backdoor"],
                       "security-severity": "9.0", "precision": "high"},
    }
    inconclusive_rule = {
        "id": SARIF_INCONCLUSIVE_RULE_ID,
        "name": "InconclusiveBackdoorScan",
        "shortDescription": {"text": "Backdoor scan inconclusive: not shown clean"},
        "fullDescription": {"text": "The scan could not judge every candidate trigger it "
                                    "found (a confirmation quota was spent) and accepted "
                                    "none, so the encoder is not shown free of a "
                                    "task-agnostic backdoor."},
        "help": {"text": "Treat this revision as unsafe until reviewed: audit it again with "
                         "a larger confirmation budget or a known clean base, or inspect "
                         "the unjudged candidates in the audit's evidence. It has no PV "
                         "artifact.",
                 "markdown": "Treat this revision as unsafe until reviewed: audit it again "
                             "with a larger confirmation budget or a known clean base, or "
                             "inspect the unjudged candidates in the audit's evidence. It "
                             "has no PV artifact."},
        "defaultConfiguration": {"level": "warning"},
        "properties": {"tags": ["security", "supply-chain", "backdoor"],
                       "security-severity": "5.0", "precision": "medium"},
    }
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
