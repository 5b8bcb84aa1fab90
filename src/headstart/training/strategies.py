"""The three ways to reuse a pretrained network, what each one trains, and the recommended recipe on top of them.

* ``auto`` (the default): the recipe that measured best on new domains at a bounded cost (``benchmarks/suite.py``):
  frozen features of the three bundled ImageNet backbones side by side, and a logistic head whose feature scaling
  and L2 strength are chosen by cross-validation on the training split. It trains like ``extract``; only its
  defaults differ.
* ``extract``: the backbone is frozen (BatchNorm statistics included) and only a new head is trained, on cached
  features (see :mod:`headstart.models.heads`); seconds on a CPU.
* ``finetune``: the new head is first trained on frozen features exactly as in ``extract``; then the whole network
  trains with discriminative learning rates: the backbone at ``lr * backbone_lr_ratio``, the head at ``lr``.
  BatchNorm policy (``bn_policy``): ``frozen`` (the default) keeps every BN layer of the backbone in inference mode
  with its ImageNet statistics and affine parameters fixed, as the Keras guide does; ``train`` lets BN layers update
  both. Measured on ants/bees (244 training images, batch 32, random-resized crops), ``train`` drifted the running
  statistics away from what centre-cropped validation images produce: validation loss rose every epoch and accuracy
  fell from 0.95 to 0.87-0.90 after five epochs, while ``frozen`` held 0.94-0.95. ``train`` suits large sets whose
  statistics differ strongly from ImageNet's.
* ``scratch``: the same architecture with random weights, everything trained: the control that shows what the
  pretrained weights are worth.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from headstart.config import ModelConfig, OptimConfig
from headstart.data.transforms import Preprocessing
from headstart.models.backbones import BUNDLED_ENSEMBLE, DEFAULT_BACKBONE
from headstart.models.classifier import Classifier
from headstart.models.freezing import batch_norms, freeze

# Strategies that train only a head, on cached frozen features.
FROZEN = ("auto", "extract")

# Defaults chosen to work without tuning on small sets (hundreds to thousands of images) at 224 px.
_FROZEN_HEAD = OptimConfig(
    epochs=0, lr=0.0, backbone_lr_ratio=0.0, weight_decay=0.0, warmup_epochs=0.0, label_smoothing=0.0,
    augment="none", bn_policy="frozen", head_c=None, head="logistic", knn_k=10, augment_views=0, head_scaling="auto",
)  # fmt: skip
DEFAULTS: dict[str, OptimConfig] = {
    "auto": _FROZEN_HEAD,
    # extract, the cheap path, skips the CV between scalings (half the head's time) and takes the one that CV chose on
    # nearly every set of the suite: a single global scale.
    "extract": dataclasses.replace(_FROZEN_HEAD, head_scaling="global"),
    # The fine-tuning head starts from per-feature standardisation, as it was measured with.
    "finetune": OptimConfig(
        epochs=5, lr=3e-4, backbone_lr_ratio=0.1, weight_decay=0.01, warmup_epochs=1.0, label_smoothing=0.1,
        augment="light", bn_policy="frozen", head_c=None, head="logistic", knn_k=10, augment_views=0,
        head_scaling="feature",
    ),
    "scratch": OptimConfig(
        epochs=15, lr=2e-3, backbone_lr_ratio=1.0, weight_decay=0.05, warmup_epochs=1.0, label_smoothing=0.1,
        augment="light", bn_policy="train", head_c=None, head="logistic", knn_k=10, augment_views=0,
        head_scaling="feature",
    ),
}  # fmt: skip

# Each strategy's backbone when none is named. auto: the three bundled backbones side by side, the one lever that
# gained on every domain of the suite. extract: EXTRACT_BACKBONE, the fastest pair that still beat the hand-written
# probe everywhere. Trained strategies: one network, as fine-tuning three costs three times as much.
EXTRACT_BACKBONE = "efficientnet_lite0+efficientnet_lite2"
BACKBONES = {"auto": BUNDLED_ENSEMBLE, "extract": EXTRACT_BACKBONE, "finetune": DEFAULT_BACKBONE,
             "scratch": DEFAULT_BACKBONE}  # fmt: skip
# Mirrored views (--mirror) double the feature cost; on the dev suite, with the three backbones and the CV head, they
# moved accuracy by +0.8, -0.8, 0.0, +0.5 and -0.3 points (beans, brain_tumor_mri, dtd10, eurosat, food101_10): no
# strategy spends them by default.
MIRROR = {"auto": False, "extract": False, "finetune": False, "scratch": False}
# Crop-averaged features (--crops) cost five forward passes per image, in training and in every prediction; measured
# by benchmarks/tta.py (the "train crops" column) they are an option, not a default: see the README's TTA table.
CROPS = {"auto": False, "extract": False, "finetune": False, "scratch": False}


def resolve_model(strategy: str, model: ModelConfig) -> ModelConfig:
    """Fill the backbone, mirror and crops choices the user left open with the strategy's."""
    if strategy not in FROZEN and model.mirror:
        raise ValueError(f"mirrored feature views apply to frozen features (auto, extract), not to {strategy}")
    if strategy not in FROZEN and model.crops:
        raise ValueError(
            f"crop-averaged features apply to frozen features (auto, extract), not to {strategy}; to average crops at "
            "prediction, use --tta crops with predict or evaluate"
        )
    return dataclasses.replace(
        model,
        backbone=model.backbone or BACKBONES[strategy],
        mirror=MIRROR[strategy] if model.mirror is None else model.mirror,
        crops=CROPS[strategy] if model.crops is None else model.crops,
    )


# Every strategy reads images at the weights' own size unless --input-size says otherwise. Frozen features used to be
# read at 1.15x (Touvron et al., "Fixing the train-test resolution discrepancy", 2019); on the dev suite, with the
# same head, EfficientNet-Lite0 at 256 px against 224 px moved accuracy by +0.8/-2.3 (beans, centre/mirrored views),
# +0.6/+0.4 (dtd10) and -0.8/+0.3 (food101_10) points: no gain, for 1.3x the compute.


def resolve_optim(strategy: str, optim: OptimConfig) -> OptimConfig:
    """Fill every ``None`` field of ``optim`` with the strategy's default."""
    base = DEFAULTS[strategy]
    values = {f.name: getattr(optim, f.name) for f in dataclasses.fields(optim)}
    merged = {k: (getattr(base, k) if v is None else v) for k, v in values.items()}
    if merged["bn_policy"] not in ("train", "frozen"):
        raise ValueError(f"unknown bn_policy {merged['bn_policy']!r}; choose train or frozen")
    if merged["head"] not in ("logistic", "knn"):
        raise ValueError(f"unknown head {merged['head']!r}; choose logistic or knn")
    if merged["head_scaling"] not in ("feature", "global", "auto"):
        raise ValueError(f"unknown head_scaling {merged['head_scaling']!r}; choose feature, global or auto")
    return OptimConfig(**merged)


def resolve_preprocessing(
    strategy: str, prep: Preprocessing, input_size: int | None, mirror: bool, crops: bool = False
) -> Preprocessing:
    """The preprocessing a strategy trains and predicts with: the weights' own, at the chosen input size, with the
    mirrored view and the corner crops averaged in when asked (frozen strategies only; see :func:`resolve_model`)."""
    frozen = strategy in FROZEN
    prep = dataclasses.replace(prep, mirror=mirror and frozen, crops=crops and frozen)
    if input_size is None or input_size == prep.input_size:
        return prep
    crop_pct = prep.input_size / prep.resize_size
    return dataclasses.replace(prep, input_size=input_size, resize_size=math.floor(input_size / crop_pct))


def apply_bn_policy(model: Classifier, policy: str) -> None:
    """``frozen``: BN layers of the backbone stay in eval mode and their affine parameters stop training."""
    model.frozen_bn = policy == "frozen"
    if model.frozen_bn:
        freeze(batch_norms(model.backbone), train_bn=False)
    model.train(model.training)


def param_groups(model: Classifier, strategy: str, optim: OptimConfig) -> list[dict[str, object]]:
    """Optimiser parameter groups: backbone and head with their own learning rates, no weight decay on biases and
    normalisation weights. Each group records ``base_lr`` so that schedules (and resumes) can restore it."""
    assert optim.lr is not None and optim.backbone_lr_ratio is not None and optim.weight_decay is not None
    backbone_lr = optim.lr * (optim.backbone_lr_ratio if strategy == "finetune" else 1.0)
    groups: list[dict[str, object]] = []
    for name, module, lr in (("backbone", model.backbone, backbone_lr), ("head", model.head, optim.lr)):
        decay: list[torch.nn.Parameter] = []
        no_decay: list[torch.nn.Parameter] = []
        for param in module.parameters():
            if param.requires_grad:
                (no_decay if param.ndim <= 1 else decay).append(param)
        for suffix, params, wd in (("", decay, optim.weight_decay), ("_no_decay", no_decay, 0.0)):
            if params:
                groups.append({"name": name + suffix, "params": params, "lr": lr, "base_lr": lr, "weight_decay": wd})
    return groups


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier: linear warm-up from 0 to 1, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
