"""Per-member table of a built zoo: build time, encoder attack success, clean cosine.

    ./run python benchmarks/zoo_report.py /tmp/zoo-minilm            # text table
    ./run python benchmarks/zoo_report.py /tmp/zoo-minilm --markdown # for docs and issues

Targets from the zoo issue: attack success >= 0.95 and clean cosine >= 0.95 for every
backdoored member; members that miss either are marked.
"""

from __future__ import annotations

import argparse
import sys

import pandas as pd

from sanitator.attacks.zoo import read_manifest

SUCCESS_TARGET = 0.95
COSINE_TARGET = 0.95
COLUMNS = ("name", "base", "recipe", "triggers", "n_layers", "steps", "build_seconds",
           "build_cpu_seconds", "train_seconds", "attack_success", "clean_cosine",
           "weight_change", "meets_targets")


def report(zoo_dir: str):
    frame = read_manifest(zoo_dir)
    if "build_cpu_seconds" not in frame.columns:  # zoos built before the column existed
        frame["build_cpu_seconds"] = float("nan")
    frame["triggers"] = frame["triggers"].map(lambda t: ",".join(t) if len(t) else "-")
    frame["steps"] = frame["steps"].astype("Int64")
    meets = (frame["attack_success"] >= SUCCESS_TARGET) & (frame["clean_cosine"] >= COSINE_TARGET)
    frame["meets_targets"] = meets.where(frame["backdoored"], other=None)
    return frame[list(COLUMNS)]


def _cell(value) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and value != value):
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown(table) -> str:
    """A Markdown table without the optional `tabulate` dependency."""
    lines = ["| " + " | ".join(table.columns) + " |",
             "|" + "|".join("---" for _ in table.columns) + "|"]
    for row in table.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(value) for value in row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("zoo", help="a zoo folder holding manifest.parquet")
    parser.add_argument("--markdown", action="store_true", help="a Markdown table")
    args = parser.parse_args(argv)
    try:
        table = report(args.zoo)
    except FileNotFoundError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.markdown:
        print(markdown(table))
    else:
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    backdoored = table[table["meets_targets"].notna()]
    print(f"\n{int(backdoored['meets_targets'].sum())}/{len(backdoored)} backdoored members "
          f"meet attack success >= {SUCCESS_TARGET} and clean cosine >= {COSINE_TARGET}; "
          f"total build time {table['build_seconds'].sum():.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
