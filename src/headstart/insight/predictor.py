"""The loaded-model wrapper: ``load`` a trained classifier from its run folder (or an ONNX export of it), ``predict``,
``evaluate``, ``embed``."""

from __future__ import annotations

import copy
import csv
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from headstart.data.scan import Dataset, ImageRecord, collect_files, load_dataset
from headstart.data.transforms import Preprocessing, tta_views
from headstart.errors import DataError
from headstart.features.embeddings import embed
from headstart.features.inference import Outputs, run_model
from headstart.files import atomic_write_bytes, default_cache_root
from headstart.hardware import pick_device, resolve_precision
from headstart.insight.metrics import classification_metrics, multilabel_metrics
from headstart.models.backbones import Backbone, fingerprint_tensors
from headstart.models.checks import (
    HEAD_TENSORS,
    check_classifier_files,
    head_type,
    read_weights,
    weight_shapes,
)
from headstart.models.classifier import Classifier, head_from_tensors, load_classifier, read_model_info
from headstart.models.exported import ExportedClassifier
from headstart.models.hub import is_hub_ref, pull
from headstart.models.prepared import PreparedBackbone


@dataclass
class Prediction:
    """One image's prediction.

    A multi-label model's ``label`` is its predicted label set joined by ``|`` (empty when no label reaches its
    threshold), ``probability`` the highest label probability, ``labels`` the set and ``probabilities`` every
    label's sigmoid probability.
    """

    path: Path
    label: str
    probability: float
    top: list[tuple[str, float]]
    labels: list[str] | None = None  # multi-label models: the labels at or above their thresholds
    probabilities: dict[str, float] | None = None  # multi-label models: every label's probability


class Model:
    """A trained classifier loaded from its run folder.

    A model whose backbone stayed frozen (``auto``, ``extract``) evaluates from the feature cache: its backbone is the
    pretrained one, so the features its training computed (keyed by the weights' fingerprint, preprocessing and
    precision) are its own, and only the head runs. Its network is built on first need (new images, the report).

    A model loaded from an ONNX export (fp32 or int8) runs in onnxruntime on the CPU: it predicts and evaluates, but
    has no PyTorch network (``classifier``) for embeddings, Grad-CAM or further training.
    """

    def __init__(
        self, classifier: Classifier | None, info: dict[str, Any], run_dir: Path,
        exported: ExportedClassifier | None = None,
    ) -> None:  # fmt: skip
        self._classifier = classifier
        self._exported = exported
        self._saved: SavedBackbone | None = None
        self._views: dict[Preprocessing, Classifier] = {}  # the classifier under other preprocessing (TTA flip)
        self.info = info
        self.run_dir = run_dir
        self.classes: list[str] = list(info["classes"])
        self.device = pick_device() if exported is None else torch.device("cpu")
        saved = str(info.get("precision", "fp32"))
        # Use the precision the model was validated with, where this machine runs it natively.
        native = exported is None and resolve_precision("auto", self.device) == "bf16"
        self.precision = saved if native else "fp32"
        if classifier is not None:
            classifier.to(self.device)

    @property
    def classifier(self) -> Classifier:
        """The network, built from the run folder on first use."""
        if self._exported is not None:
            raise ValueError(
                f"{self._exported.path} is an ONNX export: it predicts and evaluates, but has no PyTorch network; "
                "load the run folder it was exported from for embeddings, the report or Grad-CAM"
            )
        if self._classifier is None:
            self._classifier = load_classifier(self.run_dir)[0].to(self.device)
        return self._classifier

    @property
    def preprocessing(self) -> Preprocessing:
        """The preprocessing stored with the model."""
        return Preprocessing.from_dict(self.info["preprocessing"])

    def network(self, prep: Preprocessing | None = None) -> Classifier | ExportedClassifier:
        """The classifier, or with ``prep`` another preprocessing of it (the mirrored view of TTA ``flip``): the same
        network and head, kept for reuse. A model loaded from an ONNX export answers with the export's runtime."""
        if self._exported is not None:
            if prep is not None and prep != self.preprocessing:
                raise ValueError(
                    f"{self._exported.path} runs the preprocessing it was exported with; for test-time augmentation "
                    "flip, load the run folder (crops works with an export)"
                )
            return self._exported
        if prep is None or prep == self.preprocessing:
            return self.classifier
        if prep not in self._views:
            base = self.classifier
            b = base.backbone
            view = Classifier(Backbone(b.net, b.num_features, b.name, prep, b.weights_source), base.num_classes,
                              head=base.head)  # fmt: skip
            self._views[prep] = view.eval()
        return self._views[prep]

    @property
    def multi_label(self) -> bool:
        """Whether each image gets a set of labels (one sigmoid per label) rather than one class."""
        return bool(self.info.get("multi_label"))

    @property
    def thresholds(self) -> np.ndarray:
        """Per-label decision thresholds [C] of a multi-label model, from model.json (0.5 for a label it lacks)."""
        stored = self.info.get("thresholds") or {}
        return np.array([float(stored.get(name, 0.5)) for name in self.classes])

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities of logits [N, C]: softmax over classes, or a sigmoid per label for a multi-label model."""
        return torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=1)

    def decide(self, probs: np.ndarray) -> list[list[str]]:
        """The labels of each row of multi-label probabilities [N, C] that reach their thresholds, in class order."""
        above = probs >= self.thresholds[None, :]
        return [[self.classes[j] for j in np.flatnonzero(row)] for row in above]

    def _repr_html_(self) -> str:
        """What the model is, its recorded scores, confusion matrix and learning curves, shown by Jupyter."""
        from headstart.insight.notebook import model_view

        return model_view(self)

    def _run(
        self, items: list[ImageRecord] | list[Path], batch_size: int, from_cache: bool = False, tta: str | None = None
    ) -> Outputs:
        """Logits of every item, averaged over the views of ``tta`` (:func:`~headstart.data.transforms.tta_views`)."""
        prep, views = tta_views(tta, self.preprocessing)
        outputs = []
        for name, augment in views:
            if from_cache and self.info.get("frozen_backbone") and self._exported is None:
                outputs.append(self._run_head(items, batch_size, prep, name, augment))
            else:
                outputs.append(run_model(
                    self.network(prep), items, prep, len(self.classes), batch_size=batch_size,
                    precision=self.precision, device=self.device, description=f"predicting ({name})", augment=augment,
                ))  # fmt: skip
        if len(outputs) == 1:
            return outputs[0]
        ok = np.logical_and.reduce([o.ok for o in outputs])
        values = np.mean([o.values for o in outputs], axis=0) * ok[:, None]
        failed = {path: reason for o in outputs for path, reason in o.failed}
        return Outputs(values.astype(np.float32), ok, sorted(failed.items()))

    def _run_head(
        self, items: list[ImageRecord] | list[Path], batch_size: int, prep: Preprocessing, view: str = "center",
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> Outputs:  # fmt: skip
        """Logits of a frozen-backbone model: cached (or computed and cached) features of one view, then the head."""
        backbone = self._feature_backbone(prep)
        features = embed(backbone, items, batch_size=batch_size, precision=self.precision, device=self.device,
                         description=f"predicting ({view})", view=view, augment=augment)  # fmt: skip
        head = head_from_tensors(self.info, backbone.saved, self.run_dir)
        with torch.inference_mode():
            logits = head(torch.from_numpy(features.features).float()).numpy()
        values = np.zeros((len(items), len(self.classes)), dtype=np.float32)
        values[features.index] = logits
        ok = np.zeros(len(items), dtype=bool)
        ok[features.index] = True
        return Outputs(values, ok, features.failed)

    def _feature_backbone(self, prep: Preprocessing | None = None) -> SavedBackbone:
        """The frozen backbone described from the run folder (read and fingerprinted once per loaded model), with
        ``prep`` in place of the saved preprocessing when given (its features have a cache folder of their own)."""
        if self._saved is None:
            self._saved = SavedBackbone(self, read_weights(self.run_dir))
        if prep is None or prep == self._saved.preprocessing:
            return self._saved
        view = copy.copy(self._saved)
        view.preprocessing = prep
        return view

    def predict_proba(
        self,
        items: list[ImageRecord] | list[Path],
        batch_size: int = 32,
        from_cache: bool = False,
        tta: str | None = None,
    ) -> tuple[np.ndarray, Outputs]:
        """Class probabilities [N_ok, C] for the images that decoded, and the raw outputs (with ``ok``, ``failed``).

        A multi-label model gives each label's sigmoid probability (rows need not sum to one).

        ``from_cache``: a frozen-backbone model reads (and fills) the feature cache and runs only its head; for
        labelled sets that training already saw, not for a stream of new images, which would fill the cache.
        ``tta``: test-time augmentation, ``none``, ``flip`` or ``crops``; the logits of its views are averaged.
        None: the model's own (``crops`` for a model trained on crop-averaged features, else ``none``).
        """
        out = self._run(items, batch_size, from_cache, tta)
        logits = torch.from_numpy(out.values[out.ok])
        return self.probabilities(logits).numpy(), out

    def predict(
        self, inputs: list[str | Path] | str | Path, top_k: int = 1, batch_size: int = 32, tta: str | None = None
    ) -> tuple[list[Prediction], list[tuple[Path, str]]]:
        """Predict images and folders of images; returns predictions and the files that could not be read.

        ``tta``: test-time augmentation (``none``, ``flip``, ``crops``; see :meth:`predict_proba`).
        """
        files = collect_files([inputs] if isinstance(inputs, (str, Path)) else inputs)
        if not files:
            raise DataError(f"no files found in {inputs}")
        probs, out = self.predict_proba(files, batch_size, tta=tta)
        decoded = np.flatnonzero(out.ok)
        tops = top_classes(probs, self.classes, top_k)
        if not self.multi_label:
            rows = [Prediction(files[i], top[0][0], top[0][1], top) for i, top in zip(decoded, tops, strict=True)]
            return rows, out.failed
        rows = [
            Prediction(
                files[i], "|".join(names), top[0][1], top, names, dict(zip(self.classes, map(float, p), strict=True))
            )
            for i, top, names, p in zip(decoded, tops, self.decide(probs), probs, strict=True)
        ]
        return rows, out.failed

    def evaluate(
        self, data: str | Path | Dataset, split: str = "val", batch_size: int = 32, tta: str | None = None
    ) -> dict[str, Any]:
        """Metrics on a labelled split; class names are matched to the model's by name. ``tta``: test-time
        augmentation (``none``, ``flip``, ``crops``; see :meth:`predict_proba`), recorded in the metrics when used."""
        dataset = data if isinstance(data, Dataset) else self._dataset(data)
        records = {"train": dataset.train, "val": dataset.val, "test": dataset.test}[split]
        if not records:
            raise DataError(f"{dataset.root} has no {split} images")
        if dataset.multi_label and not self.multi_label:
            raise DataError(
                f"{dataset.root} gives images several labels, but {self.run_dir} is a single-label model; evaluate a "
                "model trained on multi-label data (headstart train ... --multi-label)"
            )
        mapping = class_mapping(dataset, self.classes)
        probs, out = self.predict_proba(records, batch_size, from_cache=True, tta=tta)
        if self.multi_label:  # the data's label columns, moved to the model's
            targets = np.zeros((int(out.ok.sum()), len(self.classes)), dtype=np.float32)
            targets[:, [mapping[i] for i in range(len(dataset.classes))]] = dataset.targets(records)[out.ok]
            metrics = multilabel_metrics(targets, probs, self.classes, self.thresholds)
        else:
            labels = np.array([mapping[records[i].label] for i in np.flatnonzero(out.ok)])
            metrics = classification_metrics(labels, probs, self.classes)
        metrics["skipped"] = [str(p) for p, _ in out.failed]
        mode = tta if tta is not None else ("crops" if self.preprocessing.crops else "none")
        if mode != "none":  # recorded only when used: a run's own metrics stay as they were
            metrics["tta"] = mode
        return metrics

    def _dataset(self, data: str | Path) -> Dataset:
        config = self.info.get("config", {}).get("data", {})
        multi_label = self.multi_label and Path(data).suffix.lower() == ".csv"  # a folder still gives one label each
        return load_dataset(
            data,
            float(config.get("val_fraction", 0.2)),
            int(config.get("split_seed", 0)),
            default_cache_root(),
            multi_label,
        )

    def embed(self, inputs: list[Path], batch_size: int = 32) -> np.ndarray:
        """Backbone features of images (the model's own embedding space)."""
        if self._exported is not None:
            raise ValueError(
                f"{self._exported.path} is a classifier export; embed with the run folder, or export the embedder "
                "(headstart export RUN --what embedder)"
            )
        if self.info.get("frozen_backbone"):
            backbone: Backbone | SavedBackbone = self._feature_backbone()
        else:
            backbone = self.classifier.backbone
        return embed(backbone, inputs, batch_size=batch_size, precision=self.precision).features


class SavedBackbone(PreparedBackbone):
    """The frozen backbone of a saved model, described from its files: feature-cache lookups need no network; one is
    built (the model's own) only for images not in the cache."""

    def __init__(self, model: Model, saved: dict[str, torch.Tensor]):
        info = model.info
        tensors = {k.removeprefix("backbone."): v for k, v in saved.items() if k.startswith("backbone.")}
        meta = {
            "num_features": str(info["num_features"]),
            "preprocessing": json.dumps(info["preprocessing"]),
            "weights_source": str(info.get("weights_source", "")),
            "fingerprint": fingerprint_tensors(str(info["backbone"]), tensors),
        }
        super().__init__(model.run_dir / "model.safetensors", str(info["backbone"]), None, meta)
        self._model = model
        self._tensors = tensors
        self.saved = saved  # every tensor of the model file, the head's too

    def network(self) -> Backbone:
        """The model's own backbone (built from the run folder), with this description's preprocessing."""
        network = self._model.network(self.preprocessing)
        assert isinstance(network, Classifier)  # a frozen backbone is described from a run folder, never an export
        return network.backbone

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone's tensors as saved."""
        return self._tensors


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
    """Load a trained model from its run folder, or from the hub as ``hf-hub:org/name[@revision]`` (downloaded once
    into the hub cache, then read from there, offline too); no code is executed. A frozen-backbone model builds its
    network only when an image is not in the feature cache.

    ``run`` may also be an ONNX classifier written by ``headstart export`` (``classifier.onnx``, or the int8
    ``classifier.int8.onnx``): the model then runs in onnxruntime, described by the file's own metadata.
    """
    if Path(run).suffix == ".onnx":
        exported = ExportedClassifier(run)
        info = {**exported.meta, "kind": "classifier", "exported": str(exported.path)}
        return Model(None, info, exported.path.parent, exported)
    if is_hub_ref(run):
        run = pull(str(run))
    folder = Path(run)
    info = read_model_info(folder)
    if info.get("kind") != "classifier":
        raise ValueError(f"{run} holds a {info.get('kind')!r} model, not a classifier")
    if info.get("frozen_backbone"):
        # The network is built (and the weights read) on first need; the files' agreement is checked now, from the
        # weights' header, so that a mismatch is reported here rather than as a failed array operation later.
        check_classifier_files(info, weight_shapes(folder, HEAD_TENSORS[head_type(info)]), folder)
        return Model(None, info, folder)
    classifier, info = load_classifier(folder)
    return Model(classifier, info, folder)


def write_predictions(rows: list[Prediction], path: Path) -> None:
    """Write predictions as CSV (one row per image) or JSON, by the file's suffix (atomically).

    Multi-label predictions: CSV columns ``path,labels`` (``|``-separated) then one probability column per label;
    JSON records ``path``, ``labels`` and ``probabilities``.
    """
    if any(r.probabilities is not None for r in rows):
        _write_multilabel(rows, path)
        return
    if path.suffix.lower() == ".json":
        records = [{"path": str(r.path), "label": r.label, "probability": r.probability, "top": r.top} for r in rows]
        atomic_write_bytes(path, json.dumps(records, indent=2).encode())
        return
    k = max((len(r.top) for r in rows), default=1)
    text = io.StringIO()
    writer = csv.writer(text)
    header = ["path", "label", "probability"]
    for j in range(2, k + 1):
        header += [f"label_{j}", f"probability_{j}"]
    writer.writerow(header)
    for r in rows:
        line = [str(r.path), r.label, f"{r.probability:.6f}"]
        for name, p in r.top[1:]:
            line += [name, f"{p:.6f}"]
        writer.writerow(line)
    atomic_write_bytes(path, text.getvalue().encode())


def _write_multilabel(rows: list[Prediction], path: Path) -> None:
    """:func:`write_predictions` for a multi-label model's predictions."""
    if path.suffix.lower() == ".json":
        records = [{"path": str(r.path), "labels": r.labels, "probabilities": r.probabilities} for r in rows]
        atomic_write_bytes(path, json.dumps(records, indent=2).encode())
        return
    classes = list(rows[0].probabilities or {}) if rows else []
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["path", "labels", *classes])
    for r in rows:
        probabilities = r.probabilities or {}
        writer.writerow([str(r.path), "|".join(r.labels or []), *(f"{probabilities[c]:.6f}" for c in classes)])
    atomic_write_bytes(path, text.getvalue().encode())
