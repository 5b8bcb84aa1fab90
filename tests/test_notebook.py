"""Results in a notebook: ``_repr_html_`` of a train result, a loaded model (a run folder and an ONNX export), a
comparison and an audit: the object's own figures, a metrics table and inline images, parsed without a notebook."""

from __future__ import annotations

import base64
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

import headstart
from headstart.insight.audit import audit
from headstart.serving.export import export
from headstart.training.compare import CompareResult, RunRow, summarise
from headstart.training.run import TrainResult

FAST = {"backbone": "tiny_cnn", "batch_size": 8, "num_workers": 0, "run.report": False}


class Parsed(HTMLParser):
    """The text of every table cell and the ``src`` of every image of an HTML fragment."""

    def __init__(self, html: str):
        super().__init__()
        self.cells: list[str] = []
        self.images: list[str] = []
        self.tags: list[str] = []
        self._cell: list[str] | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag in ("td", "th"):
            self._cell = []
        if tag == "img":
            self.images.append(dict(attrs).get("src") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.cells.append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def decoded(src: str, kind: str = "png") -> bytes:
    """The bytes of a ``data:image/<kind>;base64,`` URI, checked to be that kind of image."""
    prefix = f"data:image/{kind};base64,"
    assert src.startswith(prefix), src[:40]
    data = base64.b64decode(src[len(prefix) :], validate=True)
    assert data.startswith(b"\x89PNG\r\n\x1a\n" if kind == "png" else b"\xff\xd8\xff")
    return data


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory: pytest.TempPathFactory, tiny_weights: Path) -> TrainResult:
    """Two epochs of fine-tuning tiny_cnn on stripes: enough history for learning curves."""
    from conftest import make_folder

    root = tmp_path_factory.mktemp("notebook")
    data = make_folder(root / "data", {"train": 8, "val": 5})
    return headstart.train(data, strategy="finetune", weights=str(tiny_weights), epochs=2, out=str(root / "run"),
                           cache_dir=str(root / "cache"), **FAST)  # fmt: skip


def test_train_result_shows_its_metrics_confusion_matrix_and_curves(finetuned: TrainResult) -> None:
    page = Parsed(finetuned._repr_html_())
    assert "html" not in page.tags and "body" not in page.tags  # a fragment, not a page
    assert f"{finetuned.metrics['accuracy']:.4f}" in page.cells and "balanced accuracy" in page.cells
    assert "finetune" in page.cells and "horizontal" in page.cells  # the model row and the per-class table
    assert len(page.images) == 2  # the confusion matrix and the learning curves
    for src in page.images:
        decoded(src)


def test_loaded_model_shows_what_its_run_folder_recorded(finetuned: TrainResult) -> None:
    model = headstart.load(finetuned.run_dir)
    page = Parsed(model._repr_html_())
    recorded = model.info["val_metrics"]["accuracy"]
    assert f"{recorded:.4f}" in page.cells and "horizontal, vertical" in page.cells
    assert len(page.images) == 2 and all(decoded(src) for src in page.images)


def test_onnx_export_shows_its_metadata_without_borrowed_figures(finetuned: TrainResult) -> None:
    model = headstart.load(export(finetuned.run_dir, "onnx"))
    page = Parsed(model._repr_html_())
    assert str(finetuned.run_dir / "classifier.onnx") in page.cells
    assert f"{model.info['val_metrics']['accuracy']:.4f}" in page.cells
    assert page.images == []  # the run folder's figures are the PyTorch model's, not this file's


def test_comparison_shows_its_table_and_chart(tmp_path: Path) -> None:
    runs = [
        RunRow("extract", seed, str(tmp_path / f"extract-seed{seed}"), acc, acc - 0.05, 1.5, 130, 80.0)
        for seed, acc in enumerate((0.9, 0.8))
    ] + [RunRow("scratch", 0, str(tmp_path / "scratch-seed0"), 0.6, 0.55, 9.0, 50_000, 30.0)]
    result = CompareResult(tmp_path, runs, summarise(runs, ("extract", "scratch")), tmp_path / "report.html", 10)
    page = Parsed(result._repr_html_())
    assert "85.0 ± 7.1" in page.cells and "60.0 ± 0.0" in page.cells  # accuracy mean ± std, in percent
    assert "0.8000" in page.cells and "50,000" in page.cells
    assert len(page.images) == 1 and decoded(page.images[0])


def test_audit_shows_counts_and_thumbnails_of_flagged_files(image_folder: Path) -> None:
    original = image_folder / "train" / "horizontal" / "horizontal_000.jpg"
    shutil.copy(original, image_folder / "val" / "horizontal" / "copy.jpg")  # leakage: a training image in val
    (image_folder / "train" / "vertical" / "broken.jpg").write_bytes(b"not a jpeg")
    result = audit(image_folder, backbone=None)
    page = Parsed(result._repr_html_())
    counts = dict(zip(page.cells[2::2], page.cells[3::2], strict=False))  # after the (kind, files) header
    assert counts["leakage"] == "2" and counts["unreadable"] == "1"
    assert len(page.images) == 2  # the two copies; the broken file has no thumbnail
    for src in page.images:
        decoded(src, "jpeg")
