"""`sanitator audit`: run the registry audit flow (Prefect on Dask) into a Parquet store."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from sanitator.cli import exits

EXIT_BACKDOORED = exits.BACKDOORED
EXIT_REGISTRY_UNAVAILABLE = exits.PARTIAL
EXIT_BUSY = exits.BUSY
PREFECT_LOG = "prefect-server.log"  # the private Prefect API's output, in the store


def parse_assignment(text: str) -> tuple[str, Any]:
    """KEY=VALUE with VALUE read as JSON when it parses (numbers, true, null), else text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "audit", help="audit whole registries (Prefect flow on Dask) into a Parquet store",
        description="Crawl registries, audit every model not yet audited with this scan "
                    "config, and write verdicts/ and pvs/ (Parquet) plus MLflow runs. "
                    "See docs/pipeline.md.")
    parser.add_argument("--registry", "-r", action="append", required=True, metavar="SPEC",
                        help="hf:ORG[?search=..&filter=..&limit=N] | mlflow:URI[?name=LIKE] | "
                             "path:DIR (repeatable)")
    parser.add_argument("--out", default="sanitator-store", metavar="DIR",
                        help="the store folder (verdicts/, pvs/, mlflow.db); default %(default)s")
    parser.add_argument("--dask", metavar="ADDRESS",
                        help="scheduler address (tcp://host:8786); default: a LocalCluster")
    parser.add_argument("--workers", type=int, default=2,
                        help="LocalCluster worker processes (default %(default)s)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch threads per worker (default: cores / workers)")
    parser.add_argument("--mlflow-uri", metavar="URI",
                        help="MLflow tracking URI (default: sqlite in the store folder)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    parser.add_argument("--preset", default="fast", choices=["fast", "faithful"],
                        help="scan preset (default %(default)s)")
    parser.add_argument("--set", dest="options", action="append", default=[],
                        type=parse_assignment, metavar="KEY=VALUE",
                        help="override a scan option, e.g. --set steps_per_seed=60")
    bases = parser.add_mutually_exclusive_group()
    bases.add_argument("--reference", action="append", default=[], metavar="DIR|hf:ORG/NAME",
                       help="a clean base the audited models may derive from, a folder or "
                            "a Hub repo (hf:ORG/NAME[@REV], fetched from HF_ENDPOINT) "
                            "(repeatable; the installed MiniLM-L6 is always tried; bases "
                            "the models declare and their siblings come first): the scan "
                            "diffs each model against it (docs/pipeline.md, References)")
    bases.add_argument("--no-reference", action="store_true",
                       help="scan with no clean reference at all (no declared base, "
                            "sibling, configured or installed base)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (default cpu)")
    parser.add_argument("--timeout", type=float, default=3600.0, metavar="SECONDS",
                        help="per-model timeout (default %(default)s; 0 = none)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="also audit pickle-only models (torch.load weights_only=True)")
    parser.add_argument("--max-params", type=int, metavar="N",
                        help="skip models with more parameters than N")
    parser.add_argument("--force", action="store_true",
                        help="audit again even what is already audited with this config")
    parser.add_argument("--work-dir", metavar="DIR",
                        help="where workers download models (default: system temp)")
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="wait up to SECONDS for another audit of the same registry into "
                             "this store to end (default 0: leave the registry to it and "
                             f"exit {EXIT_BUSY})")
    parser.add_argument("--scanner", default=None, metavar="MODULE:FUNCTION",
                        help="a scanner with scan_model's signature (default: "
                             "sanitator.detect.scan:scan_model)")
    parser.add_argument("--json", action="store_true",
                        help="print the summary as JSON (and draw no progress lines)")
    parser.add_argument("--fail-on-backdoor", action="store_true",
                        help=f"exit {EXIT_BACKDOORED} when a backdoored model is found, "
                             f"else {exits.INCONCLUSIVE} when an inconclusive one is")
    parser.epilog = (f"exit status: 0 done, 1 the flow failed, 2 bad arguments, "
                     f"{EXIT_BACKDOORED} backdoored model found (--fail-on-backdoor), "
                     f"{exits.INCONCLUSIVE} an inconclusive one and none backdoored "
                     "(--fail-on-backdoor), "
                     f"{EXIT_REGISTRY_UNAVAILABLE} a registry could not be listed (the others "
                     f"were audited), {EXIT_BUSY} another audit of this store held a registry "
                     "(it was left to that audit)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sanitator.pipeline.registries import RegistryError, parse_registry

    try:
        for spec in args.registry:
            parse_registry(spec)
    except RegistryError as exc:
        print(f"sanitator audit: {exc}", file=sys.stderr)
        return exits.USAGE
    from sanitator.detect.config import ScanConfig

    options = dict(args.options)
    if args.no_reference:
        options["no_reference"] = True
    catalog = [r for r in args.reference if r.startswith("hf:")]
    folders = [r for r in args.reference if not r.startswith("hf:")]
    if folders:
        from sanitator.detect.reference import with_known

        options["references"] = with_known(folders)
    from sanitator.pipeline.registries.cards import is_repo_id

    bad = [r for r in catalog if not is_repo_id(r[3:]) or "/" not in r[3:].split("@")[0]]
    if bad:
        print(f"sanitator audit: --reference {bad[0]}: expected hf:ORG/NAME[@REVISION]",
              file=sys.stderr)
        return exits.USAGE
    try:
        ScanConfig.from_preset(args.preset, **options)
    except (TypeError, ValueError) as exc:
        print(f"sanitator audit: bad scan option: {exc}", file=sys.stderr)
        return exits.USAGE

    from sanitator.pipeline import lease

    # one audit per store and registry (sanitator/pipeline/lease.py): taken here, before
    # the Prefect API and the cluster start, so an overlapping run costs nothing; the
    # flow takes the same leases again (shared within this process)
    store = Path(args.out).resolve()
    holding = lease.hold(store, [parse_registry(spec).spec for spec in args.registry],
                         wait=args.wait)
    if not holding.held:
        for spec, reason in holding.busy_reasons(store).items():
            print(f"sanitator audit: {spec} is left to another audit: {reason}",
                  file=sys.stderr)
        print(f"sanitator audit: nothing audited; every registry is being audited into "
              f"{store} by another run (wait for it with --wait SECONDS)", file=sys.stderr)
        return EXIT_BUSY
    try:
        return _run_flow(args, options, catalog)
    finally:
        holding.release()


def _run_flow(args: argparse.Namespace, options: dict[str, Any], catalog: list[str]) -> int:
    from contextlib import nullcontext

    from flows.prefect_backend import flow_backend
    from sanitator.pipeline import progress
    from sanitator.pipeline.mlflow_schema import CLIENT_MODULES

    verbose = getattr(args, "verbose", 0)
    bars = None
    if not args.json and sys.stderr.isatty():  # one line per registry, redrawn in place
        from sanitator.pipeline.registries import parse_registry

        bars = progress.TtyBars(sys.stderr, progress.AuditProgress(
            waiting=[parse_registry(spec).spec for spec in args.registry]))
        if not verbose:  # Prefect's INFO lines (its task states, the per-model log
            # lines) would scroll the bars away: they still reach the Prefect API
            quiet_console_logging()
    unavailable = busy = None
    extra = {"scanner": args.scanner} if args.scanner else {}
    try:
        # without a configured Prefect API, a private one (docs/pipeline.md, Bookkeeping);
        # without --dask, a LocalCluster started beside it
        with flow_backend(Path(args.out) / PREFECT_LOG, dask_address=args.dask,
                          n_workers=args.workers, torch_threads=args.threads,
                          device=args.device, flow_module="flows.audit_zoo",
                          preload=() if args.no_mlflow else CLIENT_MODULES,
                          quiet=not verbose) as address:
            from flows.audit_zoo import RegistryBusy, RegistryUnavailable, audit_zoo

            if bars is not None:
                quiet_console_logging()  # Prefect has set its handlers up by now
            with (progress.listening(bars) if bars else nullcontext()), \
                    (bars or nullcontext()):
                try:
                    summary = audit_zoo(
                        args.registry, args.out, dask_address=address,
                        n_workers=args.workers, torch_threads=args.threads,
                        mlflow_uri=args.mlflow_uri, track=not args.no_mlflow,
                        preset=args.preset, scan_options=options, device=args.device,
                        per_model_timeout=args.timeout or None,
                        allow_pickle=args.allow_pickle, max_params=args.max_params,
                        force=args.force, work_dir=args.work_dir,
                        reference_catalog=catalog or None, **extra)
                except RegistryUnavailable as exc:  # the other registries were audited
                    summary, unavailable = exc.summary, exc
                except RegistryBusy as exc:  # another audit took a registry meanwhile
                    summary, busy = exc.summary, exc
    except Exception as exc:  # the flow failed as a whole (bad store, no cluster, ...)
        print(f"sanitator audit: the audit flow failed: {exc}", file=sys.stderr)
        return exits.FAILED
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(format_summary(summary))
    if unavailable is not None:
        print(f"sanitator audit: {unavailable}", file=sys.stderr)
        return EXIT_REGISTRY_UNAVAILABLE
    if busy is not None:
        print(f"sanitator audit: {busy}", file=sys.stderr)
        return EXIT_BUSY
    if args.fail_on_backdoor:
        return exits.gate(status for status, n in summary["counts"].items() if n)
    return exits.OK


def quiet_console_logging() -> None:
    """INFO records stay off the terminal (the progress lines are drawn there): this
    process's console handlers and, through the environment, the Dask workers' Prefect
    console handler show warnings and errors only."""
    import logging
    import os

    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    for handler in logging.getLogger().handlers:
        if handler.level < logging.WARNING:
            handler.setLevel(logging.WARNING)


def format_summary(summary: dict[str, Any]) -> str:
    counts = ", ".join(f"{n} {status}" for status, n in summary["counts"].items() if n)
    lines = [f"audited {summary['audited']} model(s) ({counts or 'nothing new'}); "
             f"{summary['already_audited']} already audited; store: {summary['store']}"]
    lines += [f"  BACKDOORED {b['repo_id']}@{b['revision'][:12]} ({b['registry']}) "
              f"score={b['score']} pvs={b['pv_count']}" for b in summary["backdoored"]]
    lines += [f"  INCONCLUSIVE {i['repo_id']}@{i['revision'][:12]} ({i['registry']}): "
              f"{i['reason']}" for i in summary.get("inconclusive", [])]
    lines += [f"  error {e['repo_id']} ({e['registry']}): {e['reason']}"
              for e in summary["errors"]]
    if summary.get("more_errors"):
        lines.append(f"  ... and {summary['more_errors']} more error(s): sanitator verdicts "
                     f"--store {summary['store']} --status error")
    lines += [f"  registry {spec} could not be listed: {reason}"
              for spec, reason in summary["registry_errors"].items()]
    lines += [f"  registry {spec} was left to another audit: {reason}"
              for spec, reason in summary.get("registry_busy", {}).items()]
    recovered = summary.get("recovered") or {}
    lines += [f"  took over the lease of {spec} {how}"
              for spec, how in recovered.get("leases", {}).items()]
    lines += [f"  closed MLflow batch run {run_id}, left RUNNING by a dead audit, as KILLED"
              for run_id in recovered.get("mlflow_runs_killed", [])]
    return "\n".join(lines)
