"""Integration: the real offline EfficientNet-Lite0 weights on the real ants/bees set, as a user runs it."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

import headstart

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def extract_run(
    hymenoptera: Path, tmp_path_factory: pytest.TempPathFactory, ants_bees_cache: Path
) -> headstart.TrainResult:
    root = tmp_path_factory.mktemp("extract")
    return headstart.train(hymenoptera, strategy="extract", out=str(root / "run"), cache_dir=str(ants_bees_cache))


def test_extract_reaches_target_and_reports_the_placeholder(
    extract_run: headstart.TrainResult, hymenoptera: Path
) -> None:
    assert extract_run.metrics["n"] == 153
    assert extract_run.metrics["accuracy"] >= 0.94
    skipped = (extract_run.run_dir / "skipped_files.txt").read_text().splitlines()
    assert len(skipped) == 1 and skipped[0].startswith(str(hymenoptera / "train" / "ants" / "imageNotFound.gif"))
    info = json.loads((extract_run.run_dir / "model.json").read_text())
    assert info["weights_source"].startswith("bundled:efficientnet-lite0")
    page = (extract_run.run_dir / "report.html").read_text()
    assert "imageNotFound.gif" in page and "confusion" in page.lower()
    assert info["train_counts"] == {"ants": 123, "bees": 121}


def test_evaluate_agrees_with_training_and_predict_writes_every_row(
    extract_run: headstart.TrainResult, hymenoptera: Path, tmp_path: Path
) -> None:
    run = extract_run.run_dir
    recorded = json.loads((run / "model.json").read_text())["val_metrics"]["accuracy"]
    preds = tmp_path / "preds.csv"
    code = "import sys; from headstart.cli import main; sys.exit(main(sys.argv[1:]))"
    # a fresh process: nothing shared with the training process but the run folder
    subprocess.run([sys.executable, "-c", code, "predict", str(run), str(hymenoptera / "val"), "--top-k", "2",
                    "--output", str(preds)], check=True)  # fmt: skip
    rows = list(csv.DictReader(preds.open()))
    assert len(rows) == 153
    correct = sum(Path(r["path"]).parent.name == r["label"] for r in rows)
    assert correct / 153 == pytest.approx(recorded)
    out = subprocess.run([sys.executable, "-c", code, "evaluate", str(run), str(hymenoptera), "--json",
                          str(tmp_path / "m.json")], check=True, capture_output=True, text=True)  # fmt: skip
    assert json.loads((tmp_path / "m.json").read_text())["accuracy"] == pytest.approx(recorded)
    assert "confusion matrix" in out.stdout


def test_finetune_default_reaches_target(hymenoptera: Path, tmp_path: Path, ants_bees_cache: Path) -> None:
    result = headstart.train(
        hymenoptera,
        strategy="finetune",
        out=str(tmp_path / "ft"),
        cache_dir=str(ants_bees_cache),
        **{"run.report": False},
    )
    assert result.metrics["accuracy"] >= 0.94
    rows = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(6)) and rows[0]["phase"] == "head"
    assert all(r["train_images_per_s"] > 0 for r in rows[1:])


def test_default_auto_recipe_on_ants_bees(hymenoptera: Path, tmp_path: Path, ants_bees_cache: Path) -> None:
    result = headstart.train(hymenoptera, out=str(tmp_path / "auto"), cache_dir=str(ants_bees_cache),
                             **{"run.report": False})  # fmt: skip
    info = json.loads((tmp_path / "auto" / "model.json").read_text())
    assert info["strategy"] == "auto" and info["backbone"] == "+".join(f"efficientnet_lite{i}" for i in range(3))
    assert info["num_features"] == 3 * 1280 and info["frozen_backbone"] is True
    assert info["recipe"].startswith("auto: frozen efficientnet_lite0+efficientnet_lite1+efficientnet_lite2")
    assert result.metrics["accuracy"] >= 0.95
