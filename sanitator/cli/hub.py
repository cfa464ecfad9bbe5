"""`sanitator hub serve`: a Hub-compatible mirror of a folder of model repos (docs/pipeline.md)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sanitator.cli import exits


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "hub", help="serve a folder of model repos as a Hugging Face Hub mirror",
        description="Hub-compatible mirror for air-gapped sites and tests.")
    actions = parser.add_subparsers(dest="hub_command", metavar="ACTION", required=True)
    serve = actions.add_parser(
        "serve", help="serve ROOT/ORG/NAME folders to the real huggingface_hub client",
        description="Serve ROOT/ORG/NAME/<files> with the read-only Hub endpoints "
                    "huggingface_hub and transformers use; point clients at it with "
                    "HF_ENDPOINT=http://HOST:PORT. Runs until interrupted.")
    serve.add_argument("root", type=Path, help="folder of ORG/NAME model repos")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    serve.add_argument("--port", type=int, default=8765, help="port (default %(default)s)")
    serve.add_argument("--token", default=os.environ.get("SANITATOR_HUB_TOKEN"),
                       help="require 'Authorization: Bearer TOKEN' (env SANITATOR_HUB_TOKEN)")
    serve.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    if not args.root.is_dir():
        print(f"sanitator hub serve: {args.root} is not a folder", file=sys.stderr)
        return exits.USAGE
    import logging

    from sanitator.pipeline.registries.hubserver import serve

    logging.getLogger("sanitator.pipeline.registries.hubserver").setLevel(logging.INFO)
    return serve(args.root, args.host, args.port, token=args.token)
