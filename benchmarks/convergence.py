"""Does prompt-tuning converge? Train and clean accuracy per encoder, task and method.

    OMP_NUM_THREADS=1 ./run python benchmarks/convergence.py \
        --encoders minilm:1,minilm:2,minilm --tasks sst2,sms_spam --methods ptv2,ptv1

Encoders are base references as in zoo specs (`minilm`, `minilm:N` for MiniLM-L6 cut to N
layers, built once under `--cache`) or model folders. Every run uses the library defaults
of `PromptTuningConfig` unless overridden (`--set key=value`, e.g. `--set epochs=5`), tests
on `--limit` seeded test rows, and applies the rule of `sanitator evaluate`: train or clean
accuracy within `--chance-margin` of the majority-class rate means not converged. No attack
is run; `--out FILE` appends one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from sanitator.downstream.evaluate import CHANCE_MARGIN, check_convergence, tune_on_task
from sanitator.downstream.prompt_tuning import PromptTuningConfig, predict

log = logging.getLogger("benchmarks.convergence")
COLUMNS = ("encoder", "task", "method", "head", "train_acc", "clean_acc", "majority",
           "converged", "n_train", "epochs", "lr", "seconds")


def encoder_folder(ref: str, cache: Path) -> Path:
    from sanitator.attacks.zoo import materialize_base

    return materialize_base(ref, cache)


def parse_setting(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def run_one(folder: Path, task: str, config: PromptTuningConfig, limit: int, margin: float,
            progress: bool) -> dict:
    tuned = tune_on_task(folder, task, prompt_config=config, limit=limit, progress=progress)
    predictions, _ = predict(tuned.model, tuned.test.texts)
    clean = float((predictions == torch.tensor(tuned.test.labels)).double().mean())
    verdict = check_convergence(tuned.training.train_accuracy, tuned.scored_train_labels, clean,
                                tuned.test.labels, margin)
    return {"task": tuned.spec.name, "method": config.method, "n_train": len(tuned.train),
            "n_test": len(tuned.test), "train_accuracy": tuned.training.train_accuracy,
            "clean_accuracy": clean, "majority_rate": verdict.test_majority,
            "train_majority": verdict.train_majority, "converged": verdict.converged,
            "reason": verdict.reason, "config": tuned.training.config,
            "standardized": tuned.training.standardized,
            "feature_spread": tuned.training.feature_spread,
            "seconds": time.perf_counter() - tuned.started}


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def print_table(rows: list[dict[str, str]]) -> None:
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in COLUMNS}
    print("  ".join(c.ljust(widths[c]) for c in COLUMNS))
    print("  ".join("-" * widths[c] for c in COLUMNS))
    for r in rows:
        print("  ".join(r[c].ljust(widths[c]) for c in COLUMNS))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoders", default="minilm:1,minilm:2,minilm")
    parser.add_argument("--tasks", default="sst2,sms_spam")
    parser.add_argument("--methods", default="ptv2", help="ptv2, ptv1 or both")
    parser.add_argument("--limit", type=int, default=500, help="test rows per task")
    parser.add_argument("--set", dest="settings", action="append", default=[],
                        type=parse_setting, metavar="KEY=VALUE",
                        help="PromptTuningConfig override (repeatable)")
    parser.add_argument("--chance-margin", type=float, default=CHANCE_MARGIN)
    parser.add_argument("--cache", type=Path, default=Path("zoo/bases"),
                        help="where minilm:N truncations are built")
    parser.add_argument("--out", type=Path, help="append one JSON line per run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    overrides = dict(args.settings)
    rows, started = [], time.perf_counter()
    for ref in args.encoders.split(","):
        folder = encoder_folder(ref, args.cache)
        for method in args.methods.split(","):
            config = replace(PromptTuningConfig(method=method), **overrides)
            for task in args.tasks.split(","):
                log.info("%s %s %s", ref, method, task)
                result = {"encoder": ref, **run_one(folder, task, config, args.limit,
                                                    args.chance_margin, sys.stderr.isatty())}
                if args.out:
                    with args.out.open("a") as handle:
                        handle.write(json.dumps(result) + "\n")
                head = "standardised" if result["standardized"] else "plain"
                rows.append({"encoder": ref, "task": result["task"], "method": method,
                             "head": head,
                             "train_acc": _pct(result["train_accuracy"]),
                             "clean_acc": _pct(result["clean_accuracy"]),
                             "majority": _pct(result["majority_rate"]),
                             "converged": "yes" if result["converged"] else "NO",
                             "n_train": str(result["n_train"]), "epochs": str(config.epochs),
                             "lr": f"{config.lr:g}", "seconds": f"{result['seconds']:.0f}"})
    print(f"\nPrompt-tuning convergence: test {args.limit} rows/task, settings "
          f"{overrides or 'defaults'}, chance margin {args.chance_margin:g}; percentages "
          f"(train = last epoch, as trained); {time.perf_counter() - started:.0f} s\n")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
