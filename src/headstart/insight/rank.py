"""Rank pretrained backbones for a dataset before training any of them.

Each candidate embeds the training split once (through the feature cache, so a second ranking is nearly free) and is
scored on its frozen features by three estimators of transferability:

* cross-validated accuracy of an L2-regularised logistic regression on standardised features, the head that
  ``headstart train --strategy extract`` fits (the C is chosen by CV log-loss, as there);
* cross-validated cosine kNN accuracy, a parameter-free check of how well the classes cluster;
* LogME (You, Liu, Wang and Long, "LogME: Practical Assessment of Pre-trained Models for Transfer Learning",
  ICML 2021, arXiv:2102.11005): the log marginal evidence per sample of a Bayesian linear model from features to
  one-hot labels, with the prior and noise precisions found by evidence maximisation.

Rows are sorted by LogME (CV accuracy breaks ties). That order is the one that held up when the candidates were
trained for real (``benchmarks/rank_validation.py``, the three bundled EfficientNet-Lite backbones, 2 datasets):
Spearman correlation with the achieved val accuracy of ``finetune`` 1.0 on ants/bees and 1.0 on scikit-learn's digits
for LogME (and kNN), 0.5 and 0.5 for CV logistic accuracy; of ``extract`` 0.87 and 0.5 for LogME, 0.0 and -0.5 for CV
accuracy. CV accuracy on a few hundred training images separates candidates by fewer images than its own noise;
it stays in the table as the estimate, in accuracy units, of what ``extract`` will deliver. Only the training split
is used, so the validation split stays untouched for judging the ranking.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from headstart import progress
from headstart.data.scan import Dataset, load_dataset
from headstart.errors import DataError
from headstart.features.embeddings import embed
from headstart.files import default_cache_root
from headstart.hardware import pick_device, resolve_precision
from headstart.models.backbones import create_backbone, list_backbones, offline_weights
from headstart.models.heads import choose_c


@dataclass(frozen=True)
class RankRow:
    """Transferability scores of one backbone on one dataset."""

    backbone: str
    cv_accuracy: float  # cross-validated logistic-regression accuracy on the frozen train features
    knn_accuracy: float  # cross-validated cosine kNN accuracy (k = 10 or fewer on tiny classes)
    logme: float  # LogME evidence per sample (higher is better; comparable across backbones on one dataset)
    embed_seconds: float  # wall time of the embedding pass (near zero when served from the cache)
    cached: int  # images whose features came from the cache
    parameters: int  # backbone parameters (without a head)
    input_size: int  # crop side the backbone's preprocessing uses
    num_features: int  # embedding width
    images: int  # training images scored


def logme(features: np.ndarray, labels: np.ndarray, max_iter: int = 11, tol: float = 0.01) -> float:
    """LogME score of features for a classification task (You et al., ICML 2021, Algorithm 1).

    For every class a Bayesian linear regression ``y_k = F w + noise`` is fitted to the one-hot column ``y_k`` with
    prior ``w ~ N(0, 1/alpha)`` and noise precision ``beta``; alpha and beta are found by the paper's fixed-point
    evidence maximisation (MacKay's updates). The score is the log evidence per sample, averaged over classes. All
    work happens in the SVD basis of ``F``, so each iteration costs O(N·min(N, D)); directions outside ``F``'s row
    space have eigenvalue 0 and only contribute the prior term ``log alpha``.

    Args:
        features: [N, D] features (raw backbone output).
        labels: [N] class indices.
        max_iter: fixed-point iterations (the paper's reference code uses 11; it converges in two or three).
        tol: relative change of alpha/beta at which to stop.

    Returns:
        The mean log evidence per sample; higher means the features explain the labels better.
    """
    f = np.asarray(features, dtype=np.float64)
    n, d = f.shape
    u, sigma, _ = np.linalg.svd(f, full_matrices=False)
    s = sigma**2  # eigenvalues of F^T F on its row space (the other d - k are zero)
    k = len(s)
    evidences = []
    for cls in np.unique(labels):
        y = (labels == cls).astype(np.float64)
        uy = u.T @ y  # y's coordinates in F's column space
        y_out = float(y @ y - uy @ uy)  # the part of y no linear model on F can fit
        alpha, beta = 1.0, 1.0
        for _ in range(max_iter):
            gamma = float((beta * s / (alpha + beta * s)).sum())  # effective number of well-determined weights
            # Posterior mean m = beta A^{-1} F^T y; its squared norm and the residual y - F m, in the SVD basis.
            m_sq = float(((beta * sigma * uy / (alpha + beta * s)) ** 2).sum())
            residual = y_out + float((((alpha / (alpha + beta * s)) * uy) ** 2).sum())
            new_alpha = gamma / (m_sq + 1e-5)
            new_beta = (n - gamma) / (residual + 1e-5)
            converged = abs(new_alpha / new_beta - alpha / beta) / (alpha / beta) < tol
            alpha, beta = new_alpha, new_beta
            if converged:
                break
        m_sq = float(((beta * sigma * uy / (alpha + beta * s)) ** 2).sum())
        residual = y_out + float((((alpha / (alpha + beta * s)) * uy) ** 2).sum())
        log_det = float(np.log(alpha + beta * s).sum()) + (d - k) * np.log(alpha)
        evidence = (
            d / 2 * np.log(alpha)
            + n / 2 * np.log(beta)
            - log_det / 2
            - beta / 2 * residual
            - alpha / 2 * m_sq
            - n / 2 * np.log(2 * np.pi)
        )
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def knn_cv_accuracy(features: np.ndarray, labels: np.ndarray, folds: int = 5, k: int = 10, seed: int = 0) -> float:
    """Stratified k-fold accuracy of a cosine kNN vote on the features."""
    folds = max(2, min(folds, int(np.bincount(labels).min())))
    k = max(1, min(k, len(labels) * (folds - 1) // folds - 1))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    knn = KNeighborsClassifier(n_neighbors=k, metric="cosine", weights="distance")
    return float(cross_val_score(knn, features, labels, cv=splitter).mean())


def offline_candidates() -> list[str]:
    """The listed backbones whose pretrained weights are available without the network (``--all-offline``)."""
    return [name for name, _, _ in list_backbones(all_models=False) if offline_weights(name)]


def rank(
    data: str | Path | Dataset,
    backbones: Sequence[str],
    *,
    cache_dir: str | Path | None = None,
    folds: int = 5,
    batch_size: int = 32,
    workers: int = -1,
    precision: str = "auto",
    seed: int = 0,
    out: str | Path | None = None,
    pretrained: bool = True,
    weights: Mapping[str, str] | None = None,
) -> list[RankRow]:
    """Score every backbone's frozen features on the dataset's training split, best first.

    Args:
        data: dataset folder or CSV manifest (any layout :func:`headstart.data.scan.load_dataset` reads), or a dataset.
        backbones: registry names to compare (``offline_candidates()`` gives those usable offline).
        cache_dir: feature cache root (default ``$HEADSTART_CACHE`` or ``~/.cache/headstart``).
        folds: cross-validation folds (fewer when a class has fewer training images).
        batch_size: images per forward pass.
        workers: decoding processes (-1 picks).
        precision: ``auto``, ``bf16`` or ``fp32``.
        seed: fold shuffling seed.
        out: folder to write ``rank.csv`` and ``rank.json`` into (the ranking report).
        pretrained: load each backbone's pretrained weights (False only makes sense for tests and baselines).
        weights: weight files by backbone name, used instead of the bundled or hub weights.

    Raises:
        ValueError: when no backbone is given.
    """
    if not backbones:
        raise ValueError("no backbones to rank; pass names (e.g. efficientnet_lite0,efficientnet_lite1) or use "
                         "--all-offline")  # fmt: skip
    dataset = data if isinstance(data, Dataset) else load_dataset(data)
    labels_all = np.array([r.label for r in dataset.train])
    device = pick_device()
    resolved = resolve_precision(precision, device)
    cache_root = default_cache_root(cache_dir)
    rows = []
    for name in backbones:
        backbone = create_backbone(name, pretrained=pretrained, weights=(weights or {}).get(name))
        start = time.perf_counter()
        emb = embed(
            backbone, dataset.train, batch_size=batch_size, precision=resolved, device=device, cache_root=cache_root,
            workers=workers, description=f"embedding ({name})",
        )  # fmt: skip
        seconds = time.perf_counter() - start
        labels = labels_all[emb.index]
        if len(np.unique(labels)) < 2:
            raise DataError(f"{dataset.root}: fewer than two classes have decodable training images for {name}")
        c, accs = choose_c(emb.features, labels, folds=folds, seed=seed)
        row = RankRow(
            backbone=name,
            cv_accuracy=accs[c],
            knn_accuracy=knn_cv_accuracy(emb.features, labels, folds=folds, seed=seed),
            logme=logme(emb.features, labels),
            embed_seconds=seconds,
            cached=emb.hits,
            parameters=sum(p.numel() for p in backbone.parameters()),
            input_size=backbone.preprocessing.input_size,
            num_features=backbone.num_features,
            images=len(labels),
        )
        progress.log(f"{name}: CV accuracy {row.cv_accuracy:.4f}, kNN {row.knn_accuracy:.4f}, LogME {row.logme:.4f}")
        rows.append(row)
    rows.sort(key=lambda r: (-r.logme, -r.cv_accuracy))
    if out is not None:
        write_report(rows, Path(out))
    return rows


def write_report(rows: Sequence[RankRow], folder: Path) -> None:
    """Write the ranking as ``rank.csv`` and ``rank.json`` (with the recommendation) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    fields = list(RankRow.__dataclass_fields__)
    with (folder / "rank.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["rank", *fields])
        writer.writeheader()
        for i, row in enumerate(rows, start=1):
            writer.writerow({"rank": i, **asdict(row)})
    report = {"recommended": rows[0].backbone if rows else None, "rows": [asdict(r) for r in rows]}
    (folder / "rank.json").write_text(json.dumps(report, indent=2))
