"""A new sqlite MLflow database starts from the cached empty schema (pipeline/mlflow_schema)."""

import os
import sqlite3

import pytest

from sanitator.pipeline import mlflow_schema
from sanitator.pipeline.audit_tracking import BATCH_EXPERIMENT, AuditTracker, default_tracking_uri


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("SANITATOR_CACHE_DIR", str(folder))
    return folder


def _tables(path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {name for (name,) in db.execute("select name from sqlite_master "
                                               "where type = 'table'")}


def test_a_new_store_database_is_a_copy_of_the_cached_schema_and_works(cache, tmp_path):
    first, second = tmp_path / "s1", tmp_path / "s2"
    first.mkdir(), second.mkdir()
    tracker = AuditTracker(default_tracking_uri(first), first / "mlartifacts")
    templates = list(cache.glob("mlflow-*-schema.db"))
    assert len(templates) == 1  # built once, on first use
    built = templates[0].stat().st_mtime_ns
    # tables and MLflow's own version stamp, and no experiment: MLflow makes the default
    # one with this store's artifact root when it opens the copy
    assert {"experiments", "runs", "alembic_version"} <= _tables(templates[0])
    with sqlite3.connect(templates[0]) as db:
        assert db.execute("select count(*) from experiments").fetchone() == (0,)
    run_id = tracker.start_batch("b1", {"registries": "path:/x"})
    assert tracker.client.get_run(run_id).data.params["registries"] == "path:/x"

    other = AuditTracker(default_tracking_uri(second), second / "mlartifacts")
    assert templates[0].stat().st_mtime_ns == built  # reused, not rebuilt
    assert other.client.get_experiment_by_name(BATCH_EXPERIMENT) is None  # its own db
    assert other.client.get_experiment("0").name == "Default"
    umask = os.umask(0)
    os.umask(umask)
    assert (second / "mlflow.db").stat().st_mode & 0o777 == 0o666 & ~umask
    assert not [p for p in second.iterdir() if p.name.endswith(".tmp")]


def test_an_existing_database_is_never_replaced(cache, tmp_path):
    uri = default_tracking_uri(tmp_path)
    tracker = AuditTracker(uri, tmp_path / "mlartifacts")
    run_id = tracker.start_batch("b1", {"registries": "path:/x"})
    assert mlflow_schema.seed(uri) is None
    assert AuditTracker(uri).client.get_run(run_id).info.run_id == run_id


def test_a_damaged_cache_file_is_built_again_not_copied(cache, tmp_path):
    import mlflow

    cache.mkdir()
    damaged = cache / f"mlflow-{mlflow.__version__}-schema.db"
    damaged.write_bytes(b"not a database")
    tracker = AuditTracker(default_tracking_uri(tmp_path), tmp_path / "mlartifacts")
    run_id = tracker.start_batch("b1", {"registries": "path:/x"})
    assert tracker.client.get_run(run_id).info.status == "RUNNING"
    assert {"experiments", "alembic_version"} <= _tables(damaged)  # rebuilt in place


@pytest.mark.parametrize("uri", ["http://127.0.0.1:5000", "sqlite:///:memory:",
                                 "sqlite:////tmp/x.db?mode=ro", "postgresql://db/mlflow",
                                 "file:///tmp/mlruns"])
def test_only_plain_sqlite_files_are_seeded(uri):
    assert mlflow_schema.sqlite_path(uri) is None
    assert mlflow_schema.seed(uri) is None


def test_a_missing_folder_is_left_to_mlflow(cache, tmp_path):
    assert mlflow_schema.seed(default_tracking_uri(tmp_path / "absent")) is None
    assert not cache.exists()
