"""The `sanitator` command: one CLI, one module per subcommand under `sanitator.cli`.

Each subcommand module defines `register(subparsers)`, which adds its parser and sets
`func(args) -> int` as the handler. Subcommands are imported lazily, so `sanitator scan`
never pays for Prefect or MLflow imports.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import logging
import os
import sys
import threading

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


def console() -> None:
    """The `sanitator` command: `main()`, then a quick exit. Python's own exit tears down
    every module after the exit handlers (torch, Prefect, MLflow, pandas: about 2 s of one
    core on a 2-core machine, after the work is done and its results are written); it has
    no effect outside the process, so the command runs the exit handlers (log handlers,
    Prefect's and MLflow's flushes, multiprocessing's children) and flushes its streams,
    then leaves without it. A non-daemon thread still running gets Python's normal exit,
    which waits for it."""
    code = main()
    if any(thread is not threading.main_thread() and not thread.daemon and thread.is_alive()
           for thread in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing to write to
            stream.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    console()
