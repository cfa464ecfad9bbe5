"""The null benchmark: how often the default scan calls a clean encoder backdoored.

The calibrated rule claims a false-alarm rate of at most `alpha` (0.01) per scan, by
derivation (docs/method.md). This measures it: many default scans of clean encoders (the
members of a zoo built from benchmarks/zoos/null.yaml: 1- and 2-layer truncations of
MiniLM-L6, continued pretraining and classifier fine-tunes of them), each encoder scanned
with several scan seeds on several corpora, then the observed false-alarm rate with its
exact 95 % (Clopper-Pearson) interval, the scores, and the paired t of every fresh
confirmation the scans made, beside the t a candidate needs to be accepted.

With no false alarm, the one-sided 95 % upper bound is 1 - 0.05^(1/n): at most 0.01 needs
n >= 299 scans. Scans run in-process in `--jobs` worker processes at one torch thread
each; every finished scan is appended to `--results` (JSON lines), so an interrupted run
resumes where it stopped.

    ./run sanitator zoo build benchmarks/zoos/null.yaml NULLZOO --no-eval
    OMP_NUM_THREADS=1 ./run python benchmarks/null.py --zoo NULLZOO \\
        --results NULLZOO/null.jsonl --seeds 10 --jobs 2 --plot docs/img/null.png

Caveat: scans of one encoder with other seeds and corpora are not independent trials of
"a clean encoder"; the interval counts scans, and the table per member shows how the
scans spread over encoders.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: one thread per worker

import argparse
import json
import multiprocessing
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

CORPORA = ("wikitext", "sst2", "ag_news")


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float, float]:
    """(two-sided lower, two-sided upper, one-sided upper) exact binomial bounds."""
    from scipy.special import betaincinv  # the beta distribution's quantile

    if n <= 0:
        return 0.0, 1.0, 1.0
    tail = 1 - level
    lower = 0.0 if k == 0 else float(betaincinv(k, n - k + 1, tail / 2))
    upper = 1.0 if k == n else float(betaincinv(k + 1, n - k, 1 - tail / 2))
    one_sided = 1.0 if k == n else float(betaincinv(k + 1, n - k, level))
    return lower, upper, one_sided


def plan(members: list[dict], corpora: list[str], seeds: int) -> list[dict]:
    """One task per (member, corpus, scan seed), seed by seed: a run stopped early has
    scanned every member about as often."""
    return [{**member, "corpus": corpus, "seed": seed,
             "key": f"{member['name']}|{corpus}|{seed}"}
            for seed in range(1, seeds + 1) for corpus in corpora for member in members]


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def scan_task(task: dict) -> dict:
    """One default scan; what the benchmark keeps of it."""
    from sanitator.detect.config import ScanConfig
    from sanitator.detect.scan import scan_model

    seed = task["seed"]
    config = ScanConfig.from_preset(
        "fast", seed=seed, corpus=None if task["corpus"] == "wikitext" else task["corpus"],
        corpus_seed=41 + seed)
    verdict = scan_model(task["path"], config, progress=False).verdict
    evidence = verdict.evidence or {}
    fresh = [c["fresh"] for c in evidence.get("candidates", [])
             if "fresh" in c and c.get("budget") == "verdict"]
    allocation = evidence.get("allocation") or {}
    return {"key": task["key"], "member": task["name"], "recipe": task["recipe"],
            "layers": task["layers"], "corpus": task["corpus"], "seed": seed,
            "status": verdict.status, "score": verdict.score, "seconds": verdict.seconds,
            "p_values": [f["p_value"] for f in fresh],
            "t_values": [max(f["t"], f["t_centred"]) for f in fresh],
            "best_t": max((max(f["t"], f["t_centred"]) for f in fresh), default=None),
            "confirmed": evidence.get("confirmed"), "unjudged": allocation.get("unjudged"),
            "reason": verdict.reason, "config_hash": config.config_hash(),
            "preset_hash": preset_hash()}


def preset_hash() -> str:
    """The default configuration's hash: rows scanned under another one (older code) are
    not counted with this one's."""
    from sanitator.detect.config import ScanConfig

    return ScanConfig.from_preset("fast").config_hash()


def read_results(path: Path) -> list[dict]:
    """The rows on record scanned with the current default configuration."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    current = [r for r in rows if r.get("preset_hash") == preset_hash()]
    if len(current) < len(rows):
        print(f"{path}: {len(rows) - len(current)} rows of another configuration ignored",
              file=sys.stderr)
    return current


def zoo_members(zoo: Path, names: list[str] | None) -> list[dict]:
    """The clean members of a built zoo (its manifest)."""
    from sanitator.attacks.zoo import read_manifest

    manifest = read_manifest(zoo)
    rows = [r for r in manifest.itertuples() if not bool(r.backdoored)]
    if names:
        rows = [r for r in rows if r.name in names]
    return [{"name": r.name, "path": str(zoo / r.path), "recipe": str(r.recipe),
             "layers": int(r.n_layers)} for r in rows]


def summarise(results: list[dict], alpha: float) -> dict:
    n = len(results)
    alarms = sum(r["status"] == "backdoored" for r in results)
    lower, upper, one_sided = clopper_pearson(alarms, n)
    p_values = [p for r in results for p in r["p_values"]]
    return {
        "scans": n, "false_alarms": alarms, "rate": alarms / n if n else float("nan"),
        "ci95": (lower, upper), "upper95_one_sided": one_sided, "alpha": alpha,
        "bound_holds": one_sided <= alpha,
        "inconclusive": sum(r["status"] == "inconclusive" for r in results),
        "errors": sum(r["status"] not in ("clean", "backdoored", "inconclusive")
                      for r in results),
        "scores_at_zero": sum((r["score"] or 0.0) == 0.0 for r in results),
        "max_score": max((r["score"] or 0.0 for r in results), default=0.0),
        "p_values": len(p_values),
        "p_at_most_0.05": sum(p <= 0.05 for p in p_values),
        "p_at_most_0.01": sum(p <= 0.01 for p in p_values),
        "median_seconds": statistics.median(r["seconds"] for r in results) if n else None,
    }


def per_member_table(results: list[dict]) -> str:
    lines = ["| member | layers | recipe | scans | backdoored | inconclusive | max score | "
             "best t | median s |", "|---|---|---|---|---|---|---|---|---|"]
    for member in sorted({r["member"] for r in results}):
        rows = [r for r in results if r["member"] == member]
        ts = [r["best_t"] for r in rows if r["best_t"] is not None]
        lines.append(
            f"| {member} | {rows[0]['layers']} | {rows[0]['recipe']} | {len(rows)} | "
            f"{sum(r['status'] == 'backdoored' for r in rows)} | "
            f"{sum(r['status'] == 'inconclusive' for r in rows)} | "
            f"{max(r['score'] or 0.0 for r in rows):.3f} | "
            f"{max(ts) if ts else float('nan'):.1f} | "
            f"{statistics.median(r['seconds'] for r in rows):.0f} |")
    return "\n".join(lines)


def accept_t(alpha: float, budget: int, n: int = 128) -> float:
    """The t statistic a candidate needs: 2 frames x `budget` x its tail <= alpha."""
    from scipy.optimize import brentq

    from sanitator.detect.evidence import t_sf

    return float(brentq(lambda t: 2 * budget * t_sf(t, n - 1) - alpha, 0.0, 50.0))


def plot(results: list[dict], path: Path, alpha: float, budget: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = [r["score"] or 0.0 for r in results]
    # every confirmed candidate's t (the better frame's), else the scan's best one
    ts = [t for r in results for t in (r.get("t_values") or
                                       ([r["best_t"]] if r["best_t"] is not None else []))]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.hist(scores, bins=[i / 50 for i in range(51)], color="#2e7d32")
    left.axvline(1 - alpha, color="#c62828", linestyle="--", label=f"backdoored at {1 - alpha}")
    left.set_yscale("log")
    left.set_xlabel("scan score (clean encoders)")
    left.set_ylabel("scans")
    left.set_title(f"{len(scores)} scans", fontsize=10)
    left.legend(fontsize=8)
    needed = accept_t(alpha, budget)
    if ts:
        right.hist(ts, bins=30, color="#1565c0")
    right.axvline(needed, color="#c62828", linestyle="--",
                  label=f"t needed (alpha {alpha}, budget {budget}): {needed:.2f}")
    right.set_xlabel("paired t of a confirmed candidate (better frame)")
    right.set_ylabel("candidates")
    right.set_title(f"{len(ts)} fresh confirmations (or best per scan)", fontsize=10)
    right.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=96)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", required=True, type=Path, help="a zoo built from null.yaml")
    parser.add_argument("--results", required=True, type=Path, help="JSON lines, resumable")
    parser.add_argument("--members", help="comma-separated member names (default: all clean)")
    parser.add_argument("--corpora", default=",".join(CORPORA), help="scan corpora")
    parser.add_argument("--seeds", type=int, default=10, help="scan seeds per member and "
                                                              "corpus (default 10)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes, one thread "
                                                            "each (default 2)")
    parser.add_argument("--limit", type=int, help="run at most this many new scans (0: only "
                                                  "summarise what is on record)")
    parser.add_argument("--plot", type=Path, help="write the scores and p-values plot here")
    args = parser.parse_args(argv)

    from sanitator.detect.config import ScanConfig

    decision = ScanConfig.from_preset("fast").decision
    alpha = decision.alpha
    members = zoo_members(args.zoo, args.members.split(",") if args.members else None)
    if not members:
        print(f"no clean members in {args.zoo}", file=sys.stderr)
        return 2
    done = {r["key"] for r in read_results(args.results)}
    todo = [t for t in plan(members, args.corpora.split(","), args.seeds)
            if t["key"] not in done][:args.limit]
    print(f"{len(done)} scans on record, {len(todo)} to run with {args.jobs} worker(s)",
          flush=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    if todo:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=context,
                                 initializer=_init_worker) as pool, \
                args.results.open("a") as log:
            futures = [pool.submit(scan_task, task) for task in todo]
            for index, future in enumerate(as_completed(futures), 1):
                row = future.result()
                log.write(json.dumps(row) + "\n")
                log.flush()
                print(f"[{index}/{len(todo)}] {row['key']}: {row['status']} "
                      f"score {row['score']} ({row['seconds']:.0f} s)", flush=True)
    results = read_results(args.results)
    summary = summarise(results, alpha)
    print()
    print(per_member_table(results))
    print()
    lower, upper = summary["ci95"]
    print(f"scans {summary['scans']}, false alarms {summary['false_alarms']} "
          f"(rate {summary['rate']:.4f}, 95 % CI [{lower:.4f}, {upper:.4f}], one-sided 95 % "
          f"upper bound {summary['upper95_one_sided']:.4f}; alpha {alpha}: "
          f"{'holds' if summary['bound_holds'] else 'not shown'})")
    print(f"inconclusive {summary['inconclusive']}, errors {summary['errors']}, scores at 0: "
          f"{summary['scores_at_zero']}, max score {summary['max_score']:.4f}, median "
          f"{summary['median_seconds']} s per scan")
    print(f"fresh p-values {summary['p_values']}: {summary['p_at_most_0.05']} at most 0.05, "
          f"{summary['p_at_most_0.01']} at most 0.01")
    if args.plot:
        plot(results, args.plot, alpha, decision.confirmation_budget)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
