"""Writing a report folder: report.json, report.sarif and report.html, diffed against the
report the folder held before."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sanitator.report.html import make_plots, to_html
from sanitator.report.model import (
    REPORT_FORMAT,
    REPORT_HTML,
    REPORT_JSON,
    REPORT_SARIF,
    ReportError,
    build_report,
    load_store,
)
from sanitator.report.sarif import to_sarif


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
