"""ASR benchmark: prompt-tune every encoder of a zoo on downstream tasks and print one table.

    OMP_NUM_THREADS=1 ./run python benchmarks/asr.py --zoo zoo/minilm --tasks sst2,sms_spam
    OMP_NUM_THREADS=1 ./run python benchmarks/asr.py --mined --zoo ZOO --models a,b \
        --store STORE --tasks sst2,sms_spam

A zoo is a folder of model folders; a model with a `backdoor.json` is backdoored (its
triggers attack it), one without is clean and is attacked with the triggers of the zoo's
backdoored models (its ASR is the baseline a backdoor must beat). The monitor's PVs come
from `--pvs`: `oracle` (the attack's own targets from backdoor.json; clean models get those
of the first backdoored model), or `store:DIR` (each model's latest audit in a store).
`--build` first writes the MiniLM-L6 zoo (clean, POR, NeuBA) with `sanitator.attacks`.

`--mined` goes the way a user goes (benchmarks/asr_mined.py): `sanitator audit` of the
members into `--store`, `sanitator pv pull` of each artifact, prompt-tuning (P-tuning v2 on
CLS members, v1 on mask members), every planted trigger, and per trigger the ASR without the
monitor, behind the mined PVs and behind the oracle PVs, with each audit's cost.

Targets (issue 6): undefended ASR >= 90% on backdoored encoders, defended ASR <= 1%,
defended clean accuracy within 1 point of undefended, monitor FPR on clean inputs <= 1%.

Token tasks (`--tasks conll04`, issue 18) prompt-tune a P-tuning v2 tagger and watch every
token; `clean_acc` / `def_clean_acc` are then entity F1 and ASR is the share of triggered
sentences whose entity spans change (docs/evaluation.md). A clean and a token-POR MiniLM-L6:

    ./run sanitator zoo build benchmarks/zoos/detection.yaml ZOO --only minilm-clean minilm-tokpor
    OMP_NUM_THREADS=1 ./run python benchmarks/asr.py --zoo ZOO/models --tasks conll04 \
        --models minilm-clean,minilm-tokpor --lr 2e-2 --epochs 10 --limit 288
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from sanitator.downstream.asr import AttackConfig, read_backdoor_manifest
from sanitator.downstream.evaluate import DownstreamResult
from sanitator.downstream.ner_eval import evaluate_task
from sanitator.downstream.prompt_tuning import PromptTuningConfig
from sanitator.downstream.pvs import resolve_pvs

log = logging.getLogger("benchmarks.asr")

COLUMNS = ("model", "attack", "task", "clean_acc", "asr", "w_asr", "def_asr", "def_clean_acc",
           "fpr", "flagged", "n_test", "seconds")


def build_zoo(zoo: Path) -> None:
    """The MiniLM-L6 zoo: the clean model (a link), a POR and a NeuBA backdoor."""
    from sanitator.attacks.models import minilm_path
    from sanitator.attacks.neuba import insert_neuba
    from sanitator.attacks.por import insert_por

    zoo.mkdir(parents=True, exist_ok=True)
    clean = zoo / "clean"
    if not clean.exists():
        clean.symlink_to(minilm_path(), target_is_directory=True)
    for name, attack in (("por", insert_por), ("neuba", insert_neuba)):
        if not (zoo / name / "backdoor.json").is_file():
            log.info("building %s", name)
            attack(minilm_path(), zoo / name)


def zoo_models(zoo: Path, names: list[str] | None) -> list[Path]:
    if not zoo.is_dir():
        raise SystemExit(f"no zoo at {zoo}: build it with --build (MiniLM-L6 clean, POR, "
                         "NeuBA) or point --zoo at a folder of model folders")
    models = sorted(p for p in zoo.iterdir() if (p / "config.json").is_file())
    if names:
        models = [m for m in models if m.name in names]
    if not models:
        raise SystemExit(f"no model folders in {zoo}")
    return models


def monitor_pvs(model: Path, source: str, fallback: torch.Tensor | None):
    if source == "oracle":
        if (model / "backdoor.json").is_file():
            return resolve_pvs(model).vectors
        return fallback
    if source.startswith("store:"):
        found = resolve_pvs(store=source.split(":", 1)[1], model_dir=model)
        if found is None:
            raise SystemExit(f"{model}: no audit in {source}")
        return found.vectors if found.vectors is not None else torch.zeros(0, 1)
    raise SystemExit(f"unknown --pvs {source!r}: use oracle or store:DIR")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def row(result: DownstreamResult, attack: str) -> dict[str, str]:
    a = result.attack
    out = {"model": Path(result.encoder).name, "attack": attack, "task": result.task,
           "clean_acc": _pct(a.clean_accuracy), "asr": _pct(a.asr), "w_asr": _pct(a.weighted_asr),
           "def_asr": _pct(a.defended_asr), "def_clean_acc": _pct(a.defended_clean_accuracy),
           "fpr": _pct(a.monitor_fpr), "flagged": _pct(a.triggered_flag_rate),
           "n_test": str(a.n_test), "seconds": f"{result.seconds:.0f}"}
    if not result.convergence.converged:  # at chance: no attack success to report
        out.update({key: "n/c" for key in ("asr", "w_asr", "def_asr", "flagged")})
    return out


def print_table(rows: list[dict[str, str]]) -> None:
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in COLUMNS}
    print("  ".join(c.ljust(widths[c]) for c in COLUMNS))
    print("  ".join("-" * widths[c] for c in COLUMNS))
    for r in rows:
        print("  ".join(r[c].ljust(widths[c]) for c in COLUMNS))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=Path("zoo/minilm"))
    parser.add_argument("--build", action="store_true", help="build the MiniLM-L6 zoo first")
    parser.add_argument("--models", help="comma-separated model folder names (default all)")
    parser.add_argument("--tasks", default="sst2,sms_spam")
    parser.add_argument("--method", choices=["ptv2", "ptv1"], default="ptv2")
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--prefix-length", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=500, help="test rows per task")
    parser.add_argument("--pvs", default="oracle", help="oracle | store:DIR")
    parser.add_argument("--on-flag", choices=["purge", "reject"], default="purge")
    parser.add_argument("--out", type=Path, help="also write one JSON line per result")
    mined = parser.add_argument_group("--mined: audit, pull, prompt-tune, attack")
    mined.add_argument("--mined", action="store_true",
                       help="PVs from `sanitator audit` + `sanitator pv pull` (oracle beside)")
    mined.add_argument("--store", type=Path, help="audit store (default ZOO/../asr-store)")
    mined.add_argument("--work", type=Path,
                       help="staged registries and pulled artifacts (default STORE-work)")
    mined.add_argument("--audit-set", action="append", default=[], metavar="KEY=VALUE",
                       help="scan option for the audit (repeatable), e.g. mode=search")
    mined.add_argument("--audit-threads", type=int, default=1, help="torch threads of the audit")
    mined.add_argument("--reuse-audits", action="store_true",
                       help="skip the audit of a member whose verdict is already in --store "
                            "(same --work staging registry); the pull and the rest still run")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.mined:
        return _mined(args)

    if args.build:
        build_zoo(args.zoo)
    models = zoo_models(args.zoo, args.models.split(",") if args.models else None)
    manifests = {m: read_backdoor_manifest(m) for m in models}
    backdoored = [m for m in models if manifests[m]]
    if not backdoored:
        raise SystemExit(f"no backdoored model (backdoor.json) in {args.zoo}")
    zoo_triggers = list(dict.fromkeys(t for m in backdoored for t in manifests[m]["triggers"]))
    fallback = resolve_pvs(backdoored[0]).vectors
    prompt_config = PromptTuningConfig(method=args.method, epochs=args.epochs,
                                       learning_rate=args.lr, prefix_length=args.prefix_length,
                                       train_size=args.train_size, batch_size=args.batch_size)
    rows, started = [], time.perf_counter()
    for model in models:
        manifest = manifests[model]
        triggers = manifest["triggers"] if manifest else zoo_triggers
        attack = manifest.get("attack", "?") if manifest else "clean"
        pvs = monitor_pvs(model, args.pvs, fallback)
        for task in args.tasks.split(","):
            log.info("%s (%s) on %s", model.name, attack, task)
            result = evaluate_task(model, task, triggers, pvs=pvs,
                                   prompt_config=prompt_config,
                                   attack_config=AttackConfig(on_flag=args.on_flag),
                                   limit=args.limit, progress=sys.stderr.isatty())
            rows.append(row(result, attack))
            if args.out:
                with args.out.open("a") as handle:
                    handle.write(json.dumps({**result.to_dict(), "attack_name": attack}) + "\n")
    print(f"\nASR benchmark: zoo {args.zoo}, method {args.method}, train {args.train_size} x "
          f"{args.epochs} epochs, test {args.limit} rows/task, PVs {args.pvs}, monitor "
          f"{args.on_flag}; percentages (n/c: prompt-tuning did not converge, no ASR; token "
          f"tasks such as conll04: clean_acc and def_clean_acc are entity F1); "
          f"{time.perf_counter() - started:.0f} s\n")
    print_table(rows)
    return 0


def _mined(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from asr_mined import run_mined

    if args.build:
        build_zoo(args.zoo)
    models = zoo_models(args.zoo, args.models.split(",") if args.models else None)
    return run_mined(args, models)


if __name__ == "__main__":
    sys.exit(main())
