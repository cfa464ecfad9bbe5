"""The weekly evaluation flow end to end: real Prefect, a Dask LocalCluster worker, MLflow
(sqlite) and the Parquet store, on a planted backdoor and the clean base (2-layer MiniLM-L6)."""

import datetime as dt
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from evaluation_support import planted_backdoor, write_toy_task
from scripts_support import load_script

from sanitator.downstream.runs import DEFAULT_TRIGGERS, read_evaluations

ROOT = Path(__file__).resolve().parents[2]
PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"
FAST = {"epochs": 3, "prefix_length": 8, "batch_size": 16, "max_length": 32,
        "train_size": 160}

pytestmark = pytest.mark.slow(120)  # seconds, roughly: long modules start first


@pytest.fixture(scope="module")
def audited_store(tmp_path_factory, minilm_2layer):
    """Two model folders with their audits in a store: the planted backdoor (its PVs) and
    the clean base, MiniLM-L6 cut to 2 layers (no PVs)."""
    from sanitator.detect.results import PVSet, Verdict
    from sanitator.pipeline.audit import AuditOutcome, AuditRequest, pv_rows, verdict_row
    from sanitator.pipeline.registries.local import LocalRegistry
    from sanitator.pipeline.store import write_rows

    root = tmp_path_factory.mktemp("zoo")
    backdoored = planted_backdoor(str(minilm_2layer))
    shutil.copytree(backdoored, root / "backdoored")
    shutil.copytree(minilm_2layer, root / "clean")
    store = tmp_path_factory.mktemp("store")
    when = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)
    pvs = torch.tensor(json.loads((backdoored / "backdoor.json").read_text())["pvs"])
    for ref in LocalRegistry(root).crawl():
        request = AuditRequest(f"audit-{ref.repo_id}", ref, {}, "hash")
        if ref.repo_id == "backdoored":
            outcome = AuditOutcome(Verdict("backdoored", score=0.99),
                                   PVSet(pvs, torch.zeros(2, 7, 384)))
        else:
            outcome = AuditOutcome(Verdict("clean", score=0.01))
        write_rows(store, "pvs", pv_rows(request, outcome, audited_at=when),
                   partition="2026-05-01", name=request.audit_id)
        write_rows(store, "verdicts", [verdict_row(request, outcome, audited_at=when)],
                   partition="2026-05-01", name=request.audit_id)
    task = write_toy_task(tmp_path_factory.mktemp("toy"))
    return {"store": store, "task": {"task": str(task), "text_column": "review",
                                     "label_column": "y"}}


@pytest.fixture(scope="module")
def first_run(audited_store):
    from flows.evaluate_asr import evaluate_asr

    return evaluate_asr(audited_store["store"], tasks=[audited_store["task"]], limit=30,
                        prompt_options=FAST, n_workers=1, torch_threads=1)


def test_every_audited_encoder_is_evaluated_into_the_store(first_run, audited_store):
    assert first_run["evaluated"] == 2 and not first_run["errors"]
    rows = {row["encoder"]: row for row in read_evaluations(audited_store["store"])
            .to_dict("records")}
    backdoored, clean = rows["backdoored"], rows["clean"]
    assert backdoored["attack"] == "toy-por" and list(backdoored["triggers"]) == ["cf", "pt"]
    assert backdoored["audit_id"] == "audit-backdoored" and backdoored["n_pvs"] == 2
    assert backdoored["asr"] >= 0.9 and backdoored["defended_asr"] <= 0.05
    assert backdoored["monitor_fpr"] <= 0.05 and backdoored["clean_accuracy"] >= 0.8
    assert backdoored["converged"] and pd.isna(backdoored["reason"])
    assert backdoored["train_accuracy"] > backdoored["majority_rate"] + 0.1
    per_trigger = list(backdoored["per_trigger"])
    assert [item["trigger"] for item in per_trigger] == ["cf", "pt"]
    assert all(item["defended_asr"] <= backdoored["defended_asr"] for item in per_trigger)
    assert max(item["asr"] for item in per_trigger) <= backdoored["asr"]
    summary_rows = {r["encoder"]: r for r in first_run["results"]}
    assert summary_rows["backdoored"]["per_trigger"] == per_trigger
    assert clean["attack"] == "none" and list(clean["triggers"]) == list(DEFAULT_TRIGGERS)
    assert clean["n_pvs"] == 0 and clean["monitor_fpr"] == 0.0
    assert clean["defended_clean_accuracy"] == clean["clean_accuracy"]
    for row in rows.values():
        assert row["status"] == "ok" and row["method"] == "ptv2"
        assert row["task"] == Path(audited_store["task"]["task"]).name
        assert row["seconds"] > 0 and row["n_test"] == 30


def test_each_evaluation_has_an_mlflow_run_with_the_trained_prompt(first_run, audited_store):
    from mlflow import MlflowClient

    from sanitator.pipeline.audit_tracking import default_tracking_uri

    client = MlflowClient(default_tracking_uri(audited_store["store"]))
    for row in read_evaluations(audited_store["store"]).to_dict("records"):
        run = client.get_run(row["mlflow_run_id"])
        assert run.data.metrics["asr"] == pytest.approx(row["asr"])
        for item in row["per_trigger"]:
            assert run.data.metrics[f"asr.{item['trigger']}"] == pytest.approx(item["asr"])
        assert run.data.metrics["converged"] == 1.0
        assert run.data.params["config.prompt.prefix_length"] == "8"
        names = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
        assert {"prompt.safetensors", "evaluation.json"} <= names


def test_a_second_run_skips_pairs_already_evaluated(first_run, audited_store):
    from flows.evaluate_asr import evaluate_asr

    again = evaluate_asr(audited_store["store"], tasks=[audited_store["task"]], limit=30,
                         prompt_options=FAST, n_workers=1, torch_threads=1)
    assert again["evaluated"] == 0 and again["already_evaluated"] == 2
    assert len(read_evaluations(audited_store["store"])) == 2


def test_bad_task_fails_before_any_work(audited_store):
    from flows.evaluate_asr import evaluate_asr

    with pytest.raises(Exception, match="unknown task 'nope'"):
        evaluate_asr(audited_store["store"], tasks=["nope"])


def test_weekly_deployment_loads_with_valid_parameters():
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint

    (deployment,) = [d for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]
                     if d["name"] == "weekly-evaluation"]
    flow = load_flow_from_entrypoint(str(ROOT / deployment["entrypoint"]))
    validated = flow.validate_parameters(deployment["parameters"])
    assert validated["tasks"] == ["sst2", "sms_spam"]
    schedule = deployment["schedules"][0]
    assert CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"]).cron == "0 4 * * 0"
    serve = load_script("deployments/serve.py", "serve")
    arguments = serve.serve_arguments(serve.deployment_spec("weekly-evaluation",
                                                            PREFECT_YAML))
    runner = flow.to_deployment(**arguments)
    assert runner.name == "weekly-evaluation"
    assert runner.schedules[0].schedule.cron == "0 4 * * 0"
