"""The loaded-model wrapper: ``load`` a trained classifier from its run folder, ``predict``, ``evaluate``, ``embed``."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from headstart.data.scan import Dataset, ImageRecord, collect_files, load_dataset
from headstart.data.transforms import Preprocessing
from headstart.errors import DataError
from headstart.features.embeddings import embed
from headstart.features.inference import Outputs, run_model
from headstart.hardware import pick_device, resolve_precision
from headstart.insight.metrics import classification_metrics
from headstart.models.classifier import Classifier, load_classifier


@dataclass
class Prediction:
    """One image's prediction."""

    path: Path
    label: str
    probability: float
    top: list[tuple[str, float]]


class Model:
    """A trained classifier loaded from its run folder."""

    def __init__(self, classifier: Classifier, info: dict[str, Any], run_dir: Path):
        self.classifier = classifier
        self.info = info
        self.run_dir = run_dir
        self.classes: list[str] = list(info["classes"])
        self.device = pick_device()
        saved = str(info.get("precision", "fp32"))
        # Use the precision the model was validated with, where this machine runs it natively.
        self.precision = saved if resolve_precision("auto", self.device) == "bf16" else "fp32"
        self.classifier.to(self.device)

    @property
    def preprocessing(self) -> Preprocessing:
        """The preprocessing stored with the model."""
        return self.classifier.backbone.preprocessing

    def _run(self, items: list[ImageRecord] | list[Path], batch_size: int) -> Outputs:
        return run_model(
            self.classifier, items, self.preprocessing, len(self.classes), batch_size=batch_size,
            precision=self.precision, device=self.device, description="predicting",
        )  # fmt: skip

    def predict_proba(self, items: list[ImageRecord] | list[Path], batch_size: int = 32) -> tuple[np.ndarray, Outputs]:
        """Class probabilities [N_ok, C] for the images that decoded, and the raw outputs (with ``ok``, ``failed``)."""
        out = self._run(items, batch_size)
        logits = torch.from_numpy(out.values[out.ok])
        return torch.softmax(logits, dim=1).numpy(), out

    def predict(
        self, inputs: list[str | Path] | str | Path, top_k: int = 1, batch_size: int = 32
    ) -> tuple[list[Prediction], list[tuple[Path, str]]]:
        """Predict images and folders of images; returns predictions and the files that could not be read."""
        files = collect_files([inputs] if isinstance(inputs, (str, Path)) else inputs)
        if not files:
            raise DataError(f"no files found in {inputs}")
        probs, out = self.predict_proba(files, batch_size)
        decoded = np.flatnonzero(out.ok)
        tops = top_classes(probs, self.classes, top_k)
        rows = [Prediction(files[i], top[0][0], top[0][1], top) for i, top in zip(decoded, tops, strict=True)]
        return rows, out.failed

    def evaluate(self, data: str | Path | Dataset, split: str = "val", batch_size: int = 32) -> dict[str, Any]:
        """Metrics on a labelled split; class names are matched to the model's by name."""
        dataset = data if isinstance(data, Dataset) else self._dataset(data)
        records = {"train": dataset.train, "val": dataset.val, "test": dataset.test}[split]
        if not records:
            raise DataError(f"{dataset.root} has no {split} images")
        mapping = class_mapping(dataset, self.classes)
        probs, out = self.predict_proba(records, batch_size)
        labels = np.array([mapping[records[i].label] for i in np.flatnonzero(out.ok)])
        metrics = classification_metrics(labels, probs, self.classes)
        metrics["skipped"] = [str(p) for p, _ in out.failed]
        return metrics

    def _dataset(self, data: str | Path) -> Dataset:
        config = self.info.get("config", {}).get("data", {})
        return load_dataset(data, float(config.get("val_fraction", 0.2)), int(config.get("split_seed", 0)))

    def embed(self, inputs: list[Path], batch_size: int = 32) -> np.ndarray:
        """Backbone features of images (the model's own embedding space)."""
        result = embed(self.classifier.backbone, inputs, batch_size=batch_size, precision=self.precision)
        return result.features


def top_classes(probs: np.ndarray, classes: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
    """The ``k`` most probable classes of each row of ``probs`` [N, C], best first, as ``(name, probability)``.

    ``k`` is clipped to 1..C. Ties keep class order (a stable sort), so equal inputs always give equal answers.
    """
    k = max(1, min(k, len(classes)))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[(classes[j], float(row[j])) for j in picks] for row, picks in zip(probs, order, strict=True)]


def class_mapping(dataset: Dataset, classes: Sequence[str], model: str = "the model") -> dict[int, int]:
    """Dataset class index -> index in a model's ``classes``, matched by name.

    Raises:
        DataError: when the dataset has a class the model was not trained on (``model`` names it in the message).
    """
    unknown = sorted(set(dataset.classes) - set(classes))
    if unknown:
        raise DataError(f"{dataset.root} has classes {unknown} {model} was not trained on ({list(classes)})")
    position = {name: j for j, name in enumerate(classes)}
    return {i: position[name] for i, name in enumerate(dataset.classes)}


def load(run: str | Path) -> Model:
    """Load a trained model from its run folder (no download, no code execution)."""
    classifier, info = load_classifier(Path(run))
    return Model(classifier, info, Path(run))


def write_predictions(rows: list[Prediction], path: Path) -> None:
    """Write predictions as CSV (one row per image) or JSON, by the file's suffix."""
    if path.suffix.lower() == ".json":
        path.write_text(
            json.dumps(
                [{"path": str(r.path), "label": r.label, "probability": r.probability, "top": r.top} for r in rows],
                indent=2,
            )
        )
        return
    k = max((len(r.top) for r in rows), default=1)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        header = ["path", "label", "probability"]
        for j in range(2, k + 1):
            header += [f"label_{j}", f"probability_{j}"]
        writer.writerow(header)
        for r in rows:
            line = [str(r.path), r.label, f"{r.probability:.6f}"]
            for name, p in r.top[1:]:
                line += [name, f"{p:.6f}"]
            writer.writerow(line)
