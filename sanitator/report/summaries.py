"""The flows' run summaries as Prefect artifacts: Markdown and table rows for one audit run
(`flows/audit_zoo.py`) and one evaluation run (`flows/evaluate_asr.py`). Pure text: the
flows publish what these return."""

from __future__ import annotations

from typing import Any

from sanitator.report.markdown import md_code


def audit_summary_markdown(summary: dict[str, Any]) -> str:
    """Repo ids and reasons come from the audited repos: each is one code span."""
    lines = ["# Audit summary", "", "| status | models |", "|---|---|"]
    lines += [f"| {status} | {n} |" for status, n in summary["counts"].items()]
    lines += ["", f"Already audited (unchanged): {summary['already_audited']}", "",
              "## Backdoored", ""]
    lines += [f"- {md_code(b['repo_id'])} @ {md_code(b['revision'][:12])} "
              f"({md_code(b['registry'])}), score "
              f"{b['score'] if b['score'] is not None else 'n/a'}, {b['pv_count']} PV(s)"
              for b in summary["backdoored"]] or ["none"]
    if summary.get("inconclusive"):
        lines += ["", "## Inconclusive (not shown clean: review, no PV artifact)", ""]
        lines += [f"- {md_code(i['repo_id'])} @ {md_code(i['revision'][:12])} "
                  f"({md_code(i['registry'])}): {md_code(i['reason'] or '')}"
                  for i in summary["inconclusive"]]
    if summary["errors"]:
        lines += ["", "## Errors", ""]
        lines += [f"- {md_code(e['repo_id'])} ({md_code(e['registry'])}): {md_code(e['reason'])}"
                  for e in summary["errors"]]
        if summary.get("more_errors"):
            lines.append(f"- and {summary['more_errors']} more (every row is in the store: "
                         "`sanitator verdicts`)")
    if summary["registry_errors"]:
        lines += ["", "## Registries that could not be listed", ""]
        lines += [f"- {md_code(spec)}: {md_code(reason)}"
                  for spec, reason in summary["registry_errors"].items()]
    if summary.get("registry_busy"):
        lines += ["", "## Registries left to another audit of this store", ""]
        lines += [f"- {md_code(spec)}: {md_code(reason)}"
                  for spec, reason in summary["registry_busy"].items()]
    return "\n".join(lines)


def audit_verdicts_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The verdict rows of one run, cut to the columns the table artifact shows."""
    return [{"registry": r["registry"], "repo_id": r["repo_id"], "revision": r["revision"],
             "status": r["status"], "score": r["score"], "pv_count": r["pv_count"],
             "reason": r["reason"]} for r in rows]


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def per_trigger_text(result: dict[str, Any]) -> str:
    """`cf 100.0%/0.0%, mn ...`: ASR without/with the monitor per trigger."""
    if result.get("converged") is False:
        return "not converged"
    return ", ".join(f"{item['trigger']} {_pct(item['asr'])}/{_pct(item['defended_asr'])}"
                     for item in result.get("per_trigger") or [])


def evaluation_summary_markdown(summary: dict[str, Any]) -> str:
    pct = _pct
    lines = ["# Downstream evaluation", "",
             "| encoder | task | attack | clean acc | ASR | defended ASR | defended clean acc "
             "| monitor FPR |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| `{r['encoder']}` | {r['task']} | {r['attack']} | {pct(r['clean_accuracy'])} "
              f"| {pct(r['asr'])} | {pct(r['defended_asr'])} | "
              f"{pct(r['defended_clean_accuracy'])} | {pct(r['monitor_fpr'])} |"
              for r in summary["results"]] or ["| none | | | | | | | |"]
    unconverged = [r for r in summary["results"] if r.get("converged") is False]
    if unconverged:
        lines += ["", "## Not converged (no ASR reported)", ""]
        lines += [f"- `{r['encoder']}` {r['task']}: {r['reason']}" for r in unconverged]
    per_trigger = [(r, item) for r in summary["results"] if r.get("converged") is not False
                   for item in r.get("per_trigger") or []]
    if per_trigger:
        lines += ["", "## Per trigger", "", "| encoder | task | trigger | ASR | defended ASR |",
                  "|---|---|---|---|---|"]
        lines += [f"| `{r['encoder']}` | {r['task']} | `{item['trigger']}` | {pct(item['asr'])} "
                  f"| {pct(item['defended_asr'])} |" for r, item in per_trigger]
    lines += ["", f"Already evaluated with these settings: {summary['already_evaluated']}"]
    for title, key, field in (("Errors", "errors", "reason"),
                              ("Not evaluated", "unavailable", "reason")):
        if summary[key]:
            lines += ["", f"## {title}", ""]
            lines += [f"- `{item['encoder']}` {item.get('task', '')}: {item[field]}"
                      for item in summary[key]]
    return "\n".join(lines)


def evaluations_table(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The results of one run with their per-trigger rates as one text column."""
    return [{**{k: v for k, v in r.items() if k != "per_trigger"},
             "per_trigger": per_trigger_text(r)} for r in summary["results"]]
