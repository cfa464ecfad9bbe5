"""Model registries: where the audited encoders live, crawled into pinned ModelRefs.

A registry is named by a spec string:

- `hf:ORG` or `hf:ORG?search=TEXT&filter=TAG&limit=N` (or `hf:?search=TEXT`): a Hugging Face
  Hub, or any Hub-compatible mirror named by `HF_ENDPOINT` (token from `HF_TOKEN`);
- `mlflow:URI` or `mlflow:URI?name=PATTERN`: the model registry of an MLflow tracking server
  (`http://host:port`, `sqlite:///file.db`, ...); PATTERN is an SQL LIKE pattern;
- `path:DIR`: model folders below DIR, or a Hugging Face cache folder (air-gapped sites).

Every ref is pinned to an immutable revision (a commit sha, a registry version, a content
digest), so (source, repo id, revision, scan config hash) identifies an audit.
"""

from __future__ import annotations

from pathlib import Path

from sanitator.pipeline.registries.base import (
    SOURCES,
    FetchError,
    ModelRef,
    Registry,
    RegistryError,
    is_transient_os_error,
    model_file_patterns,
    printable,
    unreadable_ref,
)

__all__ = ["SOURCES", "FetchError", "ModelRef", "Registry", "RegistryError", "fetch_ref",
           "is_transient_os_error", "model_file_patterns", "parse_registry", "printable",
           "unreadable_ref"]


def parse_registry(spec: str) -> Registry:
    """The registry a spec string names (see the module doc). Raises RegistryError."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in SOURCES:
        raise RegistryError(f"bad registry spec {spec!r}: expected hf:ORG, mlflow:URI or path:DIR")
    if kind == "hf":
        from sanitator.pipeline.registries.hf_hub import HfHubRegistry

        return HfHubRegistry.from_spec(rest)
    if kind == "mlflow":
        from sanitator.pipeline.registries.mlflow_registry import MlflowRegistry

        return MlflowRegistry.from_spec(rest)
    from sanitator.pipeline.registries.local import LocalRegistry

    return LocalRegistry.from_spec(rest)


def fetch_ref(ref: ModelRef, dest: Path, *, allow_pickle: bool = False) -> Path:
    """Fetch a ref with the registry it was crawled from (used inside workers)."""
    return parse_registry(ref.registry).fetch(ref, dest, allow_pickle=allow_pickle)

