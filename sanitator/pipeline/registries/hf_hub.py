"""The Hugging Face Hub (or any Hub-compatible mirror) as a registry.

Endpoint and token come from `HF_ENDPOINT` / `HF_TOKEN` (read when the spec is parsed and
when fetching, never stored in a ModelRef). Crawling resolves each repo's `main` to its
40-hex commit sha once; every later call is pinned to that sha, so an audit names exactly
the bytes it read. Downloads take only the config, tokenizer and safetensors files (pickle
weights only when explicitly allowed).

`HF_HUB_OFFLINE=1` keeps model *loading* offline in this project; a registry crawl or fetch
is an explicit request to reach the configured endpoint, so these calls lift offline mode
while they run (the switch is process-wide; a lock keeps registry calls from interleaving).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

from sanitator.pipeline.registries.base import (
    FetchError,
    ModelRef,
    RegistryError,
    model_file_patterns,
    printable,
    read_bounded,
    unreadable_ref,
)
from sanitator.pipeline.registries.cards import card_bases
from sanitator.safety.model_policy import listing_config, short

DEFAULT_ENDPOINT = "https://huggingface.co"
_ONLINE_LOCK = threading.RLock()


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


@contextmanager
def hub_online() -> Iterator[None]:
    """Allow huggingface_hub HTTP calls for the duration of a registry operation."""
    from huggingface_hub import constants

    with _ONLINE_LOCK:
        previous = constants.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = False
        try:
            yield
        finally:
            constants.HF_HUB_OFFLINE = previous


def is_transient(exc: BaseException) -> bool:
    """Network failures and server errors (5xx, 429) are worth retrying; 4xx are not."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    seen: BaseException | None = exc
    while seen is not None:  # the client wraps network errors (LocalEntryNotFoundError ...)
        if isinstance(seen, HfHubHTTPError) and seen.response is not None:
            status = seen.response.status_code
            return status >= 500 or status == 429
        if isinstance(seen, httpx2.TransportError | ConnectionError | TimeoutError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@dataclass(frozen=True)
class HfHubRegistry:
    """Models of an author/org, a search, or a tag filter on a Hub endpoint."""

    author: str | None = None
    search: str | None = None
    filter: str | None = None
    limit: int | None = None
    endpoint: str = DEFAULT_ENDPOINT
    source: str = "hf"

    @classmethod
    def from_spec(cls, rest: str) -> HfHubRegistry:
        author, _, query = rest.partition("?")
        params = {key: values[-1] for key, values in parse_qs(query).items()}
        unknown = set(params) - {"search", "filter", "limit"}
        if unknown:
            raise RegistryError(f"hf:{rest}: unknown option(s) {sorted(unknown)}; "
                                "known: search, filter, limit")
        author = author.strip("/") or None
        if author and "/" in author:
            raise RegistryError(f"hf:{rest}: expected an org or user name, not a repo id")
        if not (author or params.get("search") or params.get("filter")):
            raise RegistryError("hf: needs an org (hf:ORG) or a search (hf:?search=TEXT); "
                                "refusing to crawl a whole Hub")
        try:
            limit = int(params["limit"]) if "limit" in params else None
        except ValueError as exc:
            raise RegistryError(f"hf:{rest}: limit must be an integer") from exc
        return cls(author=author, search=params.get("search"), filter=params.get("filter"),
                   limit=limit, endpoint=hub_endpoint())

    @property
    def spec(self) -> str:
        query = urlencode({key: value for key, value in (("search", self.search),
                                                         ("filter", self.filter),
                                                         ("limit", self.limit)) if value})
        return f"hf:{self.author or ''}{'?' + query if query else ''}"

    def _api(self):
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint, token=hub_token())

    def crawl(self) -> Iterator[ModelRef]:
        """Every listed repo, pinned to its commit. A failing listing fails the crawl (the
        registry is unavailable); a repo whose details cannot be read is a ref with a
        crawl error (retryable when the cause is the network or the server)."""
        with hub_online():
            api = self._api()
            listed = {str(model.id): getattr(model, "sha", None) for model in api.list_models(
                author=self.author, search=self.search, filter=self.filter, limit=self.limit)}
            for repo_id in sorted(listed):
                try:
                    ref = self._ref(api.model_info(repo_id, files_metadata=True))
                except Exception as exc:  # one unreadable repo is one error row
                    ref = unreadable_ref(self, repo_id, f"cannot read the repo's details: "
                                         f"{type(exc).__name__}: {short(exc)}",
                                         location=self.endpoint, revision=listed[repo_id],
                                         retryable=is_transient(exc))
                yield ref

    def _ref(self, info: Any) -> ModelRef:
        if not isinstance(info.sha, str) or len(info.sha) != 40:
            raise RegistryError(f"{info.id} has no commit sha")
        files = tuple(sorted((str(s.rfilename), s.size if isinstance(s.size, int) else None)
                             for s in info.siblings or []))
        sizes = [size for _, size in files]
        extra: dict[str, Any] = {"endpoint": self.endpoint}
        if info.last_modified:
            extra["last_modified"] = info.last_modified.isoformat()
        if info.tags:
            extra["tags"] = list(info.tags)
        if info.security_repo_status:
            extra["security"] = info.security_repo_status
        card = getattr(info, "card_data", None)
        if card is not None:  # the Hub parsed README.md's front matter for us
            extra["card_bases"] = card_bases({"base_model": getattr(card, "base_model", None)})
        return ModelRef(source=self.source, registry=self.spec, repo_id=printable(info.id),
                        revision=info.sha, location=self.endpoint, files=files,
                        size=sum(sizes) if None not in sizes else None,
                        # the Hub passes config.json's fields through: check their types
                        config=listing_config(info.config) if info.config is not None
                        else None,
                        extra=extra)

    def fetch(self, ref: ModelRef, dest: Path, *, allow_pickle: bool = False) -> Path:
        """Download the model files pinned to the crawled sha into `dest/<repo>`."""
        from huggingface_hub import snapshot_download

        folder = dest / ref.repo_id.replace("/", "--")
        try:
            with hub_online():
                path = snapshot_download(
                    ref.repo_id, revision=ref.revision, endpoint=ref.location,
                    token=hub_token(), local_dir=folder,
                    allow_patterns=model_file_patterns(allow_pickle))
        except Exception as exc:  # the client raises OSError, ValueError and httpx errors
            raise FetchError(f"{ref.label}: download from {ref.location} failed: {exc}",
                             retryable=is_transient(exc)) from exc
        return Path(path)

    def read_file(self, ref: ModelRef, name: str, max_bytes: int) -> bytes | None:
        """One small file of the repo at the crawled sha (None when not listed); ValueError
        when it is over `max_bytes`."""
        import tempfile

        from huggingface_hub import hf_hub_download

        if name not in ref.file_names:
            return None
        size = dict(ref.files).get(name)
        if isinstance(size, int) and size > max_bytes:
            raise ValueError(f"{name} is {size:,} bytes, over the limit of {max_bytes:,}")
        with tempfile.TemporaryDirectory(prefix="sanitator-hubfile-") as tmp, hub_online():
            path = hf_hub_download(ref.repo_id, name, revision=ref.revision,
                                   endpoint=ref.location, token=hub_token(), local_dir=tmp)
            return read_bounded(Path(path), name, max_bytes)

    def lookup(self, repo_id: str) -> ModelRef:
        """`ORG/NAME[@REVISION]` on this endpoint, pinned to its commit, whether or not the
        crawl listed it (a declared base of another org). LookupError when absent."""
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

        name, _, revision = repo_id.partition("@")
        try:
            with hub_online():
                info = self._api().model_info(name, revision=revision or None,
                                              files_metadata=True)
        except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
            raise LookupError(f"{repo_id} not found on {self.endpoint} "
                              f"({type(exc).__name__})") from None
        return self._ref(info)
