"""The Hub mirror's HTTP side: the read-only endpoints `huggingface_hub` and transformers
call, a threaded server, and `HubServer` to run it in the background (tests, fixtures)."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

from sanitator.pipeline.registries.hubserver.repos import CHUNK, Repo, RepoIndex, header_value

log = logging.getLogger(__name__)


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
                                  "X-Error-Message": header_value(message)},
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
                chunk = handle.read(min(CHUNK, remaining))
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


def serve(root: str | Path, host: str = "127.0.0.1", port: int = 8765, *,
          token: str | None = None) -> int:
    """Serve `root` in the foreground until interrupted (`sanitator hub serve`)."""
    httpd = HubHTTPServer(root, host, port, token=token)
    print(f"serving {root} as a Hub at {httpd.url} (HF_ENDPOINT={httpd.url})", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
    return 0
