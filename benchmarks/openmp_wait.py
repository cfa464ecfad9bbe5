"""What waiting OpenMP threads cost: the same scan run by P processes side by side, each
with T torch threads, under each OMP_WAIT_POLICY (libgomp's threads spin while they wait
by default; PASSIVE makes them sleep). docs/pipeline.md, Scaling out, has the figures and
why the pipeline leaves the default alone.

    ./run python benchmarks/openmp_wait.py [--processes 2] [--threads 2] [--layers 2] \
        [--policies default,PASSIVE]

Prints, per policy, each process's scan seconds and user CPU seconds. The scan is
`scan_model` with the fast preset on MiniLM-L6 truncated to `--layers` layers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROBE = """
import json, resource, sys, time
from sanitator.detect.config import ScanConfig
from sanitator.detect.scan import scan_model
start = time.perf_counter()
result = scan_model(sys.argv[1], ScanConfig.from_preset("fast"), progress=False)
seconds = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"scan_s": seconds, "user_s": usage.ru_utime, "sys_s": usage.ru_stime,
                  "verdict": result.verdict.status}))
"""


def run_policy(model: Path, policy: str, processes: int, threads: int) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    started = [subprocess.Popen([sys.executable, "-c", PROBE, str(model)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
               for _ in range(processes)]
    rows = []
    for process in started:
        out, _ = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"a scan process failed under {policy} ({process.returncode})")
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--policies", default="default,PASSIVE")
    args = parser.parse_args()

    from sanitator.attacks.models import truncated_minilm

    model = truncated_minilm(args.layers, Path(tempfile.mkdtemp()) / "model")
    print(f"{args.processes} process(es) x {args.threads} torch thread(s), MiniLM-L6 "
          f"truncated to {args.layers} layer(s), fast preset, {os.cpu_count()} cores")
    print(f"{'OMP_WAIT_POLICY':<16}{'process':>8}{'scan s':>9}{'user s':>9}{'sys s':>8}"
          f"  verdict")
    for policy in args.policies.split(","):
        began = time.perf_counter()
        rows = run_policy(model, policy, args.processes, args.threads)
        for index, row in enumerate(rows):
            print(f"{policy:<16}{index:>8}{row['scan_s']:>9.1f}{row['user_s']:>9.1f}"
                  f"{row['sys_s']:>8.1f}  {row['verdict']}")
        print(f"{policy:<16}{'wall':>8}{time.perf_counter() - began:>9.1f}")


if __name__ == "__main__":
    main()
