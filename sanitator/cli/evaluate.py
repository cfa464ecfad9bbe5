"""`sanitator evaluate`: prompt-tune a model on a task and measure attack success with and
without the PV monitor (docs/evaluation.md)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from sanitator.cli import exits
from sanitator.core.constants import MONITOR_THRESHOLD
from sanitator.core.status import VERDICT_STATUSES

log = logging.getLogger(__name__)

# The prompt model stayed near chance: the result (clean numbers only) is printed, no ASR.
EXIT_NOT_CONVERGED = exits.NOT_CONVERGED


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="prompt-tune a model and measure attack success with/without monitor",
        description="Prompt-tune MODEL_DIR (encoder frozen) on a task, insert the backdoor's "
                    "triggers into the test inputs and report clean accuracy and attack "
                    "success rate, undefended and behind the PV monitor.")
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="a Hugging Face model folder")
    parser.add_argument("--task", required=True, metavar="NAME_OR_PARQUET",
                        help="a ready-made task (sst2, sms_spam, enron_spam, ag_news, rte, "
                             "yelp; conll04: NER, ptv2 tagger, entity F1) or a Parquet file / "
                             "folder with train.parquet+test.parquet (list columns tokens and "
                             "ner_tags: a token task)")
    columns = parser.add_argument_group("user Parquet tasks")
    columns.add_argument("--text-column", help="text column (default: text/sentence/sms/...)")
    columns.add_argument("--text-pair-column", help="second text column for sentence pairs")
    columns.add_argument("--label-column", help="label column (default: label)")
    columns.add_argument("--attack-column", help="the text column triggers go into")
    attack = parser.add_argument_group("attack and monitor")
    attack.add_argument("--triggers", metavar="T1,T2,...",
                        help="comma-separated triggers (default: MODEL_DIR/backdoor.json)")
    attack.add_argument("--pvs", metavar="ARTIFACT",
                        help="PV artifact: a PVSet .safetensors or a backdoor.json (the "
                             "attack's own targets); default: the model's latest audit in "
                             "--store, else a fresh scan")
    attack.add_argument("--store", default="sanitator-store", metavar="DIR",
                        help="audit store to take PVs from (default %(default)s)")
    attack.add_argument("--no-monitor", action="store_true",
                        help="measure the undefended ASR only")
    attack.add_argument("--on-flag", choices=["purge", "reject"], default="purge",
                        help="what the monitor does with a flagged input (default purge)")
    attack.add_argument("--threshold", type=float, default=MONITOR_THRESHOLD,
                        help="sign-agreement threshold of the monitor (default %(default)s)")
    attack.add_argument("--limit", type=int, metavar="N", help="evaluate at most N test rows")
    attack.add_argument("--attack-seed", type=int, default=0, help="trigger placement seed")
    tuning = parser.add_argument_group("prompt-tuning")
    tuning.add_argument("--method", choices=["ptv2", "ptv1"], default="ptv2",
                        help="ptv2: deep prefixes + CLS head; ptv1: prompt tokens + [MASK] "
                             "verbaliser (BToP-style models)")
    tuning.add_argument("--epochs", type=int, default=3)
    tuning.add_argument("--lr", type=float, help="learning rate (default 1e-2 ptv2, 1e-3 ptv1)")
    tuning.add_argument("--prefix-length", type=int, default=16)
    tuning.add_argument("--prompt-tokens", type=int, default=2)
    tuning.add_argument("--train-size", type=int, default=2000,
                        help="training rows (seeded sample; 0 = all)")
    tuning.add_argument("--batch-size", type=int, default=32)
    tuning.add_argument("--max-length", type=int, help="tokens (default: the task's)")
    tuning.add_argument("--seed", type=int, default=44, help="prompt-tuning seed")
    tuning.add_argument("--standardize", choices=["auto", "on", "off"], default="auto",
                        help="centre and scale the feature before the head: auto (ptv2 where "
                             "the CLS feature barely varies, as in 1-2 layer encoders; ptv1 "
                             "always), on, or off (the reference's plain head)")
    tuning.add_argument("--chance-margin", type=float, default=0.10, metavar="P",
                        help="accuracy (train or clean test) within P of the majority-class "
                             "rate means not converged: no ASR is reported, exit "
                             f"{EXIT_NOT_CONVERGED} (default %(default)s)")
    tuning.add_argument("--save-prompt", metavar="FILE",
                        help="write the trained prompt + head (safetensors)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="load pickle weights (torch.load weights_only=True)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


class UsageError(Exception):
    """Bad input: reported in one line, exit status 2 (exits.USAGE)."""


def _triggers(args: argparse.Namespace, manifest: dict | None) -> list[str]:
    from sanitator.downstream.asr import manifest_triggers

    if args.triggers:
        triggers = [t.strip() for t in args.triggers.split(",") if t.strip()]
        if not triggers:
            raise UsageError("--triggers is empty")
        return triggers
    if manifest is None or not manifest.get("triggers"):
        raise UsageError(f"{args.model_dir} has no backdoor.json with triggers; pass "
                         "--triggers T1,T2,...")
    return manifest_triggers(manifest)


def _fresh_scan(model_dir: Path, args: argparse.Namespace):
    try:
        from sanitator.detect.config import ScanConfig
        from sanitator.detect.scan import scan_model
    except ImportError as exc:
        raise UsageError(f"no PVs: {model_dir} has no audit in {args.store} and this build "
                         "cannot scan; pass --pvs ARTIFACT (or --no-monitor)") from exc
    log.warning("no audit of %s in %s: scanning it now", model_dir, args.store)
    result = scan_model(model_dir, ScanConfig(), device=args.device,
                        allow_pickle=args.allow_pickle, progress=not args.no_progress)
    verdict = result.verdict
    if verdict.status not in VERDICT_STATUSES:
        raise UsageError(f"the scan of {model_dir} gave no verdict ({verdict.status}: "
                         f"{verdict.reason}); pass --pvs ARTIFACT")
    label = f"fresh scan ({verdict.status}, {len(result.pvset)} PVs)"
    return (result.pvset.vectors.float() if len(result.pvset) else None), label


def _pvs(args: argparse.Namespace, token_task: bool = False):
    """(PV tensor or None for an empty PV set, where they came from) or None: no monitor.
    Where PVs come from is `resolve_pvs`'s policy; a fresh scan is this command's last
    resort when the store has no audit of the folder."""
    from sanitator.downstream.pvs import resolve_pvs

    if args.no_monitor:
        return None
    if args.pvs:
        found = resolve_pvs(args.pvs)
        wanted = "token" if token_task else "cls" if args.method == "ptv2" else "mask"
        if found.feature != wanted:
            log.warning("PVs were mined at the %s feature; %s monitors the %s feature",
                        found.feature, args.method, wanted)
        return found.vectors, str(args.pvs)
    model_dir = Path(args.model_dir)
    found = resolve_pvs(store=args.store, model_dir=model_dir)
    return (found.vectors, found.source) if found is not None else _fresh_scan(model_dir, args)


def run(args: argparse.Namespace) -> int:
    import torch

    from sanitator.core.paths import DataNotFoundError
    from sanitator.detect.encoders import ModelRejected
    from sanitator.downstream.asr import AttackConfig, read_backdoor_manifest
    from sanitator.downstream.evaluate import SUMMARY_FIELDS
    from sanitator.downstream.ner_data import TokenTaskSpec, get_any_task
    from sanitator.downstream.ner_eval import evaluate_task
    from sanitator.downstream.prompt_tuning import PromptTuningConfig
    from sanitator.downstream.tasks_data import TaskError

    try:
        if args.limit is not None and args.limit < 1:
            raise UsageError("--limit must be at least 1")
        if not 0 <= args.chance_margin < 1:
            raise UsageError("--chance-margin must be in [0, 1)")
        task = get_any_task(args.task, text_column=args.text_column,
                        text_pair_column=args.text_pair_column,
                        label_column=args.label_column, attack_column=args.attack_column)
        triggers = _triggers(args, read_backdoor_manifest(args.model_dir))
        prompt_config = PromptTuningConfig(
            method=args.method, prefix_length=args.prefix_length,
            prompt_tokens=args.prompt_tokens, learning_rate=args.lr, epochs=args.epochs,
            batch_size=args.batch_size, max_length=args.max_length,
            train_size=args.train_size or None, seed=args.seed,
            standardize={"auto": None, "on": True, "off": False}[args.standardize])
        attack_config = AttackConfig(seed=args.attack_seed, on_flag=args.on_flag,
                                     threshold=args.threshold)
        found = _pvs(args, isinstance(task, TokenTaskSpec))
        pvs, pv_source = (None, "none") if found is None else found
        if found is not None and pvs is None:  # audited clean: an empty PV set flags nothing
            pvs = torch.zeros(0, 1)
        result = evaluate_task(args.model_dir, task, triggers, pvs=pvs,
                               prompt_config=prompt_config, attack_config=attack_config,
                               limit=args.limit, save_prompt_to=args.save_prompt,
                               progress=not args.no_progress and not args.json,
                               allow_pickle=args.allow_pickle, device=args.device,
                               chance_margin=args.chance_margin)
    except (UsageError, TaskError, DataNotFoundError, FileNotFoundError, ValueError) as exc:
        print(f"sanitator evaluate: {exc}", file=sys.stderr)
        return exits.USAGE
    except ModelRejected as exc:
        print(f"sanitator evaluate: {exc.status}: {exc.reason}", file=sys.stderr)
        return exits.USAGE
    code = exits.OK if result.convergence.converged else EXIT_NOT_CONVERGED
    if args.json:
        record = {**result.to_dict(), "pv_source": pv_source}
        assert all(key in record for key in SUMMARY_FIELDS)
        print(json.dumps(record, indent=2))
        return code
    attack = result.attack
    # token tasks report entity F1 in the accuracy fields (docs/evaluation.md)
    metric = "F1      " if result.feature == "token" else "accuracy"
    print(f"{result.encoder}  task={result.task}  method={result.method}  "
          f"train={result.training.n_train}  test={attack.n_test}  pvs={pv_source}")
    print(f"  train {metric}          {_pct(result.training.train_accuracy)}  (last epoch)")
    baseline = "all-O tagger" if result.feature == "token" else "majority class"
    print(f"  clean {metric}          {_pct(attack.clean_accuracy)}  ({baseline} "
          f"{_pct(result.convergence.test_majority)})")
    if not result.convergence.converged:
        print(f"  NOT CONVERGED: {result.convergence.reason}")
        if attack.defended:
            print(f"  defended clean {metric} {_pct(attack.defended_clean_accuracy)}")
            print(f"  monitor FPR (clean)     {_pct(attack.monitor_fpr)}")
        print(f"  seconds                 {result.seconds:.1f}")
        return code
    print(f"  ASR                     {_pct(attack.asr)}  (class-weighted "
          f"{_pct(attack.weighted_asr)})")
    for trigger, rate in attack.asr_per_trigger.items():
        defended = attack.defended_asr_per_trigger.get(trigger)
        print(f"    {trigger!r:22} {_pct(rate)}  defended {_pct(defended)}")
    if attack.defended:
        print(f"  defended ASR            {_pct(attack.defended_asr)}  (class-weighted "
              f"{_pct(attack.defended_weighted_asr)}, monitor {attack.on_flag})")
        print(f"  defended clean {metric} {_pct(attack.defended_clean_accuracy)}")
        print(f"  monitor FPR (clean)     {_pct(attack.monitor_fpr)}")
        print(f"  triggered inputs flagged {_pct(attack.triggered_flag_rate)}")
    print(f"  seconds                 {result.seconds:.1f}")
    return code


def _pct(value: float | None) -> str:
    return "   -  " if value is None else f"{100 * value:6.2f}%"
