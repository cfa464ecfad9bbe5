"""deployments/: the prefect.yaml entries load their flows with valid parameters, and the
serve script builds the same deployment."""

from pathlib import Path

import pytest
import yaml
from scripts_support import load_script

ROOT = Path(__file__).resolve().parents[2]
PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"


@pytest.fixture(scope="module")
def deployments():
    return yaml.safe_load(PREFECT_YAML.read_text())["deployments"]


def test_every_deployment_loads_its_flow_with_valid_parameters(deployments):
    from prefect.flows import load_flow_from_entrypoint

    assert [d["name"] for d in deployments] == ["nightly-audit", "weekly-evaluation",
                                               "nightly-report"]
    for deployment in deployments:
        flow = load_flow_from_entrypoint(str(ROOT / deployment["entrypoint"]))
        validated = flow.validate_parameters(deployment["parameters"])
        for key, value in deployment["parameters"].items():
            assert validated[key] == value, key
        assert deployment["work_pool"]["name"] == "sanitator"


def test_nightly_schedule_is_a_valid_cron(deployments):
    from prefect.client.schemas.schedules import CronSchedule

    schedule = deployments[0]["schedules"][0]
    assert CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"]).cron == "0 2 * * *"


def test_serve_builds_the_same_deployment(deployments):
    from flows.audit_zoo import audit_zoo_flow

    serve = load_script("deployments/serve.py", "serve")
    arguments = serve.serve_arguments(serve.deployment_spec("nightly-audit", PREFECT_YAML))
    assert arguments["parameters"] == deployments[0]["parameters"]
    runner = audit_zoo_flow.to_deployment(**arguments)
    assert runner.name == "nightly-audit"
    # one run at a time; one due meanwhile waits its turn (the store's lease does the rest)
    assert runner.concurrency_limit == 1
    assert runner.concurrency_options.collision_strategy == "ENQUEUE"
    assert runner.schedules[0].schedule.cron == "0 2 * * *"
    assert runner.parameters["out"] == "/srv/sanitator/store"
    with pytest.raises(SystemExit, match="no deployment"):
        serve.deployment_spec("nope", PREFECT_YAML)
