"""What a scan costs on a given device, and how much encoder work it is: one table.

Runs `sanitator.detect.scan_model` in this process (the method only: no Prefect, Dask or
MLflow, so it runs with just torch + transformers + pandas/pyarrow) on each model folder,
detect mode and optionally complete mode, and counts every encoder forward the scan makes
(calls and token positions, through a forward hook on the embeddings module). The counts are
the device-independent size of the scan's evidence; the seconds and peak memory (GPU
memory allocated on CUDA, the process's peak RSS on CPU) are the device's.

    OMP_NUM_THREADS=2 ./run python benchmarks/gpu.py --models ZOO/models/minilm-clean \\
        --device cpu                       # the 2-core machine: counts and CPU seconds
    python3 benchmarks/gpu.py --models gpu-kit/minilm-clean,gpu-kit/minilm-por-paper \\
        --device cuda --complete           # a GPU machine (see below)

On a GPU machine without this project's environment (the device tool's): copy the model
folders and the scan's data into one folder inside the checkout that git ignores (e.g.
`gpu-kit/`: the models, saved in bf16 to travel light, and `data/wikitext`, `data/sst2`
from ../shared/data), carry it, and run with `PYTHONPATH=. SANITATOR_DATA_DIR=gpu-kit/data`.
The first model pays CUDA's start-up; it is scanned once unmeasured when `--warm-up`.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch


class ForwardCounter:
    """Counts encoder forwards and the token positions they take in, at the embeddings
    module (one call per forward; a row-path forward, sanitator.detect.rowpath, never
    returns from the encoder module itself); grad-enabled forwards counted apart (mining,
    context search gradients)."""

    def __init__(self) -> None:
        self.forwards = self.grad_forwards = self.tokens = 0
        self.handle = None

    def __enter__(self) -> ForwardCounter:
        def hook(module, args, output):
            if not hasattr(module, "word_embeddings") or not isinstance(output, torch.Tensor):
                return
            self.forwards += 1
            self.grad_forwards += int(torch.is_grad_enabled())
            self.tokens += int(output.shape[0]) * int(output.shape[1])

        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def scan_once(path: Path, device: str, complete: bool, precision: str) -> dict:
    from sanitator.detect.config import ScanConfig
    from sanitator.detect.scan import scan_model

    config = ScanConfig.from_preset("fast", complete=complete, precision=precision)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with ForwardCounter() as counter:
        started = time.perf_counter()
        result = scan_model(path, config, device=device, progress=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    evidence = result.verdict.evidence or {}
    stages = {k: round(v, 1) for k, v in (evidence.get("stage_seconds") or {}).items()}
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:  # the process's peak RSS so far (Linux: KiB)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"model": path.name, "mode": "complete" if complete else "detect",
            "verdict": result.verdict.status, "score": result.verdict.score,
            "seconds": round(seconds, 1), "forwards": counter.forwards,
            "grad_forwards": counter.grad_forwards,
            "tokens_M": round(counter.tokens / 1e6, 2),
            "ms_per_forward": round(1000 * seconds / max(counter.forwards, 1), 1),
            "peak_MiB": round(peak), "pvs": len(result.pvset),
            "precision": evidence.get("precision"), "stages": stages}


def main() -> int:
    from sanitator.detect.config import PRECISIONS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", required=True, help="comma-separated model folders")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--complete", action="store_true",
                        help="also scan in complete mode (what an audit runs)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS)
    parser.add_argument("--warm-up", action="store_true",
                        help="scan the first model once before measuring")
    parser.add_argument("--out", type=Path, help="also append one JSON line per scan")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU here")
    paths = [Path(p) for p in args.models.split(",")]
    if args.warm_up:
        scan_once(paths[0], args.device, False, args.precision)
    rows = []
    for path in paths:
        for complete in (False, True) if args.complete else (False,):
            row = scan_once(path, args.device, complete, args.precision)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                with args.out.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
    name = (torch.cuda.get_device_name() if args.device.startswith("cuda")
            else f"cpu, {torch.get_num_threads()} torch thread(s)")
    columns = ["model", "mode", "verdict", "score", "seconds", "forwards", "grad_forwards",
               "tokens_M", "ms_per_forward", "peak_MiB", "pvs", "precision"]
    print(f"\n{name}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
