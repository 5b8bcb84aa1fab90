"""The seed's backbones (GoogLeNet, VGG-16, Inception v3, Inception v4, ResNet-152, NASNet-A Large) from weight files
keyed as the published ones are, offline.

Fast tests check what each family needs on its own: GoogLeNet's bare name, the auxiliary heads of the published
torchvision files, the [-1, 1] input scaling those weights expect (torchvision's ``transform_input``), the torch hub
cache as an offline source, and what ``headstart backbones`` says. The slow test builds each full network with random
weights, saves its state dict in the published file's names, and runs extract, one fine-tuning step, predict and ONNX
export on a tiny set through the CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from headstart.cli.app import main
from headstart.data.transforms import Preprocessing, eval_tensor, normalize
from headstart.errors import BackboneError
from headstart.models.backbones import create_backbone, offline_weights, weights_hint
from headstart.models.classifier import load_classifier
from test_weights import _randomise_bn

IMAGENET = Preprocessing(224, 256, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear")


def published_torchvision(arch: str) -> nn.Module:
    """A torchvision network as its published ImageNet file was saved: auxiliary heads included, input transform on."""
    torch.manual_seed(0)
    kwargs = (
        {"aux_logits": True, "transform_input": True, "init_weights": True}
        if arch in ("googlenet", "inception_v3")
        else {}
    )
    net = torchvision.models.get_model(arch, weights=None, **kwargs).eval()
    _randomise_bn(net)
    return net


@pytest.mark.usefixtures("one_thread")
def test_googlenet_is_torchvisions_under_its_bare_name() -> None:
    backbone = create_backbone("googlenet", pretrained=False)
    assert isinstance(backbone.net, torchvision.models.GoogLeNet)
    assert backbone.num_features == 1024 and backbone.preprocessing.input_size == 224
    assert backbone.preprocessing.mean == backbone.preprocessing.std == (0.5, 0.5, 0.5)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(("name", "arch", "size"), [("googlenet", "googlenet", 224),
                                                     ("torchvision/inception_v3", "inception_v3", 299)])  # fmt: skip
def test_published_inception_files_keep_their_input_scaling(name: str, arch: str, size: int, tmp_path: Path) -> None:
    """The features equal torchvision's own network with its input transform on ImageNet-normalised pixels, and a
    network rebuilt without weights (as loading a trained model does) gives them exactly."""
    source = published_torchvision(arch)
    path = tmp_path / f"{arch}.pth"
    torch.save(source.state_dict(), path)
    assert any(k.startswith(("aux1.", "AuxLogits.")) for k in torch.load(path, weights_only=True))
    backbone = create_backbone(name, weights=str(path)).eval()
    prep = backbone.preprocessing
    assert prep.input_size == size and prep.mean == prep.std == (0.5, 0.5, 0.5)
    torch.manual_seed(1)
    pixels = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    source.fc = nn.Identity()
    with torch.inference_mode():
        expected = source(normalize(pixels, IMAGENET))
        features = backbone(normalize(pixels, prep))
        # Random weights with random BatchNorm statistics blow activations up; rounding differs by where the
        # scaling happens, so compare as a whole: any wrong mean, std or channel order is off by far more.
        assert (features - expected).norm() / expected.norm() < 1e-4
        rebuilt = create_backbone(name, pretrained=False)
        rebuilt.load_state_dict(backbone.state_dict())
        torch.testing.assert_close(rebuilt.eval()(normalize(pixels, prep)), features, rtol=0, atol=0)


@pytest.mark.usefixtures("one_thread")
def test_torch_hub_cache_is_an_offline_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the network: a clear error naming --weights; once the file is in the torch hub cache, it is used."""

    def no_network(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    assert not offline_weights("googlenet")
    assert weights_hint("googlenet", False).startswith("--weights FILE, or online from https://")
    with pytest.raises(BackboneError, match=r"'googlenet'.*--weights FILE"):
        create_backbone("googlenet")
    url = torchvision.models.get_model_weights("googlenet").DEFAULT.url
    (tmp_path / "torch" / "checkpoints").mkdir(parents=True, exist_ok=True)  # the failed download made it
    source = published_torchvision("googlenet")
    torch.save(source.state_dict(), tmp_path / "torch" / "checkpoints" / os.path.basename(url))
    assert offline_weights("googlenet") and "torch hub cache" in weights_hint("googlenet", True)
    backbone = create_backbone("googlenet").eval()
    assert backbone.weights_source == "hub:torchvision/googlenet.DEFAULT"
    x = torch.randn(1, 3, 224, 224)
    source.fc = nn.Identity()
    source.transform_input = False  # the preprocessing does its scaling
    with torch.inference_mode():
        torch.testing.assert_close(backbone(x), source(x))


@pytest.mark.usefixtures("one_thread")
def test_backbones_lists_where_weights_are_and_how_to_get_them(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backbones"]) == 0
    out = capsys.readouterr().out
    for name in ("googlenet", "vgg16", "inception_v3", "inception_v4", "resnet152", "nasnetalarge"):
        assert f"│ {name} " in out, name
    assert "--weights FILE" in out and "bundled" in out


# -- the slow end-to-end run ----------------------------------------------------------------------------------------

# (registry name as users write it, library whose names the file uses, file suffix, input side, normalisation mean)
SEED = [
    ("googlenet", "torchvision", ".pth", 224, 0.5),
    ("vgg16", "torchvision", ".pth", 224, 0.485),  # timm's VGG, from torchvision's file (classifier -> conv layers)
    ("inception_v3", "torchvision", ".pth", 299, 0.5),  # timm's Inception v3, from torchvision's file (AuxLogits)
    ("inception_v4", "timm", ".safetensors", 299, 0.5),
    ("resnet152", "timm", ".safetensors", 224, 0.485),
    ("nasnetalarge", "timm", ".safetensors", 331, 0.5),
]


def published_file(name: str, library: str, path: Path) -> Path:
    """The network with random weights, saved in the names (and with the extra tensors) of its published file."""
    torch.manual_seed(0)
    if library == "torchvision":
        state = published_torchvision(name).state_dict()
    else:
        net = timm.create_model(name).eval()
        _randomise_bn(net)
        state = net.state_dict()
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def cli(*args: str) -> None:
    assert main(list(args)) == 0, args


def batch(run: Path, images: list[Path]) -> torch.Tensor:
    """The images as the run's preprocessing (from model.json) makes them."""
    prep = Preprocessing.from_dict(json.loads((run / "model.json").read_text())["preprocessing"])
    return normalize(torch.stack([eval_tensor(f, prep) for f in images]), prep)


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal up to float rounding, judged on the whole tensor: random weights make some activations huge."""
    return bool((got - want).norm() <= 1e-4 * want.norm())


def onnx_matches_pytorch(run: Path, images: list[Path]) -> None:
    """The exported classifier's logits are PyTorch's, within float32 rounding of the head's dot products.

    With random backbone weights every image's features are nearly alike, so the fitted head's weights are huge and
    its logits are small differences of large terms: the bound scales with those terms (sum of |w| |f|).
    """
    import onnxruntime as ort

    model, _ = load_classifier(run)
    x = batch(run, images)
    with torch.inference_mode():
        features, want = model.embed(x), model(x)
    got = torch.from_numpy(ort.InferenceSession(str(run / "classifier.onnx")).run(None, {"images": x.numpy()})[0])
    assert got.shape == want.shape == (len(images), 2)
    weight, bias = model.head.weight.detach(), model.head.bias.detach()
    terms = features.abs() @ weight.abs().T + bias.abs()
    assert ((got - want).abs() <= 1e-4 * terms + 1e-5).all(), (got, want, terms)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize(("name", "library", "suffix", "size", "mean"), SEED, ids=[s[0] for s in SEED])
def test_seed_backbone_from_its_published_file_offline(
    name: str, library: str, suffix: str, size: int, mean: float, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    folder_factory: Callable[..., Path],
) -> None:  # fmt: skip
    """extract, one fine-tuning step, predict and ONNX export from `--weights FILE`, with the network off."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "no-torch-hub"))
    started = time.perf_counter()
    laps: list[str] = []

    def lap(step: str) -> None:
        laps.append(f"{step} {time.perf_counter() - started:.0f} s")

    data = folder_factory("data", {"train": 2, "val": 1})
    weights = published_file(name, library, tmp_path / f"{name}{suffix}")
    common = ["--backbone", name, "--weights", str(weights), "--batch-size", "4", "--precision", "fp32",
              "--cache-dir", str(tmp_path / "cache"), "--no-report"]  # fmt: skip
    try:
        cli("train", str(data), "--strategy", "extract", "--out", str(tmp_path / "extract"), *common)
        info = json.loads((tmp_path / "extract" / "model.json").read_text())
        assert info["preprocessing"]["input_size"] == size and info["preprocessing"]["mean"][0] == mean
        assert info["weights_source"] == f"file:{weights}"
        # The network rebuilt from the run folder (as predict, serve and export build it) is the file's network:
        # same input scaling, auxiliary heads dropped, every tensor in place.
        val = sorted((data / "val").rglob("*.jpg"))
        x = batch(tmp_path / "extract", val)
        with torch.inference_mode():
            reference = create_backbone(name, weights=str(weights)).eval()(x)
            assert close(load_classifier(tmp_path / "extract")[0].embed(x), reference)
        lap("extract")

        cli("train", str(data), "--strategy", "finetune", "--epochs", "1", "--out", str(tmp_path / "finetune"), *common)
        rows = [json.loads(line) for line in (tmp_path / "finetune" / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["phase"] == "train" and rows[-1]["epoch"] == 1  # one epoch of 4 images at batch 4: one step
        lap("finetune")
        cli("predict", str(tmp_path / "finetune"), str(data / "val"), "--top-k", "2",
            "--output", str(tmp_path / "predictions.json"))  # fmt: skip
        predictions = json.loads((tmp_path / "predictions.json").read_text())
        assert len(predictions) == 2 and {p["label"] for p in predictions} <= {"horizontal", "vertical"}
        lap("predict")
        # The TorchScript exporter: 53 s for NASNet-A Large where dynamo takes 139 s (loaded 2-core machine), which
        # keeps CI within its time; the dynamo path is tested on the bundled backbones in test_export.py.
        cli("export", str(tmp_path / "finetune"), "--format", "onnx", "--exporter", "legacy")
        onnx_matches_pytorch(tmp_path / "finetune", val)
        lap("export")
    finally:
        print(f"\n{name}: {', '.join(laps)}")  # cumulative; the README quotes these (pytest -s)
        shutil.rmtree(tmp_path, ignore_errors=True)  # gigabytes for VGG: not kept among pytest's last three runs
