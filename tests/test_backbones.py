"""The backbone contract over the registry, name resolution errors, the offline hub path and real bundled weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from headstart.data.transforms import Preprocessing, eval_tensor, normalize
from headstart.errors import BackboneError
from headstart.models.backbones import BUNDLED, POPULAR, TINY_BACKBONES, Backbone, build_network, create_backbone
from headstart.models.classifier import Classifier

# mobilenetv3_small_050: a timm network whose pre-logits features are wider than its last feature map (as VGG's).
CONTRACT = (*TINY_BACKBONES, "torchvision/mobilenet_v3_small", "mobilenetv3_small_050")
IMAGENET_ANT, IMAGENET_BEE = 310, 309


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", CONTRACT)
def test_backbone_contract(name: str) -> None:
    """Every registered family: features [B, D] at its own input size, finite, and a gradient for every parameter."""
    torch.manual_seed(0)
    backbone = create_backbone(name, pretrained=False)
    assert isinstance(backbone, Backbone)
    assert backbone.name == name and backbone.weights_source == "random"
    prep = backbone.preprocessing
    assert isinstance(prep, Preprocessing) and prep.resize_size >= prep.input_size
    x = torch.randn(2, 3, prep.input_size, prep.input_size)
    model = Classifier(backbone, 3).train()
    features = backbone(x)
    assert features.shape == (2, backbone.num_features)
    assert torch.isfinite(features).all()
    logits = model(x)
    assert logits.shape == (2, 3)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    no_grad = [n for n, p in trainable if p.grad is None]
    assert not no_grad, f"{name}: parameters without a gradient: {no_grad[:5]}"
    not_finite = [n for n, p in trainable if not torch.isfinite(p.grad).all()]  # type: ignore[arg-type]
    assert not not_finite, f"{name}: non-finite gradients: {not_finite[:5]}"


@pytest.mark.parametrize(("name", "width"), [("torchvision/googlenet", 1024), ("torchvision/inception_v3", 2048)])
def test_inception_family_trains_without_aux_heads(name: str, width: int) -> None:
    torch.manual_seed(0)
    backbone = create_backbone(name, pretrained=False)
    assert not any(n.startswith(("aux", "AuxLogits")) for n, _ in backbone.net.named_children())
    size = backbone.preprocessing.input_size
    assert size == (299 if "inception" in name else 224)
    backbone.train()  # with aux heads torchvision would return a namedtuple here (or fail on the aux branch)
    with torch.no_grad():  # the forward pass is the point; skipping autograd bookkeeping keeps the test fast
        features = backbone(torch.randn(2, 3, size, size))
    assert features.shape == (2, width) == (2, backbone.num_features)
    assert torch.isfinite(features).all()


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(BackboneError, match="no_such_net") as info:
        create_backbone("no_such_net", pretrained=False)
    assert all(name in str(info.value) for name in ("efficientnet_lite0", "resnet50", "torchvision/<name>"))
    with pytest.raises(BackboneError, match=r"valid: .*mobilenet_v3_small"):
        create_backbone("torchvision/no_such_net", pretrained=False)


def test_tiny_cnn_needs_weights_or_scratch() -> None:
    with pytest.raises(BackboneError, match=r"tiny_cnn has no pretrained weights.*--weights"):
        create_backbone("tiny_cnn", pretrained=True)


def test_every_popular_name_is_known() -> None:
    """The names `headstart backbones` advertises must all resolve (checked without building the big ones)."""
    import timm
    import torchvision

    for name in POPULAR:
        if "+" in name:
            assert all(member in BUNDLED for member in name.split("+"))
        elif name.startswith("torchvision/"):
            assert name.split("/", 1)[1] in torchvision.models.list_models(module=torchvision.models)
        elif name in BUNDLED:
            assert timm.is_model("tf_" + name)
        elif name != "tiny_cnn":  # a name timm lacks is torchvision's (GoogLeNet)
            assert timm.is_model(name) or name in torchvision.models.list_models(module=torchvision.models), name


@pytest.mark.timeout(60)
def test_offline_hub_error_names_the_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No network and an empty hub cache: a clear error quickly, never a hang and never silent random weights."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch"))
    with pytest.raises(BackboneError) as info:
        create_backbone("resnet18")
    message = str(info.value)
    assert "'resnet18'" in message and "--weights" in message
    assert all(name in message for name in BUNDLED)


@pytest.mark.slow
def test_bundled_weights_recognise_ants_and_bees(hymenoptera: Path) -> None:
    """The default backbone's real ImageNet weights, classifier kept: ants and bees land on ImageNet's own classes."""
    net, _, prep, source = build_network("efficientnet_lite0", True, None, num_classes=None)
    assert source.startswith("bundled:")
    files = {
        IMAGENET_ANT: sorted((hymenoptera / "val" / "ants").glob("*.jpg"))[:8],
        IMAGENET_BEE: sorted((hymenoptera / "val" / "bees").glob("*.jpg"))[:8],
    }
    truth = torch.tensor([label for label, paths in files.items() for _ in paths])
    batch = torch.stack([eval_tensor(p, prep) for paths in files.values() for p in paths])
    with torch.inference_mode():
        predicted = net.eval()(normalize(batch, prep)).argmax(1)
    insect = (predicted == IMAGENET_ANT) | (predicted == IMAGENET_BEE)
    assert insect.float().mean() > 0.5, predicted.tolist()
    assert (predicted == truth).float().mean() >= 0.75, predicted.tolist()
