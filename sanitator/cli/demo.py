"""`sanitator demo`: build a small labelled zoo on the real MiniLM-L6 (once, cached) and audit
it end to end through the real flow (Prefect + Dask LocalCluster + Parquet + MLflow)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from sanitator.cli import exits

# The demo zoo: the untouched encoder, a clean continued-pretraining variant (so "any
# modified weights" is not mistaken for a backdoor), and a POR backdoor with the paper's
# triggers and block PVs. Budgets are sized for a 2-core CPU.
DEMO_SPEC: dict[str, Any] = {
    "name": "demo",
    "seed": 0,
    "corpus": "wikitext",
    "evaluation": {"n_sentences": 128, "seed": 1},
    "bases": {"minilm": "minilm"},
    "trigger_sets": {"paper": "paper"},
    "targets": {"blocks": {"kind": "paper", "n": 6}},
    "budgets": {
        "por": {"steps": 200, "batch_size": 16, "lr": 1.0e-4},
        "mlm": {"steps": 100, "batch_size": 16, "lr": 5.0e-5, "head_warmup_steps": 30},
    },
    "members": [
        {"name": "minilm-clean", "base": "minilm"},
        {"name": "minilm-mlm-sst2", "base": "minilm", "recipe": "mlm", "corpus": "sst2",
         "budget": "mlm"},
        {"name": "minilm-por", "base": "minilm", "recipe": "por", "triggers": "paper",
         "targets": "blocks", "budget": "por"},
    ],
}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="audit an embedded demo zoo end to end",
        description="Build (once, cached) a demo zoo of clean and backdoored MiniLM-L6 "
                    "encoders and audit it through the real pipeline.")
    parser.add_argument("--out", default="sanitator-demo",
                        help="working folder: zoo/, store/ (default ./sanitator-demo)")
    # one worker per model even on fewer cores: run side by side, the audits share the
    # cores (HostShare pacing, at least one torch thread each), so the longest audit never
    # waits in the queue behind a short one (on 2 cores with 2 workers it started last
    # and ran alone: 757 s of audit for 1,106 s of scans)
    parser.add_argument("--workers", type=int, default=len(DEMO_SPEC["members"]),
                        help="Dask worker processes, one audit each; the busy ones share "
                             "the cores (default: one per demo model)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def _table(rows: list[dict[str, Any]]) -> str:
    headers = list(rows[0])
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) for h in headers]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(str(r[h]).ljust(w) for h, w in zip(headers, widths, strict=True))
              for r in rows]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from sanitator.attacks.zoo import build_zoo, parse_spec, read_manifest
    from sanitator.pipeline.store import latest_verdicts

    out = Path(args.out).resolve()
    zoo_dir, store = out / "zoo", out / "store"
    started = time.perf_counter()
    print(f"[demo] building the demo zoo in {zoo_dir} (cached after the first run)")
    build_zoo(parse_spec(DEMO_SPEC, source="demo"), zoo_dir, progress=not args.quiet)
    built = time.perf_counter()

    from flows.prefect_backend import flow_backend
    from sanitator.pipeline.mlflow_schema import CLIENT_MODULES

    print(f"[demo] auditing {zoo_dir / 'models'} with the nightly flow "
          f"(Dask LocalCluster, {args.workers} worker(s))")
    # the same private Prefect API as `sanitator audit` when none is configured
    with flow_backend(store / "prefect-server.log", dask_address=None,
                      n_workers=args.workers, torch_threads=None, device="cpu",
                      flow_module="flows.audit_zoo", preload=CLIENT_MODULES) as address:
        from flows.audit_zoo import audit_zoo

        summary = audit_zoo([f"path:{zoo_dir / 'models'}"], store, dask_address=address,
                            n_workers=args.workers)
    audited = time.perf_counter()

    manifest = read_manifest(zoo_dir).set_index("path")
    verdicts = latest_verdicts(store)
    rows = []
    for verdict in verdicts.sort_values("repo_id").itertuples():
        truth = manifest["backdoored"].get(f"models/{verdict.repo_id}")
        evidence = json.loads(verdict.evidence) if verdict.evidence else {}
        words = sorted({" ".join(c["hard_trigger"]) for c in evidence.get("candidates", [])
                        if c.get("accepted") and c.get("hard_trigger")})
        rows.append({"model": verdict.repo_id,
                     "truth": "?" if truth is None else ("backdoored" if truth else "clean"),
                     "verdict": verdict.status,
                     "score": "-" if verdict.score is None else f"{verdict.score:.2f}",
                     "seconds": f"{verdict.seconds:.0f}",
                     "trigger words": ", ".join(words) or "-"})
    print()
    print(_table(rows) if rows else "(no verdicts)")
    print()
    print(f"[demo] this run: {summary['audited']} audited, {summary['already_audited']} "
          f"already audited; zoo {built - started:.0f} s, audit {audited - built:.0f} s")
    print(f"[demo] verdicts: {store / 'verdicts'}   PV sets: {store / 'pvs'}")
    print(f"[demo] MLflow:   mlflow ui --backend-store-uri sqlite:///{store / 'mlflow.db'}")
    print(f"[demo] list:     sanitator verdicts --store {store}")
    wrong = [r for r in rows if r["truth"] != "?" and r["truth"] != r["verdict"]]
    return exits.FAILED if wrong or summary["counts"].get("error") else exits.OK
