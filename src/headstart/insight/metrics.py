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


def format_metrics(result: dict[str, Any]) -> str:
    """Human-readable report of :func:`classification_metrics`."""
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
