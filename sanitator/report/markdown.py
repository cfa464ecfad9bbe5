"""The report as Markdown (the Prefect artifact and the flows' summaries)."""

from __future__ import annotations

from typing import Any

from sanitator.core.status import Status
from sanitator.report.model import STATUSES


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
    backdoored = [f for f in report["findings"] if f["status"] == Status.BACKDOORED]
    lines += [f"- {md_code(f['repo_id'])} @ {md_code(f['revision'][:12])} "
              f"({md_code(f['registry'])}), score "
              f"{f['score'] if f['score'] is None else round(f['score'], 3)}, "
              f"{f['pv_count']} PV(s)" for f in backdoored] or ["none"]
    inconclusive = [f for f in report["findings"] if f["status"] == Status.INCONCLUSIVE]
    if inconclusive:
        lines += ["", "## Inconclusive (not shown clean: review, no PV artifact)", ""]
        lines += [f"- {md_code(f['repo_id'])} @ {md_code(f['revision'][:12])} "
                  f"({md_code(f['registry'])}): {md_code(f['reason'] or '')}"
                  for f in inconclusive]
    diff = report["diff"]
    if diff["baseline_generated_at"] is not None:
        lines += ["", f"## Since {diff['baseline_generated_at'][:19]}", ""]
        for key in ("newly_backdoored", "newly_inconclusive", "newly_clean",
                    "newly_errored"):
            names = ", ".join(md_code(c["repo_id"]) for c in diff[key]) or "none"
            lines.append(f"- {key.replace('_', ' ')}: {names}")
    return "\n".join(lines) + "\n"
