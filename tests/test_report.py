"""The run report: figures are valid PNGs referenced by a self-contained HTML page that renders in Chromium."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import headstart
from conftest import make_folder
from headstart.data.scan import ImageRecord
from headstart.insight.report import FIGURES, ValPass, build_report, find_cam_layer, plot_embedding_map
from headstart.models.backbones import create_backbone
from headstart.models.classifier import Classifier

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
FAST = {"backbone": "tiny_cnn", "batch_size": 8, "num_workers": 0}


@pytest.fixture(scope="module")
def finetune_run(tmp_path_factory: pytest.TempPathFactory, tiny_weights: Path) -> Path:
    """A one-epoch finetune run on stripes, with an unreadable file in the data so the skipped list has an entry."""
    root = tmp_path_factory.mktemp("report")
    data = make_folder(root / "data", {"train": 10, "val": 8})
    (data / "train" / "horizontal" / "broken.jpg").write_bytes(b"not an image at all")
    result = headstart.train(data, strategy="finetune", weights=str(tiny_weights), epochs=2, out=str(root / "run"),
                       cache_dir=str(root / "cache"), **FAST)  # fmt: skip
    return result.run_dir


def image_sources(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


def assert_renders_in_chromium(page: Path) -> None:
    """Open ``page`` from disk in headless Chromium: every image decoded (naturalWidth > 0) and a table is present."""
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium); the browser check needs it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            tab = browser.new_page()
            tab.goto(page.resolve().as_uri(), wait_until="load")
            images = tab.eval_on_selector_all(
                "img", "els => els.map(e => ({src: e.getAttribute('src'), ok: e.complete && e.naturalWidth > 0}))"
            )
            tables = tab.locator("table").count()
        finally:
            browser.close()
    assert images, "the report shows no images"
    assert [i["src"] for i in images if not i["ok"]] == []
    assert tables >= 1


def test_report_files_and_html(finetune_run: Path) -> None:
    page = build_report(finetune_run)
    assert page == finetune_run / "report.html"
    html = page.read_text()
    sources = image_sources(html)
    expected = {"learning_curves", "confusion_matrix", "per_class", "misclassified", "gradcam", "embedding_map"}
    shown = {Path(s).stem for s in sources}
    # misclassified.png only exists when the model makes mistakes; everything else always does on a CNN
    assert expected - {"misclassified"} <= shown
    for src in sources:
        assert not src.startswith(("http:", "https:", "/")), src  # relative: opens offline from any folder
        png = finetune_run / src
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", src
        with Image.open(png) as im:
            assert im.width > 100 and im.height > 100
            # not a blank canvas: a real plot has many distinct colours
            assert len(im.convert("RGB").getcolors(1 << 20) or []) > 20, src
    assert 'alt="' in html and "<script" not in html and "cdn" not in html.lower()
    # the report re-runs validation through the saved model: the numbers match the run's own metrics.json
    saved = json.loads((finetune_run / "metrics.json").read_text())["val"]
    summary = re.search(r'<table id="summary">(.*?)</table>', html, re.S)
    assert summary and f"<td>{saved['accuracy']:.4f}</td>" in summary.group(1)
    assert f"<td>{saved['n']}</td>" in summary.group(1)
    assert "Grad-CAM on layer backbone." in html
    assert "broken.jpg" in html  # skipped-files list


def test_report_renders_in_chromium(finetune_run: Path) -> None:
    page = finetune_run / "report.html"
    if not page.is_file():
        build_report(finetune_run)
    assert_renders_in_chromium(page)


def test_rebuild_via_cli_removes_stale_figures(finetune_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from headstart.cli import COMMANDS
    from headstart.cli.report import add_parsers

    stale = finetune_run / FIGURES / "old_model.png"
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"\x89PNG stale")
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", str(finetune_run)])
    assert COMMANDS[args.command](args) == 0
    assert str(finetune_run / "report.html") in capsys.readouterr().out
    assert not stale.exists()


def test_extract_report_single_point_and_no_skips(image_folder: Path, tiny_weights: Path, cache_dir: Path,
                                                  tmp_path: Path) -> None:  # fmt: skip
    result = headstart.train(image_folder, strategy="extract", weights=str(tiny_weights), out=str(tmp_path / "run"),
                       cache_dir=str(cache_dir), **FAST)  # fmt: skip
    html = build_report(result.run_dir).read_text()
    assert "One point: the extract strategy" in html
    assert "Skipped files (0)" in html
    assert (result.run_dir / FIGURES / "learning_curves.png").is_file()


def test_report_needs_a_run_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"model\.json not found"):
        build_report(tmp_path)


def test_cam_layer_is_last_feature_map_of_a_cnn_and_absent_for_a_vit() -> None:
    cnn = Classifier(create_backbone("tiny_cnn", pretrained=False), 2).eval()
    layer, where = find_cam_layer(cnn, 64, torch.device("cpu"))
    assert layer is not None and where.startswith("backbone.net.features")
    with torch.no_grad():
        maps: list[torch.Tensor] = []
        handle = layer.register_forward_hook(lambda _m, _i, out: maps.append(out))
        cnn(torch.zeros(1, 3, 64, 64))
        handle.remove()
    assert maps[0].shape[1:] == (64, 8, 8)  # the last conv stage (stride 8), not the 1x1 pooled map

    vit_backbone = create_backbone("test_vit", pretrained=False)
    vit = Classifier(vit_backbone, 2).eval()
    layer, why = find_cam_layer(vit, vit_backbone.preprocessing.input_size, torch.device("cpu"))
    assert layer is None and "transformer" in why


def _val_pass(n: int, classes: int = 2) -> ValPass:
    rng = np.random.default_rng(0)
    labels = np.arange(n) % classes
    features = rng.normal(size=(n, 16)) + labels[:, None] * 4.0
    probs = np.eye(classes)[labels] * 0.9 + 0.05
    records = [ImageRecord(Path(f"{i}.jpg"), int(labels[i]), "d", 8, 8, "RGB") for i in range(n)]
    return ValPass(records, labels, probs, features.astype(np.float32), [])


@pytest.mark.parametrize(("n", "method"), [(6, "PCA"), (24, "t-SNE")])
def test_embedding_map_method(n: int, method: str, tmp_path: Path) -> None:
    name, used = plot_embedding_map(_val_pass(n), ["a", "b"], tmp_path / "map.png")
    assert name == "map.png" and used.startswith(method)
    with Image.open(tmp_path / "map.png") as im:
        assert im.width > 200


def test_embedding_map_declines_two_points(tmp_path: Path) -> None:
    name, why = plot_embedding_map(_val_pass(2), ["a", "b"], tmp_path / "map.png")
    assert name is None and "too few" in why and not (tmp_path / "map.png").exists()
