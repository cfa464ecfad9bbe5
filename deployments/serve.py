"""Serve the nightly audit from this process, without a work pool or worker.

    export PREFECT_API_URL=http://127.0.0.1:4200/api   # a `prefect server start` on loopback
    python deployments/serve.py [--deployment nightly-audit]

Schedule, parameters and the concurrency limit (one run at a time; a run due meanwhile
waits) come from deployments/prefect.yaml, so both ways of running the audit stay the same.
Stop with Ctrl-C.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

PREFECT_YAML = Path(__file__).with_name("prefect.yaml")


def deployment_spec(name: str, path: Path = PREFECT_YAML) -> dict[str, Any]:
    """One deployment's entry of prefect.yaml."""
    spec = yaml.safe_load(path.read_text())
    for deployment in spec.get("deployments", []):
        if deployment["name"] == name:
            return deployment
    raise SystemExit(f"no deployment named {name!r} in {path}")


def concurrency_limit(deployment: dict[str, Any]):
    """prefect.yaml's `concurrency_limit` (a number, or limit and collision strategy) as
    `to_deployment` takes it."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig

    limit = deployment.get("concurrency_limit")
    return ConcurrencyLimitConfig(**limit) if isinstance(limit, dict) else limit


def serve_arguments(deployment: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of `flow.to_deployment` equivalent to the prefect.yaml entry."""
    schedule = (deployment.get("schedules") or [{}])[0]
    return {"name": deployment["name"], "cron": schedule.get("cron"),
            "parameters": deployment.get("parameters", {}),
            "tags": deployment.get("tags", []),
            "description": deployment.get("description"),
            "version": deployment.get("version"),
            "concurrency_limit": concurrency_limit(deployment)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deployment", default="nightly-audit")
    args = parser.parse_args()
    from prefect import serve
    from prefect.flows import load_flow_from_entrypoint

    deployment = deployment_spec(args.deployment)
    root = Path(__file__).resolve().parent.parent
    flow = load_flow_from_entrypoint(str(root / deployment["entrypoint"]))
    serve(flow.to_deployment(**serve_arguments(deployment)))


if __name__ == "__main__":
    main()
