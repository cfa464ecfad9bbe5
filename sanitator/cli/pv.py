"""`sanitator pv`: PV artifacts for deployment (docs/deployment.md).

    sanitator pv pull MODEL --store DIR [--revision SHA] --out FILE
    sanitator pv show FILE
"""

from __future__ import annotations

import argparse
import json
import sys

from sanitator.cli import exits
from sanitator.core.constants import MONITOR_THRESHOLD


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "pv", help="fetch PV artifacts for deployment",
        description="PV artifacts: the PV set of an audited model revision as one safetensors "
                    "file for MonitoredEncoder.from_artifact (docs/deployment.md).")
    actions = parser.add_subparsers(dest="pv_command", metavar="ACTION")
    pull = actions.add_parser(
        "pull", help="write the PV artifact of an audited model",
        description="Find the audit of MODEL (the repo id the audit recorded) in a store and "
                    "write its PV set with deployment metadata (model, revision, feature, "
                    "threshold, config hash, audit id). A clean model gets an artifact with no "
                    "PVs. A revision the store never audited is refused unless --force.")
    pull.add_argument("model", metavar="MODEL", help="repo id as recorded by the audit")
    pull.add_argument("--store", required=True, metavar="DIR", help="the store folder")
    pull.add_argument("--out", required=True, metavar="FILE", help="the .safetensors to write")
    pull.add_argument("--revision", metavar="SHA",
                      help="the deployed revision (full or abbreviated commit sha, MLflow "
                           "v<version>-<digest>, folder digest); default: the latest audit")
    pull.add_argument("--registry", metavar="SPEC",
                      help="the registry (e.g. hf:acme) when MODEL is in several")
    pull.add_argument("--force", action="store_true",
                      help="on a revision mismatch, take the latest audit's PVs anyway")
    pull.add_argument("--threshold", type=float, default=MONITOR_THRESHOLD,
                      help="sign-agreement threshold recorded for the monitor "
                           "(default %(default)s)")
    pull.add_argument("--from", dest="pv_source", choices=["auto", "store", "mlflow"],
                      default="auto",
                      help="where the PVs come from: the store's pvs/ dataset, the audit's "
                           "MLflow run, or the store then MLflow (default)")
    pull.add_argument("--mlflow-uri", metavar="URI",
                      help="MLflow tracking URI (default: the store's mlflow.db)")
    pull.add_argument("--json", action="store_true", help="print the metadata as JSON")
    pull.set_defaults(func=run_pull)
    show = actions.add_parser("show", help="print a PV artifact's metadata")
    show.add_argument("file", metavar="FILE")
    show.set_defaults(func=run_show)
    parser.set_defaults(func=lambda args: _usage(parser))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return exits.USAGE


def _print(metadata: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(metadata, indent=2, sort_keys=True))
        return
    keys = ("model", "registry", "revision", "status", "score", "pv_count", "hidden_size",
            "feature", "threshold", "config_hash", "audit_id", "audited_at", "mlflow_run_id",
            "pv_source", "forced", "requested_revision", "note")
    for key in keys:
        if metadata.get(key) not in (None, ""):
            print(f"{key:<19}{metadata[key]}")


def run_pull(args: argparse.Namespace) -> int:
    from sanitator.guard.pv_artifact import PVArtifactError, write_pv_artifact
    from sanitator.pipeline.pv_pull import pull_pv_artifact

    try:
        artifact = pull_pv_artifact(args.store, args.model, revision=args.revision,
                                    registry=args.registry, force=args.force,
                                    threshold=args.threshold, source=args.pv_source,
                                    mlflow_uri=args.mlflow_uri)
    except PVArtifactError as exc:
        print(f"sanitator pv pull: {exc}", file=sys.stderr)
        return exits.FAILED
    path = write_pv_artifact(args.out, artifact)
    if artifact.metadata["forced"] == "true":
        print(f"sanitator pv pull: warning: {args.model} was not audited at "
              f"{args.revision}; wrote the PVs of revision {artifact.revision} (--force)",
              file=sys.stderr)
    _print(artifact.describe(), args.json)
    if not args.json:
        print(f"wrote {path}")
    return exits.OK


def run_show(args: argparse.Namespace) -> int:
    from sanitator.guard.pv_artifact import PVArtifactError, read_pv_artifact

    try:
        artifact = read_pv_artifact(args.file)
    except PVArtifactError as exc:
        print(f"sanitator pv show: {exc}", file=sys.stderr)
        return exits.FAILED
    _print(artifact.describe(), False)
    return exits.OK
