"""The report as one self-contained HTML page: matplotlib plots embedded as PNG data URIs,
no network, a strict CSP."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from sanitator.report.model import FINDING_STATUSES, STATUS_ORDER, STATUSES

MAX_BAR_MODELS = 40  # the audit-time plot shows the slowest models only


# ---------------------------------------------------------------------------------------
# Plots (matplotlib, embedded as PNG data URIs)

_COLOURS = {"backdoored": "#c62828", "inconclusive": "#8e24aa", "clean": "#2e7d32",
            "error": "#ef6c00", "unsupported": "#6d6d6d", "skipped": "#9e9e9e"}


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
tr.backdoored{background:#fdecea}tr.inconclusive{background:#f6e8f8}
tr.error{background:#fff4e5}
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
                           ("newly_inconclusive", "newly inconclusive"),
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
or deploy. Inconclusive: the scan could not judge every candidate and is not shown clean;
treat it as unsafe until reviewed (it has no PV artifact). Clean: no task-agnostic backdoor
found at this revision.</p>
<input id="filter" type="search" placeholder="filter models" aria-label="filter models">
<table id="models"><thead><tr><th>status</th><th>model</th><th>registry</th><th>score</th>
<th>PVs</th><th>revision</th><th>audited at</th><th>MLflow run</th><th>reason</th></tr></thead>
<tbody>{"".join(model_rows)}</tbody></table>
<h2>Plots</h2><div class="plots">{figures}</div>
<script>{_SCRIPT}</script>
</body></html>
"""
