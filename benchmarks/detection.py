"""How right the verdicts are on a labelled zoo: per member and overall, per preset.

Scores every member of a zoo (its manifest.parquet is the ground truth) with
`sanitator scan --json`, one child process per scan, and prints per member the score,
verdict, seconds and PVs found vs planted, then per preset: accuracy, false positives,
false negatives, ROC-AUC and cross-entropy (TrojAI's metric: mean binary cross-entropy of
the score against the label, scores clipped to [1e-4, 1 - 1e-4]).

    ./run sanitator zoo build benchmarks/zoos/detection.yaml ZOO
    ./run python benchmarks/detection.py --zoo ZOO --results ZOO/detection.jsonl
    # faithful (the paper's schedule and rule) on a subset, it takes minutes per model:
    ./run python benchmarks/detection.py --zoo ZOO --results ZOO/detection.jsonl \
        --faithful-members minilm-clean,minilm-por-paper

A scan that times out or crashes counts as a wrong verdict with score 0.5.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import pandas as pd
from scan_runner import ResultLog, markdown, recovered, scan_member, zoo_members

CLIP = 1e-4


def roc_auc(labels: list[bool], scores: list[float]) -> float:
    """Probability that a backdoored member outscores a clean one (ties count half)."""
    positives = [s for s, y in zip(scores, labels, strict=True) if y]
    negatives = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not positives or not negatives:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def cross_entropy(labels: list[bool], scores: list[float]) -> float:
    total = 0.0
    for label, score in zip(labels, scores, strict=True):
        p = min(max(score, CLIP), 1 - CLIP)
        total -= math.log(p) if label else math.log(1 - p)
    return total / len(labels)


def summarise(rows: pd.DataFrame) -> dict:
    labels = [truth == "backdoored" for truth in rows["truth"]]
    scores = [float(s) for s in rows["score"]]
    called = [verdict == "backdoored" for verdict in rows["verdict"]]
    answered = [v in ("clean", "backdoored") for v in rows["verdict"]]
    fp = sum(c and not y for c, y, a in zip(called, labels, answered, strict=True) if a)
    fn = sum(not c and y for c, y, a in zip(called, labels, answered, strict=True) if a)
    wrong = fp + fn + sum(not a for a in answered)
    return {"members": len(rows), "backdoored": sum(labels),
            "accuracy": round(1 - wrong / len(rows), 3),
            "false positives": f"{fp}/{len(labels) - sum(labels)}",
            "false negatives": f"{fn}/{sum(labels)}",
            "no verdict": sum(not a for a in answered),
            "ROC-AUC": round(roc_auc(labels, scores), 3),
            "cross-entropy": round(cross_entropy(labels, scores), 3),
            "median seconds": round(float(rows["seconds"].median()), 1),
            "max seconds": round(float(rows["seconds"].max()), 1),
            "max peak RSS MiB": int(rows["peak RSS MiB"].max())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, required=True, help="zoo folder (manifest.parquet)")
    parser.add_argument("--members", help="comma-separated member names (default all)")
    parser.add_argument("--presets", default="fast,faithful")
    parser.add_argument("--faithful-members",
                        help="run faithful only on these members (default: the same members)")
    parser.add_argument("--mode", choices=["detect", "search"], default="detect")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per scan")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--results", type=Path, help="JSON-lines log to resume from")
    args = parser.parse_args()

    members = zoo_members(args.zoo, args.members.split(",") if args.members else None)
    faithful_only = set(args.faithful_members.split(",")) if args.faithful_members else None
    log = ResultLog(args.results)
    rows = []
    for member in members:
        for preset in args.presets.split(","):
            if preset == "faithful" and faithful_only is not None \
                    and member.name not in faithful_only:
                continue
            entry = scan_member(log, member, preset, mode=args.mode, timeout=args.timeout,
                                threads=args.threads)
            result = entry["result"]
            answered = result.get("status") in ("clean", "backdoored")
            rows.append({
                "member": member.name,
                "truth": "backdoored" if member.backdoored else "clean",
                "preset": preset, "verdict": result.get("status"),
                "score": float(result["score"]) if answered and result.get("score")
                is not None else (0.0 if answered else 0.5),
                "seconds": round(float(result.get("seconds") or 0), 1),
                "seeds": result.get("seeds_tried"),
                "PVs found": len(result.get("pvs") or []),
                "recovered/planted": f"{recovered(result.get('pvs') or [], member.planted)}"
                                     f"/{len(member.planted)}",
                "trigger found": ", ".join(" ".join(t) for t in
                                            (result.get("trigger_tokens") or [])[:2]),
                "peak RSS MiB": round(entry["peak_rss_mib"]),
            })
    table = pd.DataFrame(rows)
    for preset, part in table.groupby("preset", sort=False):
        print(f"\n## {preset}\n")
        print(markdown(part.drop(columns="preset")))
    summary = pd.DataFrame([{"preset": preset, **summarise(part)}
                            for preset, part in table.groupby("preset", sort=False)])
    print("\n## overall\n")
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
