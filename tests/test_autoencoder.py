"""Autoencoders on synthetic stripes: run folder, anomaly score, and use as a backbone (embed, extract, index)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import headstart
from headstart import cli
from headstart.cli.retrieval import add_parsers
from headstart.features.retrieval import build_index, search_images
from headstart.models.autoencoder import AutoencoderConfig, load_autoencoder
from headstart.models.backbones import create_backbone
from headstart.training.autoencoder import score, train_autoencoder

FAST = {"image_size": 32, "width": 8, "latent_dim": 16, "batch_size": 8, "precision": "fp32"}


@pytest.fixture(scope="module")
def conv_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small conv autoencoder trained for a few epochs on 40 striped images."""
    from conftest import make_folder

    root = tmp_path_factory.mktemp("ae")
    data = make_folder(root / "data", {"train": 20})
    train_autoencoder(data, epochs=6, out=str(root / "run"), **FAST)
    return root / "run"


def test_conv_run_folder(conv_run: Path) -> None:
    for name in ("config.yaml", "model.safetensors", "model.json", "metrics.jsonl", "reconstructions.png",
                 "reconstructions_epoch1.png", "reconstructions_epoch6.png", "checkpoints/last.pt"):  # fmt: skip
        assert (conv_run / name).is_file(), name
    info = json.loads((conv_run / "model.json").read_text())
    assert info["kind"] == "autoencoder" and info["encoder"] == "conv" and info["latent_dim"] == 16
    assert info["preprocessing"]["input_size"] == 32 and set(info["versions"]) >= {"torch", "headstart"}
    rows = [json.loads(line) for line in (conv_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 7))
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]  # it learns to reconstruct
    with Image.open(conv_run / "reconstructions.png") as picture:
        assert picture.size == (2 + 4 * 34, 2 + 2 * 34)  # 4 val images over their 4 reconstructions, 32 px + padding
    checkpoint = torch.load(conv_run / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 6 and "optimizer" in checkpoint


def test_score_is_reconstruction_error_and_flags_anomalies(conv_run: Path, tmp_path: Path) -> None:
    info = json.loads((conv_run / "model.json").read_text())
    data = Path(info["data_path"])
    normal = score(conv_run, [data])
    assert len(normal.paths) == 40 and not normal.failed
    rng = np.random.default_rng(0)
    noise = tmp_path / "noise"
    noise.mkdir()
    for i in range(4):  # saturated random pixels: nothing like the training stripes
        Image.fromarray((rng.integers(0, 2, (40, 48, 3)) * 255).astype(np.uint8)).save(noise / f"n{i}.png")
    odd = score(conv_run, [noise])
    assert odd.errors.min() > 2 * np.median(normal.errors)
    model, _ = load_autoencoder(conv_run)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = (model(x) - x).pow(2).mean(dim=(1, 2, 3))
    from headstart.models.autoencoder import _ErrorPerImage

    torch.testing.assert_close(_ErrorPerImage(model)(x)[:, 0], expected)


def test_autoencoder_is_a_backbone(conv_run: Path, image_folder: Path, cache_dir: Path, tmp_path: Path) -> None:
    backbone = create_backbone(f"ae:{conv_run}")
    assert backbone.num_features == 16 and backbone.name == f"ae:{conv_run.resolve()}"
    model, _ = load_autoencoder(conv_run)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), model.embed(x))
        assert backbone(torch.randn(1, 3, 48, 48)).shape == (1, 16)  # any input size (extract reads larger crops)
    result = headstart.train(image_folder, strategy="extract", backbone=f"ae:{conv_run}", out=str(tmp_path / "clf"),
                       cache_dir=str(cache_dir), batch_size=8, num_workers=0)  # fmt: skip
    reloaded = headstart.load(tmp_path / "clf")
    assert reloaded.classifier.backbone.name == backbone.name
    assert reloaded.evaluate(image_folder)["accuracy"] == pytest.approx(result.metrics["accuracy"])
    build_index(image_folder, tmp_path / "ix", backbone=f"ae:{conv_run}", cache_dir=str(cache_dir), batch_size=8)
    query = image_folder / "val" / "horizontal" / "horizontal_001.jpg"
    hits = search_images(tmp_path / "ix", [query], k=1, cache_dir=str(cache_dir))[0][0].hits
    assert Path(hits[0][0].path) == query.resolve()


def test_pretrained_encoder_frozen_and_finetuned(image_folder: Path, tiny_weights: Path, cache_dir: Path,
                                                 tmp_path: Path) -> None:  # fmt: skip
    before = create_backbone("tiny_cnn", weights=str(tiny_weights)).state_dict()
    common = {**FAST, "image_size": 16, "encoder": "tiny_cnn", "encoder_weights": str(tiny_weights), "epochs": 2,
              "cache_dir": str(cache_dir)}  # fmt: skip
    frozen = train_autoencoder(image_folder, out=str(tmp_path / "frozen"), **common)
    model, info = load_autoencoder(frozen.run_dir)
    assert info["encoder"] == "tiny_cnn" and info["preprocessing"]["input_size"] == 64
    for key, value in before.items():  # a frozen encoder keeps its weights and BatchNorm statistics exactly
        torch.testing.assert_close(model.encoder.backbone.state_dict()[key], value)
    tuned = train_autoencoder(image_folder, out=str(tmp_path / "tuned"), finetune_encoder=True, **common)
    model, _ = load_autoencoder(tuned.run_dir)
    changed = [k for k, v in before.items() if not torch.equal(model.encoder.backbone.state_dict()[k], v)]
    assert any(k.endswith("weight") for k in changed)
    assert not any("running_" in k for k in changed)  # BatchNorm statistics stay frozen while fine-tuning
    assert create_backbone(f"ae:{tuned.run_dir}").preprocessing.input_size == 64


def test_config_errors_and_cli(image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="power of two"):
        AutoencoderConfig(image_size=48)
    with pytest.raises(ValueError, match="epochs must be at least 1, got 0"):
        AutoencoderConfig(epochs=0)
    with pytest.raises(TypeError, match="unknown option"):
        train_autoencoder(image_folder, latent=3)
    with pytest.raises(ValueError, match="not an autoencoder"):
        (tmp_path / "clf").mkdir()
        (tmp_path / "clf" / "model.json").write_text(json.dumps({"kind": "classifier"}))
        load_autoencoder(tmp_path / "clf")
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command", required=True))
    run = str(tmp_path / "run")
    argv = ["autoencoder", "train", str(image_folder), "--out", run, "--epochs", "1", "--image-size", "16"]
    args = parser.parse_args([*argv, "--width", "4", "--latent-dim", "8", "--batch-size", "8"])
    assert cli.COMMANDS[args.command](args) == 0
    assert f"ae:{run}" in capsys.readouterr().out
    args = parser.parse_args(["autoencoder", "score", run, str(image_folder / "val"), "--output",
                              str(tmp_path / "s.csv")])  # fmt: skip
    assert cli.COMMANDS[args.command](args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 10
    errors = [float(line.split("\t")[0]) for line in lines]
    assert errors == sorted(errors, reverse=True)  # most anomalous first
    assert (tmp_path / "s.csv").read_text().count("\n") == 11
