"""The audit store: Parquet datasets, hive-partitioned by audit date, written atomically.

Layout (docs/store.md documents every column)::

    STORE/verdicts/audit_date=2026-05-01/<audit_id>.parquet   one row per model audit
    STORE/pvs/audit_date=2026-05-01/<audit_id>.parquet        one row per accepted PV
    STORE/evaluations/...                                     reserved (downstream ASR runs)

Every file is written to a hidden temporary name in its partition and renamed into place
(`os.replace`), so a reader never sees half a file and a crash leaves only a hidden temp
file that readers ignore. Files are named by audit id, so writing the same audit twice
replaces the file instead of adding rows. PV rows are written before their verdict row:
a PV row counts only when a verdict row with its audit id exists (`read_pvs` joins on it).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from sanitator.core.status import STATUSES, VERDICT_STATUSES, Status

VERDICTS = "verdicts"
PVS = "pvs"
EVALUATIONS = "evaluations"  # reserved for the evaluation flow's rows
DATASETS: tuple[str, ...] = (VERDICTS, PVS, EVALUATIONS)
PARTITION = "audit_date"
SCHEMA_VERSION = 1

# The identity of an audit: same content audited with the same scan config.
DEDUPE_KEY: tuple[str, ...] = ("source", "repo_id", "revision", "config_hash")
# "The same model" for the latest-verdict view: a repo in a given registry.
MODEL_KEY: tuple[str, ...] = ("registry", "repo_id")
# Statuses that stand for their key whatever the audit policy (pickle, size limit).
VERDICT_FINAL: frozenset[str] = frozenset({*VERDICT_STATUSES, Status.UNSUPPORTED.value})

_TIME = pa.timestamp("us", tz="UTC")

VERDICTS_SCHEMA = pa.schema([
    pa.field("audit_id", pa.string(), nullable=False),
    pa.field("batch_id", pa.string()),           # the flow run that produced the row
    pa.field("audited_at", _TIME, nullable=False),
    pa.field("source", pa.string(), nullable=False),    # hf | mlflow | path
    pa.field("registry", pa.string(), nullable=False),  # canonical spec, e.g. hf:acme
    pa.field("repo_id", pa.string(), nullable=False),
    pa.field("revision", pa.string(), nullable=False),
    pa.field("architecture", pa.string()),       # config.json model_type
    pa.field("n_params", pa.int64()),
    pa.field("weights_format", pa.string()),     # safetensors | pickle
    pa.field("weight_bytes", pa.int64()),
    pa.field("status", pa.string(), nullable=False),   # one of core.status.STATUSES
    pa.field("score", pa.float64()),             # P(backdoored); null without a verdict
    pa.field("pv_count", pa.int32(), nullable=False),
    pa.field("seeds_tried", pa.int32()),
    pa.field("steps", pa.int64()),
    pa.field("seconds", pa.float64()),           # wall time of the audit (fetch + scan)
    pa.field("config_hash", pa.string(), nullable=False),
    pa.field("config", pa.string()),             # the full scan config, JSON
    pa.field("package_version", pa.string(), nullable=False),
    pa.field("device", pa.string()),
    pa.field("allow_pickle", pa.bool_()),        # audit policy the row was decided under
    pa.field("max_params", pa.int64()),
    pa.field("reason", pa.string()),             # why: error / unsupported / skipped text
    pa.field("retryable", pa.bool_(), nullable=False),  # transient failure: audit again
    pa.field("evidence", pa.string()),           # the verdict's evidence, JSON
    pa.field("mlflow_run_id", pa.string()),
], metadata={"sanitator.dataset": VERDICTS, "sanitator.schema_version": str(SCHEMA_VERSION)})

PVS_SCHEMA = pa.schema([
    pa.field("audit_id", pa.string(), nullable=False),
    pa.field("audited_at", _TIME, nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("registry", pa.string(), nullable=False),
    pa.field("repo_id", pa.string(), nullable=False),
    pa.field("revision", pa.string(), nullable=False),
    pa.field("config_hash", pa.string(), nullable=False),
    pa.field("pv_index", pa.int32(), nullable=False),
    pa.field("feature", pa.string()),            # cls | mask | pooler
    pa.field("hidden_size", pa.int32(), nullable=False),
    pa.field("vector", pa.list_(pa.float32()), nullable=False),
    pa.field("sign_bits", pa.binary(), nullable=False),  # np.packbits(vector >= 0), big-endian
    pa.field("seed", pa.int64()),
    pa.field("losses", pa.string()),             # final loss terms, JSON object
    pa.field("trigger_tokens", pa.list_(pa.string())),
    pa.field("trigger_shape", pa.list_(pa.int32())),  # [L, E]
    pa.field("trigger", pa.list_(pa.float32())),      # soft trigger, row-major [L * E]
], metadata={"sanitator.dataset": PVS, "sanitator.schema_version": str(SCHEMA_VERSION)})

SCHEMAS: dict[str, pa.Schema] = {VERDICTS: VERDICTS_SCHEMA, PVS: PVS_SCHEMA}


class StoreError(ValueError):
    """Rows that do not fit the dataset's schema, or an unreadable store."""


def audit_date(when: dt.datetime) -> str:
    """The partition value for a timestamp: its UTC date."""
    return when.astimezone(dt.UTC).date().isoformat()


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_audit_id() -> str:
    return uuid.uuid4().hex


def pack_signs(vector: Sequence[float] | np.ndarray) -> bytes:
    """Sign bits of a PV (1 = non-negative), packed eight per byte, most significant first."""
    return np.packbits(np.asarray(vector, dtype=np.float32) >= 0).tobytes()


def unpack_signs(bits: bytes, hidden_size: int) -> np.ndarray:
    """The inverse of `pack_signs`: a bool array of length hidden_size."""
    return np.unpackbits(np.frombuffer(bits, dtype=np.uint8))[:hidden_size].astype(bool)


def write_rows(store: str | Path, dataset: str, rows: list[dict[str, Any]], *,
               partition: str, name: str, schema: pa.Schema | None = None) -> Path | None:
    """Write rows as one Parquet file `STORE/dataset/audit_date=partition/name.parquet`.

    Atomic (temp file in the same folder + os.replace) and idempotent (same name replaces).
    `schema` defaults to the dataset's registered schema; pass one for new datasets such as
    `evaluations`. Returns the file, or None when there are no rows.
    """
    if not rows:
        return None
    schema = schema if schema is not None else SCHEMAS.get(dataset)
    if schema is None:
        raise StoreError(f"no schema registered for dataset {dataset!r}; pass schema=")
    if not name or "/" in name or name.startswith((".", "_")):
        raise StoreError(f"bad file name {name!r}")
    table = to_table(dataset, rows, schema)
    folder = Path(store) / dataset / f"{PARTITION}={partition}"
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{name}.parquet"
    # hidden name: pyarrow and pandas skip files starting with "." while it is written
    temp = folder / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        pq.write_table(table, temp)
        with temp.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, final)
    finally:
        temp.unlink(missing_ok=True)
    return final


def to_table(dataset: str, rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """The rows as a table of `schema`, after `conform_value` on every scalar; raises
    StoreError (never another type) for rows that still do not fit."""
    unknown = sorted(set().union(*rows) - set(schema.names))
    if unknown:
        raise StoreError(f"{dataset}: columns not in the schema: {unknown}")
    odd = sorted({str(row.get("status")) for row in rows} - set(STATUSES)) \
        if dataset == VERDICTS else []
    if odd:
        raise StoreError(f"{dataset}: unknown status {odd}; known: {', '.join(STATUSES)}")
    try:
        rows = [{f.name: conform_value(row.get(f.name), f) for f in schema if f.name in row}
                for row in rows]
        table = pa.Table.from_pylist(rows, schema=schema)
    except (pa.ArrowException, OverflowError, UnicodeError, TypeError, ValueError) as exc:
        raise StoreError(f"{dataset}: rows do not fit the schema: {exc}") from exc
    missing = [f.name for f in schema if not f.nullable and table.column(f.name).null_count]
    if missing:
        raise StoreError(f"{dataset}: rows do not fit the schema: null in required {missing}")
    return table


def conform_value(value: Any, field: pa.Field) -> Any:
    """A value of the field's type, from whatever a row holds: text for string columns
    (lone surrogates escaped, so any file name fits UTF-8), integers in range, finite
    floats, booleans. A value that cannot be one becomes null in a nullable column and
    raises TypeError in a required one. Nested types are left to pyarrow."""
    kind = field.type
    if value is None:
        return None
    if pa.types.is_string(kind):
        if isinstance(value, bytes):
            value = value.decode("utf-8", "backslashreplace")
        elif not isinstance(value, str):
            try:
                value = str(value)
            except RecursionError:
                value = f"<unprintable {type(value).__name__}>"
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if pa.types.is_boolean(kind):
        if isinstance(value, bool | np.bool_) or value in (0, 1):
            return bool(value)
        return _unfit(value, field)
    if pa.types.is_integer(kind):
        if isinstance(value, float | np.floating) and float(value).is_integer():
            value = int(value)
        if isinstance(value, int | np.integer):
            info = np.iinfo(kind.to_pandas_dtype())
            if info.min <= int(value) <= info.max:
                return int(value)
        return _unfit(value, field)
    if pa.types.is_floating(kind):
        if isinstance(value, int | float | np.integer | np.floating) and \
                np.isfinite(float(value)):
            return float(value)
        return _unfit(value, field)
    return value


def _unfit(value: Any, field: pa.Field) -> None:
    if field.nullable:
        return None
    raise TypeError(f"{field.name}: {type(value).__name__} {str(value)[:60]!r} is not "
                    f"{field.type}")


def read_dataset(store: str | Path, dataset: str, *, schema: pa.Schema | None = None,
                 filter_expression: pads.Expression | None = None) -> pa.Table:
    """All rows of a dataset (with the `audit_date` partition column); empty when absent.

    Files written by an older schema version are read against the current one, so a
    column added later reads as null in old files.
    """
    schema = schema if schema is not None else SCHEMAS.get(dataset)
    if schema is None:
        raise StoreError(f"no schema registered for dataset {dataset!r}; pass schema=")
    full = schema.append(pa.field(PARTITION, pa.string()))
    folder = Path(store) / dataset
    if not folder.is_dir():
        return full.empty_table()
    partitioning = pads.partitioning(pa.schema([pa.field(PARTITION, pa.string())]),
                                     flavor="hive")
    try:
        data = pads.dataset(folder, format="parquet", partitioning=partitioning, schema=full)
        return data.to_table(filter=filter_expression)
    except (pa.ArrowInvalid, OSError) as exc:
        raise StoreError(f"cannot read {folder}: {exc}") from exc


def read_verdicts(store: str | Path):
    """Every verdict row as a pandas DataFrame, oldest first."""
    frame = read_dataset(store, VERDICTS).to_pandas()
    return frame.sort_values("audited_at", kind="stable").reset_index(drop=True)


def latest_verdicts(store: str | Path):
    """The newest verdict row per model (registry, repo id), sorted by registry and repo."""
    frame = read_verdicts(store)
    if frame.empty:
        return frame
    latest = frame.groupby(list(MODEL_KEY), sort=False).tail(1)
    return latest.sort_values(list(MODEL_KEY)).reset_index(drop=True)


def read_pvs(store: str | Path, *, repo_id: str | None = None, revision: str | None = None,
             audit_id: str | None = None, latest: bool = False):
    """PV rows (pandas) whose audit has a verdict row, optionally for one model.

    `latest=True` keeps, per model, only the PVs of its newest completed audit.
    """
    conditions = []
    for column, value in (("repo_id", repo_id), ("revision", revision), ("audit_id", audit_id)):
        if value is not None:
            conditions.append(pads.field(column) == value)
    expression = None
    for condition in conditions:
        expression = condition if expression is None else expression & condition
    pvs = read_dataset(store, PVS, filter_expression=expression).to_pandas()
    verdicts = read_verdicts(store)
    if latest and not verdicts.empty:
        verdicts = verdicts.groupby(list(MODEL_KEY), sort=False).tail(1)
    pvs = pvs[pvs["audit_id"].isin(set(verdicts["audit_id"]))]
    return pvs.sort_values(["audited_at", "audit_id", "pv_index"]).reset_index(drop=True)


def completed_audits(store: str | Path) -> list[dict[str, Any]]:
    """The rows that settle their dedupe key: everything except retryable failures.

    Returns dicts with the dedupe key, the status and the policy columns, for the planner
    (`sanitator.pipeline.audit.plan_audits`) to decide what needs no new audit.
    """
    columns = [*DEDUPE_KEY, "status", "allow_pickle", "max_params", "retryable"]
    table = read_dataset(store, VERDICTS).select(columns)
    return [row for row in table.to_pylist() if not row["retryable"]]


def pvset_from_rows(rows) -> Any:
    """Rebuild a `sanitator.detect.results.PVSet` from the PV rows of one audit (a DataFrame)."""
    import pandas as pd
    import torch

    from sanitator.detect.results import PVSet

    rows = rows.sort_values("pv_index")
    if rows["audit_id"].nunique() > 1:
        raise StoreError("pvset_from_rows needs the rows of exactly one audit")
    if rows.empty:
        raise StoreError("no PV rows")
    vectors = torch.tensor(np.stack([np.asarray(v, dtype=np.float32) for v in rows["vector"]]))
    shapes = [tuple(int(x) for x in shape) for shape in rows["trigger_shape"]]
    triggers = torch.tensor(np.stack([np.asarray(t, dtype=np.float32).reshape(shape)
                                      for t, shape in zip(rows["trigger"], shapes, strict=True)]))
    return PVSet(vectors, triggers,
                 seeds=[None if pd.isna(seed) else int(seed) for seed in rows["seed"]],
                 losses=[json.loads(text) if text else {} for text in rows["losses"]],
                 trigger_tokens=[list(tokens) if tokens is not None else []
                                 for tokens in rows["trigger_tokens"]],
                 feature=str(rows["feature"].iloc[0] or "cls"),
                 features=[str(f or "cls") for f in rows["feature"]])

