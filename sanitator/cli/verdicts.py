"""`sanitator verdicts`: the latest verdict per model in a store (table or JSON)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from sanitator.cli import exits
from sanitator.core.status import STATUSES

COLUMNS = ("registry", "repo_id", "revision", "status", "score", "pv_count", "audited_at",
           "reason")
JSON_COLUMNS = (*COLUMNS, "audit_id", "source", "architecture", "n_params", "config_hash",
                "seconds", "retryable", "mlflow_run_id", "package_version")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "verdicts", help="list the latest verdict per model in a store",
        description="The newest verdict row per (registry, repo id) of a store written by "
                    "`sanitator audit`. See docs/store.md for every column.")
    parser.add_argument("--store", required=True, metavar="DIR", help="the store folder")
    parser.add_argument("--status", action="append",
                        choices=list(STATUSES),
                        help="only these statuses (repeatable)")
    parser.add_argument("--all", action="store_true",
                        help="every audit row, not only the latest per model")
    parser.add_argument("--json", action="store_true", help="JSON list instead of a table")
    parser.add_argument("--fail-on-backdoor", action="store_true",
                        help=f"exit {exits.BACKDOORED} when a listed verdict is backdoored, "
                             f"else {exits.INCONCLUSIVE} when one is inconclusive")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sanitator.pipeline.store import StoreError, latest_verdicts, read_verdicts

    store = Path(args.store)
    if not store.is_dir():
        print(f"sanitator verdicts: {store} is not a folder", file=sys.stderr)
        return exits.USAGE
    try:
        frame = read_verdicts(store) if args.all else latest_verdicts(store)
    except StoreError as exc:
        print(f"sanitator verdicts: {exc}", file=sys.stderr)
        return exits.FAILED
    if args.status:
        frame = frame[frame["status"].isin(args.status)]
    records = [_jsonable(row) for row in frame.to_dict("records")]
    if args.json:
        print(json.dumps([{**{key: row.get(key) for key in JSON_COLUMNS},
                           "reference": reference_summary(row.get("evidence"))}
                          for row in records], indent=2, default=str))
    elif not records:
        print(f"no verdicts in {store}")
    else:
        print(format_table(records))
    if args.fail_on_backdoor:
        return exits.gate(row.get("status") for row in records)
    return exits.OK


def reference_summary(evidence: Any) -> dict[str, Any] | None:
    """What the audit diffed the model against (`evidence.reference`): the source, id,
    revision and distance the scan recorded, and the pipeline's resolution log."""
    try:
        reference = json.loads(evidence).get("reference") if evidence else None
    except (ValueError, AttributeError):
        return None
    if not isinstance(reference, dict):
        return None
    out = {key: reference[key] for key in ("source", "id", "revision", "note", "tried",
                                            "resolution") if key in reference}
    distance = reference.get("distance", reference.get("relative_change"))
    if distance is not None:
        out["distance"] = distance
    return out


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in row.items():
        if hasattr(value, "isoformat"):
            value = value.isoformat()
        elif isinstance(value, float) and math.isnan(value):
            value = None
        elif hasattr(value, "item"):  # numpy scalars
            value = value.item()
        out[key] = value
    return out


def format_table(records: list[dict[str, Any]]) -> str:
    def cell(key: str, value: Any) -> str:
        if value is None:
            return "-"
        if key == "revision":
            return str(value)[:12]
        if key == "score":
            return f"{value:.3f}"
        if key == "audited_at":
            return str(value)[:19].replace("T", " ")
        if key == "reason":
            return str(value)[:60]
        return str(value)

    rows = [[cell(key, record.get(key)) for key in COLUMNS] for record in records]
    widths = [max(len(key), *(len(row[i]) for row in rows)) for i, key in enumerate(COLUMNS)]
    lines = ["  ".join(key.ljust(width) for key, width in zip(COLUMNS, widths, strict=True))]
    lines += ["  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True))
              for row in rows]
    return "\n".join(line.rstrip() for line in lines)
