"""A small Hugging Face Hub-compatible HTTP server over a folder of model repos.

It answers the read-only endpoints that `huggingface_hub` (list_models, model_info,
list_repo_tree, list_repo_refs, hf_hub_download, snapshot_download) and transformers use,
so the real clients run against an air-gapped mirror or a test fixture with
`HF_ENDPOINT=http://127.0.0.1:PORT`. Layout: `ROOT/ORG/NAME/<files>` (or `ROOT/NAME/<files>`
for repos without an org). Each repo has one revision, `main`, whose commit sha is a digest
of the repo's file contents, so changing a file changes the sha.

    python -m sanitator.pipeline.registries.hubserver ROOT [--host 127.0.0.1] [--port 8765]
        [--token SECRET]

Stdlib only (`http.server`, threaded). Read-only; no uploads, no git protocol.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

log = logging.getLogger(__name__)

# Stored with Git LFS on the real Hub: the client then sees lfs metadata and a sha256 ETag.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".ckpt",
                ".model", ".gguf")
LFS_MIN_BYTES = 10 * 1024 * 1024
_CHUNK = 1 << 20


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
        info["usedStorage"] = sum(f.size for f in self.files)
        return info


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _header_value(text: str) -> str:
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
                while chunk := handle.read(_CHUNK):
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


class HubRequestHandler(BaseHTTPRequestHandler):
    server: HubHTTPServer
    protocol_version = "HTTP/1.1"

    # --- plumbing -------------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:  # quiet: route to logging
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json", head_only: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if body and not head_only:
            self.wfile.write(body)

    def _json(self, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(HTTPStatus.OK, json.dumps(payload).encode(), headers)

    def _error(self, status: int, code: str, message: str, head_only: bool = False) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(status, body, {"X-Error-Code": code,
                                  "X-Error-Message": _header_value(message)},
                   head_only=head_only)

    def _authorized(self) -> bool:
        token = self.server.token
        return token is None or self.headers.get("Authorization") == f"Bearer {token}"

    # --- dispatch -------------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self._dispatch(head_only=True)

    def do_GET(self) -> None:
        self._dispatch(head_only=False)

    def _dispatch(self, head_only: bool) -> None:
        url = urlsplit(self.path)
        # split before unquoting: a quoted "%2F" inside one segment stays in that segment
        segments = [unquote(part) for part in url.path.split("/")[1:]]
        query = {key: values for key, values in parse_qs(url.query).items()}
        try:
            if not self._authorized():
                self._error(HTTPStatus.UNAUTHORIZED, "RepoNotFound",
                            "Repository not found (invalid or missing token)", head_only)
            elif segments[:2] == ["api", "models"]:
                self._api(segments[2:], query, url.path, head_only)
            else:
                self._resolve(segments, head_only)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # a repo the server cannot describe: a 500, not a hang-up
            log.warning("%s %s failed: %s", self.command, self.path, exc)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "ServerError",
                        f"cannot serve {url.path}: {type(exc).__name__}", head_only)

    def _split_repo(self, rest: list[str], markers: tuple[str, ...]) -> tuple[str, list[str]]:
        """Repo id (one or two segments) and what follows it."""
        for size in (2, 1):
            if len(rest) > size and rest[size] in markers:
                return "/".join(rest[:size]), rest[size:]
        return "/".join(rest), []

    def _api(self, rest: list[str], query: dict[str, list[str]], path: str,
             head_only: bool) -> None:
        if not rest or rest == [""]:
            self._list_models(query, path)
            return
        repo_id, tail = self._split_repo(rest, ("revision", "tree", "refs"))
        repo = self.server.index.get(repo_id)
        if repo is None:
            self._error(HTTPStatus.NOT_FOUND, "RepoNotFound", f"Repository {repo_id} not found",
                        head_only)
            return
        if not tail:
            self._json(repo.info())
        elif tail[0] == "revision" and len(tail) == 2:
            if self._revision_ok(repo, tail[1], head_only):
                self._json(repo.info())
        elif tail[0] == "tree" and len(tail) >= 2:
            if self._revision_ok(repo, tail[1], head_only):
                recursive = query.get("recursive", ["false"])[0].lower() in {"1", "true"}
                self._tree(repo, "/".join(tail[2:]).strip("/"), recursive, head_only)
        elif tail == ["refs"]:
            self._json({"branches": [{"name": "main", "ref": "refs/heads/main",
                                      "targetCommit": repo.sha}],
                        "tags": [], "converts": []})
        else:
            self._error(HTTPStatus.NOT_FOUND, "EntryNotFound", f"no such endpoint {path}",
                        head_only)

    def _revision_ok(self, repo: Repo, revision: str, head_only: bool) -> bool:
        if revision in {"main", repo.sha, "refs/heads/main"}:
            return True
        self._error(HTTPStatus.NOT_FOUND, "RevisionNotFound",
                    f"Invalid rev id: {revision}", head_only)
        return False

    def _list_models(self, query: dict[str, list[str]], path: str) -> None:
        author = query.get("author", [None])[0]
        search = (query.get("search", [""])[0] or "").lower()
        filters = query.get("filter", [])
        try:
            limit = int(query["limit"][0]) if "limit" in query else None
            cursor = int(query.get("cursor", ["0"])[0] or 0)
        except ValueError:
            self._error(HTTPStatus.BAD_REQUEST, "BadRequest", "limit and cursor are integers")
            return
        repos = []
        for repo_id in self.server.index.repo_ids():
            if author and not repo_id.startswith(f"{author}/"):
                continue
            if search and search not in repo_id.lower():
                continue
            repo = self.server.index.get(repo_id)
            if repo is None or any(tag not in repo.tags() for tag in filters):
                continue
            repos.append(repo)
        if limit is not None:
            repos = repos[:limit]
        page_size = self.server.page_size
        page = repos[cursor:cursor + page_size]
        full = query.get("full", ["false"])[0].lower() in {"1", "true"}
        items = [repo.info() if full else repo.summary() for repo in page]
        headers = {}
        if cursor + page_size < len(repos):
            pairs = [(k, v) for k, values in query.items() if k != "cursor" for v in values]
            next_url = (f"{self.server.url}{path}?"
                        f"{urlencode([*pairs, ('cursor', cursor + page_size)])}")
            headers["Link"] = f'<{next_url}>; rel="next"'
        self._json(items, headers)

    def _tree(self, repo: Repo, prefix: str, recursive: bool, head_only: bool) -> None:
        entries: dict[str, dict[str, Any]] = {}
        base = f"{prefix}/" if prefix else ""
        if prefix and not any(f.path.startswith(base) for f in repo.files):
            self._error(HTTPStatus.NOT_FOUND, "EntryNotFound",
                        f"{prefix} does not exist in {repo.repo_id}", head_only)
            return
        for f in repo.files:
            if not f.path.startswith(base):
                continue
            parts = f.path[len(base):].split("/")
            for depth in range(1, len(parts)):
                if recursive or depth == 1:
                    folder = base + "/".join(parts[:depth])
                    oid = hashlib.sha1(folder.encode(), usedforsecurity=False).hexdigest()
                    entries.setdefault(folder, {"type": "directory", "oid": oid, "size": 0,
                                                "path": folder})
            if recursive or len(parts) == 1:
                entries[f.path] = f.tree_entry()
        self._json([entries[key] for key in sorted(entries)])

    def _resolve(self, segments: list[str], head_only: bool) -> None:
        repo_id, tail = self._split_repo(segments, ("resolve",))
        if len(tail) < 3:
            self._error(HTTPStatus.NOT_FOUND, "EntryNotFound", f"no such path {self.path}",
                        head_only)
            return
        repo = self.server.index.get(repo_id)
        if repo is None:
            self._error(HTTPStatus.NOT_FOUND, "RepoNotFound", f"Repository {repo_id} not found",
                        head_only)
            return
        if not self._revision_ok(repo, tail[1], head_only):
            return
        path = "/".join(tail[2:])
        entry = repo.file(path)
        if entry is None:
            self._error(HTTPStatus.NOT_FOUND, "EntryNotFound",
                        f"{path} does not exist in {repo_id}@{repo.sha}", head_only)
            return
        headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{entry.etag}"',
                   "Accept-Ranges": "bytes"}
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"',
                            "X-Linked-Size": str(entry.size)})
        start, end = 0, entry.size - 1
        status = HTTPStatus.OK
        wanted = self.headers.get("Range", "")
        if wanted.startswith("bytes=") and entry.size:
            first, _, last = wanted[len("bytes="):].split(",")[0].partition("-")
            start = int(first) if first else max(entry.size - int(last or 0), 0)
            end = min(int(last), entry.size - 1) if first and last else entry.size - 1
            if start > end:
                self._send(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, b"",
                           {"Content-Range": f"bytes */{entry.size}"}, head_only=head_only)
                return
            status = HTTPStatus.PARTIAL_CONTENT
            headers["Content-Range"] = f"bytes {start}-{end}/{entry.size}"
        length = max(end - start + 1, 0)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if head_only:
            return
        with (repo.folder / path).open("rb") as handle:
            handle.seek(start)
            remaining = length
            while remaining > 0:
                chunk = handle.read(min(_CHUNK, remaining))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)


class HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int = 0, *,
                 token: str | None = None, page_size: int = 1000):
        super().__init__((host, port), HubRequestHandler)
        self.index = RepoIndex(root)
        self.token = token
        self.page_size = page_size

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class HubServer:
    """Run a HubHTTPServer in a background thread: `with HubServer(root) as hub: hub.url`."""

    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int = 0, *,
                 token: str | None = None, page_size: int = 1000):
        self.httpd = HubHTTPServer(root, host, port, token=token, page_size=page_size)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self.httpd.url

    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="hubserver",
                                        kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sanitator.pipeline.registries.hubserver",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder of ORG/NAME model repos")
    parser.add_argument("--host", default="127.0.0.1",
                        help="bind address (default loopback only)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--token", default=os.environ.get("SANITATOR_HUB_TOKEN"),
                        help="require 'Authorization: Bearer TOKEN' (env SANITATOR_HUB_TOKEN)")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        parser.error(f"{args.root} is not a folder")
    logging.basicConfig(level=logging.INFO)
    httpd = HubHTTPServer(args.root, args.host, args.port, token=args.token)
    print(f"serving {args.root} as a Hub at {httpd.url} (HF_ENDPOINT={httpd.url})", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
