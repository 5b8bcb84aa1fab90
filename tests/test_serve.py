"""The REST service over real HTTP on a loopback port, and the web page in a headless Chromium."""

from __future__ import annotations

import hmac
import http.client
import io
import re
import stat
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_folder, stripes
from headstart.cli import main
from headstart.data.scan import collect_files
from headstart.errors import ConfigError
from headstart.insight.predictor import load
from headstart.models.backbones import create_backbone
from headstart.models.classifier import Classifier, save_classifier
from headstart.serving import guard
from headstart.serving.guard import check_bind, key_file_warning, resolve_api_key
from headstart.serving.serve import FairLock, create_app, serve_in_thread

CHROMIUM = Path("/usr/bin/chromium")
LIMIT = 300_000  # bytes; small so the oversize tests stay fast
CLASSES = ["horizontal", "vertical"]
KEY = "test-key-0123456789abcdef"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


def jpeg(label: int, seed: int = 0, size: tuple[int, int] = (48, 40)) -> bytes:
    buffer = io.BytesIO()
    stripes(label, np.random.default_rng(seed), size).save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels: a decompression bomb's calling card."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, tiny_weights: Path) -> Iterator[tuple[str, Path, Path]]:
    """A tiny_cnn classifier and an index of its synthetic collection, served on a loopback port."""
    from headstart.features.retrieval import build_index

    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    model = Classifier(create_backbone("tiny_cnn", weights=str(tiny_weights)), 2)
    save_classifier(model.eval(), root / "run", {"classes": CLASSES})
    data = make_folder(root / "data", {"train": 4})
    build_index(data, root / "index", backbone="tiny_cnn", weights=str(tiny_weights), cache_dir=str(root / "cache"))
    with serve_in_thread(create_app(root / "run", root / "index", max_upload_bytes=LIMIT)) as url:
        yield url, root / "run", data


@pytest.fixture(scope="module")
def client(tiny: tuple[str, Path, Path]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=tiny[0], timeout=30) as c:
        yield c


def test_health_and_docs(client: httpx.Client) -> None:
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["classes"] == CLASSES and health["backbone"] == "tiny_cnn"
    assert health["index"] is True and health["index_size"] == 8
    assert "/predict" in client.get("/openapi.json").json()["paths"]


def test_predict_one_matches_the_python_api(client: httpx.Client, tiny: tuple[str, Path, Path]) -> None:
    _, run, data = tiny
    path = collect_files([data])[0]
    response = client.post("/predict", files={"files": (path.name, path.read_bytes(), "image/jpeg")},
                           params={"top_k": 2})  # fmt: skip
    assert response.status_code == 200
    (result,) = response.json()["results"]
    (expected,), _ = load(run).predict(path, top_k=2)
    assert result["filename"] == path.name and result["label"] == expected.label
    assert [t["label"] for t in result["top"]] == [name for name, _ in expected.top]
    assert result["probability"] == pytest.approx(expected.probability, abs=1e-2)  # bf16 where the CPU has it
    assert sum(t["probability"] for t in result["top"]) == pytest.approx(1.0, abs=1e-5)


def test_predict_several_keeps_order(client: httpx.Client) -> None:
    images = [("files", (f"img{i}.jpg", jpeg(i % 2, seed=i), "image/jpeg")) for i in range(3)]
    response = client.post("/predict", files=images, params={"top_k": 1})
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["filename"] for r in results] == ["img0.jpg", "img1.jpg", "img2.jpg"]
    assert all(len(r["top"]) == 1 and r["label"] in CLASSES for r in results)


@pytest.mark.parametrize(
    ("name", "payload", "message"),
    [
        ("notes.txt", b"this is not an image\n" * 10, "notes.txt: cannot decode"),
        ("cut.jpg", jpeg(0, size=(400, 300))[:2000], "cut.jpg: cannot decode"),
        ("empty.jpg", b"", "empty.jpg: empty file"),
        ("bomb.png", png_claiming(20_000, 20_000), "decompression bomb"),
        ("bomb2.png", png_claiming(12_000, 9_000), "decompression bomb"),
    ],
)
def test_bad_images_are_400_naming_the_file(client: httpx.Client, name: str, payload: bytes, message: str) -> None:
    response = client.post("/predict", files={"files": (name, payload, "application/octet-stream")})
    assert response.status_code == 400
    assert message in response.json()["detail"]


def test_one_bad_file_among_good_ones_is_named(client: httpx.Client) -> None:
    files = [("files", ("good.jpg", jpeg(0), "image/jpeg")), ("files", ("bad.gif", b"GIF89a-garbage", "image/gif"))]
    response = client.post("/predict", files=files)
    assert response.status_code == 400 and response.json()["detail"].startswith("bad.gif")


def test_oversize_upload_is_413(client: httpx.Client) -> None:
    big = np.random.default_rng(0).integers(0, 256, LIMIT + 1000, dtype=np.uint8).tobytes()
    response = client.post("/predict", files={"files": ("big.jpg", big, "image/jpeg")})
    assert response.status_code == 413  # refused on the Content-Length header, before reading the body


def test_oversize_chunked_upload_without_length_is_413(client: httpx.Client) -> None:
    boundary = "headstartboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()  # fmt: skip

    def body() -> Iterator[bytes]:  # a generator body is sent chunked: the server must count what it reads
        yield head
        for _ in range(LIMIT // 10_000 + 5):
            yield b"\xff" * 10_000

    response = client.post("/predict", content=body(),
                           headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})  # fmt: skip
    assert response.status_code == 413 and "300,000-byte limit" in response.json()["detail"]


def test_thumbnails_only_for_indexed_ids(client: httpx.Client) -> None:
    ok = client.get("/thumb/0")
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(ok.content)).size[0] <= 160
    for url in ("/thumb/999", "/thumb/-1", "/thumb/..%2F..%2F..%2Fetc%2Fpasswd", "/thumb/../../etc/passwd",
                "/thumb/%2Fetc%2Fpasswd"):  # fmt: skip
        response = client.get(url)
        assert response.status_code in (404, 422), url
        assert b"root:" not in response.content


def test_search_returns_the_indexed_twin_first(client: httpx.Client, tiny: tuple[str, Path, Path]) -> None:
    path = collect_files([tiny[2]])[3]
    response = client.post("/search", files={"files": (path.name, path.read_bytes(), "image/jpeg")}, params={"k": 3})
    assert response.status_code == 200
    neighbours = response.json()["results"][0]["neighbours"]
    assert len(neighbours) == 3 and neighbours[0]["name"] == path.name
    assert neighbours[0]["score"] == pytest.approx(1.0, abs=1e-2)
    assert [n["score"] for n in neighbours] == sorted((n["score"] for n in neighbours), reverse=True)
    assert client.get(neighbours[0]["thumb"]).status_code == 200


def test_concurrent_requests_agree(client: httpx.Client, tiny: tuple[str, Path, Path]) -> None:
    images = [jpeg(0, seed=1), jpeg(1, seed=2)]

    def ask(i: int) -> tuple[int, dict]:
        with httpx.Client(base_url=tiny[0], timeout=60) as c:
            response = c.post("/predict", files={"files": ("x.jpg", images[i % 2], "image/jpeg")}, params={"top_k": 2})
            return response.status_code, response.json()["results"][0]

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(ask, range(20)))
    assert all(code == 200 for code, _ in answers)
    for parity in (0, 1):
        same = [answer["top"] for i, (_, answer) in enumerate(answers) if i % 2 == parity]
        assert all(top == same[0] for top in same)


def test_search_without_index_is_404_with_a_hint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    save_classifier(Classifier(create_backbone("tiny_cnn", pretrained=False), 2).eval(), tmp_path, {"classes": CLASSES})
    with serve_in_thread(create_app(tmp_path)) as url, httpx.Client(base_url=url) as c:
        response = c.post("/search", files={"files": ("a.jpg", jpeg(0), "image/jpeg")})
        assert response.status_code == 404 and "--index" in response.json()["detail"]
        assert c.get("/thumb/0").status_code == 404
        page = c.get("/")
        assert page.status_code == 200 and '<script src="static/service.js">' in page.text
        assert "http://" not in page.text and "https://" not in page.text  # no external assets
        for asset, kind in (("service.js", "javascript"), ("service.css", "text/css"), ("style.css", "text/css")):
            response = c.get(f"/static/{asset}")
            assert response.status_code == 200 and kind in response.headers["content-type"] and response.text, asset
        assert c.get("/static/missing.js").status_code == 404


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (.ci/run installs it)")
def test_web_page_in_chromium(tmp_path: Path, hymenoptera: Path) -> None:
    """Upload a real ant photo through the page; the bars must show 'ants' first and the thumbnails appear."""
    from playwright.sync_api import sync_playwright

    from headstart.features.embeddings import embed
    from headstart.features.retrieval import build_index
    from headstart.models.heads import fit_logistic

    train = {c: sorted((hymenoptera / "train" / c).glob("*.jpg"))[:12] for c in ("ants", "bees")}
    files = train["ants"] + train["bees"]
    labels = np.array([0] * 12 + [1] * 12)
    backbone = create_backbone("efficientnet_lite0")
    features = embed(backbone, files, batch_size=8, cache_root=tmp_path / "cache", workers=0).features
    model = Classifier(backbone, 2)
    model.head, _ = fit_logistic(features, labels, 2, c=1.0)
    save_classifier(model.eval(), tmp_path / "run", {"classes": ["ants", "bees"]})
    build_index(files, tmp_path / "index", cache_dir=str(tmp_path / "cache"))
    query = sorted((hymenoptera / "val" / "ants").glob("*.jpg"))[0]
    (expected,), _ = load(tmp_path / "run").predict(query)
    assert expected.label == "ants"

    app = create_app(tmp_path / "run", tmp_path / "index")
    with serve_in_thread(app) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('index of 24')")
            page.set_input_files("#file", str(query))
            page.wait_for_selector("#bars .row", timeout=60_000)
            assert page.locator("#bars .bar-label").first.text_content() == "ants"
            page.wait_for_selector("#thumbs img", timeout=60_000)
            page.wait_for_function(
                "[...document.querySelectorAll('#thumbs img')].every(i => i.complete && i.naturalWidth > 0)"
            )
            assert page.locator("#thumbs img").count() == 8
            assert page.locator("#error").text_content() == ""
        finally:
            browser.close()


# --- Access: an API key --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(tiny: tuple[str, Path, Path]) -> Iterator[str]:
    """The tiny model and its index again, behind ``KEY``."""
    run = tiny[1]
    with serve_in_thread(create_app(run, run.parent / "index", api_key=KEY)) as url:
        yield url


def test_without_the_key_only_the_page_and_liveness_answer(keyed: str) -> None:
    image = {"files": ("a.jpg", jpeg(0), "image/jpeg")}
    routes = [("POST", "/predict"), ("POST", "/search"), ("GET", "/thumb/0"), ("GET", "/docs"),
              ("GET", "/openapi.json"), ("GET", "/no/such/route")]  # fmt: skip
    with httpx.Client(base_url=keyed, timeout=30) as c:  # one connection: a refused upload must not spoil it
        for method, url in routes:
            files = image if method == "POST" else None
            for headers, message in (({}, "needs an API key"), ({"X-API-Key": KEY[:-1] + "x"}, "wrong API key"),
                                     ({"Authorization": f"Bearer {KEY}x"}, "wrong API key"),
                                     ({"Authorization": f"Basic {KEY}"}, "needs an API key")):  # fmt: skip
                response = c.request(method, url, files=files, headers=headers)
                assert response.status_code == 401, (url, headers)
                assert response.headers["www-authenticate"].startswith("Bearer")
                assert message in response.json()["detail"] and "X-API-Key" in response.json()["detail"]
        assert c.get("/health").json() == {"status": "ok", "auth": "required"}  # liveness, nothing about the model
        assert c.get("/health", headers={"X-API-Key": "a-wrong-key-of-some-length"}).status_code == 401
        assert c.get("/").status_code == 200 and c.get("/static/service.js").status_code == 200


def test_no_path_around_the_key(keyed: str) -> None:
    """Dot segments under the open /static/ and a WebSocket handshake are refused like any other request."""
    host, port = keyed.removeprefix("http://").split(":")
    for path in ("/static/../openapi.json", "/static/%2e%2e/openapi.json", "/static/..%2Fopenapi.json"):
        connection = http.client.HTTPConnection(host, int(port), timeout=30)  # sends the path as written
        connection.request("GET", path)
        response = connection.getresponse()
        assert response.status == 401 and b"openapi" not in response.read(), path
        connection.close()
    upgrade = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}  # fmt: skip
    assert httpx.get(keyed + "/ws", headers=upgrade).status_code in (401, 403)  # never 101 Switching Protocols


@pytest.mark.parametrize("headers", [{"Authorization": f"Bearer {KEY}"}, {"authorization": f"bearer  {KEY}"},
                                     {"X-API-Key": KEY}])  # fmt: skip
def test_the_key_opens_every_route(keyed: str, headers: dict[str, str]) -> None:
    with httpx.Client(base_url=keyed, timeout=30, headers=headers) as c:
        response = c.post("/predict", files={"files": ("a.jpg", jpeg(0), "image/jpeg")})
        assert response.status_code == 200 and response.json()["results"][0]["label"] in CLASSES
        health = c.get("/health").json()
        assert health["classes"] == CLASSES and health["auth"] == "key"
        thumb = c.get("/thumb/0")
        assert thumb.status_code == 200 and thumb.headers["cache-control"].startswith("private")
        assert c.post("/search", files={"files": ("a.jpg", jpeg(1), "image/jpeg")}).status_code == 200
        assert "/predict" in c.get("/openapi.json").json()["paths"]


def test_the_key_is_compared_in_constant_time(keyed: str, monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(guard.hmac, "compare_digest", spy)
    for key in ("short", KEY + "-and-much-longer-than-the-real-one", KEY):
        response = httpx.get(keyed + "/openapi.json", headers={"X-API-Key": key})
        assert response.status_code == (200 if key == KEY else 401)
    # One digest comparison per request, of equal lengths whatever the length of the key sent.
    assert len(compared) == 3 and {(len(a), len(b)) for a, b in compared} == {(32, 32)}


def test_api_key_sources(tmp_path: Path) -> None:
    assert resolve_api_key(environ={}) is None
    assert resolve_api_key(environ={"HEADSTART_API_KEY": ""}) is None
    assert resolve_api_key(environ={"HEADSTART_API_KEY": KEY}) == KEY
    assert resolve_api_key(api_key=KEY, environ={"HEADSTART_API_KEY": "another-key-0123456789"}) == KEY
    path = tmp_path / "key"
    path.write_text(f"  {KEY}\n")
    assert resolve_api_key(key_file=path, environ={"HEADSTART_API_KEY": "another-key-0123456789"}) == KEY
    path.chmod(0o644)
    assert f"chmod 600 {path}" in (key_file_warning(path) or "")
    path.chmod(stat.S_IRUSR | stat.S_IWUSR)
    assert key_file_warning(path) is None
    with pytest.raises(ConfigError, match="not both"):
        resolve_api_key(api_key=KEY, key_file=path)
    with pytest.raises(ConfigError, match=re.escape(f"--api-key-file {tmp_path / 'missing'}: cannot read")):
        resolve_api_key(key_file=tmp_path / "missing")
    for bad in ("short", "has a space 0123456789", "ключ-0123456789abcdef", "tab\tinside0123456789"):
        with pytest.raises(ConfigError, match=r"at least 16 characters.*secrets\.token_urlsafe"):
            resolve_api_key(api_key=bad)
    with pytest.raises(ConfigError, match="HEADSTART_API_KEY: an API key must"):
        resolve_api_key(environ={"HEADSTART_API_KEY": "short"})


@pytest.mark.parametrize(
    ("host", "allowed"),
    [("127.0.0.1", True), ("localhost", True), ("::1", True), ("[::1]", True), ("127.0.0.2", True),
     ("0.0.0.0", False), ("::", False), ("192.168.1.5", False), ("10.0.0.1", False), ("example.com", False)],
)  # fmt: skip
def test_only_loopback_binds_without_a_key(host: str, allowed: bool) -> None:
    assert check_bind(host, KEY) is None  # with a key, any address
    if allowed:
        assert check_bind(host, None) is None and check_bind(host, None, insecure=True) is None
    else:
        with pytest.raises(ConfigError, match=r"--api-key-file FILE.*HEADSTART_API_KEY.*--insecure"):
            check_bind(host, None)
        assert "anyone who can reach" in (check_bind(host, None, insecure=True) or "")


def test_cli_refuses_a_network_address_without_a_key_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HEADSTART_API_KEY", raising=False)
    assert main(["serve", str(tmp_path / "no-such-run"), "--host", "0.0.0.0"]) == 2  # the run is never opened
    error = capsys.readouterr().err
    assert "headstart serve: error: --host 0.0.0.0 is reachable" in error and "--insecure" in error
    assert main(["serve", str(tmp_path / "no-such-run"), "--max-queue", "0"]) == 2
    assert "--max-queue 0" in capsys.readouterr().err


def test_cli_serves_with_a_key_file_or_insecure(
    tiny: tuple[str, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import uvicorn

    started: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: started.update(app=app, **kwargs))
    monkeypatch.setenv("HEADSTART_API_KEY", "the-environment-key-0123")
    path = tmp_path / "key"
    path.write_text(KEY + "\n")
    path.chmod(stat.S_IRUSR | stat.S_IWUSR)
    args = ["serve", str(tiny[1]), "--host", "0.0.0.0", "--port", "8123", "--max-queue", "3"]
    assert main([*args, "--api-key-file", str(path)]) == 0
    assert (started["host"], started["port"]) == ("0.0.0.0", 8123)
    assert "API key required; at most 3 requests" in capsys.readouterr().out
    with serve_in_thread(started["app"]) as url:
        assert httpx.get(url + "/openapi.json").status_code == 401
        assert httpx.get(url + "/health", headers={"X-API-Key": "the-environment-key-0123"}).status_code == 401
        health = httpx.get(url + "/health", headers={"X-API-Key": KEY}).json()  # the file's key beats the variable
        assert health["auth"] == "key" and health["queue"]["limit"] == 3

    monkeypatch.delenv("HEADSTART_API_KEY")
    assert main([*args, "--insecure"]) == 0
    assert "warning: serving 0.0.0.0 with no API key" in capsys.readouterr().err
    with serve_in_thread(started["app"]) as url:
        assert httpx.get(url + "/health").json()["auth"] == "none"
        assert httpx.get(url + "/health", headers={"Host": "example.org"}).status_code == 200  # --insecure: any name


def test_an_open_service_answers_only_requests_addressed_to_loopback(client: httpx.Client) -> None:
    """Without a key, a page that reaches the loopback service through DNS rebinding names its own host: refused."""
    for host in ("localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000"):
        assert client.get("/health", headers={"Host": host}).status_code == 200, host
    for host in ("attacker.example", "attacker.example:8000", "localhost.attacker.example", "10.0.0.7:8000"):
        response = client.get("/health", headers={"Host": host})
        assert response.status_code == 403 and "loopback" in response.json()["detail"], host
    image = {"files": ("a.jpg", jpeg(0), "image/jpeg")}
    assert client.post("/predict", files=image, headers={"Host": "attacker.example"}).status_code == 403


# --- Overload: a bounded queue --------------------------------------------------------------------------------------


def test_past_the_queue_requests_get_503_at_once(tiny: tuple[str, Path, Path]) -> None:
    """Two slow requests fill a queue of 2: the third is 503 with Retry-After in well under a second, health still
    answers, and after the two finish the service takes requests again; failed requests give their places back."""
    app = create_app(tiny[1], api_key=KEY, max_queue=2)
    service, release = app.state.service, threading.Event()
    predict = service.predict

    def slow(*args: object) -> object:
        release.wait(60)
        return predict(*args)

    image = {"files": ("a.jpg", jpeg(0), "image/jpeg")}
    with (serve_in_thread(app) as url, ThreadPoolExecutor(2) as pool,
          httpx.Client(base_url=url, timeout=60, headers={"X-API-Key": KEY}) as c):  # fmt: skip
        for _ in range(3):  # a 400 and a 413 must not keep their places (else the third would be shed)
            assert c.post("/predict", files={"files": ("x.txt", b"not an image", "text/plain")}).status_code == 400
            assert c.post("/predict", files={"files": ("big.jpg", b"\0" * 20 * 2**20, "image/jpeg")}).status_code == 413
        service.predict = slow
        try:
            held = [pool.submit(c.post, "/predict", files=image) for _ in range(2)]
            deadline = time.monotonic() + 30
            while c.get("/health").json()["queue"]["in_flight"] < 2:
                assert time.monotonic() < deadline, "the two slow requests never arrived"
                time.sleep(0.02)
            tic = time.perf_counter()
            shed = c.post("/predict", files=image)
            assert shed.status_code == 503 and time.perf_counter() - tic < 1.0
            assert int(shed.headers["retry-after"]) >= 1 and "busy" in shed.json()["detail"]
            assert httpx.post(url + "/predict", files=image).status_code == 401  # no key: refused before queueing
            assert c.get("/health").status_code == 200 and c.get("/").status_code == 200  # never shed
        finally:
            release.set()
        assert [future.result().status_code for future in held] == [200, 200]
        assert c.post("/predict", files=image).status_code == 200
        assert c.get("/health").json()["queue"] == {"limit": 2, "in_flight": 0, "shed": 1, "served": 9}


def test_the_model_is_taken_in_arrival_order() -> None:
    """Eight threads queue for the forward pass one after another; they get it in that order, not as the scheduler
    happens to wake them."""
    lock, order = FairLock(), []

    def take(i: int) -> None:
        with lock:
            order.append(i)
            time.sleep(0.001)  # give a later thread the chance to jump the queue, were it possible

    lock.__enter__()
    threads = []
    for i in range(8):
        threads.append(threading.Thread(target=take, args=(i,)))
        threads[-1].start()
        deadline = time.monotonic() + 10
        while lock.waiting() < i + 1:  # thread i is waiting before thread i + 1 starts
            assert time.monotonic() < deadline
            time.sleep(0.001)
    lock.__exit__(None, None, None)
    for thread in threads:
        thread.join(10)
    assert order == list(range(8))
    with lock:  # free again once the last one left
        assert lock.waiting() == 0


# --- The page behind a key -----------------------------------------------------------------------------------------


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (.ci/run installs it)")
def test_web_page_asks_for_the_key_once(keyed: str, tiny: tuple[str, Path, Path]) -> None:
    """A wrong key is asked for again; the right one is kept for the tab: predictions, thumbnails, and a reload
    that does not ask."""
    from playwright.sync_api import sync_playwright

    model_line = "document.getElementById('model').textContent"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        try:
            page = browser.new_page()
            page.goto(keyed + "/")
            page.wait_for_selector("#auth", state="visible")
            assert "needs an API key" in page.evaluate(model_line)
            page.fill("#key", "a-wrong-key-0123456789")
            page.click("#auth button")
            page.wait_for_function("document.getElementById('error').textContent.includes('refused that key')")
            assert page.is_visible("#auth")
            page.fill("#key", KEY)
            page.press("#key", "Enter")
            page.wait_for_function(f"{model_line}.includes('index of 8')")
            assert page.is_hidden("#auth") and page.locator("#error").text_content() == ""
            page.set_input_files("#file", str(collect_files([tiny[2]])[0]))
            page.wait_for_selector("#bars .row", timeout=60_000)
            thumbs = "[...document.querySelectorAll('#thumbs img')]"
            page.wait_for_function(f"{thumbs}.length === 8 && {thumbs}.every(i => i.naturalWidth > 0)")
            page.reload()
            page.wait_for_function(f"{model_line}.includes('index of 8')")
            assert page.is_hidden("#auth")  # asked once: the tab kept it
            assert page.evaluate("sessionStorage.getItem('headstart-api-key')") == KEY
            assert page.evaluate("localStorage.length") == 0  # not kept beyond the tab
        finally:
            browser.close()
