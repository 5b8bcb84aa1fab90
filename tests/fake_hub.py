"""A Hugging Face Hub on the loopback interface, for tests without the network.

It answers the HTTP routes ``huggingface_hub`` itself calls, so the library's real clients run against it:
``HfApi.create_repo``/``upload_folder`` (repository creation, README metadata check, pre-upload, commit) and
``snapshot_download``/``hf_hub_download`` (repository info, file tree, ``resolve`` URLs). Each repository is a folder
under ``root`` laid out as the hub lays out a model repository (its files at the top level, as a clone shows them),
at the single revision ``main``; a test may also write such a folder itself and serve it. Uploads arrive inline
(``uploadMode: regular``), so no LFS or Xet storage is involved.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit


class FakeHub:
    """The server's state: repository folders under ``root``, their commit ids, and every request seen."""

    def __init__(self, root: Path):
        self.root = root
        self.commits: dict[str, str] = {}  # repo id -> its current commit id
        self.requests: list[tuple[str, str]] = []  # (method, path), in order
        self.endpoint = ""

    def repo(self, repo_id: str) -> Path:
        """The folder holding ``repo_id``'s files."""
        return self.root / repo_id

    def commit(self, repo_id: str) -> str:
        """Record a new commit of ``repo_id``'s folder as it is now; returns its id (40 hex digits)."""
        digest = hashlib.sha1(repo_id.encode())
        for path in sorted(self.files(repo_id)):
            digest.update(path.encode() + (self.repo(repo_id) / path).read_bytes())
        self.commits[repo_id] = digest.hexdigest()
        return self.commits[repo_id]

    def files(self, repo_id: str) -> list[str]:
        """Paths of ``repo_id``'s files, relative to its folder."""
        folder = self.repo(repo_id)
        return [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read ``hub.requests`` instead."""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, value: Any, status: int = 200) -> None:
        self._send(status, json.dumps(value).encode(), {"Content-Type": "application/json"})

    def _missing(self, code: str = "RepoNotFound") -> None:
        self._send(404, json.dumps({"error": code}).encode(), {"X-Error-Code": code, "X-Error-Message": code})

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def _route(self, method: str) -> None:
        path = unquote(urlsplit(self.path).path)
        self.hub.requests.append((method, path))
        parts = path.strip("/").split("/")
        if method == "POST" and not self.headers.get("Authorization"):  # every write needs a token, as on the hub
            self._send(
                401,
                b'{"error": "Invalid credentials"}',
                {"X-Error-Message": "Invalid credentials in Authorization header"},
            )
            return
        try:
            if parts[:2] == ["api", "models"]:
                self._api_models(method, parts[2:])
            elif parts[:2] == ["api", "repos"] and method == "POST":
                self._create(json.loads(self._body()))
            elif parts[:2] == ["api", "validate-yaml"]:
                self._body()
                self._json({"errors": [], "warnings": []})
            elif len(parts) >= 5 and parts[2] == "resolve":
                self._resolve("/".join(parts[:2]), "/".join(parts[4:]), head=method == "HEAD")
            else:
                self._missing("EntryNotFound")
        except Exception as error:  # a bug here must show in the test's output, not hang the client
            self._send(500, repr(error).encode())

    def _api_models(self, method: str, parts: list[str]) -> None:
        repo_id, rest = "/".join(parts[:2]), parts[2:]
        if repo_id not in self.hub.commits:
            self._missing()
        elif method == "GET" and (not rest or rest[0] == "revision"):
            siblings = [{"rfilename": p} for p in sorted(self.hub.files(repo_id))]
            self._json({"id": repo_id, "modelId": repo_id, "sha": self.hub.commits[repo_id], "siblings": siblings,
                        "private": False, "tags": [], "downloads": 0, "likes": 0})  # fmt: skip
        elif method == "GET" and rest[0] == "tree":
            folder = self.hub.repo(repo_id)
            entries = [{"type": "file", "path": p, "size": (folder / p).stat().st_size,
                        "oid": hashlib.sha1((folder / p).read_bytes()).hexdigest()}
                       for p in sorted(self.hub.files(repo_id))]  # fmt: skip
            self._json(entries)
        elif method == "POST" and rest[0] == "preupload":
            files = json.loads(self._body())["files"]
            self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        elif method == "POST" and rest[0] == "commit":
            self._commit(repo_id, self._body())
        else:
            self._missing("EntryNotFound")

    def _create(self, body: dict[str, Any]) -> None:
        name = body["name"] if "/" in body["name"] else f"{body.get('organization') or 'user'}/{body['name']}"
        url = f"{self.hub.endpoint}/{name}"
        if name in self.hub.commits:
            self._send(409, json.dumps({"error": "already exists", "url": url}).encode(),
                       {"Content-Type": "application/json"})  # fmt: skip
            return
        self.hub.repo(name).mkdir(parents=True, exist_ok=True)
        self.hub.commit(name)
        self._json({"url": url, "name": name, "id": name})

    def _commit(self, repo_id: str, body: bytes) -> None:
        folder = self.hub.repo(repo_id)
        for line in body.decode().splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                target = folder / item["value"]["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(base64.b64decode(item["value"]["content"]))
            elif item["key"] == "deletedFile":
                (folder / item["value"]["path"]).unlink(missing_ok=True)
            elif item["key"] != "header":
                raise ValueError(f"unsupported commit operation {item['key']}")
        oid = self.hub.commit(repo_id)
        self._json({"commitUrl": f"{self.hub.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid,
                    "pullRequestUrl": None})  # fmt: skip

    def _resolve(self, repo_id: str, filename: str, head: bool) -> None:
        file = self.hub.repo(repo_id) / filename
        if repo_id not in self.hub.commits:
            self._missing()
            return
        if not file.is_file():
            self._missing("EntryNotFound")
            return
        data = file.read_bytes()
        headers = {"X-Repo-Commit": self.hub.commits[repo_id], "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
        self._send(200, data, headers, head=head)

    def do_GET(self) -> None:  # http.server's names
        self._route("GET")

    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_POST(self) -> None:
        self._route("POST")


@contextmanager
def serve(root: Path) -> Iterator[FakeHub]:
    """Run a :class:`FakeHub` over ``root`` on a free loopback port until the block ends."""
    hub = FakeHub(root)
    handler = type("Handler", (_Handler,), {"hub": hub})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    hub.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
