"""The organisation-wide supply-chain report: which audited models are safe to prompt-tune.

Pure library (no Prefect): read a store's `verdicts/`, `pvs/` and `evaluations/` datasets
(every date), build one report dict with a stable schema (`REPORT_SCHEMA`, docs/report.md),
and render it as JSON, SARIF 2.1.0 (one result per backdoored model) and a self-contained
HTML page with embedded matplotlib plots. `write_report` does all of it into one folder and
diffs against the report that folder held before.

    from sanitator.report import write_report
    report = write_report("/srv/sanitator/store", "/srv/sanitator/report")
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import html
import io
import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

from sanitator import __version__
from sanitator.pipeline.store import MODEL_KEY, VERDICTS, StoreError, read_pvs, read_verdicts

REPORT_FORMAT = "sanitator.supply-chain-report"
REPORT_VERSION = 1
STATUSES: tuple[str, ...] = ("backdoored", "clean", "error", "unsupported", "skipped")
FINDING_STATUSES: tuple[str, ...] = ("backdoored", "clean")
SKIPPED_STATUSES: tuple[str, ...] = ("unsupported", "skipped")
# Where the table and the lists put each status (backdoored first).
STATUS_ORDER = {status: index for index, status in enumerate(STATUSES)}
REPORT_JSON, REPORT_SARIF, REPORT_HTML = "report.json", "report.sarif", "report.html"
SARIF_RULE_ID = "SANITATOR-BACKDOOR"
SARIF_SCHEMA_URI = "https://json.schemastore.org/sarif-2.1.0.json"
INFORMATION_URI = "https://github.com/sanitator/sanitator"
MAX_BAR_MODELS = 40  # the audit-time plot shows the slowest models only


class ReportError(ValueError):
    """A store the report cannot be built from (no verdicts dataset, unreadable files)."""


# ---------------------------------------------------------------------------------------
# The schema of report.json (JSON Schema 2020-12). Fields are only ever added.

_NULLABLE_STR = {"type": ["string", "null"]}
_NULLABLE_NUM = {"type": ["number", "null"]}
_MODEL_ID = {"registry": {"type": "string"}, "source": {"type": "string"},
             "repo_id": {"type": "string"}, "revision": {"type": "string"}}
_COUNTS = {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0},
           "required": list(STATUSES)}
_EVALUATION = {
    "type": "object",
    "required": ["task", "method", "asr", "defended_asr", "clean_accuracy",
                 "defended_clean_accuracy", "monitor_fpr", "evaluated_at", "audit_id"],
    "properties": {"task": {"type": "string"}, "method": {"type": "string"},
                   "asr": _NULLABLE_NUM, "defended_asr": _NULLABLE_NUM,
                   "clean_accuracy": _NULLABLE_NUM, "defended_clean_accuracy": _NULLABLE_NUM,
                   "monitor_fpr": _NULLABLE_NUM, "evaluated_at": {"type": "string"},
                   "audit_id": _NULLABLE_STR},
}
_MODEL_ROW = {
    "type": "object",
    "required": [*_MODEL_ID, "status", "audit_id", "audited_at", "config_hash", "reason",
                 "mlflow_run_id", "mlflow_url", "audits"],
    "properties": {**_MODEL_ID, "status": {"enum": list(STATUSES)},
                   "audit_id": {"type": "string", "pattern": "^[0-9a-f]+$"},
                   "audited_at": {"type": "string"}, "config_hash": {"type": "string"},
                   "reason": _NULLABLE_STR, "mlflow_run_id": _NULLABLE_STR,
                   "mlflow_url": _NULLABLE_STR, "audits": {"type": "integer", "minimum": 1}},
}
_FINDING = {
    "type": "object",
    "required": [*_MODEL_ROW["required"], "score", "pv_count", "trigger_tokens",
                 "architecture", "n_params", "seconds", "evaluations"],
    "properties": {**_MODEL_ROW["properties"], "status": {"enum": list(FINDING_STATUSES)},
                   "score": _NULLABLE_NUM, "pv_count": {"type": "integer", "minimum": 0},
                   "trigger_tokens": {"type": "array", "items": {"type": "string"}},
                   "architecture": _NULLABLE_STR, "n_params": {"type": ["integer", "null"]},
                   "seconds": _NULLABLE_NUM,
                   "evaluations": {"type": "array", "items": _EVALUATION}},
}
_ERROR = {
    "type": "object", "required": [*_MODEL_ROW["required"], "retryable"],
    "properties": {**_MODEL_ROW["properties"], "status": {"const": "error"},
                   "retryable": {"type": "boolean"}},
}
_SKIPPED = {
    "type": "object", "required": _MODEL_ROW["required"],
    "properties": {**_MODEL_ROW["properties"], "status": {"enum": list(SKIPPED_STATUSES)}},
}
_CHANGE = {
    "type": "object", "required": ["registry", "repo_id", "revision", "status",
                                   "previous_status"],
    "properties": {"registry": {"type": "string"}, "repo_id": {"type": "string"},
                   "revision": {"type": "string"}, "status": {"type": "string"},
                   "previous_status": _NULLABLE_STR},
}
REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "sanitator supply-chain report",
    "type": "object",
    "required": ["format", "format_version", "generated_at", "package_version", "store",
                 "summary", "findings", "errors", "skipped", "diff"],
    "properties": {
        "format": {"const": REPORT_FORMAT},
        "format_version": {"const": REPORT_VERSION},
        "generated_at": {"type": "string"},
        "package_version": {"type": "string"},
        "store": {"type": "string"},
        "summary": {
            "type": "object",
            "required": ["models", "audits", "by_status", "by_registry", "first_audit_at",
                         "last_audit_at", "evaluations"],
            "properties": {
                "models": {"type": "integer", "minimum": 0},
                "audits": {"type": "integer", "minimum": 0},
                "by_status": _COUNTS,
                "by_registry": {"type": "object", "additionalProperties": _COUNTS},
                "first_audit_at": _NULLABLE_STR, "last_audit_at": _NULLABLE_STR,
                "evaluations": {"type": "integer", "minimum": 0},
            },
        },
        "findings": {"type": "array", "items": _FINDING},
        "errors": {"type": "array", "items": _ERROR},
        "skipped": {"type": "array", "items": _SKIPPED},
        "diff": {
            "type": "object",
            "required": ["baseline_generated_at", "newly_backdoored", "newly_clean",
                         "newly_errored"],
            "properties": {"baseline_generated_at": _NULLABLE_STR,
                           "newly_backdoored": {"type": "array", "items": _CHANGE},
                           "newly_clean": {"type": "array", "items": _CHANGE},
                           "newly_errored": {"type": "array", "items": _CHANGE}},
        },
    },
}


# ---------------------------------------------------------------------------------------
# Reading the store.

def _clean(value: Any) -> Any:
    """A JSON-ready scalar: timestamps as ISO strings, NaN/NA as None, numpy as Python."""
    if value is None:
        return None
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if hasattr(value, "item") and not isinstance(value, list | tuple | dict | str):
        with contextlib.suppress(ValueError, AttributeError):
            value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    try:
        import pandas as pd

        if value is pd.NA or value is pd.NaT:
            return None
    except ImportError:  # pragma: no cover
        pass
    return value


def mlflow_run_url(mlflow_ui: str | None, run_id: str | None) -> str | None:
    """A link into the MLflow UI's run page (`/#/runs/<run id>` finds its experiment)."""
    if not mlflow_ui or not run_id:
        return None
    return f"{mlflow_ui.rstrip('/')}/#/runs/{run_id}"


def load_store(store: str | Path) -> dict[str, Any]:
    """The three datasets of a store as DataFrames: verdicts (every row), pvs, evaluations."""
    from sanitator.downstream.runs import read_evaluations

    store = Path(store)
    if not store.is_dir():
        raise ReportError(f"{store} is not a folder")
    if not (store / VERDICTS).is_dir():
        raise ReportError(f"{store} has no {VERDICTS}/ dataset: is it the folder that "
                          "`sanitator audit --out` wrote?")
    try:
        verdicts = read_verdicts(store)
        pvs = read_pvs(store)
        evaluations = read_evaluations(store)
    except StoreError as exc:
        raise ReportError(str(exc)) from exc
    return {"verdicts": verdicts, "pvs": pvs, "evaluations": evaluations}


def _trigger_tokens(pvs, audit_id: str) -> list[str]:
    if pvs is None or pvs.empty:
        return []
    tokens: list[str] = []
    for row_tokens in pvs.loc[pvs["audit_id"] == audit_id, "trigger_tokens"]:
        for token in row_tokens if row_tokens is not None else []:
            if str(token) not in tokens:
                tokens.append(str(token))
    return tokens


def _evaluations_of(evaluations, registry: str, repo_id: str, revision: str
                    ) -> list[dict[str, Any]]:
    """The newest ok evaluation per (task, method) of one encoder revision."""
    if evaluations is None or evaluations.empty:
        return []
    rows = evaluations[(evaluations["registry"] == registry)
                       & (evaluations["encoder"] == repo_id)
                       & (evaluations["revision"] == revision)
                       & (evaluations["status"] == "ok")]
    rows = rows.groupby(["task", "method"], sort=True).tail(1)
    keys = ("task", "method", "asr", "defended_asr", "clean_accuracy",
            "defended_clean_accuracy", "monitor_fpr", "evaluated_at", "audit_id")
    out = [{key: _clean(row[key]) for key in keys} for row in rows.to_dict("records")]
    return sorted(out, key=lambda e: (e["task"], e["method"]))


def build_report(store: str | Path, *, previous: dict[str, Any] | None = None,
                 mlflow_ui: str | None = None, generated_at: dt.datetime | None = None,
                 data: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report dict (schema `REPORT_SCHEMA`) of every model's latest verdict.

    `previous` is an earlier report dict to diff against (None: no baseline, empty diff);
    `mlflow_ui` the base URL of an MLflow UI serving the store's tracking database.
    """
    data = data if data is not None else load_store(store)
    verdicts, pvs, evaluations = data["verdicts"], data["pvs"], data["evaluations"]
    generated_at = generated_at or dt.datetime.now(dt.UTC)
    audits_per_model = Counter()
    latest = verdicts
    if not verdicts.empty:
        audits_per_model = Counter(zip(verdicts["registry"], verdicts["repo_id"], strict=True))
        latest = verdicts.groupby(list(MODEL_KEY), sort=False).tail(1)
    findings, errors, skipped = [], [], []
    by_status: Counter = Counter()
    by_registry: dict[str, Counter] = {}
    for row in latest.to_dict("records"):
        status = row["status"]
        by_status[status] += 1
        by_registry.setdefault(row["registry"], Counter())[status] += 1
        base = {
            "registry": row["registry"], "source": row["source"], "repo_id": row["repo_id"],
            "revision": row["revision"], "status": status, "audit_id": row["audit_id"],
            "audited_at": _clean(row["audited_at"]), "config_hash": row["config_hash"],
            "reason": _clean(row["reason"]), "mlflow_run_id": _clean(row["mlflow_run_id"]),
            "mlflow_url": mlflow_run_url(mlflow_ui, _clean(row["mlflow_run_id"])),
            "audits": audits_per_model[(row["registry"], row["repo_id"])],
        }
        if status in FINDING_STATUSES:
            findings.append({
                **base, "score": _clean(row["score"]), "pv_count": int(row["pv_count"]),
                "trigger_tokens": _trigger_tokens(pvs, row["audit_id"]),
                "architecture": _clean(row["architecture"]),
                "n_params": _clean(row["n_params"]), "seconds": _clean(row["seconds"]),
                "evaluations": _evaluations_of(evaluations, row["registry"], row["repo_id"],
                                               row["revision"]),
            })
        elif status == "error":
            errors.append({**base, "retryable": bool(row["retryable"])})
        else:
            skipped.append(base)

    def order(item: dict[str, Any]):
        score = item.get("score")
        return (STATUS_ORDER.get(item["status"], 99),
                -(score if score is not None else -1.0), item["registry"], item["repo_id"])

    findings.sort(key=order)
    errors.sort(key=order)
    skipped.sort(key=order)
    n_evaluations = 0 if evaluations is None else len(evaluations)
    report = {
        "format": REPORT_FORMAT, "format_version": REPORT_VERSION,
        "generated_at": generated_at.isoformat(), "package_version": __version__,
        "store": str(Path(store).resolve()),
        "summary": {
            "models": len(latest), "audits": len(verdicts),
            "by_status": {s: int(by_status.get(s, 0)) for s in STATUSES},
            "by_registry": {registry: {s: int(counts.get(s, 0)) for s in STATUSES}
                            for registry, counts in sorted(by_registry.items())},
            "first_audit_at": _clean(verdicts["audited_at"].min()) if len(verdicts) else None,
            "last_audit_at": _clean(verdicts["audited_at"].max()) if len(verdicts) else None,
            "evaluations": int(n_evaluations),
        },
        "findings": findings, "errors": errors, "skipped": skipped,
    }
    report["diff"] = diff_reports(previous, report)
    return report


def model_statuses(report: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(registry, repo id) -> its row, over findings, errors and skipped."""
    rows = [*report.get("findings", []), *report.get("errors", []), *report.get("skipped", [])]
    return {(row["registry"], row["repo_id"]): row for row in rows}


def diff_reports(previous: dict[str, Any] | None, current: dict[str, Any]) -> dict[str, Any]:
    """What changed since `previous`, per model (registry, repo id): a model is *newly*
    backdoored / clean / errored when its latest status is that now and was something else
    (or the model was absent) in the previous report. No previous report: empty lists."""
    diff: dict[str, Any] = {"baseline_generated_at": None, "newly_backdoored": [],
                            "newly_clean": [], "newly_errored": []}
    if not previous:
        return diff
    diff["baseline_generated_at"] = previous.get("generated_at")
    before = model_statuses(previous)
    targets = {"backdoored": "newly_backdoored", "clean": "newly_clean",
               "error": "newly_errored"}
    for key, row in sorted(model_statuses(current).items()):
        old = before.get(key)
        old_status = old["status"] if old else None
        if row["status"] in targets and row["status"] != old_status:
            diff[targets[row["status"]]].append({
                "registry": row["registry"], "repo_id": row["repo_id"],
                "revision": row["revision"], "status": row["status"],
                "previous_status": old_status})
    return diff


# ---------------------------------------------------------------------------------------
# SARIF 2.1.0

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
    """SARIF 2.1.0 log: one run, one rule, one result per backdoored model."""
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
    results = []
    for finding in report["findings"]:
        if finding["status"] != "backdoored":
            continue
        score = finding["score"]
        text = (f"{finding['repo_id']} @ {finding['revision'][:12]} ({finding['registry']}) is "
                f"backdoored: score {score if score is None else round(score, 3)}, "
                f"{finding['pv_count']} PV(s)")
        if finding["trigger_tokens"]:
            text += ", trigger tokens " + ", ".join(finding["trigger_tokens"])
        identity = f"{finding['registry']}|{finding['repo_id']}|{finding['revision']}"
        results.append({
            "ruleId": SARIF_RULE_ID, "ruleIndex": 0, "level": "error", "kind": "fail",
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
                                "informationUri": INFORMATION_URI, "rules": [rule]}},
            "automationDetails": {"id": "sanitator/supply-chain/"},
            "invocations": [{"executionSuccessful": True,
                             "endTimeUtc": report["generated_at"]}],
            "results": results,
            "properties": {"summary": report["summary"]},
        }],
    }


# ---------------------------------------------------------------------------------------
# Plots (matplotlib, embedded as PNG data URIs)

_COLOURS = {"backdoored": "#c62828", "clean": "#2e7d32", "error": "#ef6c00",
            "unsupported": "#6d6d6d", "skipped": "#9e9e9e"}


def _png(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=96)
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def make_plots(report: dict[str, Any], data: dict[str, Any]) -> dict[str, str | None]:
    """Title -> PNG data URI (None when there is nothing to plot). Repo ids are anyone's
    text: every label is plain text (a `$` in a name is not mathtext)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    with matplotlib.rc_context({"text.parse_math": False}):
        return _make_plots(report, data)


def _make_plots(report: dict[str, Any], data: dict[str, Any]) -> dict[str, str | None]:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    plots: dict[str, str | None] = {}
    verdicts = data["verdicts"]

    # verdicts over time: stacked bars of audits per audit date and status
    if len(verdicts):
        counts = verdicts.groupby(["audit_date", "status"]).size().unstack(fill_value=0)
        figure, axes = plt.subplots(figsize=(6, 3))
        bottom = None
        for status in STATUSES:
            if status not in counts:
                continue
            values = counts[status].to_numpy()
            axes.bar(counts.index, values, bottom=bottom, label=status,
                     color=_COLOURS[status])
            bottom = values if bottom is None else bottom + values
        axes.set_xlabel("audit date (UTC)")
        axes.set_ylabel("audits")
        axes.yaxis.set_major_locator(MaxNLocator(integer=True))
        axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        axes.tick_params(axis="x", labelrotation=30, labelsize=8)
        plots["Verdicts over time"] = _png(figure)
    else:
        plots["Verdicts over time"] = None

    # score distribution of the latest verdicts
    scored = [(f["score"], f["status"]) for f in report["findings"] if f["score"] is not None]
    if scored:
        figure, axes = plt.subplots(figsize=(6, 3))
        bins = [i / 20 for i in range(21)]
        for status in FINDING_STATUSES:
            values = [score for score, s in scored if s == status]
            if values:
                axes.hist(values, bins=bins, label=status, color=_COLOURS[status], alpha=0.8)
        axes.set_xlim(0, 1)
        axes.set_xlabel("score (probability-like, latest verdict per model)")
        axes.set_ylabel("models")
        axes.yaxis.set_major_locator(MaxNLocator(integer=True))
        axes.legend(fontsize=8)
        plots["Score distribution"] = _png(figure)
    else:
        plots["Score distribution"] = None

    # audit time per model (latest audit), slowest first
    timed = [(row["seconds"], row["repo_id"], row["status"])
             for row in report["findings"] if row.get("seconds") is not None]
    if timed:
        timed = sorted(timed, reverse=True)[:MAX_BAR_MODELS]
        figure, axes = plt.subplots(figsize=(6, 1.0 + 0.28 * len(timed)))
        axes.barh([name for _, name, _ in timed][::-1], [s for s, _, _ in timed][::-1],
                  color=[_COLOURS[status] for _, _, status in timed][::-1])
        axes.set_xlabel("seconds (latest audit: fetch, preflight, scan)")
        axes.tick_params(axis="y", labelsize=8)
        plots["Audit time per model"] = _png(figure)
    else:
        plots["Audit time per model"] = None

    # ASR with and without the monitor, where evaluated
    pairs = [(f"{f['repo_id']}\n{e['task']}", e["asr"], e["defended_asr"])
             for f in report["findings"] for e in f["evaluations"]
             if e["asr"] is not None]
    if pairs:
        figure, axes = plt.subplots(figsize=(6, 3.2))
        positions = range(len(pairs))
        width = 0.38
        undefended = axes.bar([p - width / 2 for p in positions],
                              [100 * a for _, a, _ in pairs], width,
                              label="without monitor", color="#c62828")
        defended = axes.bar([p + width / 2 for p in positions],
                            [100 * (d if d is not None else 0.0) for _, _, d in pairs], width,
                            label="with PV monitor", color="#1565c0")
        for bars in (undefended, defended):
            axes.bar_label(bars, fmt="%.0f", fontsize=7)
        axes.set_xlim(-0.6, max(len(pairs), 3) - 0.4)
        axes.set_xticks(list(positions), [name for name, _, _ in pairs], fontsize=7)
        axes.set_ylabel("attack success rate (%)")
        axes.set_ylim(0, 110)
        axes.legend(fontsize=8)
        plots["ASR with and without the monitor"] = _png(figure)
    else:
        plots["ASR with and without the monitor"] = None
    return plots


# ---------------------------------------------------------------------------------------
# HTML

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222}
h1{margin:0 0 4px}h2{margin-top:28px}.meta{color:#666;font-size:13px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:14px 0}
.card{border-radius:6px;padding:10px 16px;min-width:110px;color:#fff}
.card b{display:block;font-size:26px}
table{border-collapse:collapse;font-size:13px;width:100%}
th,td{border-bottom:1px solid #ddd;padding:5px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3;position:sticky;top:0}
tr.backdoored{background:#fdecea}tr.error{background:#fff4e5}
.badge{border-radius:4px;padding:1px 6px;color:#fff;font-size:12px}
code{font-size:12px}.plots{display:flex;flex-wrap:wrap;gap:16px}
.plots figure{margin:0}.plots img{max-width:100%;border:1px solid #eee}
td.nowrap{white-space:nowrap}
.empty{color:#888;font-style:italic}#filter{margin:6px 0;padding:4px;width:260px}
"""

# Nothing may be fetched: a violation shows up as a console error in the browser test.
_CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
        "script-src 'unsafe-inline'")

# Filters table rows by a text box; no network, no libraries.
_SCRIPT = """
(function () {
  var box = document.getElementById("filter");
  var rows = Array.prototype.slice.call(document.querySelectorAll("#models tbody tr"));
  box.addEventListener("input", function () {
    var needle = box.value.toLowerCase();
    rows.forEach(function (row) {
      row.style.display = row.textContent.toLowerCase().indexOf(needle) >= 0 ? "" : "none";
    });
  });
})();
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _badge(status: str) -> str:
    return (f'<span class="badge" style="background:{_COLOURS.get(status, "#555")}">'
            f"{_e(status)}</span>")


def _fmt_time(value: str | None) -> str:
    return "" if not value else value[:19].replace("T", " ") + " UTC"


def _model_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [*report["findings"], *report["errors"], *report["skipped"]]
    return sorted(rows, key=lambda r: (STATUS_ORDER.get(r["status"], 99),
                                       -(r.get("score") if r.get("score") is not None else -1),
                                       r["registry"], r["repo_id"]))


def to_html(report: dict[str, Any], plots: dict[str, str | None]) -> str:
    """One self-contained page: inline CSS and script, plots as data URIs, nothing fetched."""
    summary = report["summary"]
    cards = "".join(
        f'<div class="card" style="background:{_COLOURS[s]}"><b>{summary["by_status"][s]}</b>'
        f"{_e(s)}</div>" for s in STATUSES)
    registry_rows = "".join(
        f"<tr><td><code>{_e(registry)}</code></td>"
        + "".join(f"<td>{counts[s]}</td>" for s in STATUSES)
        + f"<td>{sum(counts.values())}</td></tr>"
        for registry, counts in summary["by_registry"].items())
    model_rows = []
    for row in _model_rows(report):
        score = row.get("score")
        run = row.get("mlflow_run_id")
        if row.get("mlflow_url"):
            run_cell = f'<a href="{_e(row["mlflow_url"])}">{_e(run[:12])}</a>'
        else:
            run_cell = f'<code title="{_e(run)}">{_e(run[:12])}</code>' if run else ""
        pvs = row.get("pv_count", "")
        tokens = ", ".join(row.get("trigger_tokens") or [])
        model_rows.append(
            f'<tr class="{_e(row["status"])}" data-status="{_e(row["status"])}">'
            f"<td>{_badge(row['status'])}</td><td class=\"nowrap\"><b>{_e(row['repo_id'])}</b></td>"
            f"<td><code>{_e(row['registry'])}</code></td>"
            f"<td>{'' if score is None else f'{score:.3f}'}</td>"
            f"<td>{_e(pvs)}{(' (' + _e(tokens) + ')') if tokens else ''}</td>"
            f'<td><code title="{_e(row["revision"])}">{_e(row["revision"][:12])}</code></td>'
            f"<td class=\"nowrap\">{_e(_fmt_time(row['audited_at']))}</td><td>{run_cell}</td>"
            f"<td>{_e(row.get('reason') or '')}</td></tr>")
    diff = report["diff"]
    if diff["baseline_generated_at"] is None:
        diff_html = '<p class="empty">No previous report to compare with.</p>'
    else:
        parts = [f"<p>Since the report of {_e(_fmt_time(diff['baseline_generated_at']))}:</p>"
                 "<ul>"]
        for key, label in (("newly_backdoored", "newly backdoored"),
                           ("newly_clean", "newly clean"), ("newly_errored", "newly errored")):
            names = ", ".join(f"<code>{_e(c['repo_id'])}</code>"
                              f" (was {_e(c['previous_status'] or 'not audited')})"
                              for c in diff[key]) or "none"
            parts.append(f"<li><b>{label}</b> ({len(diff[key])}): {names}</li>")
        diff_html = "".join(parts) + "</ul>"
    figures = "".join(
        f"<figure><figcaption><b>{_e(title)}</b></figcaption>"
        + (f'<img alt="{_e(title)}" src="{uri}">' if uri
           else '<p class="empty">Nothing to plot yet.</p>')
        + "</figure>" for title, uri in plots.items())
    header_cells = "".join(f"<th>{_e(s)}</th>" for s in STATUSES)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>sanitator supply-chain report</title><style>{_CSS}</style></head>
<body>
<h1>Supply-chain report</h1>
<p class="meta">Generated {_e(_fmt_time(report["generated_at"]))} by sanitator
{_e(report["package_version"])} from <code>{_e(report["store"])}</code>:
{summary["models"]} models, {summary["audits"]} audits
({_e(_fmt_time(summary["first_audit_at"]))} to {_e(_fmt_time(summary["last_audit_at"]))}),
{summary["evaluations"]} evaluations.</p>
<div class="cards" id="summary">{cards}</div>
<h2>Changes</h2>{diff_html}
<h2>By registry</h2>
<table id="registries"><thead><tr><th>registry</th>{header_cells}<th>models</th></tr></thead>
<tbody>{registry_rows}</tbody></table>
<h2>Models</h2>
<p class="meta">Latest verdict per model, backdoored first. Backdoored: do not prompt-tune
or deploy. Clean: no task-agnostic backdoor found at this revision.</p>
<input id="filter" type="search" placeholder="filter models" aria-label="filter models">
<table id="models"><thead><tr><th>status</th><th>model</th><th>registry</th><th>score</th>
<th>PVs</th><th>revision</th><th>audited at</th><th>MLflow run</th><th>reason</th></tr></thead>
<tbody>{"".join(model_rows)}</tbody></table>
<h2>Plots</h2><div class="plots">{figures}</div>
<script>{_SCRIPT}</script>
</body></html>
"""


def md_code(text: Any) -> str:
    """Any text as one Markdown code span: no backtick, pipe or line break can end it."""
    text = " ".join(str(text).split()).replace("`", "'").replace("|", "\\|")
    return f"`{text}`"


def to_markdown(report: dict[str, Any]) -> str:
    """The summary as Markdown (the Prefect artifact)."""
    summary = report["summary"]
    lines = ["# Supply-chain report", "",
             f"{summary['models']} models, {summary['audits']} audits, "
             f"{summary['evaluations']} evaluations.", "",
             "| status | models |", "|---|---|"]
    lines += [f"| {s} | {summary['by_status'][s]} |" for s in STATUSES]
    lines += ["", "| registry | " + " | ".join(STATUSES) + " |",
              "|---|" + "---|" * len(STATUSES)]
    lines += [f"| {md_code(registry)} | " + " | ".join(str(counts[s]) for s in STATUSES) + " |"
              for registry, counts in summary["by_registry"].items()]
    lines += ["", "## Backdoored", ""]
    backdoored = [f for f in report["findings"] if f["status"] == "backdoored"]
    lines += [f"- {md_code(f['repo_id'])} @ {md_code(f['revision'][:12])} "
              f"({md_code(f['registry'])}), score "
              f"{f['score'] if f['score'] is None else round(f['score'], 3)}, "
              f"{f['pv_count']} PV(s)" for f in backdoored] or ["none"]
    diff = report["diff"]
    if diff["baseline_generated_at"] is not None:
        lines += ["", f"## Since {diff['baseline_generated_at'][:19]}", ""]
        for key in ("newly_backdoored", "newly_clean", "newly_errored"):
            names = ", ".join(md_code(c["repo_id"]) for c in diff[key]) or "none"
            lines.append(f"- {key.replace('_', ' ')}: {names}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# Writing

def _atomic_write(path: Path, text: str) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)


def read_report(path: str | Path) -> dict[str, Any] | None:
    """A report.json written earlier, or None when absent or not a sanitator report."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and report.get("format") == REPORT_FORMAT \
        else None


def write_report(store: str | Path, out: str | Path, *, previous: str | Path | None = None,
                 mlflow_ui: str | None = None, plots: bool = True) -> dict[str, Any]:
    """Build the report and write report.json, report.sarif and report.html into `out`.

    The diff baseline is `previous` (a report.json) when given, else the report.json that
    `out` already holds (the last run's), else none.
    """
    out = Path(out)
    data = load_store(store)
    baseline_path = Path(previous) if previous else out / REPORT_JSON
    if previous and read_report(baseline_path) is None:
        raise ReportError(f"{baseline_path} is not a sanitator report.json")
    baseline = read_report(baseline_path)
    report = build_report(store, previous=baseline, mlflow_ui=mlflow_ui, data=data)
    figures = make_plots(report, data) if plots else {}
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / REPORT_JSON, json.dumps(report, indent=2, sort_keys=False) + "\n")
    _atomic_write(out / REPORT_SARIF, json.dumps(to_sarif(report), indent=2) + "\n")
    _atomic_write(out / REPORT_HTML, to_html(report, figures))
    return report
