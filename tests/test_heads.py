"""The extract heads against scikit-learn's definitions: same logistic-regression optimum, same metrics."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.linear_model import LogisticRegression

from headstart.insight.metrics import classification_metrics
from headstart.models.heads import C_GRID, choose_c, fit_logistic, group_folds, predict_proba


def blobs(n: int, d: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping Gaussian classes (not separable, so the optimum is finite at every C) on uneven feature scales."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = rng.normal(0, 1.0, (classes, d))
    features = (centres[labels] + rng.normal(0, 2.0, (n, d))) * rng.uniform(0.1, 10, d) + rng.normal(0, 5, d)
    return features.astype(np.float32), labels


@pytest.mark.parametrize(
    ("n", "d", "classes", "c", "class_weight"),
    [
        (120, 300, 2, 0.3, None),  # wider than tall: solved in the row space
        (200, 16, 2, 1.0, "balanced"),  # taller than wide: solved directly
        (150, 200, 4, 0.1, None),  # multinomial
        (150, 12, 3, 3.0, "balanced"),
    ],
)
def test_logistic_head_matches_scikit_learn(n: int, d: int, classes: int, c: float, class_weight: str | None) -> None:
    features, labels = blobs(n, d, classes)
    test, _ = blobs(50, d, classes, seed=1)
    head, info = fit_logistic(features, labels, classes, c=c, class_weight=class_weight)
    assert info == {"C": c, "scaling": "feature"}
    mean, std = features.mean(0), features.std(0) + 1e-6
    reference = LogisticRegression(C=c, class_weight=class_weight, max_iter=10000, tol=1e-10)
    reference.fit((features - mean) / std, labels)
    expected = reference.predict_proba((test - mean) / std)
    np.testing.assert_allclose(predict_proba(head, test), expected, atol=5e-3)


def test_absent_class_gets_no_probability() -> None:
    features, labels = blobs(80, 10, 2)
    head, _ = fit_logistic(features, labels * 2, 3, c=1.0)  # classes 0 and 2 present, 1 absent
    probs = predict_proba(head, features)
    assert probs.shape == (80, 3) and probs[:, 1].max() < 1e-6
    assert (probs.argmax(1) != 1).all()


def test_one_class_is_refused() -> None:
    features, _ = blobs(20, 5, 2)
    with pytest.raises(ValueError, match="two classes or more"):
        fit_logistic(features, np.ones(20, dtype=int), 2, c=1.0)


def test_group_folds_keep_groups_together_and_stratify() -> None:
    labels = np.repeat([0, 1, 1], 20)  # 20 images of class 0, 40 of class 1, 3 views each below
    groups = np.arange(60)
    rows_labels, rows_groups = np.tile(labels, 3), np.tile(groups, 3)
    folds = group_folds(rows_labels, rows_groups, 5, seed=0)
    tested = np.concatenate([test for _, test in folds])
    assert sorted(tested.tolist()) == list(range(180))  # every row tested exactly once
    for train, test in folds:
        assert not set(rows_groups[train]) & set(rows_groups[test])  # no image on both sides
        assert np.bincount(rows_labels[test]).tolist() == [12, 24]  # 4 of class 0 and 8 of class 1, 3 views each
    assert [t.tolist() for _, t in group_folds(rows_labels, rows_groups, 5, seed=0)] == [t.tolist() for _, t in folds]
    assert [t.tolist() for _, t in group_folds(rows_labels, rows_groups, 5, seed=1)] != [t.tolist() for _, t in folds]


def test_large_sets_cross_validate_on_a_stratified_subsample(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past CV_MAX_IMAGES, the folds cover a stratified subsample of images (every class, its views together) and the
    final fit on every row still reaches the scikit-learn optimum at the chosen C."""
    from headstart.models import heads

    features, labels = blobs(600, 20, 3, seed=4)
    groups = np.repeat(np.arange(300), 2)  # two views per image
    labels = labels[groups]
    splits = group_folds(labels, groups, 5, seed=0, max_groups=90)
    covered = np.unique(np.concatenate([test for _, test in splits]))
    images = np.unique(groups[covered])
    assert abs(len(images) - 90) <= 3 and len(covered) == 2 * len(images)  # ~90 images (rounded per class), 2 views
    for train_idx, test_idx in splits:
        assert not set(groups[train_idx]) & set(groups[test_idx])
        assert set(labels[test_idx]) == {0, 1, 2}
    shares = np.bincount(labels[covered], minlength=3) / len(covered)
    np.testing.assert_allclose(shares, np.bincount(labels, minlength=3) / len(labels), atol=0.02)

    monkeypatch.setattr(heads, "CV_MAX_IMAGES", 90)
    head, info = fit_logistic(features[groups], labels, 3, groups=groups, scaling="feature")
    x = features[groups]
    scaled = (x - x.mean(0)) / (x.std(0) + 1e-6)
    reference = LogisticRegression(C=float(info["C"]), tol=1e-10, max_iter=10_000).fit(scaled, labels)
    ours = predict_proba(head, x)
    np.testing.assert_allclose(ours, reference.predict_proba(scaled), atol=2e-3)


def test_choose_c_prefers_strong_regularisation_on_noise() -> None:
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(60, 200)).astype(np.float32)
    c, accs = choose_c(noise, rng.integers(0, 2, 60))
    assert c == min(C_GRID) and set(accs) < set(C_GRID)  # the loss rose twice past the minimum: search stopped
    separable = rng.normal(size=(200, 5)).astype(np.float32)
    c, accs = choose_c(separable, (separable[:, 0] > 0).astype(int))
    assert c == 3.0 and accs[c] > 0.95  # a clean threshold: the weakest penalty fits it best


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_metrics_match_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    for classes in (2, 4):
        labels = rng.integers(0, classes, 300)
        labels[labels == classes - 1] = 0 if classes == 4 else labels[labels == classes - 1]  # class 3 never true
        probs = rng.dirichlet(np.ones(classes), 300)
        probs[np.arange(300), labels] += rng.uniform(0, 0.5, 300)  # better than chance
        probs = np.round(probs / probs.sum(1, keepdims=True), 2)  # rounding makes ties for the ROC curve
        names = [f"c{i}" for i in range(classes)]
        out = classification_metrics(labels, probs, names)
        preds = probs.argmax(1)
        p, r, f, s = skm.precision_recall_fscore_support(labels, preds, labels=list(range(classes)), zero_division=0)
        assert out["accuracy"] == pytest.approx(skm.accuracy_score(labels, preds))
        assert out["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, preds))
        assert out["confusion_matrix"] == skm.confusion_matrix(labels, preds, labels=list(range(classes))).tolist()
        for i, name in enumerate(names):
            row = out["per_class"][name]
            expected = (p[i], r[i], f[i], s[i])
            assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx(expected)
        if classes == 2:
            assert out["roc_auc"] == pytest.approx(skm.roc_auc_score(labels, probs[:, 1]))
        else:
            assert "roc_auc" not in out


def test_large_sets_make_one_full_size_copy_of_the_features(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past CV_MAX_IMAGES, choosing C and the scaling by CV builds its problems on the subsample: the fit holds one
    float64 copy of the [N, D] features (a second, and np.std's centred temporary, made 100,000 x 3,840 take 14 GB)."""
    import tracemalloc

    from headstart.models import heads

    features, labels = blobs(3000, 400, 4, seed=5)
    features = features.astype(np.float32)
    copy = features.size * 8
    monkeypatch.setattr(heads, "CV_MAX_IMAGES", 300)
    tracemalloc.start()
    try:
        head, info = fit_logistic(features, labels, 4, scaling="auto")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * copy, f"peak {peak / 2**20:.1f} MiB for a {copy / 2**20:.1f} MiB float64 copy"
    assert info["scaling"] in heads.SCALINGS and float(info["C"]) in heads.C_GRID
    assert (predict_proba(head, features).argmax(1) == labels).mean() > 0.9
