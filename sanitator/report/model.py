"""The supply-chain report's model: read a store's `verdicts/`, `pvs/` and `evaluations/`
datasets (every date) and build one report dict (schema: `report.schema`, docs/report.md);
diff two reports. Rendering lives in `sarif`, `html` and `markdown`."""

from __future__ import annotations

import contextlib
import datetime as dt
import math
from collections import Counter
from pathlib import Path
from typing import Any

from sanitator import __version__
from sanitator.core import status as core_status
from sanitator.core.status import SCANNED_STATUSES, Status
from sanitator.pipeline.store import MODEL_KEY, VERDICTS, StoreError, read_pvs, read_verdicts

REPORT_FORMAT = "sanitator.supply-chain-report"
REPORT_VERSION = 1
# The report's order puts what needs attention first: backdoored, then inconclusive (not
# shown clean), then the rest (the table, the lists, the schema's enums).
_FIRST = (Status.BACKDOORED.value, Status.INCONCLUSIVE.value)
STATUSES: tuple[str, ...] = (*_FIRST, *(s for s in core_status.STATUSES if s not in _FIRST))
# a scanned model is a finding (score, PVs, evidence), decided or inconclusive
FINDING_STATUSES: tuple[str, ...] = tuple(s for s in STATUSES if s in SCANNED_STATUSES)
SKIPPED_STATUSES: tuple[str, ...] = core_status.SKIPPED_STATUSES
STATUS_ORDER = {status: index for index, status in enumerate(STATUSES)}
REPORT_JSON, REPORT_SARIF, REPORT_HTML = "report.json", "report.sarif", "report.html"


class ReportError(ValueError):
    """A store the report cannot be built from (no verdicts dataset, unreadable files)."""


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
        elif status == Status.ERROR:
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
    backdoored / inconclusive / clean / errored when its latest status is that now and was
    something else (or the model was absent) in the previous report. No previous report:
    empty lists."""
    diff: dict[str, Any] = {"baseline_generated_at": None, "newly_backdoored": [],
                            "newly_inconclusive": [], "newly_clean": [], "newly_errored": []}
    if not previous:
        return diff
    diff["baseline_generated_at"] = previous.get("generated_at")
    before = model_statuses(previous)
    targets = {"backdoored": "newly_backdoored", "inconclusive": "newly_inconclusive",
               "clean": "newly_clean", "error": "newly_errored"}
    for key, row in sorted(model_statuses(current).items()):
        old = before.get(key)
        old_status = old["status"] if old else None
        if row["status"] in targets and row["status"] != old_status:
            diff[targets[row["status"]]].append({
                "registry": row["registry"], "repo_id": row["repo_id"],
                "revision": row["revision"], "status": row["status"],
                "previous_status": old_status})
    return diff
