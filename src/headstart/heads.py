"""Heads trained on frozen features in seconds: L2-regularised logistic regression (C chosen by cross-validation)
and a kNN vote. Both become ordinary ``nn.Module`` heads of a :class:`~headstart.models.Classifier`."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from torch import nn

from headstart.models import KNNHead

C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)  # inverse L2 strengths searched on standardised features


def _standardise(features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean = features.mean(0)
    std = features.std(0) + 1e-6
    return (features - mean) / std, mean, std


def choose_c(
    features: np.ndarray, labels: np.ndarray, grid: tuple[float, ...] = C_GRID, folds: int = 5, seed: int = 0,
    class_weight: str | None = None, groups: np.ndarray | None = None,
) -> tuple[float, dict[float, float]]:  # fmt: skip
    """Pick the L2 strength with the best stratified k-fold log-loss; returns (C, {C: mean accuracy}).

    ``groups`` keeps rows of one image (augmented views) in the same fold, so that CV never tests on a training view.
    """
    x, _, _ = _standardise(features)
    groups = np.arange(len(labels)) if groups is None else groups
    folds = max(2, min(folds, int(np.bincount(labels[np.unique(groups, return_index=True)[1]]).min())))
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    losses: dict[float, list[float]] = {c: [] for c in grid}
    accs: dict[float, list[float]] = {c: [] for c in grid}
    for train_idx, test_idx in splitter.split(x, labels, groups):
        for c in grid:
            clf = LogisticRegression(C=c, max_iter=300, class_weight=class_weight)
            clf.fit(x[train_idx], labels[train_idx])
            probs = np.clip(clf.predict_proba(x[test_idx]), 1e-7, 1.0)
            cols = np.searchsorted(clf.classes_, labels[test_idx])
            losses[c].append(float(-np.log(probs[np.arange(len(test_idx)), cols]).mean()))
            accs[c].append(float((clf.classes_[probs.argmax(1)] == labels[test_idx]).mean()))
    best = min(grid, key=lambda c: float(np.mean(losses[c])))
    return best, {c: float(np.mean(a)) for c, a in accs.items()}


def fit_logistic(
    features: np.ndarray, labels: np.ndarray, num_classes: int, c: float | None = None, class_weight: str | None = None,
    seed: int = 0, groups: np.ndarray | None = None,
) -> tuple[nn.Linear, dict[str, float]]:  # fmt: skip
    """Train a linear head; standardisation is folded into its weights so it applies to raw backbone features.

    Args:
        features: [N, D] training features.
        labels: [N] class indices.
        num_classes: output width (classes absent from ``labels`` get a very negative bias).
        c: inverse L2 strength; None chooses it by cross-validation.
        class_weight: ``"balanced"`` for inverse-frequency weighting.
        seed: fold shuffling seed.
        groups: image identity per row when rows include augmented views (keeps views in one CV fold).

    Returns:
        The head and a summary (chosen C, cross-validated accuracy).
    """
    info: dict[str, float] = {}
    if c is None:
        c, accs = choose_c(features, labels, class_weight=class_weight, seed=seed, groups=groups)
        info["cv_accuracy"] = accs[c]
    info["C"] = c
    x, mean, std = _standardise(features)
    clf = LogisticRegression(C=c, max_iter=1000, class_weight=class_weight)
    clf.fit(x, labels)
    coef = clf.coef_
    intercept = clf.intercept_
    if len(clf.classes_) == 2 and coef.shape[0] == 1:  # sklearn stores one row for binary problems
        coef = np.vstack([-coef[0] / 2, coef[0] / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    weight = np.zeros((num_classes, features.shape[1]), dtype=np.float64)
    bias = np.full(num_classes, -1e4, dtype=np.float64)
    weight[clf.classes_] = coef / std
    bias[clf.classes_] = intercept - (coef / std) @ mean
    head = nn.Linear(features.shape[1], num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight).float())
        head.bias.copy_(torch.from_numpy(bias).float())
    return head, info


def fit_knn(features: np.ndarray, labels: np.ndarray, num_classes: int, k: int = 10) -> KNNHead:
    """A kNN head over the training features."""
    return KNNHead(torch.from_numpy(features), torch.from_numpy(labels), num_classes, k=k)


def predict_proba(head: nn.Module, features: np.ndarray) -> np.ndarray:
    """Softmax probabilities of a head on precomputed features."""
    with torch.inference_mode():
        logits = head(torch.from_numpy(features).float())
    return torch.softmax(logits.float(), dim=1).numpy()
