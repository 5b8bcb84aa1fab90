"""The seed's backbones (GoogLeNet, VGG-16, Inception v3, Inception v4, ResNet-152, NASNet-A Large) from weight files
keyed as the published ones are, offline.

Fast tests check what each family needs on its own: GoogLeNet's bare name, the auxiliary heads of the published
torchvision files, the [-1, 1] input scaling those weights expect (torchvision's ``transform_input``), the torch hub
cache as an offline source, and what ``headstart backbones`` says. The slow test builds each full network with random
weights, saves its state dict in the published file's names, and runs extract, one fine-tuning step, predict and ONNX
export on a tiny set through the CLI.
"""

from __future__ import annotations

import os
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from headstart.cli.app import main
from headstart.data.transforms import Preprocessing, normalize
from headstart.errors import BackboneError
from headstart.models.backbones import create_backbone, offline_weights, weights_hint
from test_weights import _randomise_bn

pytestmark = pytest.mark.usefixtures("one_thread")

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


def test_googlenet_is_torchvisions_under_its_bare_name() -> None:
    backbone = create_backbone("googlenet", pretrained=False)
    assert isinstance(backbone.net, torchvision.models.GoogLeNet)
    assert backbone.num_features == 1024 and backbone.preprocessing.input_size == 224
    assert backbone.preprocessing.mean == backbone.preprocessing.std == (0.5, 0.5, 0.5)


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


def test_backbones_lists_where_weights_are_and_how_to_get_them(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backbones"]) == 0
    out = capsys.readouterr().out
    for name in ("googlenet", "vgg16", "inception_v3", "inception_v4", "resnet152", "nasnetalarge"):
        assert f"│ {name} " in out, name
    assert "--weights FILE" in out and "bundled" in out
