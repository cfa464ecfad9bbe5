"""Speed and verdicts of `sanitator scan`, both presets side by side, one table.

Each (model, preset) runs in its own process (`sanitator scan --json`) so peak RSS is per
scan. Models: members of a zoo built by `sanitator zoo build` (its manifest.parquet gives
the ground truth; backdoor.json gives the planted PVs) plus a tiny random encoder.

    ./run python benchmarks/detect.py --zoo /tmp/zoo-minilm --members clean,por-a,neuba-a
    ./run python benchmarks/detect.py --zoo /tmp/zoo-minilm --presets fast   # skip faithful
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

import pandas as pd
import torch

from sanitator.monitor import sign_agreement

SCAN = str(Path(sys.executable).parent / "sanitator")


def run_scan(model: Path, preset: str, timeout: float, threads: int) -> tuple[dict, float]:
    """(the scan's JSON, peak RSS in MiB) of one `sanitator scan` child process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with tempfile.TemporaryFile("w+") as out:
        child = subprocess.Popen([SCAN, "scan", str(model), "--preset", preset, "--json"],
                                 stdout=out, stderr=subprocess.DEVNULL, env=env)
        started = time.monotonic()
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - started > timeout:
                child.kill()
                pid, status, usage = os.wait4(child.pid, 0)
                return {"status": f"timeout>{timeout:.0f}s", "seconds": timeout}, \
                    usage.ru_maxrss / 1024
            time.sleep(0.5)
        out.seek(0)
        text = out.read().strip()
    try:
        return json.loads(text.splitlines()[-1]), usage.ru_maxrss / 1024
    except (json.JSONDecodeError, IndexError):
        return {"status": f"crashed (exit {status >> 8})"}, usage.ru_maxrss / 1024


def recovered(found: list, planted: list) -> int:
    """Planted PVs matched (sign agreement >= 0.95) by some found PV."""
    if not found or not planted:
        return 0
    agreement = sign_agreement(torch.tensor(found), torch.tensor(planted))
    return int((agreement.max(dim=0).values >= 0.95).sum())


def members(zoo: Path | None, names: list[str] | None) -> list[tuple[str, Path, bool, list]]:
    rows = []
    if zoo is not None:
        manifest = pd.read_parquet(zoo / "manifest.parquet")
        for row in manifest.itertuples():
            name = Path(row.path).name
            if names and name not in names and row.path not in names:
                continue
            path = zoo / row.path
            record = path / "backdoor.json"
            planted = json.loads(record.read_text())["pvs"] if record.is_file() else []
            rows.append((row.path, path, bool(row.backdoored), planted))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, help="a zoo folder with manifest.parquet")
    parser.add_argument("--members", help="comma-separated member names or paths (default all)")
    parser.add_argument("--presets", default="fast,faithful")
    parser.add_argument("--no-tiny", action="store_true", help="skip the tiny random encoder")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per scan")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    models = members(args.zoo, args.members.split(",") if args.members else None)
    if not args.no_tiny:
        from sanitator.models import build_tiny_encoder

        tiny = build_tiny_encoder("bert", Path(tempfile.mkdtemp()) / "tiny-bert")
        models.append(("tiny-bert (random init)", tiny, False, []))
    if not models:
        parser.error("no models: pass --zoo (and --members) or drop --no-tiny")
    rows = []
    for name, path, backdoored, planted in models:
        for preset in args.presets.split(","):
            result, rss = run_scan(path, preset, args.timeout, args.threads)
            rows.append({
                "model": name, "truth": "backdoored" if backdoored else "clean",
                "preset": preset, "verdict": result.get("status"),
                "score": result.get("score"),
                "seconds": round(float(result.get("seconds") or 0), 1),
                "seeds": result.get("seeds_tried"),
                "pvs recovered/planted": f"{recovered(result.get('pvs') or [], planted)}"
                                         f"/{len(planted)}",
                "triggers found": " | ".join(" ".join(t) for t in
                                             result.get("trigger_tokens") or []),
                "peak RSS MiB": round(rss),
            })
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    table = pd.DataFrame(rows)
    print(table.to_markdown(index=False) if _has_tabulate() else table.to_string(index=False))
    return 0


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
