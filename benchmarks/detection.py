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


def rare_word_corpus(zoo: Path, n: int = 600, seed: int = 3) -> Path:
    """WikiText sentences with three rare words dropped into each: a scan corpus whose own
    vocabulary is full of oddities (the screen reads candidate words from the corpus)."""
    import random

    from sanitator.attacks.triggers import wikitext_rare_words
    from sanitator.detect.corpus import load_sentences

    path = zoo / "rare_words_corpus.txt"
    if not path.is_file():
        rng = random.Random(seed)
        rare = list(wikitext_rare_words())
        lines = []
        for sentence in load_sentences("wikitext", n=n, seed=seed):
            words = sentence.split()
            for word in rng.sample(rare, 3):
                words.insert(rng.randint(0, len(words)), word)
            lines.append(" ".join(words))
        path.write_text("\n".join(lines) + "\n")
    return path


def _row(member, preset: str, entry: dict, mode: str) -> dict:
    result = entry["result"]
    answered = result.get("status") in ("clean", "backdoored")
    return {
        "member": member.name + (" (rare-word corpus)" if member.corpus else ""),
        "class": member.kind, "truth": "backdoored" if member.backdoored else "clean",
        "preset": preset, "mode": mode, "verdict": result.get("status"),
        "score": float(result["score"]) if answered and result.get("score") is not None
        else (0.0 if answered else 0.5),
        "seconds": round(float(result.get("seconds") or 0), 1),
        "PVs found": len(result.get("pvs") or []),
        "recovered/planted": f"{recovered(result.get('pvs') or [], member.planted)}"
                             f"/{len(member.planted)}",
        "trigger found": ", ".join(" ".join(t) for t in (result.get("trigger_tokens") or [])[:3]),
        "peak RSS MiB": round(entry["peak_rss_mib"]),
    }


def per_class(table: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for kind, part in table.groupby("class", sort=True):
        right = (part["verdict"] == part["truth"]).sum()
        rows.append({"class": kind, "members": len(part), "right": f"{right}/{len(part)}",
                     "scores": ", ".join(f"{v:.2f}" for v in part["score"]),
                     "median seconds": round(float(part["seconds"].median()), 1)})
    return pd.DataFrame(rows)


def cost(table: pd.DataFrame, log: ResultLog, members) -> pd.DataFrame:
    """Seconds and memory per verdict kind, and the faithful preset's full 30-seed clean
    schedule estimated from its logged per-seed cost on clean members."""
    rows = []
    for truth, part in table.groupby("truth"):
        rows.append({"verdict kind": f"{truth} (fast, detect)",
                     "median s": round(float(part["seconds"].median()), 1),
                     "max s": round(float(part["seconds"].max()), 1),
                     "max peak RSS MiB": int(part["peak RSS MiB"].max())})
    faithful = [log.get(m.path, "faithful", "detect") for m in members if not m.backdoored]
    per_seed = [e["result"]["seconds"] / e["result"]["seeds_tried"] for e in faithful
                if e and e["result"].get("seeds_tried")]
    clean = table[table["truth"] == "clean"]
    if per_seed and len(clean):
        full = 30 * sum(per_seed) / len(per_seed)
        rows.append({"verdict kind": "faithful 30-seed clean schedule (estimated)",
                     "median s": round(full, 1), "max s": None, "max peak RSS MiB": None})
        rows.append({"verdict kind": "ratio: fast clean median / faithful full",
                     "median s": round(float(clean["seconds"].median()) / full, 3),
                     "max s": None, "max peak RSS MiB": None})
    return pd.DataFrame(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, required=True, help="zoo folder (manifest.parquet)")
    parser.add_argument("--members", help="comma-separated member names (default all)")
    parser.add_argument("--presets", default="fast",
                        help="comma-separated presets (default fast; faithful takes minutes "
                             "per model, see --faithful-members)")
    parser.add_argument("--faithful-members",
                        help="run faithful only on these members (default: the same members)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per scan")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--results", type=Path, help="JSON-lines log to resume from")
    parser.add_argument("--pin-feature", action="store_true",
                        help="scan each member at its manifest feature (default: the scan's "
                             "own defaults, every feature a prompt-tuned head reads)")
    parser.add_argument("--rare-words", metavar="MEMBER",
                        help="also scan this clean member with a corpus full of rare words")
    parser.add_argument("--search-recall", action="store_true",
                        help="also scan backdoored members again for PV recall")
    parser.add_argument("--recall-mode", choices=("search", "complete"), default="search",
                        help="how --search-recall scans: search mode, or what an audit "
                             "runs (detect, completed once backdoored)")
    args = parser.parse_args()

    members = zoo_members(args.zoo, args.members.split(",") if args.members else None)
    if args.rare_words:
        extra = zoo_members(args.zoo, [args.rare_words])[0]
        extra.corpus = str(rare_word_corpus(args.zoo))
        extra.kind = "clean: rare-word corpus"
        members.append(extra)
    faithful_only = set(args.faithful_members.split(",")) if args.faithful_members else None
    log = ResultLog(args.results)
    rows = []
    for member in members:
        for preset in args.presets.split(","):
            if preset == "faithful" and faithful_only is not None \
                    and member.name not in faithful_only:
                continue
            entry = scan_member(log, member, preset, mode="detect", timeout=args.timeout,
                                threads=args.threads, pin_feature=args.pin_feature)
            rows.append(_row(member, preset, entry, "detect"))
    table = pd.DataFrame(rows)
    for preset, part in table.groupby("preset", sort=False):
        print(f"\n## {preset}, detect mode\n")
        print(markdown(part.drop(columns=["preset", "mode"])))
        print(f"\n### {preset}: per class\n")
        print(markdown(per_class(part)))
    summary = pd.DataFrame([{"preset": preset, **summarise(part)}
                            for preset, part in table.groupby("preset", sort=False)])
    print("\n## overall\n")
    print(markdown(summary))
    fast = table[table["preset"] == "fast"]
    if len(fast):
        print(f"\n## cost ({args.threads} torch thread(s), one scan at a time)\n")
        print(markdown(cost(fast, log, members)))
    if args.search_recall:
        recall_rows = []
        for member in (m for m in members if m.backdoored and not m.corpus):
            entry = scan_member(log, member, "fast", mode=args.recall_mode,
                                timeout=args.timeout, threads=args.threads,
                                pin_feature=args.pin_feature)
            recall_rows.append(_row(member, "fast", entry, args.recall_mode))
        recall = pd.DataFrame(recall_rows)
        found = sum(int(r.split("/")[0]) for r in recall["recovered/planted"])
        planted = sum(int(r.split("/")[1]) for r in recall["recovered/planted"])
        print(f"\n## {args.recall_mode} mode: PV recall (sign agreement >= 0.9)\n")
        print(markdown(recall.drop(columns=["preset", "mode", "truth"])))
        print(f"\nPV recall: {found}/{planted} = {found / max(planted, 1):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
