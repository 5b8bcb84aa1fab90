"""What each strategy trains: resolved defaults, input size, parameter groups, frozen BatchNorm, the lr schedule."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
from torch import nn

from headstart.config import STRATEGIES, OptimConfig
from headstart.data.transforms import Preprocessing
from headstart.models.backbones import create_backbone
from headstart.models.classifier import Classifier
from headstart.training.strategies import (
    DEFAULTS,
    apply_bn_policy,
    param_groups,
    resolve_optim,
    resolve_preprocessing,
    warmup_cosine,
)


def _tiny(num_classes: int = 3) -> Classifier:
    torch.manual_seed(0)
    return Classifier(create_backbone("tiny_cnn", pretrained=False), num_classes)


def _bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: tensor.clone()
        for name, tensor in model.state_dict().items()
        if name.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }


def _batch() -> torch.Tensor:
    return torch.randn(4, 3, 64, 64) * 2 + 1  # statistics far from the initial (0, 1) so any update would show


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_resolve_optim_fills_defaults(strategy: str) -> None:
    resolved = resolve_optim(strategy, OptimConfig())
    assert resolved == DEFAULTS[strategy]
    assert all(getattr(resolved, f.name) is not None for f in dataclasses.fields(OptimConfig) if f.name != "head_c")
    explicit = resolve_optim(strategy, OptimConfig(lr=0.123, epochs=1, bn_policy="train", augment="none"))
    assert (explicit.lr, explicit.epochs, explicit.bn_policy, explicit.augment) == (0.123, 1, "train", "none")
    assert explicit.weight_decay == DEFAULTS[strategy].weight_decay


def test_strategy_defaults_differ_where_they_should() -> None:
    assert DEFAULTS["extract"].epochs == 0
    assert DEFAULTS["finetune"].backbone_lr_ratio is not None and 0 < DEFAULTS["finetune"].backbone_lr_ratio < 1
    assert DEFAULTS["scratch"].bn_policy == "train"  # random BN statistics must be learned


def test_resolve_optim_rejects_bad_choices() -> None:
    with pytest.raises(ValueError, match="unknown bn_policy 'half'; choose train or frozen"):
        resolve_optim("finetune", OptimConfig(bn_policy="half"))
    with pytest.raises(ValueError, match="unknown head 'svm'; choose logistic or knn"):
        resolve_optim("extract", OptimConfig(head="svm"))


def test_resolve_preprocessing() -> None:
    prep = Preprocessing(224, 256, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")
    for strategy in ("auto", "extract", "finetune", "scratch"):
        assert resolve_preprocessing(strategy, prep, None, mirror=False) == prep  # the weights' own size
    assert resolve_preprocessing("auto", prep, None, mirror=True).mirror
    assert not resolve_preprocessing("finetune", prep, None, mirror=True).mirror  # only frozen features mirror
    explicit = resolve_preprocessing("finetune", prep, 160, mirror=False)
    assert explicit.input_size == 160 and explicit.resize_size == math.floor(160 * 256 / 224)  # same crop ratio
    assert (explicit.mean, explicit.std, explicit.interpolation) == (prep.mean, prep.std, prep.interpolation)


def test_param_groups_finetune() -> None:
    model = _tiny()
    optim = OptimConfig(lr=0.01, backbone_lr_ratio=0.1, weight_decay=0.05)
    groups = {g["name"]: g for g in param_groups(model, "finetune", optim)}
    assert set(groups) == {"backbone", "backbone_no_decay", "head", "head_no_decay"}
    assert groups["backbone"]["lr"] == groups["backbone_no_decay"]["lr"] == pytest.approx(0.001)
    assert groups["head"]["lr"] == groups["head_no_decay"]["lr"] == 0.01
    assert all(g["base_lr"] == g["lr"] for g in groups.values())
    for name, group in groups.items():
        params = group["params"]
        assert isinstance(params, list)
        if name.endswith("_no_decay"):
            assert group["weight_decay"] == 0.0 and all(p.ndim == 1 for p in params)
        else:
            assert group["weight_decay"] == 0.05 and all(p.ndim > 1 for p in params)
    grouped = [id(p) for g in groups.values() for p in g["params"]]  # type: ignore[attr-defined]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # every parameter exactly once
    assert groups["head"]["params"] == [model.head.weight] and groups["head_no_decay"]["params"] == [model.head.bias]
    torch.optim.AdamW(param_groups(model, "finetune", optim))  # the groups are what the optimiser accepts


def test_param_groups_scratch_uses_one_rate_and_skips_frozen() -> None:
    model = _tiny()
    groups = param_groups(model, "scratch", OptimConfig(lr=0.01, backbone_lr_ratio=0.1, weight_decay=0.05))
    assert {g["lr"] for g in groups} == {0.01}
    model = _tiny()
    apply_bn_policy(model, "frozen")
    groups = param_groups(model, "finetune", OptimConfig(lr=0.01, backbone_lr_ratio=0.1, weight_decay=0.05))
    bn_params = {id(p) for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    assert bn_params and not bn_params & {id(p) for g in groups for p in g["params"]}  # type: ignore[attr-defined]


def test_freeze_backbone_really_freezes() -> None:
    model = _tiny()
    model.freeze_backbone()
    before = _bn_state(model.backbone)
    weights = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model.train()
    assert model.training and model.head.training and not model.backbone.training
    assert not any(m.training for m in model.backbone.modules())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(_batch()).logsumexp(1).mean().backward()
        optimizer.step()
    assert all(not p.requires_grad for p in model.backbone.parameters())
    assert all(p.grad is None for p in model.backbone.parameters())
    after = _bn_state(model.backbone)
    assert before and all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(weights[k], v) for k, v in model.backbone.state_dict().items())
    assert model.head.weight.grad is not None


def test_bn_policy_frozen_keeps_bn_in_eval() -> None:
    model = _tiny()
    apply_bn_policy(model, "frozen")
    model.train()
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    convs = [m for m in model.backbone.modules() if isinstance(m, nn.Conv2d)]
    assert bns and all(not m.training for m in bns)
    assert convs and all(m.training for m in convs) and model.dropout.training
    assert all(not p.requires_grad for m in bns for p in m.parameters())
    assert all(m.weight.requires_grad for m in convs)
    before = _bn_state(model.backbone)
    model(_batch()).sum().backward()
    assert all(torch.equal(before[k], v) for k, v in _bn_state(model.backbone).items())
    assert all(m.weight.grad is not None for m in convs)
    model.eval()
    model.train()  # the policy survives mode switches
    assert all(not m.training for m in bns)


def test_bn_policy_train_lets_statistics_move() -> None:
    model = _tiny()
    apply_bn_policy(model, "train")
    model.train()
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.training for m in bns) and all(p.requires_grad for m in bns for p in m.parameters())
    before = _bn_state(model.backbone)
    model(_batch())
    after = _bn_state(model.backbone)
    moved = [k for k in before if k.endswith("running_mean") and not torch.equal(before[k], after[k])]
    assert len(moved) == len(bns)


def test_warmup_cosine_shape() -> None:
    total, warmup = 100, 10
    values = [warmup_cosine(step, total, warmup) for step in range(total + 1)]
    ramp, decay = values[:warmup], values[warmup - 1 :]
    assert ramp[0] == pytest.approx(1 / warmup) and ramp[-1] == pytest.approx(1.0)
    assert all(a < b for a, b in itertools.pairwise(ramp))
    assert values[warmup] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(decay))
    assert values[(total + warmup) // 2] == pytest.approx(0.5)  # half-way through the decay
    assert values[total - 1] < 1e-3 and values[total] == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(total + 50, total, warmup) == pytest.approx(0.0, abs=1e-12)  # stays at 0 past the end
    assert warmup_cosine(0, total, 0) == 1.0  # no warm-up: starts at the peak


def test_freeze_with_train_bn_leaves_batchnorm_training() -> None:
    from headstart.models.freezing import batch_norms, freeze

    model = _tiny()
    freeze(model.backbone, train_bn=True)  # Lightning's default: everything but BatchNorm stops training
    model.train()
    bns = batch_norms(model.backbone)
    others = [m for m in model.backbone.modules() if m not in bns]
    assert bns and all(m.training for m in bns) and all(p.requires_grad for m in bns for p in m.parameters())
    assert not any(m.training for m in others) and model.head.training
    assert all(not p.requires_grad for m in others for p in m.parameters(recurse=False))
    before = _bn_state(model.backbone)
    model(_batch())
    after = _bn_state(model.backbone)
    moved = [k for k in before if k.endswith("running_mean") and not torch.equal(before[k], after[k])]
    assert len(moved) == len(bns)
