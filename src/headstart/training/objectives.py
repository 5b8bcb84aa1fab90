"""What a run optimises and how it is judged: the task half of the loop in :mod:`headstart.training.trainer`.

The trainer runs steps, schedules, processes and checkpoints; an objective says what one batch's loss is, what to
gather from the validation set and which metrics that gives. Classification trains a classifier with cross-entropy;
reconstruction trains an autoencoder on its pixel error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from headstart.data.transforms import Preprocessing, normalize
from headstart.insight.metrics import classification_metrics
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
