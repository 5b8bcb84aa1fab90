"""Strategy comparison on stripes with tiny_cnn: every run, the summary files, the table and the linked reports."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from headstart.insight.report import FIGURES
from headstart.training.compare import CompareResult, RunRow, compare, images_per_second, summarise
from test_report import assert_renders_in_chromium


@pytest.fixture(scope="module")
def comparison(tmp_path_factory: pytest.TempPathFactory, tiny_weights: Path) -> CompareResult:
    from conftest import make_folder

    root = tmp_path_factory.mktemp("compare")
    data = make_folder(root / "data", {"train": 8, "val": 5})
    return compare(
        data, backbone="tiny_cnn", strategies=("extract", "finetune", "scratch"), seeds=2, out=root / "cmp",
        weights=str(tiny_weights), epochs={"finetune": 1, "scratch": 1}, batch_size=8, num_workers=0,
    )  # fmt: skip


def test_every_strategy_and_seed_runs_on_the_same_split(comparison: CompareResult) -> None:
    assert [(r.strategy, r.seed) for r in comparison.runs] == [
        (s, k) for s in ("extract", "finetune", "scratch") for k in (0, 1)
    ]
    counts = set()
    for run in comparison.runs:
        info = json.loads((Path(run.run_dir) / "model.json").read_text())
        assert info["strategy"] == run.strategy and info["config"]["run"]["seed"] == run.seed
        counts.add(json.dumps(info["val_counts"]))
        # the control never sees pretrained weights; the other two start from the given file
        assert (info["weights_source"] == "random") == (run.strategy == "scratch")
        assert (Path(run.run_dir) / "report.html").is_file()
        assert 0.0 <= run.accuracy <= 1.0 and run.seconds > 0 and run.images_per_s > 0
    assert len(counts) == 1
    assert comparison.n_val == 10


def test_trainable_parameters_follow_the_strategy(comparison: CompareResult) -> None:
    params = {r.strategy: r.trainable_params for r in comparison.runs}
    assert params["extract"] == 64 * 2 + 2  # the linear head on tiny_cnn's 64 features, nothing else
    # finetune keeps BatchNorm frozen (its default policy): the three convs (3*16 + 16*32 + 32*64) * 9 weights + head
    assert params["finetune"] == (3 * 16 + 16 * 32 + 32 * 64) * 9 + 130
    # scratch also trains the BatchNorm affine parameters: 2 * (16 + 32 + 64)
    assert params["scratch"] == params["finetune"] + 2 * (16 + 32 + 64)


def test_summary_files_and_table(comparison: CompareResult) -> None:
    out = comparison.out
    summary = json.loads((out / "summary.json").read_text())
    assert [s["strategy"] for s in summary["strategies"]] == ["extract", "finetune", "scratch"]
    for row in comparison.table:
        accs = [r.accuracy for r in comparison.runs if r.strategy == row.strategy]
        assert row.seeds == 2
        assert row.accuracy_mean == pytest.approx(np.mean(accs))
        assert row.accuracy_std == pytest.approx(np.std(accs, ddof=1))
    with (out / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 and float(rows[0]["accuracy"]) == comparison.runs[0].accuracy
    with Image.open(out / FIGURES / "comparison.png") as im:
        assert im.width > 300
    html = comparison.report.read_text()
    assert '<table id="comparison">' in html
    for run in comparison.runs:
        assert f'href="{run.strategy}-seed{run.seed}/report.html"' in html
    extract = comparison.table[0]
    assert f"<td>{100 * extract.accuracy_mean:.1f} ± {100 * extract.accuracy_std:.1f}</td>" in html


def test_compare_report_renders_in_chromium(comparison: CompareResult) -> None:
    assert_renders_in_chromium(comparison.report)


def test_summarise_statistics() -> None:
    runs = [RunRow("extract", k, "", acc, acc, 1.0, 10, 5.0) for k, acc in enumerate((0.8, 0.9, 1.0))]
    (row,) = summarise(runs, ("extract", "scratch"))
    assert row.accuracy_mean == pytest.approx(0.9) and row.accuracy_std == pytest.approx(0.1)
    (single,) = summarise(runs[:1], ("extract",))
    assert single.accuracy_std == 0.0


def test_images_per_second() -> None:
    history = [{"epoch": 0, "phase": "head"}, {"train_images_per_s": 10.0}, {"train_images_per_s": 30.0}]
    assert images_per_second(history, {}, 5.0) == pytest.approx(20.0)
    info = {"train_counts": {"a": 30, "b": 30}, "val_counts": {"a": 10, "b": 10}}
    assert images_per_second(history[:1], info, 4.0) == pytest.approx(20.0)


def test_bad_options_name_the_value(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'transfer'"):
        compare(tmp_path, strategies=("extract", "transfer"), out=tmp_path / "x")
    with pytest.raises(ValueError, match="seeds must be at least 1, got 0"):
        compare(tmp_path, seeds=0, out=tmp_path / "x")
    with pytest.raises(TypeError, match="'seed'"):
        compare(tmp_path, seed=3, out=tmp_path / "x")


def test_cli_parses_and_refuses_existing_folder(comparison: CompareResult) -> None:
    from headstart.cli import COMMANDS
    from headstart.cli.report import add_parsers, parse_strategies

    assert parse_strategies(" extract, scratch ,") == ("extract", "scratch")
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compare", "data", "--out", str(comparison.out), "--epochs-scratch", "2"])
    assert args.seeds == 3 and args.epochs_scratch == 2 and args.strategies == "extract,finetune,scratch"
    with pytest.raises(FileExistsError, match="--overwrite"):
        COMMANDS["compare"](args)
