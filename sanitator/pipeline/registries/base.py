"""What every registry shares: the pinned ModelRef, the Registry protocol, its errors and
the helpers the crawlers use (the package face adds the factory over them)."""

from __future__ import annotations

import errno
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

SOURCES: tuple[str, ...] = ("hf", "mlflow", "path")


class RegistryError(Exception):
    """A registry spec that cannot be parsed, or a registry that cannot be read."""


class FetchError(Exception):
    """A model could not be fetched. `retryable` marks transient causes (network, server)."""

    def __init__(self, message: str, *, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class ModelRef:
    """One model at one pinned revision, and how to fetch it."""

    source: str        # hf | mlflow | path
    registry: str      # canonical registry spec it was crawled from
    repo_id: str       # org/name (hf), registered model name (mlflow), relative path (path)
    revision: str      # commit sha (hf), v<version>-<digest> (mlflow), content digest (path)
    location: str      # hub endpoint (hf), model version download URI (mlflow), folder (path)
    files: tuple[tuple[str, int | None], ...] = ()  # (relative name, bytes) as listed
    size: int | None = None                          # total bytes of `files`, when known
    config: Mapping[str, Any] | None = None          # model_type / architectures, when known
    extra: Mapping[str, Any] = field(default_factory=dict)  # aliases, tags, cache layout
    # the crawl could not read this repo: it gets an error row instead of an audit
    crawl_error: str | None = None
    crawl_retryable: bool = False

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.source, self.repo_id, self.revision)

    @property
    def file_names(self) -> frozenset[str]:
        return frozenset(name for name, _ in self.files)

    @property
    def label(self) -> str:
        """For messages and logs: valid UTF-8 even for a hostile name (a lone surrogate
        breaks a log handler, and any tool that ships the line on)."""
        return printable(f"{self.registry} {self.repo_id}@{self.revision[:12]}")


class Registry(Protocol):
    source: str
    spec: str  # canonical

    def crawl(self) -> Iterator[ModelRef]:
        """Every model the registry holds, pinned to a revision."""
        ...

    def fetch(self, ref: ModelRef, dest: Path, *, allow_pickle: bool = False) -> Path:
        """A local model folder for `ref` (downloaded below `dest` when remote; pickle
        weights only when allowed)."""
        ...

    def read_file(self, ref: ModelRef, name: str, max_bytes: int) -> bytes | None:
        """A small file beside the model's config.json (README.md, config.json): None when
        absent, ValueError when over `max_bytes` (pipeline/references.py)."""
        ...

    def lookup(self, repo_id: str) -> ModelRef:
        """The model a declared base id names in this registry, pinned, whether or not the
        crawl listed it; LookupError when there is none."""
        ...


def model_file_patterns(allow_pickle: bool) -> list[str]:
    """The files a fetch downloads: exactly those the scan reads (sanitator.safety.model_policy)."""
    from sanitator.safety.model_policy import scan_file_patterns

    return scan_file_patterns(allow_pickle)


# errno values of the machine, not of a repo's bytes: worth another try
TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.EAGAIN, errno.EBUSY, errno.ENOSPC, errno.ENOMEM,
                              errno.EMFILE, errno.ENFILE, errno.ESTALE, errno.EINTR})


def is_transient_os_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS


def read_bounded(path: Path, what: str, max_bytes: int) -> bytes:
    """A file's bytes, ValueError when it holds more than `max_bytes` (checked while
    reading: a size in a listing is the server's word)."""
    with path.open("rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{what} is over the limit of {max_bytes:,} bytes")
    return data


def printable(text: str) -> str:
    """A name from a file system or a server as valid UTF-8 text (bytes that are not
    UTF-8, kept by Python as lone surrogates, become backslash escapes)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def unreadable_ref(registry: Registry, repo_id: str, reason: str, *, location: str,
                   revision: str | None = None, retryable: bool = False,
                   files: tuple[tuple[str, int | None], ...] = ()) -> ModelRef:
    """The ref of a repo the crawl could not read: one error row for it, never a lost
    registry. Without a pinned revision, the revision is `unresolved-<digest of the
    listing>`, so an unchanged broken repo is not recorded again every run."""
    import hashlib

    if not revision:
        listing = "\n".join(f"{name}\0{size}" for name, size in files)
        revision = "unresolved-" + hashlib.sha256(listing.encode("utf-8", "surrogateescape")
                                                  ).hexdigest()[:12]
    return ModelRef(source=registry.source, registry=registry.spec, repo_id=printable(repo_id),
                    revision=revision, location=location, files=files,
                    crawl_error=reason, crawl_retryable=retryable)
