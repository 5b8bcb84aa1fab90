"""Heads trained on frozen features in seconds: L2-regularised logistic regression (C chosen by cross-validation)
and a kNN vote. Both become ordinary ``nn.Module`` heads of a :class:`~headstart.models.classifier.Classifier`.

The logistic regression minimises scikit-learn's ``LogisticRegression`` objective (``0.5 * |W|^2 + C * sum of
sample-weighted log-losses``, intercept unpenalised, one logit for two classes, softmax otherwise) with SciPy's
L-BFGS-B, as scikit-learn itself does; it is written here because importing scikit-learn costs 1.3 s, more than the
whole fit of a cached extract run. When the features are wider than there are rows, the problem is solved exactly in
the row space of the standardised training features (the optimum lies there, and every cross-validation subset's
row space is inside it), which makes each fit several times cheaper.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.special import expit
from torch import nn

from headstart.models.classifier import KNNHead

C_GRID = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)  # inverse L2 strengths searched on scaled features
# How features are scaled before the fit. "feature": each to unit variance (every dimension weighs the same, however
# little it varies); "global": centred, and all divided by one common scale (a dimension's own spread counts, as in
# the raw features a hand-written probe fits). Which one generalises better depends on the features: "auto" lets
# cross-validation on the training split choose, with the strength C.
SCALINGS = ("feature", "global")
# Cross-validation only ranks settings, so its fits stop at a looser gradient tolerance than the final fit: several
# times faster on unstandardised features, whose objective is ill-conditioned.
CV_GTOL = 1e-5
# Cross-validation ranks 7 strengths x 2 scalings x 5 folds; past this many images it ranks them on a stratified
# subsample of this many (the final fit still uses every image, warm-started from the folds' mean solution). On 10,000
# images of 3,840 features and 100 classes the full search takes tens of minutes on 2 CPU cores; a few thousand
# images already rank 7 strengths an order of magnitude apart.
CV_MAX_IMAGES = 4000
# With a class of one image, no split leaves that class in both a training and a test fold: cross-validation cannot
# rank anything, so the head is fitted at scikit-learn's default strength (and the first scaling asked for), and its
# summary says why.
DEFAULT_C = 1.0


def _standardise(features: np.ndarray, scaling: str = "feature") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scaled float64 copy, mean, std). One [N, D] float64 array is allocated: centred and scaled in place, the
    variance summed block by block (``np.std`` would allocate a second centred copy: 3 GB more at 100,000 x 3,840)."""
    if scaling not in SCALINGS:
        raise ValueError(f"unknown scaling {scaling!r}; choose one of {', '.join(SCALINGS)} or auto")
    x = features.astype(np.float64)
    mean = x.mean(0)
    x -= mean
    squares = np.zeros(x.shape[1])
    for start in range(0, len(x), 4096):
        block = x[start : start + 4096]
        squares += np.einsum("ij,ij->j", block, block)
    std = np.sqrt(squares / max(len(x), 1)) + 1e-6
    if scaling == "global":
        std = np.full_like(std, float(std.mean()))
    x /= std
    return x, mean, std


def _row_space(x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """``x`` in coordinates of its row space (``x = coords @ basis``), when that is narrower than ``x``.

    From the eigendecomposition of the N x N Gram matrix, which is cheaper than an SVD of the N x D matrix.
    """
    if x.shape[1] <= x.shape[0]:
        return x, None
    values, vectors = np.linalg.eigh(x @ x.T)
    keep = values > max(float(values[-1]), 0.0) * 1e-12
    singular = np.sqrt(values[keep])
    coords = vectors[:, keep] * singular
    return coords, (vectors[:, keep] / singular).T @ x


def group_folds(
    labels: np.ndarray, groups: np.ndarray, folds: int, seed: int, max_groups: int | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:  # fmt: skip
    """Stratified k-fold over groups: every row of a group (the views of one image) lands in the same fold.

    Each class's groups are shuffled and dealt round-robin, continuing the count across classes, so folds differ in
    size by at most one group and each holds its share of every class. With ``max_groups``, only the first
    ``max_groups`` groups of that deal take part (each class keeps its share, and at least one group); the rows of the
    others are in no fold.
    """
    rng = np.random.default_rng(seed)
    unique, first = np.unique(groups, return_index=True)
    keep = 1.0 if max_groups is None else min(1.0, max_groups / len(unique))
    fold_of_group: dict[int, int] = {}
    turn = 0
    for label in np.unique(labels):
        members = unique[labels[first] == label]
        members = members[rng.permutation(len(members))]
        for group in members[: max(1, round(len(members) * keep))]:
            fold_of_group[int(group)] = turn % folds
            turn += 1
    assignment = np.array([fold_of_group.get(int(g), -1) for g in groups])
    return [(np.flatnonzero((assignment != k) & (assignment >= 0)), np.flatnonzero(assignment == k))
            for k in range(folds)]  # fmt: skip


def _balanced_weights(labels: np.ndarray) -> np.ndarray:
    """scikit-learn's ``class_weight="balanced"``: n / (classes * count of the row's class)."""
    present, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return len(labels) / (len(present) * counts[inverse].astype(np.float64))


def _solve(
    x: np.ndarray,
    y: np.ndarray,
    c: float,
    sample_weight: np.ndarray,
    start: np.ndarray | None,
    max_iter: int,
    gtol: float = 1e-7,
) -> np.ndarray:
    """Minimise the L2-penalised log-loss; returns the flat parameters ``[W (D x R), b (R)]``.

    ``y`` holds indices into the classes present (0..K-1); R is 1 for two classes (one logit), K otherwise.
    """
    n, d = x.shape
    k = int(y.max()) + 1
    r = 1 if k == 2 else k
    scale = 1.0 / sample_weight.sum()  # the mean loss keeps the gradient's size independent of n; same minimiser
    onehot = np.eye(k)[y] if r > 1 else y[:, None].astype(np.float64)

    def loss_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w = theta[: d * r].reshape(d, r)
        z = x @ w + theta[d * r :]
        if r == 1:
            losses = np.logaddexp(0.0, z[:, 0]) - onehot[:, 0] * z[:, 0]
            residual = (expit(z) - onehot) * sample_weight[:, None]
        else:
            top = z.max(1, keepdims=True)
            log_norm = top + np.log(np.exp(z - top).sum(1, keepdims=True))
            losses = (log_norm - z)[np.arange(n), y]
            residual = (np.exp(z - log_norm) - onehot) * sample_weight[:, None]
        value = scale * (0.5 * float((w * w).sum()) + c * float(losses @ sample_weight))
        grad = np.concatenate([(scale * (w + c * (x.T @ residual))).ravel(), scale * c * residual.sum(0)])
        return value, grad

    theta0 = np.zeros(d * r + r) if start is None else start
    result = minimize(loss_grad, theta0, jac=True, method="L-BFGS-B", options={"maxiter": max_iter, "gtol": gtol})
    return np.asarray(result.x)


class _Problem:
    """Standardised features in row-space coordinates, shared by every fit of one cross-validation."""

    def __init__(self, features: np.ndarray, scaling: str = "feature"):
        self.scaling = scaling
        x, self.mean, self.std = _standardise(features, scaling)
        self.coords, self.basis = _row_space(x)

    def fit(
        self, rows: np.ndarray | None, labels: np.ndarray, c: float, class_weight: str | None,
        start: np.ndarray | None = None, max_iter: int = 1000, gtol: float = 1e-7,
    ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Fit on ``rows`` (None: every row, without copying the features); returns (classes present, flat parameters
        in row-space coordinates)."""
        present, y = np.unique(labels if rows is None else labels[rows], return_inverse=True)
        if len(present) < 2:
            raise ValueError(f"a logistic head needs two classes or more among its training rows, got only {present}")
        r = 1 if len(present) == 2 else len(present)
        if start is not None and start.size != (self.coords.shape[1] + 1) * r:
            start = None  # a start fitted on rows missing a class has fewer outputs: begin from zero instead
        weight = _balanced_weights(y) if class_weight == "balanced" else np.ones(len(y))
        x = self.coords if rows is None else self.coords[rows]
        return present, _solve(x, y, c, weight, start, max_iter, gtol)

    def logits(self, theta: np.ndarray, n_present: int, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        """Logits [N, K] over the classes present (a binary fit's one logit becomes -z/2, z/2)."""
        r = 1 if n_present == 2 else n_present
        d = self.coords.shape[1]
        z = self.coords[rows] @ theta[: d * r].reshape(d, r) + theta[d * r :]
        return np.concatenate([-z / 2, z / 2], axis=1) if r == 1 else z


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return np.asarray(e / e.sum(1, keepdims=True))


def choose_c(
    features: np.ndarray, labels: np.ndarray, grid: tuple[float, ...] = C_GRID, folds: int = 5, seed: int = 0,
    class_weight: str | None = None, groups: np.ndarray | None = None,
) -> tuple[float, dict[float, float]]:  # fmt: skip
    """Pick the L2 strength with the best stratified k-fold log-loss; returns (C, {C: mean accuracy}).

    ``groups`` keeps rows of one image (augmented views) in the same fold, so that CV never tests on a training view.
    Within a fold the fits run from strong to weak regularisation, each starting from the previous solution.
    """
    c, accs, _, _ = _choose_c(_Problem(features), labels, grid, folds, seed, class_weight, groups)
    return c, accs


def _choose_c(
    problem: _Problem, labels: np.ndarray, grid: tuple[float, ...], folds: int, seed: int, class_weight: str | None,
    groups: np.ndarray | None,
) -> tuple[float, dict[float, float], float, np.ndarray | None]:  # fmt: skip
    """(best C, {C: mean CV accuracy} of the strengths tried, best mean CV log-loss, the folds' mean solution at the
    best C as a warm start for the final fit).

    Strengths are tried from strong to weak regularisation, each fold starting from its previous solution. The
    held-out log-loss along C falls then rises, and weak regularisation is the slow end to fit, so the search stops
    once the loss has risen at two strengths in a row past its minimum.
    """
    groups = np.arange(len(labels)) if groups is None else groups
    folds = max(2, min(folds, int(np.bincount(labels[np.unique(groups, return_index=True)[1]]).min())))
    splits = group_folds(labels, groups, folds, seed, max_groups=CV_MAX_IMAGES)
    starts: list[np.ndarray | None] = [None] * len(splits)
    losses: dict[float, float] = {}
    accs: dict[float, float] = {}
    best, rises = None, 0
    best_starts: list[np.ndarray | None] = []
    for c in sorted(grid):
        fold_losses, fold_accs = [], []
        for k, (train_idx, test_idx) in enumerate(splits):
            present, theta = problem.fit(train_idx, labels, c, class_weight, starts[k], gtol=CV_GTOL)
            starts[k] = theta
            probs = np.clip(_softmax(problem.logits(theta, len(present), test_idx)), 1e-7, 1.0)
            cols = np.searchsorted(present, labels[test_idx]).clip(max=len(present) - 1)
            known = present[cols] == labels[test_idx]  # a class absent from this fold's training rows scores 1e-7
            row_probs = np.where(known, probs[np.arange(len(test_idx)), cols], 1e-7)
            fold_losses.append(float(-np.log(row_probs).mean()))
            fold_accs.append(float((present[probs.argmax(1)] == labels[test_idx]).mean()))
        losses[c], accs[c] = float(np.mean(fold_losses)), float(np.mean(fold_accs))
        if best is None or losses[c] < losses[best]:
            best, rises, best_starts = c, 0, list(starts)
        else:
            rises += 1
            if rises == 2:
                break
    assert best is not None
    return best, accs, losses[best], _mean_start(best_starts)


def _cv_rows(labels: np.ndarray, groups: np.ndarray, seed: int) -> np.ndarray:
    """The rows of the stratified subsample of :data:`CV_MAX_IMAGES` images that cross-validation ranks settings on
    (the rows :func:`group_folds` puts in some fold; which images take part does not depend on the fold count)."""
    return np.sort(np.concatenate([test for _, test in group_folds(labels, groups, 2, seed, CV_MAX_IMAGES)]))


def _smallest_class(labels: np.ndarray, groups: np.ndarray) -> int:
    """Images (groups) in the smallest class present."""
    counts = np.bincount(labels[np.unique(groups, return_index=True)[1]])
    return int(counts[counts > 0].min())


def _mean_start(starts: list[np.ndarray | None]) -> np.ndarray | None:
    """The folds' solutions averaged: a warm start for the fit on every row (None where folds differ in shape, i.e.
    a class was missing from some fold's training rows)."""
    arrays = [s for s in starts if s is not None]
    if not arrays or len(arrays) < len(starts) or any(a.shape != arrays[0].shape for a in arrays):
        return None
    return np.asarray(np.mean(np.stack(arrays), axis=0))


def fit_logistic(
    features: np.ndarray, labels: np.ndarray, num_classes: int, c: float | None = None, class_weight: str | None = None,
    seed: int = 0, groups: np.ndarray | None = None, scaling: str = "feature",
) -> tuple[nn.Linear, dict[str, float | str]]:  # fmt: skip
    """Train a linear head; the feature scaling is folded into its weights so it applies to raw backbone features.

    Args:
        features: [N, D] training features.
        labels: [N] class indices.
        num_classes: output width (classes absent from ``labels`` get a very negative bias).
        c: inverse L2 strength; None chooses it by cross-validation.
        class_weight: ``"balanced"`` for inverse-frequency weighting.
        seed: fold shuffling seed.
        groups: image identity per row when rows include augmented views (keeps views in one CV fold).
        scaling: ``feature``, ``global`` (see :data:`SCALINGS`) or ``auto`` (chosen by cross-validation with C).

    Returns:
        The head and a summary (chosen C and scaling, cross-validated accuracy).
    """
    info: dict[str, float | str] = {}
    candidates = SCALINGS if scaling == "auto" else (scaling,)
    start = None
    images = np.arange(len(labels)) if groups is None else groups
    large = len(np.unique(images)) > CV_MAX_IMAGES
    if (c is None or len(candidates) > 1) and _smallest_class(labels, images) < 2:
        c, candidates, info["cv_skipped"] = c or DEFAULT_C, candidates[:1], "a class has a single training image"
    problem: _Problem | None = None
    chosen_scaling = candidates[0]
    if c is None or len(candidates) > 1:
        # A large set is cross-validated on a stratified subsample of its images; the settings are ranked on problems
        # built from those rows alone, so the [N, D] float64 copy is made once, for the final fit.
        rows = _cv_rows(labels, images, seed) if large else np.arange(len(labels))
        cv_labels, cv_groups = labels[rows], None if groups is None else groups[rows]
        best: tuple[float, _Problem, float, float, np.ndarray | None] | None = None  # (loss, problem, C, acc, start)
        for name in candidates:
            trial = _Problem(features[rows] if large else features, name)
            grid = C_GRID if c is None else (c,)
            chosen, accs, loss, fold_start = _choose_c(trial, cv_labels, grid, 5, seed, class_weight, cv_groups)
            if best is None or loss < best[0]:
                best = (loss, trial, chosen, accs[chosen], fold_start)
            del trial  # the losing scaling's copy of the features is freed before the next is built
        assert best is not None
        _, problem, c, info["cv_accuracy"], start = best
        chosen_scaling = problem.scaling
        if large:
            problem = None  # the subsample's: the final fit gets its own, from every row
    info["C"] = c
    problem = problem or _Problem(features, chosen_scaling)
    info["scaling"] = problem.scaling
    if not large:
        start = None  # small sets: the final fit starts from zero, so it does not depend on the folds' path
    present, theta = problem.fit(None, labels, c, class_weight, start)
    r = 1 if len(present) == 2 else len(present)
    d = problem.coords.shape[1]
    coef = theta[: d * r].reshape(d, r).T  # [R, D'] in row-space coordinates
    if problem.basis is not None:
        coef = coef @ problem.basis
    intercept = theta[d * r :]
    if r == 1:  # one logit z for two classes becomes the pair (-z/2, z/2): the same softmax
        coef = np.vstack([-coef[0] / 2, coef[0] / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    weight = np.zeros((num_classes, features.shape[1]), dtype=np.float64)
    bias = np.full(num_classes, -1e4, dtype=np.float64)
    weight[present] = coef / problem.std
    bias[present] = intercept - (coef / problem.std) @ problem.mean
    head = nn.Linear(features.shape[1], num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight).float())
        head.bias.copy_(torch.from_numpy(bias).float())
    return head, info


def fit_one_vs_rest(
    features: np.ndarray, targets: np.ndarray, c: float | None = None, class_weight: str | None = None, seed: int = 0,
    groups: np.ndarray | None = None, scaling: str = "feature", names: list[str] | None = None,
) -> tuple[nn.Linear, dict[str, Any], np.ndarray]:  # fmt: skip
    """Train a multi-label head: one binary logistic regression per label (one-vs-rest) on shared scaled features.

    Each label gets its own strength C, chosen like :func:`fit_logistic`'s (stratified k-fold held-out log-loss,
    folds dealt over images), and its own decision threshold: the one that maximises F1 of the out-of-fold
    probabilities at that C, so that no threshold is chosen on a prediction of an image the head was fitted on.
    ``scaling="auto"`` picks the feature scaling with the lower mean held-out log-loss over the labels. A label
    with fewer than two training images on one side (present or absent) cannot be cross-validated: it is fitted at
    :data:`DEFAULT_C` with threshold 0.5, and the summary's ``cv_skipped`` names it.

    Args:
        features: [N, D] training features.
        targets: [N, L] multi-hot labels (0/1).
        c: inverse L2 strength for every label; None chooses one per label by cross-validation.
        class_weight: ``"balanced"`` weighs each label's present and absent images equally.
        seed: fold shuffling seed.
        groups: image identity per row when rows include augmented views (keeps views in one CV fold).
        scaling: ``feature``, ``global`` or ``auto``.
        names: label names for the summary (default ``label_0``, ...).

    Returns:
        The head (one logit per label: a sigmoid gives its probability), a summary (C, CV log-loss and threshold per
        label) and the thresholds [L].
    """
    targets = np.asarray(targets) > 0.5
    n_labels = targets.shape[1]
    names = names or [f"label_{j}" for j in range(n_labels)]
    images = np.arange(len(targets)) if groups is None else groups
    candidates = SCALINGS if scaling == "auto" else (scaling,)
    best: tuple[float, _Problem, list[tuple[float, float | None, np.ndarray | None]]] | None = None
    for name in candidates:
        problem = _Problem(features, name)
        per_label = [_binary_cv(problem, targets[:, j].astype(np.int64), c, class_weight, seed, images)
                     for j in range(n_labels)]  # fmt: skip
        losses = [loss for _, loss, _ in per_label if loss is not None]
        total = float(np.mean(losses)) if losses else 0.0
        if best is None or total < best[0]:
            best = (total, problem, per_label)
        del problem
    assert best is not None
    total, problem, per_label = best
    d = problem.coords.shape[1]
    weight = np.zeros((n_labels, features.shape[1]), dtype=np.float64)
    bias = np.zeros(n_labels, dtype=np.float64)
    thresholds = np.full(n_labels, 0.5)
    skipped = []
    for j, (chosen, loss, oof) in enumerate(per_label):
        _, theta = problem.fit(None, targets[:, j].astype(np.int64), chosen, class_weight)
        coef = theta[:d].reshape(1, d)
        if problem.basis is not None:
            coef = coef @ problem.basis
        weight[j] = coef[0] / problem.std
        bias[j] = theta[d] - weight[j] @ problem.mean
        if oof is None or loss is None:
            skipped.append(names[j])
        else:
            rows = ~np.isnan(oof)
            thresholds[j] = choose_threshold(oof[rows], targets[rows, j])
    head = nn.Linear(features.shape[1], n_labels)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight).float())
        head.bias.copy_(torch.from_numpy(bias).float())
    info: dict[str, Any] = {
        "C": {names[j]: per_label[j][0] for j in range(n_labels)},
        "scaling": problem.scaling,
        "thresholds": {names[j]: round(float(thresholds[j]), 6) for j in range(n_labels)},
    }
    if len(skipped) < n_labels:
        info["cv_log_loss"] = total
    if skipped:
        info["cv_skipped"] = f"label(s) {', '.join(skipped)} have fewer than two training images with or without them"
    return head, info, thresholds


def _binary_cv(
    problem: _Problem, y: np.ndarray, c: float | None, class_weight: str | None, seed: int, groups: np.ndarray,
    folds: int = 5,
) -> tuple[float, float | None, np.ndarray | None]:  # fmt: skip
    """(C, its mean held-out log-loss, the out-of-fold probabilities at that C [N], NaN for rows in no fold) of one
    label; (DEFAULT_C or ``c``, None, None) when a side has fewer than two images.

    Strengths run from strong to weak regularisation, warm-started per fold, and stop once the loss has risen at
    two strengths in a row (as in :func:`_choose_c`).
    """
    smallest = _smallest_class(y, groups) if len(np.unique(y)) == 2 else 0
    if smallest < 2:
        return c or DEFAULT_C, None, None
    splits = group_folds(y, groups, max(2, min(folds, smallest)), seed, max_groups=CV_MAX_IMAGES)
    starts: list[np.ndarray | None] = [None] * len(splits)
    best: tuple[float, float, np.ndarray] | None = None
    rises = 0
    for strength in sorted(C_GRID if c is None else (c,)):
        oof = np.full(len(y), np.nan)
        for k, (train_idx, test_idx) in enumerate(splits):
            _, theta = problem.fit(train_idx, y, strength, class_weight, starts[k], gtol=CV_GTOL)
            starts[k] = theta
            oof[test_idx] = _softmax(problem.logits(theta, 2, test_idx))[:, 1]
        rows = ~np.isnan(oof)
        p = np.clip(oof[rows], 1e-7, 1 - 1e-7)
        loss = float(-np.mean(y[rows] * np.log(p) + (1 - y[rows]) * np.log(1 - p)))
        if best is None or loss < best[1]:
            best, rises = (strength, loss, oof), 0
        else:
            rises += 1
            if rises == 2:
                break
    assert best is not None
    return best


def choose_threshold(probs: np.ndarray, labels: np.ndarray) -> float:
    """The probability threshold (``p >= t`` predicts the label) that maximises F1 on ``probs`` [N] against 0/1
    ``labels``; it lies halfway between two neighbouring probabilities, and ties go to the one nearest 0.5.

    0.5 when ``labels`` has no positive (F1 is zero at every threshold).
    """
    labels = np.asarray(labels).astype(np.float64)
    positives = labels.sum()
    if positives == 0 or len(probs) == 0:
        return 0.5
    order = np.argsort(-probs, kind="stable")
    p, y = probs[order], labels[order]
    tp = np.cumsum(y)
    f1 = 2 * tp / (np.arange(1, len(p) + 1) + positives)  # 2TP / (2TP + FP + FN), with TP + FP = rows predicted
    cuts = np.r_[p[:-1] > p[1:], True]  # a cut after row k only where the next probability is lower
    cut_at = np.r_[(p[:-1] + p[1:]) / 2, p[-1] / 2]
    score = np.where(cuts, f1, -1.0)
    tied = np.flatnonzero(score >= score.max() - 1e-12)
    return float(cut_at[tied[np.argmin(np.abs(cut_at[tied] - 0.5))]])


def predict_sigmoid(head: nn.Module, features: np.ndarray) -> np.ndarray:
    """Per-label sigmoid probabilities of a multi-label head on precomputed features."""
    with torch.inference_mode():
        logits = head(torch.from_numpy(features).float())
    return torch.sigmoid(logits.float()).numpy()


def fit_knn(features: np.ndarray, labels: np.ndarray, num_classes: int, k: int = 10) -> KNNHead:
    """A kNN head over the training features."""
    return KNNHead(torch.from_numpy(features), torch.from_numpy(labels), num_classes, k=k)


def predict_proba(head: nn.Module, features: np.ndarray) -> np.ndarray:
    """Softmax probabilities of a head on precomputed features."""
    with torch.inference_mode():
        logits = head(torch.from_numpy(features).float())
    return torch.softmax(logits.float(), dim=1).numpy()
