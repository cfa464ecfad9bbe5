"""What the pipeline costs around the scans: parallel efficiency and Prefect + Dask overhead
of `sanitator audit` on an N-model zoo, one table (issue 17).

Builds N copies of MiniLM-L6 truncated to `--layers` layers (each its own folder, so its
own audit), then runs the real `sanitator audit --registry path:ZOO` (private Prefect API,
Dask LocalCluster, Parquet store, MLflow) with W workers of T torch threads and reads back
each model's audit seconds from the store.

    OMP_NUM_THREADS=1 ./run python benchmarks/orchestration.py [--models 6] [--layers 2] \
        [--workers 2] [--threads 1] [--work DIR]

  compute     = sum over models of the worker's audit seconds (fetch + scan)
  efficiency  = compute / (workers x wall): 1.0 when every worker scans all the time
  overhead    = (workers x wall - compute) / compute: start-up, scheduling, recording

Targets (issue 17): efficiency >= 90 %, overhead <= 5 %. The overhead is mostly fixed
(Prefect API and cluster start, worker imports), so its share falls as scans get longer:
quote it with the layer count.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_zoo(root: Path, n: int, layers: int) -> Path:
    from sanitator.attacks.models import truncated_minilm

    base = root / "base" / "model"
    if not (base / "config.json").is_file():
        truncated_minilm(layers, base)
    zoo = root / "zoo"
    for index in range(n):
        member = zoo / f"minilm{layers}-copy{index}"
        if not (member / "config.json").is_file():
            shutil.copytree(base, member, copy_function=os.link)
    return zoo


def sanitator_command() -> list[str]:
    script = Path(sys.executable).with_name("sanitator")
    return [str(script)] if script.is_file() else [
        sys.executable, "-c", "from sanitator.cli import console; console()"]


def run(args: argparse.Namespace) -> dict:
    from sanitator.pipeline.store import read_verdicts

    root = Path(args.work or tempfile.mkdtemp(prefix="sanitator-orch-"))
    zoo = build_zoo(root, args.models, args.layers)
    store = root / f"store-{int(time.time())}"
    command = [*sanitator_command(), "audit", "--registry", f"path:{zoo}", "--out",
               str(store), "--workers", str(args.workers), "--threads", str(args.threads),
               "--json"]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False,
                            env={**os.environ, "TQDM_DISABLE": "1"})
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"audit failed ({result.returncode}):\n{result.stderr[-3000:]}")
    rows = read_verdicts(store)
    compute = float(rows["seconds"].sum())
    capacity = args.workers * wall
    return {"models": len(rows), "layers": args.layers, "workers": args.workers,
            "threads": args.threads, "wall_s": round(wall, 1),
            "compute_s": round(compute, 1),
            "per_model_s": round(compute / max(len(rows), 1), 1),
            "efficiency": round(compute / capacity, 3),
            "overhead": round((capacity - compute) / max(compute, 1e-9), 3),
            "statuses": sorted(rows["status"].astype(str).unique().tolist())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=6)
    parser.add_argument("--layers", type=int, default=2, choices=range(1, 7))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--work", help="folder for the zoo and stores (default: a temp dir)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    row = run(args)
    if args.json:
        print(json.dumps(row))
        return
    print("| " + " | ".join(row) + " |")
    print("|" + "---|" * len(row))
    print("| " + " | ".join(str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
