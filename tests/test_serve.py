"""The REST service over real HTTP on a loopback port, and the web page in a headless Chromium."""

from __future__ import annotations

import io
import struct
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
from headstart.data.scan import collect_files
from headstart.insight.predictor import load
from headstart.models.backbones import create_backbone
from headstart.models.classifier import Classifier, save_classifier
from headstart.serving.serve import create_app, serve_in_thread

CHROMIUM = Path("/usr/bin/chromium")
LIMIT = 300_000  # bytes; small so the oversize tests stay fast
CLASSES = ["horizontal", "vertical"]


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

    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
    app = create_app(tmp_path / "run", tmp_path / "index")
    with serve_in_thread(app) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=args)
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
