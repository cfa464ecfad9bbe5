"""PV artifacts for deployment: the PV set of one audited model revision as one safetensors
file with the metadata a deployment needs (docs/deployment.md).

`write_pv_artifact` / `read_pv_artifact` write and read the file (safetensors only, never
pickle); `sanitator.pipeline.pv_pull` makes one from an audit store (the format lives here,
below the pipeline, so the monitor can read it without importing the store). A clean model
gets an artifact with no PVs that says so, so deployment code has a single path:
`MonitoredEncoder.from_artifact(FILE, model)` (sanitator.guard.monitor).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sanitator.core.constants import MONITOR_THRESHOLD
from sanitator.detect.results import PVSet

ARTIFACT_FORMAT = "sanitator.pv-artifact"
ARTIFACT_VERSION = 1
CLEAN_NOTE = ("clean: the audit found no task-agnostic backdoor at this revision; the "
              "artifact holds no PVs and the monitor passes every input")


class PVArtifactError(ValueError):
    """No artifact can be made or read: unknown model, revision mismatch, no PVs, bad file."""


@dataclass
class PVArtifact:
    """A PV set plus its deployment metadata (all strings, as safetensors stores them)."""

    pvset: PVSet
    metadata: dict[str, str]

    @property
    def model(self) -> str:
        return self.metadata["model"]

    @property
    def revision(self) -> str:
        return self.metadata["revision"]

    @property
    def status(self) -> str:
        return self.metadata["status"]

    @property
    def feature(self) -> str:
        return self.metadata.get("feature") or self.pvset.feature

    @property
    def threshold(self) -> float:
        return float(self.metadata.get("threshold") or MONITOR_THRESHOLD)

    @property
    def hidden_size(self) -> int:
        return int(self.pvset.vectors.shape[1]) if self.pvset.vectors.ndim == 2 else 0

    @property
    def empty(self) -> bool:
        return len(self.pvset) == 0

    def matches_revision(self, revision: str) -> bool:
        return revision_matches(self.revision, revision)

    def describe(self) -> dict[str, Any]:
        return {**self.metadata, "pv_count": len(self.pvset), "hidden_size": self.hidden_size}


def revision_matches(audited: str, wanted: str) -> bool:
    """Exact match, or an abbreviated commit sha (at least 7 characters) of the audited one."""
    return audited == wanted or (len(wanted) >= 7 and audited.startswith(wanted))


def write_pv_artifact(path: str | Path, artifact: PVArtifact) -> Path:
    """Write the artifact as safetensors: `vectors` [K, H], `triggers` [K, L, E], metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    artifact.pvset.save(temp, artifact.metadata)
    temp.replace(path)
    return path


def read_pv_artifact(path: str | Path) -> PVArtifact:
    """Read a file `write_pv_artifact` wrote; refuse anything else (no pickle, ever)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise PVArtifactError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        pvset = PVSet.load(path)
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise PVArtifactError(f"{path}: not a safetensors PV artifact ({exc})") from exc
    if metadata.get("format") != ARTIFACT_FORMAT:
        raise PVArtifactError(f"{path}: not a sanitator PV artifact (metadata format is "
                              f"{metadata.get('format')!r}, expected {ARTIFACT_FORMAT!r})")
    if int(metadata.get("format_version", "0")) > ARTIFACT_VERSION:
        raise PVArtifactError(f"{path}: artifact format version {metadata['format_version']} "
                              f"is newer than this sanitator reads ({ARTIFACT_VERSION})")
    return PVArtifact(pvset, metadata)
