"""Back-to-back `sanitator audit` runs of a many-model folder: does the embedded Prefect
backend (a temporary API server on sqlite) survive its own bookkeeping? One table.

Builds N tiny BERT encoders (different seeds, so N revisions) once, then runs
`sanitator audit --registry path:ZOO` R times, each into a fresh store with the real scan
under a tiny budget, and reports per run: exit code, seconds, verdict rows written, and
whether the output held a traceback or a "database is locked" message.

    OMP_NUM_THREADS=1 ./run python benchmarks/audit_repeat.py [--models 10] [--runs 10] \
        [--workers 2] [--work DIR] [--keep-logs] [--json]

Target (issue 16): every run exits 0, writes one row per model, prints no traceback.
Every run uses one private PREFECT_HOME (the first run pays the database migrations), so
other Prefect users of the machine do not share its sqlite file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# the budget under which the real scan takes a few seconds on a tiny encoder
TINY_SCAN = {"steps_per_seed": 40, "n_sentences": 96, "n_holdout": 32, "max_seeds": 4,
             "parallel_seeds": 4, "hard_token_candidates": 16}
MARKERS = {"traceback": "Traceback (most recent call last)",
           "locked": "database is locked"}


def build_zoo(root: Path, n: int) -> Path:
    from sanitator.attacks.models import build_tiny_encoder

    zoo = root / "zoo"
    for index in range(n):
        folder = zoo / f"tiny-{index:02d}"
        if not (folder / "model.safetensors").is_file():
            build_tiny_encoder("bert", folder, seed=index)
    return zoo


def audit_once(zoo: Path, store: Path, env: dict[str, str], workers: int) -> dict:
    command = [str(Path(sys.executable).with_name("sanitator")), "audit",
               "--registry", f"path:{zoo}", "--out", str(store), "--workers", str(workers),
               "--no-mlflow", "--json"]
    for key, value in TINY_SCAN.items():
        command += ["--set", f"{key}={value}"]
    started = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - started
    output = done.stdout + done.stderr
    rows = None
    with contextlib.suppress(ValueError, KeyError, TypeError):  # no JSON: the run failed
        rows = json.loads(done.stdout)["audited"]
    return {"exit": done.returncode, "seconds": round(seconds, 1), "rows": rows,
            **{name: output.count(text) for name, text in MARKERS.items()},
            "output": output}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=10)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", type=Path, help="folder for the zoo, stores and logs "
                                                   "(default: a new temporary folder)")
    parser.add_argument("--keep-logs", action="store_true",
                        help="write each run's output to WORK/run-K.log")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="sanitator-audit-repeat-"))
    work.mkdir(parents=True, exist_ok=True)
    zoo = build_zoo(work, args.models)
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect-home")}
    results = []
    for run in range(1, args.runs + 1):
        result = audit_once(zoo, work / f"store-{run}", env, args.workers)
        if args.keep_logs:
            (work / f"run-{run}.log").write_text(result["output"])
        result.pop("output")
        results.append({"run": run, **result})
        if not args.json:
            print(f"run {run}: exit {result['exit']}", file=sys.stderr, flush=True)
    ok = sum(r["exit"] == 0 and r["rows"] == args.models and r["traceback"] == 0
             for r in results)
    if args.json:
        print(json.dumps({"models": args.models, "runs": results, "clean_runs": ok}, indent=2))
    else:
        print(f"{args.models} models, {args.runs} runs, {args.workers} workers, work {work}")
        print(f"{'run':>3} {'exit':>4} {'seconds':>8} {'rows':>4} {'tracebacks':>10} "
              f"{'locked':>6}")
        for r in results:
            print(f"{r['run']:>3} {r['exit']:>4} {r['seconds']:>8.1f} {r['rows']!s:>4} "
                  f"{r['traceback']:>10} {r['locked']:>6}")
        print(f"clean runs (exit 0, {args.models} rows, no traceback): {ok}/{args.runs}")
    return 0 if ok == args.runs else 1


if __name__ == "__main__":
    raise SystemExit(main())
