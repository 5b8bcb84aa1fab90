"""The demo dataset download, against a loopback HTTP server: extract once, refuse unsafe or broken archives."""

from __future__ import annotations

import io
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from conftest import stripes
from headstart.data.demo import HYMENOPTERA_DIR, download_and_extract, find_local
from headstart.data.scan import load_dataset


def _jpeg(label: int, seed: int) -> bytes:
    buffer = io.BytesIO()
    stripes(label, np.random.default_rng(seed)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _hymenoptera_zip() -> bytes:
    return _zip(
        {
            f"{HYMENOPTERA_DIR}/{split}/{cls}/{i}.jpg": _jpeg(label, i)
            for split, count in (("train", 3), ("val", 2))
            for label, cls in enumerate(("ants", "bees"))
            for i in range(count)
        }
    )


class Server:
    """Serves ``routes`` (path -> body) on 127.0.0.1 and counts requests per path; anything else is a 404."""

    def __init__(self, routes: dict[str, bytes]):
        self.routes = routes
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                body = server.routes.get(self.path)
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


@pytest.fixture
def server() -> Iterator[Server]:
    server = Server(
        {
            "/hymenoptera_data.zip": _hymenoptera_zip(),
            "/evil.zip": _zip({f"{HYMENOPTERA_DIR}/train/a/x.jpg": b"x", "../evil": b"gotcha"}),
            # the sibling of the staging folder "x": a string-prefix check would let it through
            "/sibling.zip": _zip({f"{HYMENOPTERA_DIR}/train/a/x.jpg": b"x", "../x-evil/evil": b"gotcha"}),
            "/absolute.zip": _zip({f"{HYMENOPTERA_DIR}/train/a/x.jpg": b"x", "/tmp/evil": b"gotcha"}),
            "/page.zip": b"<html>Sorry, this file has moved</html>",
            "/wrong.zip": _zip({"other_data/train/a/x.jpg": b"x"}),
        }
    )
    server.thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.mark.timeout(60)
def test_download_extracts_once(server: Server, tmp_path: Path) -> None:
    root = tmp_path / "cache" / "datasets"
    folder = download_and_extract(server.url("/hymenoptera_data.zip"), root, timeout=10)
    assert folder == root / HYMENOPTERA_DIR
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg"))[:3] == [
        "train/ants/0.jpg",
        "train/ants/1.jpg",
        "train/ants/2.jpg",
    ]
    assert [p.name for p in root.iterdir()] == [HYMENOPTERA_DIR]  # the temporary download folder is gone
    dataset = load_dataset(folder)
    assert dataset.classes == ["ants", "bees"] and (len(dataset.train), len(dataset.val)) == (6, 4)
    again = download_and_extract(server.url("/hymenoptera_data.zip"), root, timeout=10)
    assert again == folder
    assert server.requests == ["/hymenoptera_data.zip"]  # the second call did not download


@pytest.mark.timeout(60)
def test_member_escaping_the_folder_is_refused(server: Server, tmp_path: Path) -> None:
    root = tmp_path / "deep" / "datasets"
    with pytest.raises(ValueError, match=r"archive member '\.\./evil' escapes the extraction folder"):
        download_and_extract(server.url("/evil.zip"), root, timeout=10)
    with pytest.raises(ValueError, match=r"archive member '\.\./x-evil/evil' escapes"):
        download_and_extract(server.url("/sibling.zip"), root, timeout=10)
    with pytest.raises(ValueError, match=r"archive member '/tmp/evil' escapes"):
        download_and_extract(server.url("/absolute.zip"), root, timeout=10)
    assert not list(tmp_path.rglob("*evil*"))
    assert not (root / HYMENOPTERA_DIR).exists()


@pytest.mark.timeout(60)
def test_missing_file_is_a_connection_error(server: Server, tmp_path: Path) -> None:
    url = server.url("/nothing-here.zip")
    with pytest.raises(ConnectionError, match="404") as info:
        download_and_extract(url, tmp_path / "datasets", timeout=10)
    message = str(info.value)
    assert url in message and "by hand" in message and "HEADSTART_DATA" in message
    assert list((tmp_path / "datasets").iterdir()) == []


@pytest.mark.timeout(60)
def test_non_zip_body_and_wrong_layout(server: Server, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a valid zip archive"):
        download_and_extract(server.url("/page.zip"), tmp_path / "datasets", timeout=10)
    with pytest.raises(ValueError, match="archive has no hymenoptera_data/train and hymenoptera_data/val"):
        download_and_extract(server.url("/wrong.zip"), tmp_path / "datasets", timeout=10)
    assert list((tmp_path / "datasets").iterdir()) == []


def test_find_local_honours_headstart_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no candidate folder relative to the working directory
    monkeypatch.delenv("HEADSTART_DATA", raising=False)
    assert find_local() is None
    copy = tmp_path / "elsewhere" / HYMENOPTERA_DIR
    (copy / "train").mkdir(parents=True)
    monkeypatch.setenv("HEADSTART_DATA", str(tmp_path / "elsewhere"))
    assert find_local() is None  # a copy without val/ is incomplete
    (copy / "val").mkdir()
    assert find_local() == copy.resolve()
    (tmp_path / "data" / HYMENOPTERA_DIR / "train").mkdir(parents=True)
    (tmp_path / "data" / HYMENOPTERA_DIR / "val").mkdir()
    assert find_local() == copy.resolve()  # the variable wins over the working-directory candidates
    monkeypatch.delenv("HEADSTART_DATA")
    assert find_local() == (tmp_path / "data" / HYMENOPTERA_DIR).resolve()
