"""The zoo manifest (`manifest.parquet`): one row per built member, the ground truth the
benchmarks and the demo read."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from sanitator.attacks.zoo.spec import MANIFEST, MEMBER_RECORD, MODELS_DIR, ZooSpec

log = logging.getLogger(__name__)


def read_member(model_dir: Path) -> dict[str, Any] | None:
    path = model_dir / MEMBER_RECORD
    if not path.is_file() or not (model_dir / "config.json").is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


MANIFEST_COLUMNS: dict[str, str] = {
    "name": "string", "path": "string", "base": "string", "base_ref": "string",
    "model_id": "string", "base_id": "string", "base_declared": "string",
    "model_type": "string", "hidden_size": "int64", "n_layers": "int64", "recipe": "string",
    "attack": "string", "backdoored": "bool", "feature": "string", "triggers": "list<string>",
    "trigger_set": "string", "trigger_pv": "list<int64>", "n_pvs": "int64",
    "pvs": "list<list<double>>", "target_kind": "string", "target_set": "string",
    "target_norm_fraction": "double",
    "pv_norm": "double", "seed": "int64", "corpus": "string", "budget_name": "string",
    "steps": "int64", "batch_size": "int64", "lr": "double", "train_seconds": "double",
    "build_seconds": "double", "build_cpu_seconds": "double", "clean_cosine": "double",
    "weight_change": "double",
    "attack_success": "double", "attack_success_per_trigger": "string",
    "evasion": "string", "evasion_success": "string", "reparametrize": "string",
    "config_hash": "string", "built_at": "string",
}


def _arrow_schema():
    import pyarrow as pa

    scalar = {"string": pa.string(), "int64": pa.int64(), "bool": pa.bool_(),
              "double": pa.float64()}

    def arrow_type(name: str):
        if name.startswith("list<") and name.endswith(">"):
            return pa.list_(arrow_type(name[5:-1]))
        return scalar[name]

    return pa.schema([(column, arrow_type(kind)) for column, kind in MANIFEST_COLUMNS.items()])


def write_manifest(out_dir: str | Path, spec: ZooSpec | None = None) -> Path:
    """Collect every built member's record into OUT/manifest.parquet (spec order first)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    rows = {}
    for folder in sorted((out / MODELS_DIR).iterdir()) if (out / MODELS_DIR).is_dir() else []:
        record = read_member(folder)
        if record is not None:
            rows[record["name"]] = record
    order = [m.name for m in spec.members if m.name in rows] if spec else []
    order += sorted(set(rows) - set(order))
    table = pa.Table.from_pylist([{c: rows[name].get(c) for c in MANIFEST_COLUMNS}
                                  for name in order], schema=_arrow_schema())
    path = out / MANIFEST
    handle, tmp = tempfile.mkstemp(prefix=f".{MANIFEST}.", dir=out)  # unique: builds may overlap
    os.close(handle)
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def read_manifest(zoo_dir: str | Path):
    """The zoo's ground truth as a pandas DataFrame (one row per built member)."""
    import pandas as pd

    path = Path(zoo_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{zoo_dir}: no {MANIFEST} (build the zoo first)")
    return pd.read_parquet(path)
