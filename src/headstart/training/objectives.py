"""What a run optimises and how it is judged: the task half of the loop in :mod:`headstart.training.trainer`.

The trainer runs steps, schedules, processes and checkpoints; an objective says what one batch's loss is, what to
gather from the validation set and which metrics that gives. Classification trains a classifier with cross-entropy;
multi-label classification one sigmoid per label with binary cross-entropy; reconstruction trains an autoencoder on
its pixel error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from headstart.data.transforms import Preprocessing, normalize
from headstart.insight.metrics import classification_metrics, multilabel_metrics
from headstart.models.autoencoder import Autoencoder
from headstart.training.trainer import Batch, Forward, StepResult


class Classification:
    """Cross-entropy on class logits; judged by :func:`~headstart.insight.metrics.classification_metrics` and the
    validation loss. Batches are (uint8 images, labels, indices).

    Args:
        classes: class names in label order.
        prep: the preprocessing whose normalisation turns a uint8 batch into the network's input.
        label_smoothing: cross-entropy target smoothing.
        class_weights: loss weight per class; None for uniform.
        device: where the class weights live: the training device.
    """

    running: tuple[str, ...] = ("train_accuracy",)
    unlogged: tuple[str, ...] = ("per_class", "confusion_matrix", "classes")

    def __init__(
        self,
        classes: Sequence[str],
        prep: Preprocessing,
        label_smoothing: float = 0.0,
        class_weights: Sequence[float] | None = None,
        device: torch.device | None = None,
    ):
        self.classes = list(classes)
        self.prep = prep
        weight = torch.tensor(class_weights, device=device) if class_weights else None
        self.loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)

    def step(self, forward: Forward, batch: Batch) -> StepResult:
        """Cross-entropy of the batch, and its correct predictions."""
        images, labels, _ = batch
        logits = forward(normalize(images, self.prep))
        loss = self.loss_fn(logits.float(), labels)  # fp32 outside autocast: the loss of bf16 logits is imprecise
        return StepResult(loss, len(labels), ((logits.argmax(1) == labels).sum(),))

    def outputs(self, forward: Forward, batch: Batch) -> tuple[torch.Tensor, ...]:
        """Logits and labels."""
        images, labels, _ = batch
        return forward(normalize(images, self.prep)).float(), labels

    def evaluate(self, outputs: tuple[torch.Tensor, ...]) -> dict[str, Any]:
        """Classification metrics and the (unsmoothed, unweighted) cross-entropy ``loss``."""
        logits, labels = outputs
        metrics = classification_metrics(labels.numpy(), torch.softmax(logits, 1).numpy(), self.classes)
        metrics["loss"] = float(F.cross_entropy(logits, labels))
        return metrics

    def describe(self, epoch: int, row: dict[str, Any]) -> str:
        """Training loss and accuracy, validation loss, accuracy and balanced accuracy, throughput."""
        return (
            f"epoch {epoch}: train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.3f} | "
            f"val loss {row['loss']:.4f} acc {row['accuracy']:.4f} "
            f"bal {row['balanced_accuracy']:.4f} | {row['train_images_per_s']:.1f} img/s"
        )


class MultiLabel:
    """Binary cross-entropy on one logit per label (``BCEWithLogitsLoss``); judged by
    :func:`~headstart.insight.metrics.multilabel_metrics`, macro mAP first (it needs no threshold, so the best epoch
    does not depend on one). Batches are (uint8 images, labels, indices): a record holds a label *set*, so the
    multi-hot targets are looked up by the batch's indices into the training and validation splits.

    Args:
        classes: label names in column order.
        prep: the preprocessing whose normalisation turns a uint8 batch into the network's input.
        train_targets: multi-hot labels [N_train, L] of the training split, indexed by the training loader's indices.
        val_targets: the same [N_val, L] for the validation split.
        thresholds: per-label decision thresholds for the validation metrics at each epoch (F1, exact match).
        label_smoothing: targets become ``t * (1 - s) + s / 2``.
        pos_weight: weight of each label's positive term, e.g. negatives / positives for rare labels; None: 1.
        device: where the targets live: the training device.
    """

    running: tuple[str, ...] = ("train_exact_match",)
    unlogged: tuple[str, ...] = ("per_class", "classes")

    def __init__(
        self,
        classes: Sequence[str],
        prep: Preprocessing,
        train_targets: np.ndarray,
        val_targets: np.ndarray,
        thresholds: Sequence[float],
        label_smoothing: float = 0.0,
        pos_weight: Sequence[float] | None = None,
        device: torch.device | None = None,
    ):
        self.classes = list(classes)
        self.prep = prep
        self.train_targets = torch.as_tensor(train_targets, dtype=torch.float32, device=device)
        self.val_targets = torch.as_tensor(val_targets, dtype=torch.float32, device=device)
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        self.smoothing = label_smoothing
        weight = torch.tensor(pos_weight, device=device) if pos_weight else None
        self.loss_fn = nn.BCEWithLogitsLoss(pos_weight=weight)

    def step(self, forward: Forward, batch: Batch) -> StepResult:
        """Binary cross-entropy of the batch, and its images with every label right (at probability 0.5)."""
        images, _, index = batch
        targets = self.train_targets[index.to(self.train_targets.device)]
        logits = forward(normalize(images, self.prep)).float()
        loss = self.loss_fn(logits, targets * (1 - self.smoothing) + self.smoothing / 2)
        exact = ((logits > 0) == (targets > 0.5)).all(1).sum()
        return StepResult(loss, len(targets), (exact,))

    def outputs(self, forward: Forward, batch: Batch) -> tuple[torch.Tensor, ...]:
        """Logits and multi-hot targets."""
        images, _, index = batch
        return forward(normalize(images, self.prep)).float(), self.val_targets[index.to(self.val_targets.device)]

    def evaluate(self, outputs: tuple[torch.Tensor, ...]) -> dict[str, Any]:
        """Multi-label metrics (their ``loss`` is the unsmoothed, unweighted binary cross-entropy)."""
        logits, targets = outputs
        probs = torch.sigmoid(logits).numpy()
        return multilabel_metrics(targets.numpy(), probs, self.classes, self.thresholds)

    def describe(self, epoch: int, row: dict[str, Any]) -> str:
        """Training loss and exact match, validation loss, mAP and exact match, throughput."""
        return (
            f"epoch {epoch}: train loss {row['train_loss']:.4f} exact {row['train_exact_match']:.3f} | "
            f"val loss {row['loss']:.4f} mAP {row['mAP']:.4f} exact {row['exact_match']:.4f} | "
            f"{row['train_images_per_s']:.1f} img/s"
        )


class Reconstruction:
    """An autoencoder's reconstruction loss (``mse`` or ``l1`` on normalised pixels); judged by ``val_loss``, the mean
    squared error per pixel of held-out images: the anomaly score :func:`~headstart.training.autoencoder.score` gives.

    Training batches are (uint8 images, ...) or, for a frozen backbone encoder, (cached features [B, D], targets);
    validation batches are (uint8 centre crops, ...).

    Args:
        model: the autoencoder, for its reconstruction targets (the trained module may wrap it).
        prep: the encoder's preprocessing.
        loss: ``mse`` or ``l1``.
    """

    running: tuple[str, ...] = ()
    unlogged: tuple[str, ...] = ()

    def __init__(self, model: Autoencoder, prep: Preprocessing, loss: str = "mse"):
        self.model = model
        self.prep = prep
        self.loss_fn = F.mse_loss if loss == "mse" else F.l1_loss

    def step(self, forward: Forward, batch: Batch) -> StepResult:
        """Reconstruction loss of the batch."""
        if batch[0].ndim == 2:  # a frozen encoder's cached features: the targets were made with them
            recon, target = forward(batch[0]), batch[1]
        else:
            x = normalize(batch[0], self.prep)
            target = self.model.target(x)
            recon = forward(x)
        return StepResult(self.loss_fn(recon.float(), target), len(target))

    def outputs(self, forward: Forward, batch: Batch) -> tuple[torch.Tensor, ...]:
        """Mean squared error per pixel and channel of each image."""
        x = normalize(batch[0], self.prep)
        return ((forward(x).float() - self.model.target(x)).pow(2).mean(dim=(1, 2, 3)),)

    def evaluate(self, outputs: tuple[torch.Tensor, ...]) -> dict[str, Any]:
        """``val_loss``: the mean over held-out images."""
        return {"val_loss": float(outputs[0].mean())}

    def describe(self, epoch: int, row: dict[str, Any]) -> str:
        """Training and validation loss."""
        return f"epoch {epoch}: train loss {row['train_loss']:.4f}, val loss {row['val_loss']:.4f}"
