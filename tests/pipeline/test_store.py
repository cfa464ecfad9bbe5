import datetime as dt

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import torch

from sanitator.detect.results import PVSet
from sanitator.pipeline import store


def _verdict(audit_id: str, repo: str, status: str = "clean", *, day: int = 1,
             revision: str = "r1", retryable: bool = False, **extra) -> dict:
    row = {"audit_id": audit_id, "audited_at": dt.datetime(2026, 5, day, 3, tzinfo=dt.UTC),
           "source": "path", "registry": "path:/zoo", "repo_id": repo, "revision": revision,
           "status": status, "pv_count": 0, "config_hash": "c" * 16,
           "package_version": "0.1.0", "retryable": retryable}
    row.update(extra)
    return row


def _write(root, rows, day=1):
    for row in rows:
        store.write_rows(root, store.VERDICTS, [row], partition=f"2026-05-0{day}",
                         name=row["audit_id"])


def test_rows_land_hive_partitioned_and_read_back_with_plain_pandas(tmp_path):
    path = store.write_rows(tmp_path, store.VERDICTS, [_verdict("a1", "acme/x", score=0.2)],
                            partition="2026-05-01", name="a1")
    assert path == tmp_path / "verdicts" / "audit_date=2026-05-01" / "a1.parquet"
    frame = pd.read_parquet(tmp_path / "verdicts")  # no sanitator code needed to read
    assert frame.loc[0, "repo_id"] == "acme/x"
    assert str(frame.loc[0, "audit_date"]) == "2026-05-01"
    assert frame.loc[0, "score"] == pytest.approx(0.2)


def test_rewriting_the_same_audit_replaces_instead_of_duplicating(tmp_path):
    _write(tmp_path, [_verdict("a1", "acme/x", "error", retryable=True)])
    _write(tmp_path, [_verdict("a1", "acme/x", "clean")])
    frame = store.read_verdicts(tmp_path)
    assert list(frame["status"]) == ["clean"]
    assert [p.name for p in (tmp_path / "verdicts").rglob("*")
            if p.is_file()] == ["a1.parquet"]  # no temp files left behind


def test_half_written_temp_files_are_invisible_to_readers(tmp_path):
    _write(tmp_path, [_verdict("a1", "acme/x")])
    partition = tmp_path / "verdicts" / "audit_date=2026-05-01"
    (partition / ".a2.deadbeef.tmp").write_bytes(b"PAR1 half a file")
    assert len(store.read_verdicts(tmp_path)) == 1
    assert len(pd.read_parquet(tmp_path / "verdicts")) == 1


def test_a_crash_during_the_write_leaves_the_old_file(tmp_path, monkeypatch):
    _write(tmp_path, [_verdict("a1", "acme/x", "clean")])

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(store.pq, "write_table", crash)
    with pytest.raises(OSError):
        _write(tmp_path, [_verdict("a1", "acme/x", "backdoored")])
    assert list(store.read_verdicts(tmp_path)["status"]) == ["clean"]
    assert not list((tmp_path / "verdicts").rglob(".*"))


def test_rows_outside_the_schema_are_refused(tmp_path):
    with pytest.raises(store.StoreError, match="not in the schema"):
        store.write_rows(tmp_path, store.VERDICTS, [_verdict("a1", "x", colour="red")],
                         partition="2026-05-01", name="a1")
    bad = _verdict("a1", "x")
    del bad["repo_id"]
    with pytest.raises(store.StoreError, match="do not fit"):
        store.write_rows(tmp_path, store.VERDICTS, [bad], partition="2026-05-01", name="a1")
    with pytest.raises(store.StoreError, match="unknown status"):
        store.write_rows(tmp_path, store.VERDICTS, [{**_verdict("a1", "x"), "status": "fine"}],
                         partition="2026-05-01", name="a1")
    with pytest.raises(store.StoreError, match="no schema"):
        store.write_rows(tmp_path, "evaluations", [{"a": 1}], partition="d", name="n")
    with pytest.raises(store.StoreError, match="bad file name"):
        store.write_rows(tmp_path, store.VERDICTS, [_verdict("a", "x")], partition="d",
                         name="../escape")


def test_reserved_dataset_accepts_an_explicit_schema(tmp_path):
    schema = pa.schema([pa.field("audit_id", pa.string()), pa.field("asr", pa.float64())])
    store.write_rows(tmp_path, store.EVALUATIONS, [{"audit_id": "a", "asr": 0.9}],
                     partition="2026-05-01", name="e1", schema=schema)
    table = store.read_dataset(tmp_path, store.EVALUATIONS, schema=schema)
    assert table.column("asr").to_pylist() == [0.9]


def test_empty_store_reads_as_empty_frames_with_the_schema_columns(tmp_path):
    frame = store.read_verdicts(tmp_path)
    assert frame.empty and "status" in frame.columns and "audit_date" in frame.columns
    assert store.latest_verdicts(tmp_path).empty
    assert store.read_pvs(tmp_path).empty
    assert store.completed_audits(tmp_path) == []


def test_latest_verdict_per_model_is_the_newest_row(tmp_path):
    _write(tmp_path, [_verdict("a1", "acme/x", "error", retryable=True),
                      _verdict("b1", "acme/y", "clean")], day=1)
    _write(tmp_path, [_verdict("a2", "acme/x", "backdoored", revision="r2", day=2)], day=2)
    latest = store.latest_verdicts(tmp_path)
    assert list(latest["repo_id"]) == ["acme/x", "acme/y"]
    assert list(latest["status"]) == ["backdoored", "clean"]
    assert list(latest["revision"]) == ["r2", "r1"]


def test_completed_audits_leave_out_retryable_failures(tmp_path):
    _write(tmp_path, [_verdict("a1", "acme/x", "error", retryable=True),
                      _verdict("b1", "acme/y", "clean")])
    completed = store.completed_audits(tmp_path)
    assert [(row["repo_id"], row["status"]) for row in completed] == [("acme/y", "clean")]
    assert set(completed[0]) >= set(store.DEDUPE_KEY)


def test_sign_bits_round_trip():
    vector = np.array([0.5, -1.0, 0.0, -0.0, 3.0, -2.0, 1.0, 1.0, -4.0, 2.0], dtype=np.float32)
    bits = store.pack_signs(vector)
    assert len(bits) == 2
    assert store.unpack_signs(bits, 10).tolist() == (vector >= 0).tolist()


def _pv_rows(audit_id: str, repo: str, k: int = 2) -> list[dict]:
    rows = []
    for index in range(k):
        vector = [float(index + 1), -1.0, 2.0]
        rows.append({"audit_id": audit_id, "audited_at": dt.datetime(2026, 5, 1, tzinfo=dt.UTC),
                     "source": "path", "registry": "path:/zoo", "repo_id": repo,
                     "revision": "r1", "config_hash": "c" * 16, "pv_index": index,
                     "feature": ("cls", "mask")[index % 2], "hidden_size": 3, "vector": vector,
                     "sign_bits": store.pack_signs(vector), "seed": 10 + index,
                     "losses": '{"distance": -0.5}', "trigger_tokens": ["cf"],
                     "trigger_shape": [2, 2], "trigger": [1.0, 2.0, 3.0, 4.0]})
    return rows


def test_pv_rows_count_only_once_their_verdict_exists(tmp_path):
    store.write_rows(tmp_path, store.PVS, _pv_rows("a1", "acme/x"), partition="2026-05-01",
                     name="a1")
    store.write_rows(tmp_path, store.PVS, _pv_rows("orphan", "acme/z"), partition="2026-05-01",
                     name="orphan")  # its verdict was never written (crash)
    _write(tmp_path, [_verdict("a1", "acme/x", "backdoored", pv_count=2)])
    pvs = store.read_pvs(tmp_path)
    assert set(pvs["audit_id"]) == {"a1"}
    assert list(pvs["pv_index"]) == [0, 1]
    assert store.read_pvs(tmp_path, repo_id="acme/z").empty
    assert len(store.read_pvs(tmp_path, repo_id="acme/x", revision="r1")) == 2


def test_read_pvs_latest_keeps_only_the_newest_audit_per_model(tmp_path):
    for audit_id, day in (("old", 1), ("new", 2)):
        store.write_rows(tmp_path, store.PVS, _pv_rows(audit_id, "acme/x"),
                         partition=f"2026-05-0{day}", name=audit_id)
        _write(tmp_path, [_verdict(audit_id, "acme/x", "backdoored", day=day)], day=day)
    assert set(store.read_pvs(tmp_path)["audit_id"]) == {"old", "new"}
    assert set(store.read_pvs(tmp_path, latest=True)["audit_id"]) == {"new"}


def test_pvset_round_trips_through_pv_rows(tmp_path):
    store.write_rows(tmp_path, store.PVS, _pv_rows("a1", "acme/x"), partition="2026-05-01",
                     name="a1")
    _write(tmp_path, [_verdict("a1", "acme/x", "backdoored")])
    pvset = store.pvset_from_rows(store.read_pvs(tmp_path))
    assert isinstance(pvset, PVSet)
    assert torch.equal(pvset.vectors, torch.tensor([[1.0, -1.0, 2.0], [2.0, -1.0, 2.0]]))
    assert pvset.triggers.shape == (2, 2, 2)
    assert pvset.seeds == [10, 11]
    assert pvset.losses == [{"distance": -0.5}] * 2
    assert pvset.trigger_tokens == [["cf"], ["cf"]]
    assert pvset.features == ["cls", "mask"]  # each PV keeps the feature it was found at


def test_old_files_read_against_a_newer_schema(tmp_path):
    """A column added later reads as null in files written before it existed."""
    old = store.VERDICTS_SCHEMA.remove(store.VERDICTS_SCHEMA.get_field_index("mlflow_run_id"))
    row = _verdict("a1", "acme/x")
    store.write_rows(tmp_path, store.VERDICTS, [row], partition="2026-05-01", name="a1",
                     schema=old)
    frame = store.read_verdicts(tmp_path)
    assert frame.loc[0, "mlflow_run_id"] is None or pd.isna(frame.loc[0, "mlflow_run_id"])


def test_filter_expression_pushdown(tmp_path):
    _write(tmp_path, [_verdict("a1", "acme/x"), _verdict("b1", "acme/y")])
    table = store.read_dataset(tmp_path, store.VERDICTS,
                               filter_expression=pads.field("repo_id") == "acme/y")
    assert table.column("audit_id").to_pylist() == ["b1"]


def test_any_value_is_conformed_to_the_schema_or_refused_before_the_write(tmp_path):
    hostile = _verdict("a1", "team/\udcff-name\nx", architecture=7, n_params=2 ** 70,
                       weight_bytes=-(2 ** 64), score=float("nan"), seeds_tried=2.0,
                       steps=True, reason=b"\xff bytes", evidence={"nested": [1]})
    _write(tmp_path, [hostile])
    row = store.read_verdicts(tmp_path).iloc[0]
    assert row["repo_id"] == "team/\\xff-name\nx"  # bytes that are not UTF-8, escaped
    assert row["architecture"] == "7" and row["reason"] == "\\xff bytes"
    assert pd.isna(row["n_params"]) and pd.isna(row["weight_bytes"])  # out of int64
    assert pd.isna(row["score"]) and row["seeds_tried"] == 2 and row["steps"] == 1
    assert row["evidence"] == "{'nested': [1]}"
    for required in ({"retryable": "yes"}, {"pv_count": 2 ** 40}):
        with pytest.raises(store.StoreError, match="do not fit"):
            store.write_rows(tmp_path, store.VERDICTS, [_verdict("a2", "x", **required)],
                             partition="2026-05-01", name="a2")
    assert len(store.read_verdicts(tmp_path)) == 1
