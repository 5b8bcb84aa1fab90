"""Classification metrics from predicted probabilities, and their text rendering."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn import metrics as skm


def classification_metrics(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, per-class precision/recall/F1, confusion matrix, and ROC-AUC for two classes.

    Args:
        labels: true class indices [N].
        probs: predicted probabilities [N, C].
        classes: class names, index-aligned with the columns of ``probs``.
    """
    labels = np.asarray(labels)
    preds = probs.argmax(1)
    index = list(range(len(classes)))
    precision, recall, f1, support = skm.precision_recall_fscore_support(labels, preds, labels=index, zero_division=0)
    out: dict[str, Any] = {
        "n": len(labels),
        "accuracy": float((preds == labels).mean()) if len(labels) else 0.0,
        "balanced_accuracy": float(skm.balanced_accuracy_score(labels, preds)) if len(labels) else 0.0,
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "confusion_matrix": skm.confusion_matrix(labels, preds, labels=index).tolist(),
        "classes": list(classes),
    }
    if len(classes) == 2 and len(set(labels.tolist())) == 2:
        out["roc_auc"] = float(skm.roc_auc_score(labels, probs[:, 1]))
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
