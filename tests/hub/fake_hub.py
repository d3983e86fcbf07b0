"""A tiny Hugging Face hub on 127.0.0.1: just the HTTP API huggingface_hub's downloads use.

GET  /api/models/{org}/{name}[/revision/{rev}]   repo info with siblings (name, size) and sha
HEAD /{org}/{name}/resolve/{rev}/{path}          X-Repo-Commit, ETag, Content-Length
GET  /{org}/{name}/resolve/{rev}/{path}          the bytes (Range: bytes=N- answered with 206)

Errors carry the hub's X-Error-Code header (RepoNotFound, EntryNotFound, GatedRepo) so that
huggingface_hub raises the same exception types it raises against huggingface.co.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class FakeRepo:
    """A model repo: repo path -> file (or bytes); `token` gates the files like a gated repo."""

    files: dict[str, Path | bytes]
    token: str | None = None
    cut: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before the line drops
    stall: set[str] = field(default_factory=set)  # paths that hang halfway until released

    def data(self, path: str) -> bytes:
        f = self.files[path]
        return f if isinstance(f, bytes) else f.read_bytes()


class FakeHub:
    """Serve `repos` over HTTP on 127.0.0.1 (a context manager); record every request."""

    def __init__(self, repos: dict[str, FakeRepo]):
        self.repos = repos
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # method, path, headers
        self.stalled = threading.Event()  # set once a stalled file has sent its first half
        self.release = threading.Event()  # set to let stalled responses end

    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hub._handle(self, body=True)

            def do_HEAD(self) -> None:
                hub._handle(self, body=False)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda *a: None  # dropped connections are the point, not noise
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def paths_requested(self, method: str = "GET", since: int = 0) -> list[str]:
        """Paths of the `method` requests from the `since`-th request on."""
        return [p for m, p, _ in self.requests[since:] if m == method]

    def _handle(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        self.requests.append((h.command, h.path, {k.lower(): v for k, v in h.headers.items()}))
        path = h.path.split("?", 1)[0]
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?", path):
            return self._info(h, m[1], body)
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/[^/]+/(.+)", path):
            return self._file(h, m[1], m[2], body)
        self._error(h, 404, "", "no such route", body)

    def _info(self, h: BaseHTTPRequestHandler, repo_id: str, body: bool) -> None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(h, 404, "RepoNotFound", "Repository not found", body)
        siblings = [{"rfilename": p, "size": len(repo.data(p))} for p in sorted(repo.files)]
        info = {
            "id": repo_id,
            "modelId": repo_id,
            "sha": COMMIT,
            "private": False,
            "gated": "manual" if repo.token else False,
            "siblings": siblings,
        }
        self._send(h, 200, {"Content-Type": "application/json"}, json.dumps(info).encode(), body)

    def _file(self, h: BaseHTTPRequestHandler, repo_id: str, path: str, body: bool) -> None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(h, 404, "RepoNotFound", "Repository not found", body)
        if repo.token is not None:
            auth = h.headers.get("Authorization")
            if auth is None:
                msg = f"Access to model {repo_id} is restricted. You must be authenticated."
                return self._error(h, 401, "GatedRepo", msg, body)
            if auth != f"Bearer {repo.token}":
                msg = f"Access to model {repo_id} is restricted and you are not in the authorized list."
                return self._error(h, 403, "GatedRepo", msg, body)
        if path not in repo.files:
            return self._error(h, 404, "EntryNotFound", "Entry not found", body)
        data = repo.data(path)
        headers = {
            "X-Repo-Commit": COMMIT,
            "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        start = 0
        if r := re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range", "")):
            start = int(r[1])
            if path in repo.cut:
                return self._drop(h)  # the line stays down: every resume attempt fails
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        status = 206 if start else 200
        if not body or (path not in repo.cut and path not in repo.stall):
            return self._send(h, status, headers, data[start:], body)
        # Announce the whole file, send part of it, then hang up (or hang until released).
        h.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(data))}.items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data[: repo.cut.get(path, len(data) // 2)])
        h.wfile.flush()
        if path in repo.stall:
            self.stalled.set()
            self.release.wait(60)
        self._drop(h)

    def _error(self, h: BaseHTTPRequestHandler, status: int, code: str, msg: str, body: bool):
        headers = {"X-Error-Message": msg, "X-Repo-Commit": COMMIT}
        if code:
            headers["X-Error-Code"] = code
        payload = json.dumps({"error": msg}).encode()
        self._send(h, status, {**headers, "Content-Type": "application/json"}, payload, body)

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, headers: dict, data: bytes, body: bool):
        h.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(data))}.items():
            h.send_header(k, v)
        h.end_headers()
        if body:
            h.wfile.write(data)

    @staticmethod
    def _drop(h: BaseHTTPRequestHandler) -> None:
        """Close the connection mid-response, as a dropped network link does."""
        h.close_connection = True
        with contextlib.suppress(OSError):
            h.connection.shutdown(socket.SHUT_RDWR)
