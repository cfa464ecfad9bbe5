"""Latency of the PV sign monitor next to the encoder it guards, on CPU, one table.

For each batch size: the median time of one forward pass of the real MiniLM-L6 (inputs
tokenised beforehand) and the median time of the monitor's check of that batch's CLS
features against a PV set (`SignMonitor.flag`: signs, one matrix product, max, compare).
Clean inputs are not purged, so the check is the whole cost a deployment pays for them.

    OMP_NUM_THREADS=1 ./run python benchmarks/monitor_overhead.py [--batches 1,32] \
        [--pvs 6] [--repeats 30] [--words 24] [--json]

Target (docs/deployment.md): overhead under 2% of encoder time at batch 1 and batch 32.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

import torch

from sanitator.attacks.models import minilm_path
from sanitator.detect.encoders import load_encoder
from sanitator.guard.monitor import SignMonitor

WORDS = ("the", "film", "was", "quite", "good", "bad", "plot", "acting", "really", "and",
         "a", "story", "music", "slow", "funny", "ending", "characters", "but", "not", "too",
         "boring", "wonderful", "of", "in", "with", "director", "scenes", "long", "best")


def sentences(n: int, words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) + " ." for _ in range(n)]


def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def measure(batch_size: int, encoder, monitor: SignMonitor, *, repeats: int, words: int
            ) -> dict:
    batch = encoder.tokenizer(sentences(batch_size, words), padding=True, truncation=True,
                              max_length=128, return_tensors="pt")
    with torch.no_grad():
        features = encoder.model(**batch).last_hidden_state[:, 0]

        def forward():
            encoder.model(**batch)

        def check():
            monitor.flag(features)

        encoder_ms = median_ms(forward, repeats)
        # the check is microseconds: time many more calls for a stable median
        monitor_ms = median_ms(check, max(repeats * 20, 200), warmup=20)
    return {"batch": batch_size, "tokens": int(batch["input_ids"].shape[1]),
            "encoder_ms": encoder_ms, "monitor_ms": monitor_ms,
            "overhead_pct": 100 * monitor_ms / encoder_ms, "pvs": int(monitor.pvs.shape[0])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    parser.add_argument("--pvs", type=int, default=6, help="PVs in the monitor (default 6)")
    parser.add_argument("--repeats", type=int, default=30, help="encoder forwards per batch")
    parser.add_argument("--words", type=int, default=24, help="words per input sentence")
    parser.add_argument("--threads", type=int,
                        default=int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    parser.add_argument("--json", action="store_true", help="one JSON object per batch size")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    encoder = load_encoder(minilm_path())
    pvs = torch.randn(args.pvs, encoder.hidden_size, generator=torch.Generator().manual_seed(0))
    monitor = SignMonitor(pvs)
    rows = [measure(int(b), encoder, monitor, repeats=args.repeats, words=args.words)
            for b in args.batches.split(",")]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"MiniLM-L6 on CPU, {args.threads} torch thread(s), {args.pvs} PVs, "
          f"{args.words}-word inputs, medians")
    print("| batch | tokens | encoder ms | monitor ms | overhead % |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['batch']} | {row['tokens']} | {row['encoder_ms']:.2f} | "
              f"{row['monitor_ms']:.4f} | {row['overhead_pct']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
