"""`sanitator scan MODEL_DIR`: audit one model folder and print the verdict."""

from __future__ import annotations

import argparse
import json
import sys

from sanitator.cli import exits
from sanitator.core.status import SCANNED_STATUSES, VERDICT_STATUSES, Status
from sanitator.detect.config import PRECISIONS


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "scan", help="audit one model folder for a task-agnostic backdoor",
        description="Mine predefined attack vectors (PVs) in one encoder folder and decide "
                    "whether it carries a task-agnostic backdoor.")
    parser.add_argument("model_dir", help="a Hugging Face model folder or HF cache snapshot")
    parser.add_argument("--mode", choices=["detect", "search"], default="detect",
                        help="detect: stop at the first accepted PV; search: collect every "
                             "unique PV within the seed budget (default: detect)")
    parser.add_argument("--preset", choices=["fast", "faithful"], default="fast",
                        help="fast: batched schedule, calibrated rule (default); faithful: "
                             "the paper's schedule and decision rule")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    parser.add_argument("--seed", type=int, default=1, help="first seed (default 1)")
    parser.add_argument("--max-seeds", type=int, help="seed budget (preset default)")
    parser.add_argument("--feature", choices=["cls", "mask", "token", "pooler"],
                        help="scan only this feature (default: every feature a prompt-tuned "
                             "head reads: cls, and mask when the tokenizer has one)")
    parser.add_argument("--complete", action="store_true",
                        help="detect mode: once a backdoor is found, keep searching until the "
                             "PV set saturates (what audits do, so the artifact is complete)")
    parser.add_argument("--corpus", help="clean sentences: a corpus name or a .parquet/.txt "
                                         "file (default WikiText sentences)")
    bases = parser.add_mutually_exclusive_group()
    bases.add_argument("--reference", action="append", default=[], metavar="DIR",
                       help="a clean base the model may derive from (repeatable; the "
                            "installed MiniLM-L6 is always tried): its first layer's change "
                            "names candidate trigger tokens")
    bases.add_argument("--no-reference", action="store_true",
                       help="use no clean reference at all (no declared, configured or "
                            "installed base): what the scan finds without one")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="the encoder's matmuls (default auto: bfloat16 where the "
                             "device computes it natively, float32 elsewhere; faithful: "
                             "float32)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow pickle weights (loaded with weights_only=True)")
    parser.add_argument("--pvs-out", help="write the PV set to this .safetensors file")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--fail-on-backdoor", action="store_true",
                        help=f"exit {exits.BACKDOORED} when the verdict is backdoored, "
                             f"{exits.INCONCLUSIVE} when it is inconclusive (not shown clean)")
    parser.epilog = (f"exit status: {exits.OK} a verdict, {exits.FAILED} no verdict (error, "
                     f"unsupported), {exits.USAGE} bad arguments, {exits.BACKDOORED} "
                     f"backdoored and {exits.INCONCLUSIVE} inconclusive (--fail-on-backdoor)")
    parser.set_defaults(func=run)


def _overrides(args: argparse.Namespace) -> dict:
    overrides = {"mode": args.mode, "seed": args.seed}
    if args.max_seeds is not None:
        overrides["max_seeds"] = args.max_seeds
    if args.feature:
        overrides["feature"] = args.feature
    if args.corpus:
        overrides["corpus"] = args.corpus
    if args.complete:
        overrides["complete"] = True
    if args.precision:
        overrides["precision"] = args.precision
    if args.no_reference:
        overrides["no_reference"] = True
    if args.reference:
        from sanitator.detect.reference import with_known

        overrides["references"] = with_known(args.reference)
    return overrides


def run(args: argparse.Namespace) -> int:
    from sanitator.detect.config import ScanConfig
    from sanitator.detect.results import PVSet, Verdict
    from sanitator.detect.scan import ScanResult, scan_model

    config = ScanConfig.from_preset(args.preset, **_overrides(args))
    progress = not (args.quiet or args.json) and sys.stderr.isatty()
    try:
        result = scan_model(args.model_dir, config, device=args.device,
                            allow_pickle=args.allow_pickle, progress=progress)
    except Exception as exc:  # out of memory: still one object, with the reason
        result = ScanResult(Verdict(Status.ERROR, reason=f"{type(exc).__name__}: {exc}"),
                            PVSet.empty(0))
    verdict, pvset = result.verdict, result.pvset
    # an inconclusive scan has no PV set: an empty file would read as a clean model's
    if args.pvs_out and verdict.status in VERDICT_STATUSES:
        pvset.save(args.pvs_out, {"config_hash": config.config_hash(),
                                  "model": str(args.model_dir)})
    payload = {
        "status": verdict.status,
        "score": verdict.score,
        "pvs": pvset.vectors.tolist() if len(pvset) else [],
        "trigger_tokens": pvset.trigger_tokens,
        "seeds_tried": verdict.seeds_tried,
        "seconds": verdict.seconds,
        "reason": verdict.reason,
        # what the verdict rests on: the reference used (source, id, revision, distance),
        # every candidate judged and the confirmations spent (docs/method.md)
        "evidence": verdict.evidence or {},
    }
    if args.json:
        print(json.dumps(payload))
    else:
        print(f"{args.model_dir}: {verdict.status}"
              + (f" (score {verdict.score:.3f})" if verdict.score is not None else ""))
        if verdict.reason:
            print(f"  reason: {verdict.reason}")
        for index, tokens in enumerate(pvset.trigger_tokens):
            print(f"  PV {index + 1}: fired by {' '.join(tokens)!r}")
        print(f"  seeds tried {verdict.seeds_tried}, {verdict.seconds:.1f} s, "
              f"config {config.config_hash()}")
    if verdict.status not in SCANNED_STATUSES:
        return exits.FAILED
    return exits.gate([verdict.status]) if args.fail_on_backdoor else exits.OK
