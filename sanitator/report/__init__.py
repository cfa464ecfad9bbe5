"""The organisation-wide supply-chain report: which audited models are safe to prompt-tune.

Pure library (no Prefect): `model` reads a store and builds one report dict with a stable
schema (`schema`, docs/report.md); `sarif`, `html` and `markdown` render it; `write` puts
report.json, report.sarif and report.html into one folder, diffed against the last one.

    from sanitator.report import write_report
    report = write_report("/srv/sanitator/store", "/srv/sanitator/report")
"""

from sanitator.report.html import make_plots, to_html
from sanitator.report.markdown import md_code, to_markdown
from sanitator.report.model import (
    REPORT_FORMAT,
    REPORT_HTML,
    REPORT_JSON,
    REPORT_SARIF,
    REPORT_VERSION,
    STATUSES,
    ReportError,
    build_report,
    diff_reports,
    load_store,
)
from sanitator.report.sarif import to_sarif
from sanitator.report.schema import REPORT_SCHEMA
from sanitator.report.write import read_report, write_report

__all__ = [
    "REPORT_FORMAT", "REPORT_HTML", "REPORT_JSON", "REPORT_SARIF", "REPORT_SCHEMA",
    "REPORT_VERSION", "STATUSES", "ReportError", "build_report", "diff_reports", "load_store",
    "make_plots", "md_code", "read_report", "to_html", "to_markdown", "to_sarif",
    "write_report",
]
