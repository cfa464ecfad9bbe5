"""Local registries: model folders below a path, or a Hugging Face cache (air-gapped sites).

Folder layout: every folder holding a `config.json` is a model (its subfolders are not
searched further); repo id = its path relative to the registry root (`acme/encoder-a`);
revision = a content digest of every file the scan reads (config, weights, tokenizer), so
a retrained model or a fixed tokenizer gets a new revision and an untouched model keeps
its old one. A folder that cannot be read is a ref with a crawl error (one error row),
never the end of the crawl.

Cache layout (a folder holding `models--ORG--NAME` folders, such as `~/.cache/huggingface/hub`):
every snapshot of every model repo, repo id = the Hub repo id, revision = the commit sha.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sanitator.pipeline.registries.base import (
    FetchError,
    ModelRef,
    RegistryError,
    is_transient_os_error,
    printable,
    read_bounded,
    unreadable_ref,
)
from sanitator.safety.model_policy import (
    MAX_CONFIG_BYTES,
    ModelRejected,
    is_scan_file,
    read_listing_config,
    short,
)

_CHUNK = 1 << 20
# (path, size, mtime_ns) -> sha256: hashing gigabytes once per process is enough
_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    stat = path.stat()
    cache_key = (str(path), stat.st_size, stat.st_mtime_ns)
    cached = _FILE_DIGESTS.get(cache_key)
    if cached is None:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        cached = _FILE_DIGESTS[cache_key] = digest.hexdigest()
    return cached


def content_revision(folder: Path) -> str:
    """40 hex digits of sha256 over (name, sha256) of every file the scan reads. A link
    that leaves the folder is digested by its target's name, never read: the preflight
    refuses it anyway, and it may point at a device or a huge file."""
    digest = hashlib.sha256()
    root = folder.resolve()
    for name in sorted(_relative_files(folder)):
        if not is_scan_file(Path(name).name):
            continue
        path = folder / name
        target = path.resolve()
        if target.is_relative_to(root):
            digest.update(f"{name}\0{file_sha256(path)}\n".encode("utf-8", "surrogateescape"))
        else:
            digest.update(f"{name}\0link:{target}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:40]


def _relative_files(folder: Path) -> dict[str, int]:
    """Regular files below `folder` (links followed, devices and pipes left out)."""
    files: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in filenames:
            if filename.startswith("."):
                continue
            path = Path(dirpath) / filename
            if path.is_file():
                files[path.relative_to(folder).as_posix()] = path.stat().st_size
    return files


def irregular_scan_file(folder: Path) -> str | None:
    """Why the folder cannot be audited when a file the scan reads is there by name but is
    no regular file inside the folder (a named pipe, a device, a link to itself or out of
    the folder): the preflight's own reason (`checked_file`), so the crawl's row says what
    a scan would. The listing leaves such entries out, and would read "no weights"."""
    from sanitator.safety.weight_files import checked_file, model_root

    def regular(entry: os.DirEntry) -> bool:
        try:
            return entry.is_file()
        except OSError:  # a loop of links
            return False

    try:
        entries = sorted(entry.name for entry in os.scandir(folder)
                         if not entry.name.startswith(".") and is_scan_file(entry.name)
                         and not regular(entry))
    except OSError:
        return None  # the listing itself reports an unreadable folder
    root = model_root(folder)
    for name in entries:
        try:
            checked_file(folder, name, root)
        except ModelRejected as exc:
            return exc.reason
    return None


def read_model_config(folder: Path) -> dict[str, Any] | None:
    """model_type and architectures from config.json (type-checked; `invalid` with the
    reason when they are wrong, the file is no JSON object or links out of the folder);
    None when absent."""
    from sanitator.safety.weight_files import checked_file, model_root

    try:
        path = checked_file(folder, "config.json", model_root(folder), MAX_CONFIG_BYTES)
    except ModelRejected as exc:
        return {"model_type": None, "architectures": None, "invalid": exc.reason}
    return read_listing_config(path) if path is not None else None


def is_hf_cache(root: Path) -> bool:
    return any(entry.is_dir() and entry.name.startswith("models--") for entry in root.iterdir())


@dataclass(frozen=True)
class LocalRegistry:
    """Model folders (or a Hugging Face cache) below `root`."""

    root: Path
    source: str = "path"

    @classmethod
    def from_spec(cls, rest: str) -> LocalRegistry:
        if not rest:
            raise RegistryError("path: needs a folder, e.g. path:/models")
        return cls(Path(rest).expanduser().resolve())

    @property
    def spec(self) -> str:
        return f"path:{self.root}"

    def crawl(self) -> Iterator[ModelRef]:
        if not self.root.is_dir():
            raise RegistryError(f"{self.spec}: {self.root} is not a folder")
        cache_root = self.root / "hub" if (self.root / "hub").is_dir() else self.root
        if is_hf_cache(cache_root):
            yield from self._crawl_cache(cache_root)
        else:
            yield from self._crawl_folders()

    def _crawl_folders(self) -> Iterator[ModelRef]:
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            if "config.json" not in filenames:
                continue
            dirnames[:] = []  # a model folder's subfolders are part of the model
            folder = Path(dirpath)
            repo_id = folder.relative_to(self.root).as_posix()
            if repo_id == ".":
                repo_id = folder.name
            try:
                ref = self._ref(folder, repo_id, content_revision(folder), {"layout": "folder"})
            except Exception as exc:  # one unreadable folder is one error row
                ref = self._unreadable(folder, repo_id, exc)
            yield ref

    def _crawl_cache(self, cache_root: Path) -> Iterator[ModelRef]:
        from huggingface_hub import scan_cache_dir

        info = scan_cache_dir(cache_root)
        for repo in sorted(info.repos, key=lambda r: r.repo_id):
            if repo.repo_type != "model":
                continue
            for revision in sorted(repo.revisions, key=lambda r: r.commit_hash):
                extra = {"layout": "hf-cache", "refs": sorted(revision.refs)}
                folder = Path(revision.snapshot_path)
                try:
                    ref = self._ref(folder, repo.repo_id, revision.commit_hash, extra)
                except Exception as exc:
                    ref = self._unreadable(folder, repo.repo_id, exc, revision.commit_hash)
                yield ref

    def _unreadable(self, folder: Path, repo_id: str, exc: Exception,
                    revision: str | None = None) -> ModelRef:
        try:
            files = tuple(sorted(_relative_files(folder).items()))
        except OSError:
            files = ()
        return unreadable_ref(self, repo_id, f"cannot read the model folder: "
                              f"{type(exc).__name__}: {short(exc)}", location=str(folder),
                              revision=revision, files=files,
                              retryable=is_transient_os_error(exc))

    def _ref(self, folder: Path, repo_id: str, revision: str, extra: dict[str, Any]) -> ModelRef:
        files = _relative_files(folder)
        return ModelRef(source=self.source, registry=self.spec, repo_id=printable(repo_id),
                        revision=revision, location=str(folder),
                        files=tuple(sorted(files.items())), size=sum(files.values()),
                        config=read_model_config(folder), extra=extra,
                        crawl_error=irregular_scan_file(folder))

    def fetch(self, ref: ModelRef, dest: Path, *, allow_pickle: bool = False) -> Path:
        """The folder itself (no copy): workers must see the same filesystem."""
        folder = Path(ref.location)
        if not folder.is_dir():
            raise FetchError(f"{ref.label}: {folder} is gone", retryable=False)
        if ref.extra.get("layout") == "folder" and content_revision(folder) != ref.revision:
            raise FetchError(f"{ref.label}: {folder} changed since the crawl", retryable=False)
        return folder

    def read_file(self, ref: ModelRef, name: str, max_bytes: int) -> bytes | None:
        """A small file of the model folder (links out of it refused, like the preflight)."""
        from sanitator.safety.weight_files import checked_file, model_root

        folder = Path(ref.location)
        try:
            path = checked_file(folder, name, model_root(folder), max_bytes)
        except ModelRejected as exc:
            raise ValueError(exc.reason) from None
        return None if path is None else read_bounded(path, name, max_bytes)

    def lookup(self, repo_id: str) -> ModelRef:
        """The folder `ROOT/ORG/NAME` (the crawl lists every model folder, so this finds
        one only when the listing missed it); in a cache, the snapshot of `main`."""
        if "@" in repo_id and not self._is_cache():
            raise LookupError(f"{repo_id}: a folder registry has no revisions")
        if self._is_cache():
            name, _, revision = repo_id.partition("@")
            snapshots = [r for r in self.crawl() if r.repo_id == name]
            wanted = [r for r in snapshots if revision in {r.revision, *r.extra.get("refs", ())}
                      ] if revision else [r for r in snapshots if "main" in r.extra.get("refs", ())]
            if not wanted:
                raise LookupError(f"{repo_id} not in the cache {self.root}")
            return wanted[0]
        folder = self.root / repo_id
        if not folder.resolve().is_relative_to(self.root) or \
                not (folder / "config.json").is_file():
            raise LookupError(f"no model folder {repo_id} in {self.root}")
        return self._ref(folder, repo_id, content_revision(folder), {"layout": "folder"})

    def _is_cache(self) -> bool:
        cache_root = self.root / "hub" if (self.root / "hub").is_dir() else self.root
        return cache_root.is_dir() and is_hf_cache(cache_root)
