"""The MLflow Model Registry as a registry: every version of every registered model.

A version must carry a Hugging Face model folder in its artifacts (config.json, weights,
tokenizer), as written by `MlflowClient.log_artifacts(run_id, folder, "model")` then
`create_model_version(name, "runs:/RUN/model")`, or by `mlflow.transformers` (whose
tokenizer lives in `components/tokenizer`; the fetch puts it beside the weights).

Revision = `v<version>-<8 hex>`: the version number users know, plus a digest of the
version's source, run and creation time, so a model deleted and registered again under the
same name does not inherit its predecessor's verdicts.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from sanitator.pipeline.registries.base import (
    FetchError,
    ModelRef,
    RegistryError,
    read_bounded,
    unreadable_ref,
)
from sanitator.safety.model_policy import (
    MAX_CONFIG_BYTES,
    TOKENIZER_FILES,
    ModelRejected,
    listing_config,
    parse_json,
    short,
)

_PAGE = 200


def version_revision(version: Any) -> str:
    identity = f"{version.source}|{version.run_id}|{version.creation_timestamp}"
    return f"v{version.version}-{hashlib.sha256(identity.encode()).hexdigest()[:8]}"


def is_transient(exc: BaseException) -> bool:
    """Server errors and lost connections (MLflow reports both as HTTP 5xx)."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.get_http_status_code() >= 500
    return isinstance(exc, ConnectionError | TimeoutError)


@dataclass(frozen=True)
class MlflowRegistry:
    """Registered models (optionally those whose name matches a LIKE pattern) of a server."""

    tracking_uri: str
    name_like: str | None = None
    source: str = "mlflow"

    @classmethod
    def from_spec(cls, rest: str) -> MlflowRegistry:
        uri, _, query = rest.partition("?")
        params = {key: values[-1] for key, values in parse_qs(query).items()}
        if set(params) - {"name"}:
            raise RegistryError(f"mlflow:{rest}: unknown option(s) "
                                f"{sorted(set(params) - {'name'})}; known: name")
        if not uri:
            raise RegistryError("mlflow: needs a tracking URI, e.g. mlflow:http://host:5000")
        return cls(uri.rstrip("/"), params.get("name"))

    @property
    def spec(self) -> str:
        return f"mlflow:{self.tracking_uri}" + (f"?name={self.name_like}" if self.name_like
                                                else "")

    def _client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def _registered_models(self, client) -> Iterator[Any]:
        filter_string = None
        if self.name_like:
            filter_string = "name LIKE '{}'".format(self.name_like.replace("'", "''"))
        token = None
        while True:
            page = client.search_registered_models(filter_string=filter_string,
                                                   max_results=_PAGE, page_token=token)
            yield from page
            token = page.token
            if not token:
                return

    def crawl(self) -> Iterator[ModelRef]:
        client = self._client()
        for model in sorted(self._registered_models(client), key=lambda m: m.name):
            # search results carry no per-version aliases: invert the model's alias map
            aliases: dict[str, list[str]] = {}
            for alias, version in (model.aliases or {}).items():
                aliases.setdefault(str(version), []).append(alias)
            escaped = model.name.replace("'", "''")
            versions = client.search_model_versions(f"name = '{escaped}'")
            for version in sorted(versions, key=lambda v: int(v.version)):
                if version.status and version.status != "READY":
                    continue
                try:
                    ref = self._ref(client, version,
                                    sorted(aliases.get(str(version.version), [])))
                except Exception as exc:  # one unreadable version is one error row
                    ref = unreadable_ref(self, version.name, "cannot read the model "
                                         f"version: {type(exc).__name__}: {short(exc)}",
                                         location=self.tracking_uri,
                                         revision=version_revision(version),
                                         retryable=is_transient(exc))
                yield ref

    def _ref(self, client, version, aliases: list[str]) -> ModelRef:
        uri = client.get_model_version_download_uri(version.name, version.version)
        files = self._list_files(uri)
        config = self._read_config(uri, files)
        extra = {"version": str(version.version), "aliases": aliases,
                 "run_id": version.run_id, "source": version.source,
                 "tags": dict(version.tags or {})}
        sizes = [size for _, size in files]
        return ModelRef(source=self.source, registry=self.spec, repo_id=version.name,
                        revision=version_revision(version), location=uri,
                        files=tuple(sorted(files)),
                        size=sum(sizes) if None not in sizes else None,
                        config=config, extra=extra)

    def _list_files(self, uri: str) -> list[tuple[str, int | None]]:
        """Every artifact file below `uri`, with paths relative to it."""
        import mlflow.artifacts

        files: list[tuple[str, int | None]] = []
        pending = [""]
        while pending:
            sub = pending.pop()
            target = f"{uri}/{sub}" if sub else uri
            for info in mlflow.artifacts.list_artifacts(artifact_uri=target,
                                                        tracking_uri=self.tracking_uri):
                # listings name entries relative to the run (runs:/) or to the URI (others)
                name = Path(info.path).name
                relative = f"{sub}/{name}" if sub else name
                if info.is_dir:
                    pending.append(relative)
                else:
                    files.append((relative, info.file_size))
        return files

    def _read_config(self, uri: str, files: list[tuple[str, int | None]]) -> dict | None:
        import tempfile

        import mlflow.artifacts

        configs = sorted((name for name, _ in files if Path(name).name == "config.json"),
                         key=lambda name: name.count("/"))
        if not configs:
            return None
        size = dict(files).get(configs[0])
        if isinstance(size, int) and size > MAX_CONFIG_BYTES:
            return {"model_type": None, "architectures": None,
                    "invalid": f"config.json is {size:,} bytes, over the limit of "
                               f"{MAX_CONFIG_BYTES:,}"}
        with tempfile.TemporaryDirectory(prefix="sanitator-mlflow-") as tmp:
            path = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{uri}/{configs[0]}", dst_path=tmp, tracking_uri=self.tracking_uri)
            try:
                return listing_config(parse_json(Path(path).read_bytes(), "config.json"))
            except ModelRejected as exc:
                return {"model_type": None, "architectures": None, "invalid": exc.reason}

    def read_file(self, ref: ModelRef, name: str, max_bytes: int) -> bytes | None:
        """A small artifact beside the version's config.json (README.md: its model card)."""
        import tempfile

        import mlflow.artifacts

        configs = sorted((n for n in ref.file_names if Path(n).name == "config.json"),
                         key=lambda n: n.count("/"))
        folder = str(Path(configs[0]).parent) if configs else "."
        relative = name if folder == "." else f"{folder}/{name}"
        if relative not in ref.file_names:
            return None
        size = dict(ref.files).get(relative)
        if isinstance(size, int) and size > max_bytes:
            raise ValueError(f"{name} is {size:,} bytes, over the limit of {max_bytes:,}")
        with tempfile.TemporaryDirectory(prefix="sanitator-mlflow-") as tmp:
            path = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{ref.location}/{relative}", dst_path=tmp,
                tracking_uri=self.tracking_uri)
            return read_bounded(Path(path), name, max_bytes)

    def lookup(self, repo_id: str) -> ModelRef:
        """`NAME` (its newest ready version), `NAME@N` (version N) or `NAME@ALIAS`, whether
        or not the crawl's name pattern listed it. LookupError when there is none."""
        from mlflow.exceptions import MlflowException

        client = self._client()
        name, _, which = repo_id.partition("@")
        try:
            if which.isdigit():
                version = client.get_model_version(name, which)
            elif which:
                version = client.get_model_version_by_alias(name, which)
            else:
                escaped = name.replace("'", "''")
                ready = [v for v in client.search_model_versions(f"name = '{escaped}'")
                         if not v.status or v.status == "READY"]
                if not ready:
                    raise LookupError(f"no ready version of {name} in {self.spec}")
                version = max(ready, key=lambda v: int(v.version))
            model = client.get_registered_model(name)
        except MlflowException as exc:
            if is_transient(exc):
                raise
            raise LookupError(f"{repo_id} not in {self.spec} ({short(exc, 120)})") from None
        aliases = sorted(a for a, v in (model.aliases or {}).items()
                         if str(v) == str(version.version))
        return self._ref(client, version, aliases)

    def fetch(self, ref: ModelRef, dest: Path, *, allow_pickle: bool = False) -> Path:
        """Download the version's artifacts into `dest` and return its model folder."""
        import mlflow.artifacts

        target = dest / "mlflow"
        target.mkdir(parents=True, exist_ok=True)
        try:
            root = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=ref.location, dst_path=str(target), tracking_uri=self.tracking_uri))
        except Exception as exc:  # MlflowException, OSError, requests errors
            raise FetchError(f"{ref.label}: artifact download from {self.tracking_uri} "
                             f"failed: {exc}", retryable=is_transient(exc)) from exc
        return model_folder(root, ref.label)


def model_folder(root: Path, label: str) -> Path:
    """The folder holding config.json below a downloaded artifact tree, with its tokenizer."""
    configs = sorted(root.rglob("config.json"), key=lambda p: len(p.parts))
    if not configs:
        raise FetchError(f"{label}: no config.json in the model version's artifacts",
                         retryable=False)
    folder = configs[0].parent
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        tokenizers = sorted((p.parent for name in TOKENIZER_FILES for p in root.rglob(name)),
                            key=lambda p: len(p.parts))
        if tokenizers:
            for name in TOKENIZER_FILES:
                if (tokenizers[0] / name).is_file():
                    shutil.copy2(tokenizers[0] / name, folder / name)
    return folder
