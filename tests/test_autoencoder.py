"""Autoencoders on synthetic stripes: run folder, anomaly score, use as a backbone (embed, extract, index), and the
shared trainer's guarantees: SIGKILL mid-epoch then resume, 2-process CPU (gloo) DDP."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import headstart
from headstart import cli
from headstart.cli.retrieval import add_parsers
from headstart.features.retrieval import build_index, search_images
from headstart.models.autoencoder import AutoencoderConfig, load_autoencoder
from headstart.models.backbones import create_backbone
from headstart.training.autoencoder import resume_autoencoder, score, train_autoencoder

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


# Deterministic fp32 CPU mode with augmentation on, so that restoring the RNG states and the epoch's order is exercised.
SCALE = {**FAST, "batch_size": 4, "epochs": 3, "augment": "light", "checkpoint_every": 1}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HEADSTART_QUIET": "1"}

AE_TRAIN = """
import os, signal, sys
import torch
torch.set_num_threads(1)
from headstart.training import autoencoder, trainer
kill_at, mode = int(sys.argv[3]), sys.argv[4]
if kill_at:
    original = trainer.Trainer.save_checkpoint
    def save_then_die(self, batches_done, totals=()):
        if mode == "during-write" and self.step == kill_at:
            def die(*args):  # the new checkpoint is fully written to a temporary file but not yet renamed
                os.kill(os.getpid(), signal.SIGKILL)
            os.replace = die
        original(self, batches_done, totals)
        if mode == "after-write" and self.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    trainer.Trainer.save_checkpoint = save_then_die
autoencoder.train_autoencoder(sys.argv[1], out=sys.argv[2], **{settings})
"""


def _train_script(*args: str) -> subprocess.CompletedProcess[str]:
    code = AE_TRAIN.replace("{settings}", repr(SCALE))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, env=ENV)


def _checkpoint(run: Path) -> dict[str, Any]:
    state: dict[str, Any] = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    return state


@pytest.fixture(scope="module")
def reference_ae(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One uninterrupted run, shared by the kill tests: (data, run folder)."""
    from conftest import make_folder

    root = tmp_path_factory.mktemp("ae_reference")
    data = make_folder(root / "data", {"train": 10, "val": 5})  # 30 images: 27 train (6 steps of 4), 3 val
    proc = _train_script(str(data), str(root / "run"), "0", "none")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return data, root / "run"


@pytest.mark.parametrize("mode", ["after-write", "during-write"])
def test_autoencoder_sigkill_mid_epoch_then_resume_matches_uninterrupted(
    mode: str, reference_ae: tuple[Path, Path], tmp_path: Path
) -> None:
    data, reference = reference_ae
    killed = tmp_path / "killed"
    proc = _train_script(str(data), str(killed), "8", mode)  # step 8: the second batch of epoch 2
    assert proc.returncode == -9, proc.stderr[-2000:]
    state = _checkpoint(killed)
    expected_step = 8 if mode == "after-write" else 7  # a write cut short leaves the previous checkpoint intact
    assert state["step"] == expected_step and state["epoch"] == 1 and state["batches_done"] == expected_step - 6
    resumed = subprocess.run([sys.executable, "-m", "headstart", "autoencoder", "train", "--resume", str(killed)],
                             capture_output=True, text=True, timeout=300, env=ENV)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"ae:{killed}" in resumed.stdout
    final_ref, final_res = _checkpoint(reference)["model"], _checkpoint(killed)["model"]
    assert final_ref.keys() == final_res.keys() == load_file(str(killed / "model.safetensors")).keys()
    for key in final_ref:
        torch.testing.assert_close(final_res[key], final_ref[key], rtol=0, atol=1e-6, msg=key)
    ref_rows, res_rows = (_rows(run) for run in (reference, killed))
    assert [r["epoch"] for r in res_rows] == [1, 2, 3]
    for a, b in zip(ref_rows, res_rows, strict=True):
        for key in ("train_loss", "val_loss"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
    info = json.loads((killed / "model.json").read_text())
    assert info["best_epoch"] == json.loads((reference / "model.json").read_text())["best_epoch"]
    assert (killed / "reconstructions_epoch3.png").is_file() and load_autoencoder(killed)[1]["kind"] == "autoencoder"


def test_autoencoder_resume_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.yaml"):
        resume_autoencoder(tmp_path / "nothing")
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command", required=True))
    with pytest.raises(ValueError, match="--resume RUN"):
        cli.COMMANDS["autoencoder"](parser.parse_args(["autoencoder", "train"]))


AE_DDP = """
import os, sys
import torch
torch.set_num_threads(1)
from safetensors.torch import save_file
from headstart.training import autoencoder, trainer
original = trainer.Trainer.fit
def fit_and_keep(self, resume=False):  # every rank keeps the weights it trained, to compare them
    result = original(self, resume)
    state = self._plain_model().state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, sys.argv[3] + f"/rank{os.environ.get('RANK', '0')}.st")
    return result
trainer.Trainer.fit = fit_and_keep
autoencoder.train_autoencoder(sys.argv[1], out=sys.argv[2], **{settings})
"""


@pytest.mark.skipif(not (Path(sys.executable).parent / "torchrun").exists(), reason="torchrun not installed")
def test_autoencoder_two_process_gloo(image_folder: Path, tmp_path: Path) -> None:
    settings = {**FAST, "epochs": 2, "augment": "none"}  # no augmentation: each process draws its own numbers
    script = tmp_path / "ae_ddp.py"
    script.write_text(AE_DDP.replace("{settings}", repr(settings)))
    single, multi = tmp_path / "single", tmp_path / "multi"
    for folder in (single, multi):
        folder.mkdir()
    one = subprocess.run([sys.executable, str(script), str(image_folder), str(single / "run"), str(single)],
                         capture_output=True, text=True, timeout=300, env=ENV)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = str(Path(sys.executable).parent / "torchrun")
    command = [torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(image_folder), str(multi / "run")]
    two = subprocess.run([*command, str(multi)], capture_output=True, text=True, timeout=300, env=ENV)
    assert two.returncode == 0, two.stderr[-3000:]
    rank0, rank1 = load_file(str(multi / "rank0.st")), load_file(str(multi / "rank1.st"))
    reference = load_file(str(single / "rank0.st"))
    assert rank0.keys() == rank1.keys() == reference.keys()
    # Gradients are averaged across the processes: every weight agrees exactly. BatchNorm statistics are each
    # process's own on CPU (SyncBatchNorm needs GPUs), so the batch statistics differ from one process's.
    weights = [k for k in rank0 if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    for key in weights:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0, msg=f"ranks disagree on {key}")
    drift = max(float((rank0[k] - reference[k]).abs().max()) for k in weights)
    assert drift < 0.05, drift  # the same training as one process, up to per-process batch statistics
    # only rank 0 wrote the run folder, and it is complete and usable
    rows = _rows(multi / "run")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[-1]["val_loss"] == pytest.approx(_rows(single / "run")[-1]["val_loss"], rel=0.05)
    assert json.loads((multi / "run" / "model.json").read_text())["best_epoch"] == 2  # so model.safetensors is rank0's
    encoder = {f"encoder.{k}": v for k, v in create_backbone(f"ae:{multi / 'run'}").net.state_dict().items()}
    assert encoder and all(torch.equal(v, rank0[k]) for k, v in encoder.items() if k in weights)


def _rows(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
