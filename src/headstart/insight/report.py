"""The run report: learning curves, confusion matrix, per-class scores, mistakes, Grad-CAM and an embedding map.

``build_report(run_dir)`` reads a run folder (``model.json``, ``metrics.jsonl``, ``skipped_files.txt``), runs the
validation images through the saved model once (probabilities and embeddings from the same pass), and writes PNG
figures into ``run_dir/figures/`` and a self-contained ``run_dir/report.html`` beside them (a page of sections, see
:mod:`headstart.insight.pages`): inline CSS, relative image links, no script and no CDN, so it opens from disk in any
browser, offline.

Figures are drawn with matplotlib's object-oriented API (``Figure`` + Agg canvas), never ``pyplot``: no global
backend state is touched, so building a report inside another program cannot change how that program plots.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from headstart import progress
from headstart.data.scan import Dataset, ImageRecord, load_dataset
from headstart.data.transforms import eval_tensor, normalize
from headstart.errors import DataError
from headstart.features.inference import run_model
from headstart.insight.metrics import classification_metrics, multilabel_metrics
from headstart.insight.pages import Section, Table, render_sections
from headstart.models.classifier import Classifier

FIGURES = "figures"
MAX_MISTAKES = 24  # misclassified images shown; the most confident mistakes first, they are the instructive ones
CAM_PER_KIND = 4  # Grad-CAM overlays per kind (correct, wrong)
MIN_TSNE = 10  # below this many points t-SNE has no neighbourhoods to preserve; PCA is used instead


class _FeaturesAndLogits(nn.Module):
    """Backbone features and class logits from one forward pass, concatenated: [B, D + C]."""

    def __init__(self, classifier: Classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.classifier.embed(x)
        with torch.autocast(device_type=x.device.type, enabled=False):  # the head runs in fp32, as in forward()
            logits = self.classifier.head(features.float())
        return torch.cat([features.float(), logits.float()], dim=1)


@dataclass
class ValPass:
    """What one pass over the validation images gives."""

    records: list[ImageRecord]  # the images that decoded, row-aligned with the arrays below
    labels: np.ndarray  # [N] true class index in the model's class list
    probs: np.ndarray  # [N, C]
    features: np.ndarray  # [N, D]
    failed: list[tuple[Path, str]]


def validation_pass(model: Any, records: Sequence[ImageRecord], mapping: dict[int, int]) -> ValPass:
    """Probabilities and embeddings of ``records`` from a single forward pass of ``model``.

    ``model`` is a :class:`~headstart.insight.predictor.Model`.
    """
    classifier: Classifier = model.classifier
    width_d = classifier.backbone.num_features
    out = run_model(
        _FeaturesAndLogits(classifier), list(records), model.preprocessing, width_d + len(model.classes),
        batch_size=32, precision=model.precision, device=model.device, description="report",
    )  # fmt: skip
    ok = np.flatnonzero(out.ok).tolist()
    values = out.values[ok]
    logits = torch.from_numpy(values[:, width_d:])
    return ValPass(
        records=[records[i] for i in ok],
        labels=np.array([mapping[records[i].label] for i in ok], dtype=np.int64),
        probs=model.probabilities(logits).numpy(),
        features=values[:, :width_d],
        failed=out.failed,
    )


# -- figures -------------------------------------------------------------------------------------------------------


def _save(fig: Figure, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight", facecolor="white")
    return path.name


def plot_learning_curves(history: list[dict[str, Any]], path: Path) -> str:
    """Loss and accuracy per epoch, train and validation (:func:`learning_curves_figure`), saved as ``path``."""
    return _save(learning_curves_figure(history), path)


def learning_curves_figure(history: list[dict[str, Any]]) -> Figure:
    """Loss and accuracy per epoch, train and validation; epoch 0 is the head fitted on frozen features.

    A panel without any recorded value (the head phase records no loss) is left out rather than drawn empty.
    """
    kinds = (("loss", "loss", "train_loss"), ("accuracy", "accuracy", "train_accuracy"), ("mAP", "mAP", "train_mAP"))
    panels = [
        (name, [(k, label, style) for k, label, style in ((train_key, "train", "o--"), (val_key, "val", "o-"))])
        for name, val_key, train_key in kinds
        if any(row.get(val_key) is not None or row.get(train_key) is not None for row in history)
    ]
    last = max((int(row.get("epoch", 0)) for row in history), default=0)
    fig = Figure(figsize=(5 * max(1, len(panels)), 3.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, max(1, len(panels)))).ravel()
    for ax, (name, series) in zip(axes, panels, strict=False):
        for key, label, style in series:
            points = [(row["epoch"], row[key]) for row in history if row.get(key) is not None]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, style, label=label, markersize=5)
        ax.set_xlim(-0.5, last + 0.5)
        ax.set_xticks(range(0, last + 1, max(1, math.ceil((last + 1) / 10))))
        ax.set_xlabel("epoch (0: head on frozen features)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
        if name in ("accuracy", "mAP"):
            ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.02)
    fig.suptitle("Learning curves")
    return fig


def plot_confusion(matrix: list[list[int]], classes: list[str], path: Path) -> str:
    """Confusion matrix with counts (:func:`confusion_figure`), saved as ``path``."""
    return _save(confusion_figure(matrix, classes), path)


def confusion_figure(matrix: list[list[int]], classes: list[str]) -> Figure:
    """Confusion matrix with counts; rows are true classes, columns predicted ones."""
    counts = np.asarray(matrix)
    side = 2.5 + 0.5 * len(classes)
    fig = Figure(figsize=(side + 1, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(counts, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = counts.max() / 2 if counts.size else 0
    for (i, j), value in np.ndenumerate(counts):
        ax.text(j, i, str(value), ha="center", va="center", color="white" if value > threshold else "black")
    ax.set_title("Confusion matrix (validation)")
    return fig


def plot_per_class(per_class: dict[str, dict[str, float]], path: Path) -> str:
    """Grouped bars of precision, recall and F1 per class."""
    names = list(per_class)
    fig = Figure(figsize=(max(5.0, 1.2 * len(names) + 2), 3.8), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(names))
    for k, metric in enumerate(("precision", "recall", "f1")):
        ax.bar(x + (k - 1) * 0.27, [per_class[n][metric] for n in names], 0.27, label=metric)
    ax.set_xticks(x, names, rotation=30 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
    ax.set_ylim(0, 1.05)
    ax.legend(loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("Per-class scores (validation)")
    return _save(fig, path)


def _grid(count: int, columns: int = 6) -> tuple[Figure, list[Any]]:
    cols = min(columns, count)
    rows = math.ceil(count / cols)
    fig = Figure(figsize=(2.2 * cols, 2.5 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel().tolist()
    for ax in axes:
        ax.axis("off")
    return fig, axes


def _pixels(record: ImageRecord, prep: Any) -> np.ndarray:
    """The centre crop the model saw, HWC uint8."""
    return eval_tensor(record.path, prep).permute(1, 2, 0).numpy()


def plot_mistakes(vp: ValPass, classes: list[str], prep: Any, path: Path) -> tuple[str | None, int]:
    """Grid of misclassified validation images, most confident first; returns (file name or None, mistakes)."""
    preds = vp.probs.argmax(1)
    wrong = np.flatnonzero(preds != vp.labels)
    if not len(wrong):
        return None, 0
    order = wrong[np.argsort(-vp.probs[wrong, preds[wrong]])][:MAX_MISTAKES]
    fig, axes = _grid(len(order))
    for ax, i in zip(axes, order, strict=False):
        ax.imshow(_pixels(vp.records[i], prep))
        ax.set_title(
            f"true: {classes[vp.labels[i]]}\npred: {classes[preds[i]]} ({vp.probs[i, preds[i]]:.2f})\n"
            f"{vp.records[i].path.name[:24]}",
            fontsize=8,
        )
    fig.suptitle(f"Misclassified validation images ({len(wrong)} in all; most confident first)")
    return _save(fig, path), len(wrong)


def find_cam_layer(model: nn.Module, input_size: int, device: torch.device) -> tuple[nn.Module | None, str]:
    """The last module whose output is a spatial feature map (4-D, square, more than 1x1) near the output.

    Found by running one dummy batch with forward hooks on every module: works for any CNN (timm, torchvision,
    custom) without per-architecture layer names. Returns (None, reason) when the network has no such layer in its
    second half, e.g. a vision transformer, whose only 4-D map is the patch embedding at the very start.
    """
    order: list[tuple[str, nn.Module, bool]] = []
    names = {id(m): n for n, m in model.named_modules()}

    def hook(module: nn.Module, _: Any, output: Any) -> None:
        # The dummy input is square, so a CNN's maps are square; attention tensors [B, heads, tokens, dim] are not.
        spatial = isinstance(output, torch.Tensor) and output.ndim == 4 and output.shape[-1] == output.shape[-2] > 1
        order.append((names.get(id(module), "?"), module, spatial))

    handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size, device=device))
    finally:
        for handle in handles:
            handle.remove()
    spatial_at = [k for k, (_, _, spatial) in enumerate(order) if spatial]
    if not spatial_at:
        return None, "the network has no convolutional feature map (e.g. a vision transformer)"
    last = spatial_at[-1]
    if last < len(order) / 2:
        return None, (
            f"the last spatial feature map ({order[last][0]}) sits early in the network, so Grad-CAM there would "
            "not explain the prediction (typical of vision transformers)"
        )
    return order[last][1], order[last][0]


def _make_leaf(_module: nn.Module, _inputs: Any, output: Any) -> None:
    if isinstance(output, torch.Tensor) and not output.requires_grad:
        output.requires_grad_(True)


def plot_gradcam(vp: ValPass, model: Any, path: Path) -> tuple[str | None, str]:
    """Grad-CAM overlays (``pytorch_grad_cam``) for the most confident correct and wrong predictions.

    Returns (file name or None, a note: the layer used, or why there is no figure).
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    classifier: Classifier = model.classifier
    prep = model.preprocessing
    preds = vp.probs.argmax(1)
    confidence = vp.probs[np.arange(len(preds)), preds]
    picks: list[int] = []
    for mask in (preds == vp.labels, preds != vp.labels):
        idx = np.flatnonzero(mask)
        picks += idx[np.argsort(-confidence[idx])][:CAM_PER_KIND].tolist()
    if not picks:
        return None, "no validation images"
    # Grad-CAM needs gradients and fp32; work on the model's own device, then restore its state.
    was_training = classifier.training
    grad_state = [p.requires_grad for p in classifier.parameters()]
    classifier.eval().to(memory_format=torch.contiguous_format)
    try:
        layer, where = find_cam_layer(classifier, prep.input_size, model.device)
        if layer is None:
            return None, f"Grad-CAM skipped: {where}."
        # Gradients are needed only from the logits back to the target layer: weights stay frozen and the layer's
        # output becomes the leaf that needs a gradient, so backward stops there (no weight gradients, no backward
        # through the early layers). This hook runs before Grad-CAM's own, which is registered after it.
        classifier.requires_grad_(False)
        hook = layer.register_forward_hook(_make_leaf)
        images = torch.stack([eval_tensor(vp.records[i].path, prep) for i in picks])
        x = normalize(images.to(model.device), prep)
        try:
            with GradCAM(model=classifier, target_layers=[layer]) as cam:
                maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(preds[i])) for i in picks])
        finally:
            hook.remove()
    except Exception as error:  # an architecture Grad-CAM cannot handle must not cost the user the whole report
        return (
            None,
            f"Grad-CAM failed on this model ({type(error).__name__}: {error}); the rest of the report is intact.",
        )
    finally:
        for p, flag in zip(classifier.parameters(), grad_state, strict=True):
            p.requires_grad_(flag)
        classifier.train(was_training)
    fig, axes = _grid(len(picks), columns=CAM_PER_KIND)
    classes: list[str] = model.classes
    for ax, i, heat, rgb in zip(axes, picks, maps, images.permute(0, 2, 3, 1).numpy(), strict=False):
        ax.imshow(show_cam_on_image(rgb.astype(np.float32) / 255.0, heat, use_rgb=True))
        mark = "correct" if preds[i] == vp.labels[i] else "WRONG"
        ax.set_title(
            f"{mark}: pred {classes[preds[i]]} ({confidence[i]:.2f})\ntrue {classes[vp.labels[i]]}", fontsize=8
        )
    fig.suptitle("Grad-CAM: where the network looked for its predicted class")
    return _save(fig, path), f"Grad-CAM on layer {where}."


def plot_embedding_map(vp: ValPass, classes: list[str], path: Path, seed: int = 0) -> tuple[str | None, str]:
    """2-D map of the validation embeddings (t-SNE; PCA for very few images), coloured by true class."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    n = len(vp.features)
    if n < 3:
        return None, f"only {n} validation image(s): too few for a map"
    features = vp.features.astype(np.float64)
    if n < MIN_TSNE:
        coords = PCA(n_components=2, random_state=seed).fit_transform(features)
        method = "PCA"
    else:
        perplexity = float(min(30.0, (n - 1) / 3))
        tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
        # One OpenMP thread: on a busy machine t-SNE's spin-waiting threads ran 18x slower (28.8 s vs 1.6 s for 153
        # points on 2 shared cores), and a few hundred points need no parallelism.
        with threadpool_limits(limits=1, user_api="openmp"):
            coords = tsne.fit_transform(features)
        method = f"t-SNE (perplexity {perplexity:.0f})"
    preds = vp.probs.argmax(1)
    fig = Figure(figsize=(6.5, 5.5), layout="constrained")
    ax = fig.subplots()
    palette = _palette(len(classes))
    for c, name in enumerate(classes):
        ok = (vp.labels == c) & (preds == c)
        bad = (vp.labels == c) & (preds != c)
        ax.scatter(coords[ok, 0], coords[ok, 1], s=18, color=palette[c], label=name, alpha=0.8)
        ax.scatter(coords[bad, 0], coords[bad, 1], s=40, color=palette[c], marker="x", linewidths=1.5)
    ax.scatter([], [], s=40, color="grey", marker="x", label="misclassified")
    ax.legend(fontsize=8, loc="best")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"Validation embeddings, {method}")
    return _save(fig, path), method


def _palette(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


# -- reading the run folder ------------------------------------------------------------------------------------------


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl`` (empty when the file is missing)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_skipped(run_dir: Path) -> list[tuple[str, str]]:
    """``(path, reason)`` pairs of ``skipped_files.txt``."""
    path = run_dir / "skipped_files.txt"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            name, _, reason = line.partition("\t")
            rows.append((name, reason))
    return rows


def _dataset_for(info: dict[str, Any], data: str | Path | Dataset | None) -> Dataset:
    if isinstance(data, Dataset):
        return data
    settings = info.get("config", {}).get("data", {})
    path = data or info.get("data_path") or settings.get("path")
    if not path:
        raise DataError("model.json names no dataset; pass the data folder the model was trained on")
    return load_dataset(path, float(settings.get("val_fraction", 0.2)), int(settings.get("split_seed", 0)))


# -- the page -------------------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def build_report(run_dir: str | Path, data: str | Path | Dataset | None = None) -> Path:
    """Write ``report.html`` and its PNG figures for a trained classifier's run folder.

    Args:
        run_dir: a run folder made by ``headstart train``.
        data: the dataset (folder, CSV or an already-loaded ``Dataset``); default: the path in ``model.json``,
            split as recorded in its config.

    Returns:
        The path of ``report.html``.
    """
    from headstart.insight.predictor import class_mapping, load

    run_dir = Path(run_dir)
    model = load(run_dir)  # raises a clear error when run_dir is not a run folder
    info = model.info
    classes = model.classes
    figures = run_dir / FIGURES
    figures.mkdir(exist_ok=True)
    for old in figures.glob("*.png"):  # a rebuilt report must not show pictures of an older model
        old.unlink()
    dataset = _dataset_for(info, data)
    mapping = class_mapping(dataset, classes, f"the model in {run_dir}")
    if not dataset.val:
        raise DataError(f"{dataset.root} has no validation images to report on")
    vp = validation_pass(model, dataset.val, mapping)
    if model.multi_label:
        targets = np.zeros_like(vp.probs)
        targets[:, [mapping[i] for i in range(len(dataset.classes))]] = dataset.targets(vp.records)
        metrics = multilabel_metrics(targets, vp.probs, classes, model.thresholds)
        figures_done = [_curves_section(run_dir), _per_label_section(metrics["per_class"], figures)]
    else:
        metrics = classification_metrics(vp.labels, vp.probs, classes)
        figures_done = _figure_sections(run_dir, model, vp, metrics)
    sections = [
        _summary_section(info, dataset, vp, metrics),
        *figures_done,
        *_label_curve_section(run_dir),
        _skipped_section(run_dir),
    ]
    title = f"headstart run: {info.get('strategy', '?')} on {info.get('backbone', '?')}"
    subtitle = f"{run_dir.resolve()} | data {dataset.root} | {len(classes)} classes: {', '.join(classes)}"
    out = run_dir / "report.html"
    out.write_text(render_sections(title, subtitle, sections, FIGURES), encoding="utf-8")
    return out


def _summary_section(info: dict[str, Any], dataset: Dataset, vp: ValPass, metrics: dict[str, Any]) -> Section:
    """The model, the headline scores and what the figures below are (not) based on."""
    notes = []
    if info.get("data_fingerprint") and info["data_fingerprint"] != dataset.fingerprint():
        notes.append(
            f"The data in {dataset.root} differs from what this model was trained on (fingerprint mismatch); "
            "the figures describe the data as it is now."
        )
    if vp.failed:
        notes.append(f"{len(vp.failed)} validation image(s) could not be decoded and are left out.")
    rows = [
        ("strategy", info.get("strategy", "?")),
        ("backbone", f"{info.get('backbone')} ({info.get('weights_source', '?')})"),
        ("validation images", metrics["n"]),
    ]
    if metrics.get("multi_label"):
        rows += [("macro mAP", _fmt(metrics["mAP"])), ("exact match", _fmt(metrics["exact_match"])),
                 ("macro F1 at the thresholds", _fmt(metrics["macro_f1"])),
                 ("Hamming loss", _fmt(metrics["hamming_loss"]))]  # fmt: skip
        notes.append("Multi-label model: a label is predicted when its probability reaches its threshold (chosen by "
                     "cross-validation on the training split). The mistakes grid, Grad-CAM and the embedding map "
                     "are drawn for single-label models only.")  # fmt: skip
    else:
        rows += [("accuracy", _fmt(metrics["accuracy"])), ("balanced accuracy", _fmt(metrics["balanced_accuracy"]))]
    if "roc_auc" in metrics:
        rows.append(("ROC-AUC", _fmt(metrics["roc_auc"])))
    if info.get("train_seconds") is not None:
        rows.append(("training wall time (s)", info["train_seconds"]))
    counts = info.get("train_counts") or {}
    rows.append(("training images", ", ".join(f"{k} {v}" for k, v in counts.items()) or "?"))
    return Section("Summary", table=Table(("", "value"), rows, "summary"), notes=notes)


def _figure_sections(run_dir: Path, model: Any, vp: ValPass, metrics: dict[str, Any]) -> list[Section]:
    """The sections with a figure, drawn one after another under one progress bar."""
    figures = run_dir / FIGURES
    classes: list[str] = model.classes
    steps: list[Callable[[], Section]] = [
        lambda: _curves_section(run_dir),
        lambda: Section(
            "Confusion matrix",
            image=plot_confusion(metrics["confusion_matrix"], classes, figures / "confusion_matrix.png"),
            alt="confusion matrix of the validation set, rows true, columns predicted",
        ),
        lambda: _per_class_section(metrics["per_class"], figures),
        lambda: _mistakes_section(vp, classes, model.preprocessing, figures),
        lambda: _gradcam_section(vp, model, figures),
        lambda: _embedding_section(vp, classes, figures),
    ]
    sections = []
    with progress.bar() as bars:
        task = bars.add_task("report figures", total=len(steps), info="")
        for step in steps:
            sections.append(step())
            bars.advance(task)
    return sections


# Folder of ``headstart curve DATA --run RUN`` inside a run folder: its figure and answer join the run's report.
LABEL_CURVE = "curve"


def _label_curve_section(run_dir: Path) -> list[Section]:
    """The learning curve over training-set size (would more labels pay?), when ``headstart curve --run`` wrote one."""
    folder = run_dir / LABEL_CURVE
    try:
        answer = str(json.loads((folder / "curve.json").read_text())["answer"])
        image = (folder / "curve.png").read_bytes()
    except (OSError, ValueError, KeyError):
        return []
    (run_dir / FIGURES / "label_curve.png").write_bytes(image)
    alt = "validation accuracy against labelled training images, fit and projection"
    return [Section("Would more labels pay? (headstart curve)", image="label_curve.png", alt=alt, text=answer)]


def _curves_section(run_dir: Path) -> Section:
    history = read_history(run_dir)
    section = Section("Learning curves", alt="loss and accuracy per epoch, train and validation")
    if history:
        section.image = plot_learning_curves(history, run_dir / FIGURES / "learning_curves.png")
        if len(history) == 1:
            section.notes.append("One point: the extract strategy fits its head once, on frozen features.")
    else:
        section.notes.append(f"{run_dir / 'metrics.jsonl'} is missing: no curves to draw.")
    return section


def _per_class_section(per_class: dict[str, dict[str, Any]], figures: Path) -> Section:
    rows = [
        (name, f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}", r["support"])
        for name, r in per_class.items()
    ]
    return Section(
        "Per-class precision, recall and F1",
        image=plot_per_class(per_class, figures / "per_class.png"),
        alt="per-class precision, recall and F1 bars",
        table=Table(("class", "precision", "recall", "F1", "support"), rows, "per-class"),
    )


def _per_label_section(per_class: dict[str, dict[str, Any]], figures: Path) -> Section:
    """A multi-label model's table in place of the confusion matrix: AP, threshold, precision, recall, F1."""
    rows = [
        (name, "-" if r["ap"] is None else f"{r['ap']:.3f}", f"{r['threshold']:.3f}", f"{r['precision']:.3f}",
         f"{r['recall']:.3f}", f"{r['f1']:.3f}", r["support"])
        for name, r in per_class.items()
    ]  # fmt: skip
    return Section(
        "Per-label average precision, and precision, recall and F1 at the thresholds",
        image=plot_per_class(per_class, figures / "per_class.png"),
        alt="per-label precision, recall and F1 bars",
        table=Table(("label", "AP", "threshold", "precision", "recall", "F1", "support"), rows, "per-label"),
    )


def _mistakes_section(vp: ValPass, classes: list[str], prep: Any, figures: Path) -> Section:
    mistakes, n_wrong = plot_mistakes(vp, classes, prep, figures / "misclassified.png")
    section = Section("Misclassified validation images", image=mistakes, alt="grid of misclassified images")
    if mistakes is None:
        section.notes.append("No validation image is misclassified.")
    elif n_wrong > MAX_MISTAKES:
        section.notes.append(f"Showing the {MAX_MISTAKES} most confident of {n_wrong} mistakes.")
    return section


def _gradcam_section(vp: ValPass, model: Any, figures: Path) -> Section:
    cam, note = plot_gradcam(vp, model, figures / "gradcam.png")
    section = Section("Grad-CAM", image=cam, alt="Grad-CAM overlays on correct and wrong predictions")
    if cam is None:
        section.notes.append(note)
    else:
        section.text = f"{note} Red: regions that raised the predicted class."
    return section


def _embedding_section(vp: ValPass, classes: list[str], figures: Path) -> Section:
    emb, method = plot_embedding_map(vp, classes, figures / "embedding_map.png")
    section = Section("Validation embeddings", image=emb, alt=f"2-D map of validation embeddings ({method})")
    if emb is None:
        section.notes.append(method)
    else:
        section.text = "Backbone features of each validation image; crosses are mistakes."
    return section


def _skipped_section(run_dir: Path) -> Section:
    skipped = read_skipped(run_dir)
    if not skipped:
        return Section("Skipped files (0)", text="None: every file was read.")
    return Section(f"Skipped files ({len(skipped)})", table=Table(("file", "reason"), skipped, "skipped"))
