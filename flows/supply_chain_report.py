"""The supply-chain report as a Prefect flow: write report.html / report.json / report.sarif
from the store and publish the summary (and the diff against the last report) as a
Markdown artifact. The work is `sanitator.report.write_report`; docs/report.md.

    from flows.supply_chain_report import supply_chain_report
    report = supply_chain_report("/srv/sanitator/store", "/srv/sanitator/report")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from sanitator.report import to_markdown, write_report


@flow(name="supply-chain-report")
def supply_chain_report_flow(store: str = "sanitator-store", out: str | None = None,
                             mlflow_ui: str | None = None, plots: bool = True
                             ) -> dict[str, Any]:
    """Report every model's latest verdict in `store` into `out` (default STORE/report);
    the report.json already there is the diff's baseline. Returns the report's summary
    and diff."""
    logger = get_run_logger()
    out = out or str(Path(store) / "report")
    report = write_report(store, out, mlflow_ui=mlflow_ui, plots=plots)
    logger.info("report of %d models written to %s", report["summary"]["models"], out)
    create_markdown_artifact(to_markdown(report), key="supply-chain-report",
                             description="latest verdict counts, backdoored models, changes")
    return {"out": str(Path(out).resolve()), "summary": report["summary"],
            "diff": report["diff"]}


def supply_chain_report(store: str | Path = "sanitator-store", out: str | Path | None = None,
                        **options: Any) -> dict[str, Any]:
    """Run the report flow from Python."""
    return supply_chain_report_flow(store=str(store), out=None if out is None else str(out),
                                    **options)
