"""Results in a Jupyter notebook: the HTML that ``_repr_html_`` returns for a train result, a loaded model, a
comparison and an audit.

Each is a fragment (template ``notebook.html``): the metrics table, then the key figures inline as base64 PNGs drawn
by the report's own figure code (:mod:`headstart.insight.report`), so the notebook shows what ``report.html`` shows,
without files beside it. Showing a result computes nothing new: the metrics, the confusion matrix and the history are
the ones the object holds, or those its run folder already records (``metrics.json``, ``metrics.jsonl``).
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matplotlib.figure import Figure

from headstart.data.scan import thumbnail
from headstart.errors import DataError
from headstart.insight.pages import Section, Table, render

if TYPE_CHECKING:
    from headstart.insight.audit import AuditResult
    from headstart.insight.predictor import Model

FIGURE_DPI = 80  # lower than the report's 110: two figures side by side in a notebook cell
MAX_THUMBS = 12  # flagged files shown per kind in an audit's view; audit.html shows them all


def png_uri(fig: Figure) -> str:
    """A figure as a ``data:image/png;base64,...`` URI."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=FIGURE_DPI, bbox_inches="tight", facecolor="white")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def fragment(
    title: str, subtitle: str, sections: Sequence[Section], figures: Sequence[Section] = (),
    galleries: Sequence[tuple[str, list[Any]]] = (),
) -> str:  # fmt: skip
    """The HTML fragment: ``sections`` (tables and notes), then ``figures`` (sections whose ``image`` is a data URI)
    side by side, then ``galleries`` of thumbnails (heading, cards)."""
    return render("notebook.html", title=title, subtitle=subtitle, sections=sections, figures=figures,
                  galleries=galleries)  # fmt: skip


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


SCORES = (("n", "images"), ("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"),
          ("roc_auc", "ROC-AUC"), ("mAP", "macro mAP"), ("exact_match", "exact match"), ("macro_f1", "macro F1"),
          ("hamming_loss", "Hamming loss"), ("loss", "loss"))  # fmt: skip


def metrics_table(metrics: dict[str, Any], label: str = "validation", id: str = "metrics") -> Table:
    """The headline scores of :func:`~headstart.insight.metrics.classification_metrics` (or its summary)."""
    return Table(("", label), [(name, _fmt(metrics[key])) for key, name in SCORES if key in metrics], id)


def metrics_view(
    title: str, subtitle: str, rows: list[tuple[str, Any]], metrics: dict[str, Any] | None,
    history: list[dict[str, Any]], test: dict[str, Any] | None = None,
) -> str:  # fmt: skip
    """A run's view: what it is (``rows``), its scores and per-class table, its confusion matrix and learning curves.

    Args:
        title: heading.
        subtitle: a muted line under it.
        rows: (name, value) pairs describing the model.
        metrics: validation metrics (full, or the summary of ``model.json``); None when unknown.
        history: the rows of ``metrics.jsonl``.
        test: test-split metrics, when the data had a test split.
    """
    sections = [Section("Model", table=Table(("", "value"), rows, "model")), *_score_sections(metrics, test)]
    if len(history) == 1:
        sections.append(Section("", text="One training step: the head fitted once on frozen features (no curves)."))
    return fragment(title, subtitle, sections, _figures(metrics, history))


def _score_sections(metrics: dict[str, Any] | None, test: dict[str, Any] | None) -> list[Section]:
    if not metrics:
        return [Section("Scores", notes=["No validation metrics recorded."])]
    sections = [Section("Scores", table=metrics_table(metrics))]
    if test:
        sections.append(Section("", table=metrics_table(test, "test", "test-metrics")))
    per_class = metrics.get("per_class") or {}
    if per_class:
        cells = [(name, f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}", r["support"])
                 for name, r in per_class.items()]  # fmt: skip
        header = ("class", "precision", "recall", "F1", "support")
        sections.append(Section("", table=Table(header, cells, "per-class")))
    return sections


def _figures(metrics: dict[str, Any] | None, history: list[dict[str, Any]]) -> list[Section]:
    """The confusion matrix and the learning curves (from two epochs on), drawn by the report's code."""
    from headstart.insight.report import confusion_figure, learning_curves_figure

    figures = []
    if metrics and metrics.get("confusion_matrix"):
        classes = list(metrics.get("classes") or metrics.get("per_class") or [])
        image = png_uri(confusion_figure(metrics["confusion_matrix"], classes))
        figures.append(Section("Confusion matrix", image, "confusion matrix, rows true, columns predicted"))
    if len(history) > 1:
        image = png_uri(learning_curves_figure(history))
        figures.append(Section("Learning curves", image, "loss and accuracy per epoch"))
    return figures


def train_view(result: Any) -> str:
    """The view of a :class:`~headstart.training.run.TrainResult`: its own metrics and history."""
    config = result.config
    rows = [("strategy", config.strategy), ("backbone", config.model.backbone), ("run folder", str(result.run_dir)),
            ("wall time (s)", f"{result.seconds:.1f}")]  # fmt: skip
    title = f"headstart run: {config.strategy} on {config.model.backbone}"
    return metrics_view(title, str(config.data.path), rows, result.metrics, result.history, result.test_metrics)


def model_view(model: Model) -> str:
    """The view of a loaded :class:`~headstart.insight.predictor.Model`: what ``model.json`` (or the export's
    metadata) says, and the scores and history its run folder records."""
    from headstart.insight.report import read_history

    info = model.info
    rows: list[tuple[str, Any]] = [
        ("backbone", info.get("backbone", "?")), ("strategy", info.get("strategy", "?")),
        ("classes", ", ".join(model.classes)), ("input", f"{model.preprocessing.input_size} px"),
    ]  # fmt: skip
    if "exported" in info:  # an ONNX export: its metadata is all there is; the run folder's figures are fp32's
        rows.append(("file", info["exported"]))
        check = info.get("quantization")
        if check:
            rows.append(("int8 top-1 agreement with fp32", f"{check['agreement']:.4f} on {check['images']} images"))
        title = f"headstart export ({info.get('precision', 'fp32')}): {info.get('backbone', '?')}"
        return metrics_view(title, info["exported"], rows, info.get("val_metrics"), [])
    recorded = _read_json(model.run_dir / "metrics.json")
    metrics = recorded.get("val") or info.get("val_metrics")
    rows.append(("run folder", str(model.run_dir)))
    title = f"headstart model: {info.get('strategy', '?')} on {info.get('backbone', '?')}"
    return metrics_view(title, str(info.get("data_path", "")), rows, metrics, read_history(model.run_dir),
                        recorded.get("test"))  # fmt: skip


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def audit_view(result: AuditResult) -> str:
    """The view of an :class:`~headstart.insight.audit.AuditResult`: counts, statistics, and thumbnails (inline
    JPEGs) of the first flagged files of each kind."""
    counts = sorted(result.counts().items())
    sections = [
        Section("Flagged files", table=Table(("kind", "files"), counts or [("none", 0)], "counts")),
        Section("Images", table=Table(("", "value"), _stat_rows(result.stats), "stats")),
    ]
    galleries: list[tuple[str, list[Any]]] = []
    if result.unreadable:
        galleries.append(("Unreadable and placeholder files",
                          [_card(s.path, s.reason) for s in result.unreadable[:MAX_THUMBS]]))  # fmt: skip
    for group in result.groups[:MAX_THUMBS]:
        galleries.append((f"group {group.id}: {group.name}",
                          [_card(m.path, f"{m.split} / {m.label}") for m in group.members[:MAX_THUMBS]]))  # fmt: skip
    if result.label_issues:
        cards = [_card(i.path, f"{i.split} / {i.label} → {i.suggested} ({i.suggested_probability:.2f})")
                 for i in result.label_issues[:MAX_THUMBS]]  # fmt: skip
        galleries.append(("Likely label errors", cards))
    shown = len(result.groups) > MAX_THUMBS or len(result.label_issues) > MAX_THUMBS
    if shown:
        sections.append(Section("", text=f"Showing the first {MAX_THUMBS} of each kind; write_report lists them all."))
    subtitle = f"backbone {result.backbone}, near-duplicate threshold {result.near_threshold}, {result.seconds:.1f} s"
    return fragment(f"headstart audit of {result.root}", subtitle, sections, galleries=galleries)


def _stat_rows(stats: dict[str, Any]) -> list[tuple[str, Any]]:
    """Top-level statistics as rows; nested ones (per class, quantiles) as compact JSON."""
    return [(key, value if isinstance(value, (int, float, str)) else json.dumps(value)) for key, value in stats.items()]


def _card(path: Path, caption: str) -> Any:
    """A gallery card whose thumbnail is an inline JPEG (None when the file does not decode)."""
    from headstart.insight.audit import THUMB_SIDE, Card

    try:
        image = thumbnail(path, THUMB_SIDE)
    except DataError:
        return Card(None, path, caption)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=80)
    return Card("data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), path, caption)
