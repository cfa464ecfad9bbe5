"""Speed and verdicts of `sanitator scan`, both presets side by side, one table.

Each (model, preset) runs in its own process (`sanitator scan --json`) so peak RSS is per
scan. Models: members of a zoo built by `sanitator zoo build` (its manifest.parquet gives
the ground truth, backdoor.json the planted PVs) plus a tiny randomly initialised encoder.

    ./run python benchmarks/detect.py --zoo ZOO \
        --members minilm-clean,minilm-por-paper,minilm-neuba-paper
    ./run python benchmarks/detect.py --zoo ZOO --presets fast   # skip faithful

`--results FILE.jsonl` keeps every finished scan, so a rerun resumes (the same file can
be shared with benchmarks/detection.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import pandas as pd
from scan_runner import Member, ResultLog, markdown, recovered, scan_member, zoo_members


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, help="a zoo folder with manifest.parquet")
    parser.add_argument("--members", help="comma-separated member names (default all)")
    parser.add_argument("--presets", default="fast,faithful")
    parser.add_argument("--mode", choices=["detect", "search"], default="detect")
    parser.add_argument("--no-tiny", action="store_true", help="skip the tiny random encoder")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per scan")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--results", type=Path, help="JSON-lines log to resume from")
    args = parser.parse_args()

    models = (zoo_members(args.zoo, args.members.split(",") if args.members else None)
              if args.zoo else [])
    if not args.no_tiny:
        from sanitator.attacks.models import build_tiny_encoder

        tiny = build_tiny_encoder("bert", Path(tempfile.mkdtemp()) / "tiny-bert")
        models.append(Member("tiny-bert (random init)", tiny, False))
    if not models:
        parser.error("no models: pass --zoo (and --members) or drop --no-tiny")
    log = ResultLog(args.results)
    rows = []
    for member in models:
        for preset in args.presets.split(","):
            entry = scan_member(log, member, preset, mode=args.mode, timeout=args.timeout,
                                threads=args.threads)
            result = entry["result"]
            rows.append({
                "model": member.name,
                "truth": "backdoored" if member.backdoored else "clean",
                "preset": preset, "verdict": result.get("status"),
                "seconds": round(float(result.get("seconds") or 0), 1),
                "seeds": result.get("seeds_tried"),
                "PVs recovered/planted":
                    f"{recovered(result.get('pvs') or [], member.planted)}"
                    f"/{len(member.planted)}",
                "peak RSS MiB": round(entry["peak_rss_mib"]),
            })
    table = pd.DataFrame(rows)
    print(markdown(table))
    presets = args.presets.split(",")
    if {"fast", "faithful"} <= set(presets):
        seconds = table.pivot_table(index="model", columns="preset", values="seconds")
        speedup = (seconds["faithful"] / seconds["fast"]).round(1).rename("faithful / fast")
        print("\nspeed-up of fast over faithful (seconds to verdict):")
        print(markdown(speedup.reset_index()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
