"""The whole hostile corpus through `sanitator audit` end to end: a private Prefect API,
a Dask LocalCluster of 2 processes, the real scan (tiny budget), MLflow on sqlite, a
local Hub serving hostile repos, and a registry that cannot be listed at all.

What must hold: every folder with a config.json gets exactly one row with its exact
status, nothing prints a traceback, no payload runs, every MLflow run ends and has its
row, the unlistable registry makes the command fail and say so, and a rerun adds rows
only for retryable failures."""

import shutil
from pathlib import Path

import pytest
from hostile_corpus import VERDICTS, canaries

from sanitator.cli import main
from sanitator.pipeline.store import read_verdicts

# the smallest budget under which the real scan runs its whole path on a tiny encoder
CORPUS_SCAN = {"steps_per_seed": 10, "n_sentences": 48, "n_holdout": 16, "batch_size": 16,
               "max_seeds": 1, "parallel_seeds": 1, "hard_token_candidates": 4,
               "screen_candidates": 4}

pytestmark = pytest.mark.slow(125)  # seconds, roughly: long modules start first

# corpus cases also served by the local Hub: config problems seen in the Hub's listing,
# header problems seen only after the download
HUB_CASES = ("config-nested-array", "model-type-list", "architectures-int", "header-list",
             "index-path-traversal", "decoder")


@pytest.fixture
def hostile_hub(hostile_corpus, tmp_path):
    from sanitator.pipeline.registries.hubserver import HubServer

    root = tmp_path / "hub"
    for name in HUB_CASES:
        shutil.copytree(hostile_corpus["root"] / name, root / "hostile" / name, symlinks=True)
    shutil.copytree(hostile_corpus["root"] / "good", root / "hostile" / "bad name!")
    with HubServer(root) as hub:
        yield hub


def _mlflow_runs(store: Path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    return [run for experiment in client.search_experiments()
            for run in client.search_runs([experiment.experiment_id])]


def test_every_hostile_repo_gets_exactly_one_honest_row(hostile_corpus, hostile_hub, tmp_path,
                                                         capfd, monkeypatch):
    from flows.audit_zoo import audit_zoo

    corpus, cases = hostile_corpus["root"], {c.name: c for c in hostile_corpus["cases"]}
    store = tmp_path / "store"
    monkeypatch.setenv("HF_ENDPOINT", hostile_hub.url)
    missing = f"path:{tmp_path / 'no-such-registry'}"
    args = ["audit", "-r", f"path:{corpus}", "-r", "hf:hostile", "-r", missing,
            "--out", str(store), "--workers", "2", "--timeout", "600"]
    for key, value in CORPUS_SCAN.items():
        args += ["--set", f"{key}={value}"]
    code = main(args)
    out, err = capfd.readouterr()
    assert code == 4  # a registry could not be listed: the command fails and says so
    assert f"{missing}: RegistryError" in err and "could not be listed" in err
    assert "Traceback" not in out + err and "database is locked" not in out + err

    verdicts = read_verdicts(store)
    on_disk = sorted(p.parent.relative_to(corpus).as_posix() for p in corpus.rglob("config.json"))
    local = verdicts[verdicts["source"] == "path"]
    assert sorted(local["repo_id"]) == on_disk == sorted(cases)  # one row each, none lost
    good = local.set_index("repo_id").loc["good", "status"]
    assert good in VERDICTS
    wrong = []
    for row in local.itertuples():
        case = cases[row.repo_id]
        want = good if case.status == "verdict" else case.status  # one weights, one verdict
        if row.status != want or (case.reason and case.reason not in (row.reason or "")):
            wrong.append(f"{row.repo_id}: {row.status} {row.reason!r}")
    assert wrong == []

    hub = verdicts[verdicts["source"] == "hf"].set_index("repo_id")
    assert sorted(hub.index) == sorted(f"hostile/{n}" for n in (*HUB_CASES, "bad name!"))
    for name in HUB_CASES:
        assert hub.loc[f"hostile/{name}", "status"] == cases[name].status, name
    assert "cannot read the repo's details" in hub.loc["hostile/bad name!", "reason"]
    assert not verdicts["retryable"].any()
    assert canaries(hostile_corpus["base"], tmp_path, Path.cwd()) == []

    runs = _mlflow_runs(store)
    assert {run.info.status for run in runs} <= {"FINISHED", "FAILED"}  # none left RUNNING
    audit_ids = {run.data.tags.get("sanitator.audit_id") for run in runs} - {None}
    assert audit_ids == set(verdicts["audit_id"])  # no orphan run, no row without its run

    # a rerun (the registries that can be listed) audits only what may change on retry
    summary = audit_zoo([f"path:{corpus}", "hf:hostile"], store, n_workers=2,
                        scan_options=CORPUS_SCAN, track=False)
    assert summary["audited"] == int(verdicts["retryable"].sum()) == 0
    assert summary["already_audited"] == len(verdicts)
    assert len(read_verdicts(store)) == len(verdicts)
