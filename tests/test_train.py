"""End-to-end training on synthetic stripes with tiny networks: run folder, reload, predict, evaluate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import headstart
from headstart.cli import main
from headstart.insight.predictor import write_predictions

FAST = {"backbone": "tiny_cnn", "batch_size": 8, "num_workers": 0, "run.report": False}


def test_extract_run_folder_and_reload(image_folder: Path, tiny_weights: Path, cache_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = headstart.train(image_folder, strategy="extract", weights=str(tiny_weights), out=str(out),
                       cache_dir=str(cache_dir), **FAST)  # fmt: skip
    for name in (
        "config.yaml",
        "model.safetensors",
        "model.json",
        "metrics.jsonl",
        "skipped_files.txt",
        "metrics.json",
    ):
        assert (out / name).is_file(), name
    info = json.loads((out / "model.json").read_text())
    assert info["classes"] == ["horizontal", "vertical"]
    assert info["strategy"] == "extract"
    assert info["preprocessing"]["input_size"] == 64  # tiny_cnn's 64 px x 1.15, rounded to a multiple of 32
    assert set(info["versions"]) >= {"torch", "timm", "headstart"}
    assert info["data_fingerprint"]
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["strategy"] == "extract" and config["model"]["weights"] == str(tiny_weights)
    # stripes are linearly separable from random conv features
    assert result.metrics["accuracy"] >= 0.8
    model = headstart.load(out)
    assert model.evaluate(image_folder)["accuracy"] == pytest.approx(result.metrics["accuracy"])


def test_refuses_to_overwrite(image_folder: Path, tiny_weights: Path, cache_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    kwargs = {"strategy": "extract", "weights": str(tiny_weights), "out": str(out), "cache_dir": str(cache_dir)}
    headstart.train(image_folder, **kwargs, **FAST)
    with pytest.raises(FileExistsError, match="--overwrite"):
        headstart.train(image_folder, **kwargs, **FAST)
    headstart.train(image_folder, overwrite=True, **kwargs, **FAST)


@pytest.mark.parametrize("strategy", ["finetune", "scratch"])
def test_network_strategies(strategy: str, image_folder: Path, tiny_weights: Path, cache_dir: Path,
                            tmp_path: Path) -> None:  # fmt: skip
    out = tmp_path / strategy
    weights = str(tiny_weights) if strategy == "finetune" else None
    result = headstart.train(image_folder, strategy=strategy, weights=weights, epochs=3, out=str(out),
                       cache_dir=str(cache_dir), **FAST)  # fmt: skip
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == ([0, 1, 2, 3] if strategy == "finetune" else [1, 2, 3])
    assert all(np.isfinite(r["train_loss"]) for r in rows if r["phase"] == "train")
    assert (out / "checkpoints" / "last.pt").is_file()
    recorded = json.loads((out / "model.json").read_text())["val_metrics"]["accuracy"]
    assert recorded == pytest.approx(result.metrics["accuracy"])
    assert headstart.load(out).evaluate(image_folder)["accuracy"] == pytest.approx(recorded)


def test_reload_in_fresh_process_gives_identical_predictions(
    image_folder: Path, tiny_weights: Path, cache_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    headstart.train(image_folder, strategy="finetune", weights=str(tiny_weights), epochs=1, out=str(out),
              cache_dir=str(cache_dir), **FAST)  # fmt: skip
    here = tmp_path / "here.csv"
    rows, _ = headstart.load(out).predict([image_folder / "val"], top_k=2)
    write_predictions(rows, here)
    there = tmp_path / "there.csv"
    code = "import sys; from headstart.cli import main; sys.exit(main(sys.argv[1:]))"
    subprocess.run([sys.executable, "-c", code, "predict", str(out), str(image_folder / "val"), "--top-k", "2",
                    "--output", str(there)], check=True)  # fmt: skip
    assert here.read_text() == there.read_text()


def test_cli_train_predict_evaluate(image_folder: Path, tiny_weights: Path, cache_dir: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / "run"
    assert main(["train", str(image_folder), "--strategy", "extract", "--backbone", "tiny_cnn", "--weights",
                 str(tiny_weights), "--out", str(out), "--cache-dir", str(cache_dir)]) == 0  # fmt: skip
    assert "val accuracy" in capsys.readouterr().out
    preds = tmp_path / "preds.json"
    assert main(["predict", str(out), str(image_folder / "val"), "--top-k", "2", "--output", str(preds)]) == 0
    rows = json.loads(preds.read_text())
    assert len(rows) == 10 and all(len(r["top"]) == 2 for r in rows)
    assert main(["evaluate", str(out), str(image_folder)]) == 0
    text = capsys.readouterr().out
    assert "confusion matrix" in text and "ROC-AUC" in text


def test_cli_reports_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", str(tmp_path / "missing"), "--backbone", "tiny_cnn"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", str(tmp_path), "--backbone", "no_such_net"]) == 2


def test_class_weights_and_csv_manifest(folder_factory, tiny_weights: Path, cache_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = folder_factory("csvdata", {"all": 8})
    manifest = root / "manifest.csv"
    lines = ["path,label"] + [f"{p.relative_to(root)},{p.parent.name}" for p in sorted(root.rglob("*.jpg"))]
    manifest.write_text("\n".join(lines) + "\n")
    result = headstart.train(manifest, strategy="scratch", epochs=1, class_weights="auto", out=str(tmp_path / "r"),
                       cache_dir=str(cache_dir), **FAST)  # fmt: skip
    assert result.metrics["n"] == 4  # 20% of 8 per class, stratified


def test_scratch_refuses_weights_and_paths_are_accepted(image_folder: Path, tiny_weights: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="scratch trains from random weights"):
        headstart.train(image_folder, strategy="scratch", weights=str(tiny_weights), out=str(tmp_path / "r"), **FAST)
    result = headstart.train(
        image_folder, strategy="scratch", epochs=1, out=tmp_path / "p", cache_dir=tmp_path / "c", **FAST
    )
    assert yaml.safe_load((result.run_dir / "config.yaml").read_text())["run"]["out"] == str(tmp_path / "p")


def test_early_stopping_stops_after_patience(image_folder: Path, tiny_weights: Path, tmp_path: Path) -> None:
    # lr 0: the metric cannot improve after epoch 0 (the head fitted on frozen features), so patience 2 stops at 2
    result = headstart.train(image_folder, strategy="finetune", weights=str(tiny_weights), epochs=6, lr=0.0,
                       early_stopping=2, out=str(tmp_path / "r"), cache_dir=str(tmp_path / "c"), **FAST)  # fmt: skip
    assert [row["epoch"] for row in result.history] == [0, 1, 2]


@pytest.mark.slow
def test_compiled_training_matches_eager(
    image_folder: Path, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torch.compile: the same training (to float tolerance), and plain state_dict keys in the saved model and the
    # checkpoint, so predict, export and --resume need not know that the run was compiled.
    import torch
    import torch._inductor.config
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)  # eager's dropout masks, for the comparison
    common = {"strategy": "scratch", "epochs": 2, "precision": "fp32", "cache_dir": str(cache_dir), **FAST}
    eager = headstart.train(image_folder, out=str(tmp_path / "eager"), **common)
    graphs = counters["stats"]["unique_graphs"]
    compiled = headstart.train(image_folder, out=str(tmp_path / "compiled"), **{"run.compile": True}, **common)
    assert counters["stats"]["unique_graphs"] > graphs  # dynamo really traced the network
    keys = torch.load(tmp_path / "compiled" / "checkpoints" / "last.pt", weights_only=True)["model"].keys()
    assert not any("_orig_mod" in k for k in keys)
    losses = [[r["train_loss"] for r in run.history] for run in (eager, compiled)]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-4)
    files = sorted(image_folder.rglob("*.jpg"))
    probs = [headstart.load(tmp_path / name).predict_proba(files)[0] for name in ("eager", "compiled")]
    assert len(files) == len(probs[0]) > 0
    np.testing.assert_allclose(probs[1], probs[0], atol=1e-3)
