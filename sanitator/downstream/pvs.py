"""Where a downstream evaluation gets the PVs its monitor tests: one policy for the CLI, the
weekly flow and the benchmarks.

`resolve_pvs` looks, in order, at an explicit artifact (a `pv pull` artifact or any PVSet
safetensors file, or the attack's own `backdoor.json`: the oracle), a given audit in a
store, or the newest clean/backdoored audit of a model folder's content in a store. The
file formats stay with their owners: `guard.pv_artifact.read_pv_artifact` and
`detect.results.PVSet.load` underneath, the store's `pvs/` rows through `pipeline.store`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from sanitator.core.status import VERDICT_STATUSES

log = logging.getLogger(__name__)


@dataclass
class ResolvedPVs:
    """PVs for a monitor, and where they came from."""

    vectors: torch.Tensor | None      # [K, H] float32; None: the audit accepted no PVs
    feature: str                      # where they were found: cls | mask
    source: str                       # for humans: the file, or "audit ID (status)"
    audit_id: str | None = None
    verdict_status: str | None = None

    def as_lists(self) -> list[list[float]]:
        """The vectors as plain data (a request shipped to a worker); [] when none."""
        return [] if self.vectors is None else self.vectors.tolist()


def resolve_pvs(artifact: str | Path | None = None, *, store: str | Path | None = None,
                model_dir: str | Path | None = None, audit_id: str | None = None
                ) -> ResolvedPVs | None:
    """The PVs to monitor with: `artifact` when given, else audit `audit_id` of `store`,
    else the newest clean/backdoored audit of `model_dir`'s content in `store`.

    Returns None when the store holds no such audit (the caller decides: scan, or run
    unguarded). An artifact that is missing or unreadable raises (FileNotFoundError,
    ValueError); its `feature` says where it was mined, for the caller to compare.
    """
    if artifact is not None:
        return _from_artifact(Path(artifact))
    if store is None:
        raise ValueError("resolve_pvs needs an artifact or a store")
    if audit_id is not None:
        return _from_audit(Path(store), audit_id)
    if model_dir is None:
        raise ValueError("resolve_pvs needs an audit id or a model folder with a store")
    return _latest_audit(Path(store), Path(model_dir))


def _from_artifact(path: Path) -> ResolvedPVs:
    from sanitator.downstream.asr import BACKDOOR_MANIFEST, manifest_pvs

    if path.is_dir():
        path = path / BACKDOOR_MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"PV artifact {path} not found")
    if path.suffix == ".json":  # the attack's own targets: an oracle PV set
        manifest = json.loads(path.read_text())
        return ResolvedPVs(manifest_pvs(manifest), str(manifest.get("feature", "cls")),
                           str(path))
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: PV artifacts are PVSet .safetensors files or backdoor.json")
    pvset, metadata = _read_pvset(path)
    return ResolvedPVs(pvset.vectors.float(), pvset.feature, str(path),
                       metadata.get("audit_id"), metadata.get("status"))


def _read_pvset(path: Path):
    """A `pv pull` artifact (its format checks and metadata), else a plain PVSet file."""
    from sanitator.detect.results import PVSet
    from sanitator.guard.pv_artifact import PVArtifactError, read_pv_artifact

    try:
        artifact = read_pv_artifact(path)
    except PVArtifactError:
        return PVSet.load(path), {}
    return artifact.pvset, artifact.metadata


def _from_audit(store: Path, audit_id: str, status: str | None = None) -> ResolvedPVs:
    """The PVs audit `audit_id` wrote to the store's `pvs/` rows (in PV order)."""
    import numpy as np

    from sanitator.pipeline.store import read_pvs

    label = f"audit {audit_id}" + (f" ({status})" if status else "")
    rows = read_pvs(store, audit_id=audit_id)
    log.info("PVs from %s in %s: %d", label, store, len(rows))
    if rows.empty:
        return ResolvedPVs(None, "cls", label, audit_id, status)
    rows = rows.sort_values("pv_index")
    vectors = torch.tensor(np.stack([np.asarray(v, dtype=np.float32) for v in rows["vector"]]))
    feature = rows["feature"].iloc[0] or "cls"
    return ResolvedPVs(vectors, str(feature), label, audit_id, status)


def _latest_audit(store: Path, model_dir: Path) -> ResolvedPVs | None:
    """The folder is matched by content revision (as the local registry names it), so a
    copy or a renamed folder still finds its audit."""
    from sanitator.pipeline.registries.local import content_revision
    from sanitator.pipeline.store import read_verdicts

    if not (store / "verdicts").is_dir():
        return None
    revision = content_revision(model_dir)
    verdicts = read_verdicts(store)
    verdicts = verdicts[(verdicts["revision"] == revision)
                        & verdicts["status"].isin(VERDICT_STATUSES)]
    if verdicts.empty:
        return None
    audit = verdicts.iloc[-1]
    return _from_audit(store, str(audit["audit_id"]), str(audit["status"]))
