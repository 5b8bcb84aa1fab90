"""Backbone ranking: LogME against the paper's reference algorithm, CV scores on tiny data, the CLI table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from headstart import cli
from headstart.cli.audit import add_parsers
from headstart.insight.rank import knn_cv_accuracy, logme, offline_candidates, rank


def reference_logme(f: np.ndarray, y: np.ndarray) -> float:
    """LogME as in the authors' published code (You et al. 2021): dense eigendecomposition of F^T F."""
    f = f.astype(np.float64)
    n, d = f.shape
    v, s, _ = np.linalg.svd(f.T @ f, full_matrices=True)
    evidences = []
    for cls in np.unique(y):
        y_ = (y == cls).astype(np.float64)
        alpha, beta = 1.0, 1.0
        tmp = v.T @ (f.T @ y_)
        for _ in range(11):
            gamma = (beta * s / (alpha + beta * s)).sum()
            m = v @ (tmp * beta / (alpha + beta * s))
            alpha_de = (m * m).sum()
            beta_de = ((y_ - f @ m) ** 2).sum()
            new_alpha, new_beta = gamma / (alpha_de + 1e-5), (n - gamma) / (beta_de + 1e-5)
            done = abs(new_alpha / new_beta - alpha / beta) / (alpha / beta) < 0.01
            alpha, beta = new_alpha, new_beta
            if done:
                break
        m = v @ (tmp * beta / (alpha + beta * s))
        alpha_de, beta_de = (m * m).sum(), ((y_ - f @ m) ** 2).sum()
        evidence = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * np.log(alpha + beta * s).sum()
                    - beta / 2 * beta_de - alpha / 2 * alpha_de - n / 2 * np.log(2 * np.pi))  # fmt: skip
        evidences.append(evidence / n)
    return float(np.mean(evidences))


@pytest.mark.parametrize(("n", "d"), [(60, 8), (30, 50)])
def test_logme_matches_the_reference_algorithm(n: int, d: int) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, n)
    features = rng.normal(size=(n, d)) + labels[:, None] * 0.5
    assert logme(features, labels) == pytest.approx(reference_logme(features, labels), rel=1e-6, abs=1e-6)


def test_logme_prefers_features_that_carry_the_labels() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 200)
    noise = rng.normal(size=(200, 32))
    informative = noise.copy()
    informative[:, :4] += 3.0 * labels[:, None]
    assert logme(informative, labels) > logme(noise, labels) + 0.1
    assert knn_cv_accuracy(informative, labels) > 0.85
    assert knn_cv_accuracy(noise, labels) < 0.75


def test_rank_scores_and_sorts_backbones(
    image_folder: Path, cache_dir: Path, tmp_path: Path, tiny_weights: Path
) -> None:
    names = ["tiny_cnn", "test_resnet"]
    files = {"tiny_cnn": str(tiny_weights)}
    rows = rank(image_folder, names, cache_dir=cache_dir, folds=3, batch_size=8, workers=0, pretrained=False,
                weights=files, out=tmp_path / "report")  # fmt: skip
    assert sorted(r.backbone for r in rows) == sorted(names)
    assert [r.logme for r in rows] == sorted((r.logme for r in rows), reverse=True)
    for r in rows:
        assert r.images == 20 and r.cached == 0
        assert 0.5 <= r.cv_accuracy <= 1.0 and 0.0 <= r.knn_accuracy <= 1.0 and np.isfinite(r.logme)
        assert r.parameters > 1000 and r.num_features > 0 and r.input_size > 0
    report = json.loads((tmp_path / "report" / "rank.json").read_text())
    assert report["recommended"] == rows[0].backbone
    assert (tmp_path / "report" / "rank.csv").read_text().count("\n") == 3
    # Same weights file, same images: the second ranking embeds nothing and scores the same.
    again = rank(image_folder, ["tiny_cnn"], cache_dir=cache_dir, folds=3, batch_size=8, workers=0,
                 pretrained=False, weights=files)  # fmt: skip
    first = next(r for r in rows if r.backbone == "tiny_cnn")
    assert again[0].cached == 20 and again[0].cv_accuracy == first.cv_accuracy and again[0].logme == first.logme


def test_rank_needs_backbones(image_folder: Path) -> None:
    with pytest.raises(ValueError, match="no backbones"):
        rank(image_folder, [])


def test_offline_candidates_have_local_weights() -> None:
    assert "efficientnet_lite0" in offline_candidates()  # the bundled default always is


@pytest.mark.slow
def test_rank_cli_on_ants_and_bees(hymenoptera: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "subset.csv"  # 24 real photos per class keep the embedding pass to seconds
    lines = ["path,label"] + [
        f"{p},{c}" for c in ("ants", "bees") for p in sorted((hymenoptera / "train" / c).glob("*.jpg"))[:24]
    ]
    manifest.write_text("\n".join(lines) + "\n")
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["rank", str(manifest), "--backbones", "efficientnet_lite0", "--out",
                              str(tmp_path / "r"), "--cache-dir", str(tmp_path / "cache"), "--folds", "3"])  # fmt: skip
    assert cli.COMMANDS["rank"](args) == 0
    out = capsys.readouterr().out
    assert "recommended: efficientnet_lite0" in out
    row = json.loads((tmp_path / "r" / "rank.json").read_text())["rows"][0]
    assert row["images"] == 38  # 48 minus the 20% the manifest's missing val split holds out
    assert row["cv_accuracy"] > 0.8  # real ImageNet features separate ants from bees
