"""Classification metrics from predicted probabilities, and their text rendering."""

from __future__ import annotations

from typing import Any

import numpy as np


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts [C, C]: rows are true classes, columns predicted ones."""
    flat = np.asarray(labels, dtype=np.int64) * num_classes + np.asarray(preds, dtype=np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def binary_roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of scores for class 1: the Mann-Whitney statistic, ties counted as one half."""
    labels = np.asarray(labels)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    below = np.cumsum(counts) - counts  # scores strictly lower than each distinct value
    ranks = (below + (counts + 1) / 2.0)[inverse]  # average rank (1-based) of every score
    positives = int((labels == 1).sum())
    negatives = len(labels) - positives
    return float((ranks[labels == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def classification_metrics(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, per-class precision/recall/F1, confusion matrix, and ROC-AUC for two classes.

    The definitions are scikit-learn's (``zero_division=0``; balanced accuracy averages recall over the classes
    present); numpy computes them because importing scikit-learn takes longer than a cached extract run.

    Args:
        labels: true class indices [N].
        probs: predicted probabilities [N, C].
        classes: class names, index-aligned with the columns of ``probs``.
    """
    labels = np.asarray(labels)
    preds = probs.argmax(1)
    matrix = confusion_matrix(labels, preds, len(classes))
    hits = np.diag(matrix).astype(np.float64)
    support = matrix.sum(1)
    predicted = matrix.sum(0)
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(hits, support, out=np.zeros_like(hits), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(hits), where=both > 0)
    out: dict[str, Any] = {
        "n": len(labels),
        "accuracy": float((preds == labels).mean()) if len(labels) else 0.0,
        "balanced_accuracy": float(recall[support > 0].mean()) if len(labels) else 0.0,
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "confusion_matrix": matrix.tolist(),
        "classes": list(classes),
    }
    if len(classes) == 2 and len(set(labels.tolist())) == 2:
        out["roc_auc"] = binary_roc_auc(labels, probs[:, 1])
    return out


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall curve as scikit-learn's ``average_precision_score`` defines it:
    ``sum_n (R_n - R_{n-1}) P_n`` over the distinct scores, highest first (tied scores form one step).

    NaN when ``labels`` has no positive (recall is undefined).
    """
    labels = np.asarray(labels, dtype=np.float64)
    if labels.sum() == 0:
        return float("nan")
    order = np.argsort(-np.asarray(scores), kind="mergesort")
    ranked, hits = np.asarray(scores)[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]  # the last row of each distinct score
    tp = np.cumsum(hits)[last]
    precision = tp / (last + 1)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def multilabel_metrics(
    targets: np.ndarray, probs: np.ndarray, classes: list[str], thresholds: np.ndarray | list[float]
) -> dict[str, Any]:
    """Metrics of a multi-label classifier: macro mAP, exact-match ratio, Hamming loss, macro F1, and per label the
    average precision and the precision, recall and F1 at its threshold.

    A label is predicted when its probability reaches its threshold (``p >= t``). The definitions are
    scikit-learn's (``zero_division=0``); mAP averages the labels with at least one positive image (a label absent
    from the split has no precision-recall curve). ``loss`` is the mean binary cross-entropy over images and labels.

    Args:
        targets: multi-hot truth [N, L].
        probs: per-label probabilities [N, L].
        classes: label names, index-aligned with the columns.
        thresholds: decision threshold of each label [L].
    """
    truth = np.asarray(targets) > 0.5
    probs = np.asarray(probs, dtype=np.float64)
    preds = probs >= np.asarray(thresholds, dtype=np.float64)[None, :]
    tp = (truth & preds).sum(0).astype(np.float64)
    predicted, support = preds.sum(0), truth.sum(0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(tp), where=both > 0)
    ap = np.array([average_precision(truth[:, j], probs[:, j]) for j in range(len(classes))])
    clipped = np.clip(probs, 1e-7, 1 - 1e-7)
    n = len(truth)
    out: dict[str, Any] = {
        "n": n,
        "multi_label": True,
        "mAP": float(np.nanmean(ap)) if n and not np.isnan(ap).all() else 0.0,
        "exact_match": float((preds == truth).all(1).mean()) if n else 0.0,
        "hamming_loss": float((preds != truth).mean()) if n else 0.0,
        "macro_f1": float(f1.mean()),
        "loss": float(-np.mean(np.where(truth, np.log(clipped), np.log(1 - clipped)))) if n else 0.0,
        "per_class": {
            name: {
                "precision": float(precision[j]),
                "recall": float(recall[j]),
                "f1": float(f1[j]),
                "support": int(support[j]),
                "ap": None if np.isnan(ap[j]) else float(ap[j]),
                "threshold": float(np.asarray(thresholds)[j]),
            }
            for j, name in enumerate(classes)
        },
        "classes": list(classes),
    }
    return out


def format_metrics(result: dict[str, Any]) -> str:
    """Human-readable report of :func:`classification_metrics` or :func:`multilabel_metrics`."""
    if result.get("multi_label"):
        return _format_multilabel(result)
    classes = result["classes"]
    width = max(10, *(len(c) for c in classes)) + 2
    lines = [
        f"images {result['n']}   accuracy {result['accuracy']:.4f}   "
        f"balanced accuracy {result['balanced_accuracy']:.4f}"
        + (f"   ROC-AUC {result['roc_auc']:.4f}" if "roc_auc" in result else ""),
        "",
        f"{'class':<{width}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}",
    ]
    for name, row in result["per_class"].items():
        lines.append(
            f"{name:<{width}}{row['precision']:>10.4f}{row['recall']:>10.4f}{row['f1']:>10.4f}{row['support']:>10d}"
        )
    lines += [
        "",
        "confusion matrix (rows: true, columns: predicted)",
        " " * width + "".join(f"{c:>10.9}" for c in classes),
    ]
    for name, row in zip(classes, result["confusion_matrix"], strict=True):
        lines.append(f"{name:<{width}}" + "".join(f"{v:>10d}" for v in row))
    return "\n".join(lines)


def _format_multilabel(result: dict[str, Any]) -> str:
    """Human-readable report of :func:`multilabel_metrics`: the summary line and the per-label table."""
    width = max(10, *(len(c) for c in result["classes"])) + 2
    lines = [
        f"images {result['n']}   macro mAP {result['mAP']:.4f}   exact match {result['exact_match']:.4f}   "
        f"macro F1 {result['macro_f1']:.4f}   Hamming loss {result['hamming_loss']:.4f}",
        "",
        f"{'label':<{width}}{'AP':>10}{'threshold':>10}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}",
    ]
    for name, row in result["per_class"].items():
        ap = "-" if row["ap"] is None else f"{row['ap']:.4f}"
        lines.append(
            f"{name:<{width}}{ap:>10}{row['threshold']:>10.3f}{row['precision']:>10.4f}{row['recall']:>10.4f}"
            f"{row['f1']:>10.4f}{row['support']:>10d}"
        )
    return "\n".join(lines)
