"""`sanitator zoo`: build labelled model zoos and look at their ground truth.

  sanitator zoo build SPEC.yaml OUT/   build (or resume) every member, write manifest.parquet
  sanitator zoo plan SPEC.yaml         list the members a spec expands to, build nothing
  sanitator zoo show OUT/              print the manifest as a table (or --json)
"""

from __future__ import annotations

import argparse
import json
import sys

from sanitator.cli import exits

SHOW_COLUMNS = ("name", "base", "recipe", "attack", "backdoored", "n_pvs", "triggers",
                "build_seconds", "attack_success", "clean_cosine")


def register(subparsers) -> None:
    parser = subparsers.add_parser("zoo", help="build labelled model zoos of clean and "
                                   "backdoored encoders", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="zoo_command", metavar="ACTION", required=True)

    build = actions.add_parser("build", help="build or resume a zoo from a YAML spec")
    build.add_argument("spec", help="zoo spec (YAML, see docs/attacks.md)")
    build.add_argument("out", help="zoo folder (members go to OUT/models/NAME)")
    build.add_argument("--only", nargs="+", metavar="NAME", help="build only these members")
    build.add_argument("--no-eval", action="store_true",
                       help="skip attack-success / clean-cosine evaluation")
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    build.set_defaults(func=_build)

    plan = actions.add_parser("plan", help="list the members a spec expands to")
    plan.add_argument("spec")
    plan.set_defaults(func=_plan)

    show = actions.add_parser("show", help="print a zoo's manifest")
    show.add_argument("out", help="zoo folder")
    show.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    show.set_defaults(func=_show)


def _build(args: argparse.Namespace) -> int:
    from sanitator.attacks.zoo import BaseUnavailable, SpecError, build_zoo, load_spec

    try:
        spec = load_spec(args.spec)
        report = build_zoo(spec, args.out, only=args.only, evaluate=not args.no_eval,
                           progress=not args.quiet)
    except (SpecError, BaseUnavailable) as exc:
        print(f"sanitator zoo build: {exc}", file=sys.stderr)
        return exits.USAGE
    print(f"built {len(report.built)}, already built {len(report.skipped)}, "
          f"base unavailable {len(report.unavailable)}; manifest: {report.manifest}")
    if report.published:
        print(f"bases published under {args.out}/bases: {', '.join(report.published)}")
    for name, success in report.weak:
        print(f"sanitator zoo build: warning: {name} is labelled backdoored but its attack "
              f"took on only {success:.2f} of held-out sentences; change its options and "
              f"rebuild before judging a detector on it", file=sys.stderr)
    return exits.OK


def _plan(args: argparse.Namespace) -> int:
    from sanitator.attacks.zoo import SpecError, load_spec

    try:
        spec = load_spec(args.spec)
    except SpecError as exc:
        print(f"sanitator zoo plan: {exc}", file=sys.stderr)
        return exits.USAGE
    for member in spec.members:
        triggers = ",".join(member.triggers) if member.triggers else "-"
        declared = member.base_id if member.declare_base != "none" else "-"
        print(f"{member.name}\t{member.base_ref}\t{member.recipe}\t{triggers}\t"
              f"seed={member.seed}\tdeclares={declared} ({member.declare_base})")
    print(f"{len(spec.members)} members", file=sys.stderr)
    return exits.OK


def _show(args: argparse.Namespace) -> int:
    from sanitator.attacks.zoo import read_manifest

    try:
        frame = read_manifest(args.out)
    except FileNotFoundError as exc:
        print(f"sanitator zoo show: {exc}", file=sys.stderr)
        return exits.USAGE
    if args.json:
        for row in frame.drop(columns=["pvs"]).to_dict(orient="records"):
            print(json.dumps({k: (v.tolist() if hasattr(v, "tolist") else v)
                              for k, v in row.items()}, default=str))
        return exits.OK
    table = frame[list(SHOW_COLUMNS)].copy()
    table["triggers"] = table["triggers"].map(lambda t: ",".join(t) if len(t) else "-")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return exits.OK
