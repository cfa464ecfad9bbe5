"""`sanitator report`: the supply-chain report (HTML, JSON, SARIF) of a store (docs/report.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sanitator.cli import exits


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "report", help="write the supply-chain report (HTML, JSON, SARIF) from a store",
        description="Read every verdict, PV and evaluation of a store written by `sanitator "
                    "audit --out` and write report.html (self-contained), report.json "
                    "(schema in docs/report.md) and report.sarif (SARIF 2.1.0, one result per "
                    "backdoored or inconclusive model) into --out. The report.json already "
                    "in --out (or --previous) is the baseline of the diff: newly backdoored, "
                    "newly inconclusive, newly clean, newly errored.")
    parser.add_argument("--store", required=True, metavar="DIR", help="the store folder")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the report")
    parser.add_argument("--previous", metavar="FILE",
                        help="an earlier report.json to diff against (default: --out's)")
    parser.add_argument("--mlflow-ui", metavar="URL",
                        help="MLflow UI serving the store's runs, for links "
                             "(e.g. http://mlflow.internal:5000)")
    parser.add_argument("--no-plots", action="store_true", help="skip the matplotlib plots")
    parser.add_argument("--fail-on-backdoor", action="store_true",
                        help=f"exit {exits.BACKDOORED} when any model's latest verdict is "
                             f"backdoored, else {exits.INCONCLUSIVE} when one is inconclusive")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sanitator.report import REPORT_HTML, ReportError, write_report

    try:
        report = write_report(args.store, args.out, previous=args.previous,
                              mlflow_ui=args.mlflow_ui, plots=not args.no_plots)
    except ReportError as exc:
        print(f"sanitator report: {exc}", file=sys.stderr)
        return exits.FAILED
    counts = report["summary"]["by_status"]
    diff = report["diff"]
    print(f"{report['summary']['models']} models: "
          + ", ".join(f"{n} {status}" for status, n in counts.items() if n))
    if diff["baseline_generated_at"] is not None:
        print("since the previous report: "
              + ", ".join(f"{len(diff[key])} {key.replace('_', ' ')}"
                          for key in ("newly_backdoored", "newly_inconclusive", "newly_clean",
                                      "newly_errored")))
    print(f"wrote {Path(args.out) / REPORT_HTML} (+ report.json, report.sarif)")
    if args.fail_on_backdoor:
        return exits.gate(status for status, n in counts.items() if n)
    return exits.OK
