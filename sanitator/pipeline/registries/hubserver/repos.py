"""The repos a Hub mirror serves: a folder of `ORG/NAME/<files>` read as Hub repos with one
revision, `main`, whose sha is a digest of the file contents (links out of a repo are never
followed)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Stored with Git LFS on the real Hub: the client then sees lfs metadata and a sha256 ETag.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".ckpt",
                ".model", ".gguf")
LFS_MIN_BYTES = 10 * 1024 * 1024
CHUNK = 1 << 20


@dataclass(frozen=True)
class RepoFile:
    path: str          # relative, posix
    size: int
    blob_id: str       # git blob sha1 (of the LFS pointer for LFS files)
    sha256: str
    lfs: bool
    pointer_size: int
    mtime: float

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_id

    def tree_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "oid": self.blob_id, "size": self.size,
                                 "path": self.path}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": self.size,
                            "pointerSize": self.pointer_size}
        return entry

    def sibling(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"rfilename": self.path, "size": self.size,
                                 "blobId": self.blob_id}
        if self.lfs:
            entry["lfs"] = {"sha256": self.sha256, "size": self.size,
                            "pointerSize": self.pointer_size}
        return entry


@dataclass(frozen=True)
class Repo:
    repo_id: str
    folder: Path
    files: tuple[RepoFile, ...]
    sha: str
    last_modified: str

    def file(self, path: str) -> RepoFile | None:
        return next((f for f in self.files if f.path == path), None)

    def model_config(self) -> dict[str, Any] | None:
        """The `config` block the Hub adds to model_info: model_type and architectures."""
        if self.file("config.json") is None:  # absent, or a link the server does not serve
            return None
        try:
            config = json.loads((self.folder / "config.json").read_text())
        except (OSError, ValueError, RecursionError):  # a repo's file is anyone's bytes
            return None
        if not isinstance(config, dict):
            return None
        return {key: config[key] for key in ("model_type", "architectures") if key in config}

    def card_data(self) -> dict[str, Any] | None:
        """README.md's front matter, as the Hub's `cardData` (None without a card or
        with one the server cannot parse: the real Hub drops bad metadata too)."""
        from sanitator.pipeline.registries.cards import MAX_CARD_BYTES, card_front_matter

        entry = self.file("README.md")
        if entry is None:
            return None
        try:
            with (self.folder / "README.md").open("rb") as handle:
                card = card_front_matter(handle.read(MAX_CARD_BYTES))
            # YAML has dates and other types JSON lacks: the Hub sends them as text
            return json.loads(json.dumps(card, default=str)) or None
        except (OSError, ValueError, RecursionError, TypeError) as exc:
            log.debug("%s: card metadata not served: %s", self.repo_id, exc)
            return None

    def tags(self) -> list[str]:
        names = {f.path for f in self.files}
        tags = ["transformers"] if "config.json" in names else []
        if any(name.endswith(".safetensors") for name in names):
            tags.append("safetensors")
        if any(name.endswith(".bin") for name in names):
            tags.append("pytorch")
        model_type = (self.model_config() or {}).get("model_type")
        if model_type:
            tags.append(str(model_type))
        return tags

    def summary(self) -> dict[str, Any]:
        author = self.repo_id.split("/")[0] if "/" in self.repo_id else None
        return {"_id": self.sha[:24], "id": self.repo_id, "modelId": self.repo_id,
                "author": author, "sha": self.sha, "lastModified": self.last_modified,
                "createdAt": self.last_modified, "private": False, "gated": False,
                "disabled": False, "downloads": 0, "likes": 0, "tags": self.tags(),
                "library_name": "transformers" if "transformers" in self.tags() else None}

    def info(self) -> dict[str, Any]:
        info = self.summary()
        info["siblings"] = [f.sibling() for f in self.files]
        info["config"] = self.model_config()
        card = self.card_data()
        if card is not None:
            info["cardData"] = card
        info["usedStorage"] = sum(f.size for f in self.files)
        return info


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def header_value(text: str) -> str:
    """HTTP header values are latin-1 on one line: anything else is escaped."""
    return text.encode("ascii", "backslashreplace").decode("ascii").replace(
        "\r", "\\r").replace("\n", "\\n")


def _git_blob_sha1(size: int, chunks) -> str:
    digest = hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False)
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\n"
            f"size {size}\n").encode()


class RepoIndex:
    """Repos below a root folder, with file digests cached by (path, size, mtime)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self._digests: dict[tuple[str, int, int], tuple[str, str]] = {}
        self._lock = threading.Lock()

    def repo_ids(self) -> list[str]:
        ids: list[str] = []
        for first in sorted(self._visible_dirs(self.root)):

            if any(entry.is_file() for entry in first.iterdir()):
                ids.append(first.name)
            else:
                ids.extend(f"{first.name}/{second.name}"
                           for second in sorted(self._visible_dirs(first)))
        return ids

    def _is_repo(self, folder: Path, nested: bool) -> bool:
        """A top-level folder with files, or a folder inside an org folder (files only)."""
        if not folder.is_dir():
            return False
        if nested:
            return not any(entry.is_file() for entry in folder.parent.iterdir())
        return any(entry.is_file() for entry in folder.iterdir())

    @staticmethod
    def _visible_dirs(folder: Path) -> list[Path]:
        return [entry for entry in folder.iterdir()
                if entry.is_dir() and not entry.name.startswith(".") and _is_utf8(entry.name)]

    def get(self, repo_id: str) -> Repo | None:
        parts = repo_id.split("/")
        if not 1 <= len(parts) <= 2 or any(p in {"", ".", ".."} or p.startswith(".")
                                             for p in parts):
            return None
        folder = self.root.joinpath(*parts)
        if not self._is_repo(folder, nested=len(parts) == 2):
            return None
        files = tuple(self._file(folder, path) for path in self._file_paths(folder))
        commit = hashlib.sha1(b"sanitator-hubserver-v1\n", usedforsecurity=False)
        for f in files:
            commit.update(f"{f.path}\0{f.blob_id}\n".encode())
        newest = max((f.mtime for f in files), default=folder.stat().st_mtime)
        when = dt.datetime.fromtimestamp(newest, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        return Repo(repo_id, folder, files, commit.hexdigest(), when)

    @staticmethod
    def _file_paths(folder: Path) -> list[str]:
        """Regular files of a repo. Links are served only when they stay inside the repo
        (a link to /etc/passwd must not turn the mirror into a file server), and names
        that are not valid UTF-8 are left out (no client could ask for them)."""
        paths = []
        root = folder.resolve()
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                path = Path(dirpath) / name
                relative = path.relative_to(folder).as_posix()
                if name.startswith(".") or not _is_utf8(relative):
                    continue
                try:
                    target = path.resolve(strict=True)
                except (OSError, RuntimeError):  # dangling or looping link
                    continue
                if target.is_relative_to(root) and target.is_file():
                    paths.append(relative)
        return sorted(paths)

    def _file(self, folder: Path, path: str) -> RepoFile:
        full = folder / path
        stat = full.stat()
        key = (str(full), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            cached = self._digests.get(key)
        if cached is None:
            sha256 = hashlib.sha256()
            sha1 = hashlib.sha1(f"blob {stat.st_size}\0".encode(), usedforsecurity=False)
            with full.open("rb") as handle:
                while chunk := handle.read(CHUNK):
                    sha256.update(chunk)
                    sha1.update(chunk)
            cached = (sha256.hexdigest(), sha1.hexdigest())
            with self._lock:
                self._digests[key] = cached
        sha256_hex, blob_sha1 = cached
        lfs = path.endswith(LFS_SUFFIXES) or stat.st_size >= LFS_MIN_BYTES
        pointer = _lfs_pointer(sha256_hex, stat.st_size)
        if lfs:
            blob_sha1 = _git_blob_sha1(len(pointer), [pointer])
        return RepoFile(path, stat.st_size, blob_sha1, sha256_hex, lfs, len(pointer),
                        stat.st_mtime)
