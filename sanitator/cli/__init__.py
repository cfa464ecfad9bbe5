"""The `sanitator` command: one CLI, one module per subcommand under `sanitator.cli`.

Each subcommand module defines `register(subparsers)`, which adds its parser and sets
`func(args) -> int` as the handler. Subcommands are imported lazily, so `sanitator scan`
never pays for Prefect or MLflow imports.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from sanitator import __version__
from sanitator.cli import exits

# subcommand -> (module under sanitator.cli, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "scan": ("scan", "audit one model folder for a task-agnostic backdoor"),
    "audit": ("audit", "audit whole registries (Prefect flow on Dask) into a Parquet store"),
    "verdicts": ("verdicts", "list the latest verdict per model in a store"),
    "zoo": ("zoo", "build labelled model zoos of clean and backdoored encoders"),
    "evaluate": ("evaluate", "prompt-tune a model and measure attack success with/without monitor"),
    "report": ("report", "write the supply-chain report (HTML, JSON, SARIF) from a store"),
    "pv": ("pv", "fetch PV artifacts for deployment"),
    "hub": ("hub", "serve a folder of model repos as a Hugging Face Hub mirror"),
    "demo": ("demo", "audit an embedded demo zoo end to end"),
}


def _not_built(name: str, help_text: str):
    def register(subparsers) -> None:
        parser = subparsers.add_parser(name, help=f"{help_text} [not built yet]")
        parser.set_defaults(func=lambda args: _refuse(name), accepts_anything=True)
    return register


def _refuse(name: str) -> int:
    print(f"sanitator {name}: not built yet in this version ({__version__}).", file=sys.stderr)
    return exits.USAGE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sanitator",
        description="Audit pretrained language encoders for task-agnostic backdoors "
                    "(LMSanitator): scan models, audit registries, build zoos, evaluate.")
    parser.add_argument("--version", action="version", version=f"sanitator {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-v info, -vv debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(f"sanitator.cli.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"sanitator.cli.{module_name}":
                raise
            _not_built(name, help_text)(subparsers)
        else:
            module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "accepts_anything", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return exits.USAGE
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
