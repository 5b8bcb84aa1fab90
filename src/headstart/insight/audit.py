"""Dataset audit: unreadable files, exact and near duplicates (split-aware), label conflicts, likely label errors and
basic statistics, written as a terminal summary, ``audit.csv``, ``audit.json`` and an HTML page with thumbnails.

* Unreadable and placeholder files come from the data scan (:attr:`headstart.data.scan.Dataset.skipped`).
* Exact duplicates share a content digest; near duplicates have a cosine similarity of at least ``near_threshold``
  between their dataset-centred backbone features. Both are joined into groups (union-find). A group spanning two
  splits is **leakage** (the model is evaluated on an image it trained on); a group with two labels is a **conflict**.
* Likely label errors are found by confident learning (Northcutt et al., JAIR 2021) with ``cleanlab``, on
  out-of-fold probabilities of a logistic head on the cached features; duplicate groups stay in one fold, so a copy
  never vouches for itself.

Nothing here moves, edits or deletes the user's files: :func:`write_clean_manifest` writes a CSV manifest without
the flagged files, which ``headstart train`` reads like a folder.
"""

from __future__ import annotations

import csv
import json
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from headstart import progress
from headstart.data.scan import Dataset, ImageRecord, Skipped, load_dataset, open_image, thumbnail
from headstart.errors import DataError
from headstart.features.embeddings import embed
from headstart.files import default_cache_root
from headstart.hardware import pick_device, resolve_precision
from headstart.insight.pages import Table, render
from headstart.models.backbones import DEFAULT_BACKBONE, create_backbone

# Near duplicates need two agreeing signals: the backbone's features say "same picture content" and a 16x16 grayscale
# signature says "same layout of light and dark". Measured with efficientnet_lite0 on the 153 ants/bees val images
# against re-encoded copies (halved + JPEG q70, 0.8x + q50, 4% crop + q85): the centred feature cosine of a copy is
# >= 0.60 for 98.7% of them, but on all 397 ants/bees images 0.60 alone also links 14 groups of merely similar photos
# (two bees on daisies), whose signatures correlate at most 0.47, while every copy's signature correlates >= 0.78.
# Centring the features matters: they are non-negative, so unrelated photos already score 0.6-0.77 uncentred.
NEAR_THRESHOLD = 0.60
SIGNATURE_THRESHOLD = 0.65
DROP_CHOICES = ("unreadable", "duplicates", "conflicts", "label_issues")


@dataclass(frozen=True)
class Member:
    """One file of a flagged group."""

    path: Path
    split: str
    label: str


@dataclass
class Group:
    """Files that are copies (exact) or near copies of each other."""

    id: int
    kind: str  # "conflict" (two labels), "leakage" (two splits) or "duplicate" (same label and split)
    exact: bool  # every member has the same bytes
    members: list[Member]
    similarity: float  # lowest cosine linking the group (1.0 for exact groups)

    @property
    def name(self) -> str:
        """Kind as written in the report: ``near_`` prefix for groups of near copies."""
        return self.kind if self.exact else f"near_{self.kind}"


@dataclass(frozen=True)
class LabelIssue:
    """A file whose out-of-fold prediction confidently disagrees with its label."""

    path: Path
    split: str
    label: str
    suggested: str  # the class the model prefers
    label_probability: float  # out-of-fold probability of the given label
    suggested_probability: float


@dataclass
class AuditResult:
    """Everything the audit found, plus what is needed to write a cleaned manifest."""

    root: Path
    classes: list[str]
    backbone: str | None
    near_threshold: float
    unreadable: list[Skipped]
    groups: list[Group]
    label_issues: list[LabelIssue]
    stats: dict[str, Any]
    records: list[tuple[ImageRecord, str]] = field(repr=False)  # every usable image and its split
    seconds: float = 0.0
    files: list[Path] = field(default_factory=list)  # report files written

    def counts(self) -> dict[str, int]:
        """Flagged files per report kind (groups count their members)."""
        counter: Counter[str] = Counter()
        for s in self.unreadable:
            counter[_skip_kind(s)] += 1
        for g in self.groups:
            counter[g.name] += len(g.members)
        counter["label_issue"] += len(self.label_issues)
        return {k: v for k, v in counter.items() if v}

    def rows(self) -> list[dict[str, str]]:
        """One row per flagged file: kind, group, path, split, label, detail (the ``audit.csv`` content)."""
        rows = [
            {"kind": _skip_kind(s), "group": "", "path": str(s.path), "split": _split_of(s.path, self.root),
             "label": "", "detail": s.reason}
            for s in self.unreadable
        ]  # fmt: skip
        for g in self.groups:
            labels = sorted({m.label for m in g.members})
            splits = sorted({m.split for m in g.members})
            how = "identical bytes" if g.exact else f"near copies (cosine >= {g.similarity:.3f})"
            detail = f"{len(g.members)} files, {how}; labels {', '.join(labels)}; splits {', '.join(splits)}"
            rows += [
                {"kind": g.name, "group": str(g.id), "path": str(m.path), "split": m.split, "label": m.label,
                 "detail": detail}
                for m in g.members
            ]  # fmt: skip
        rows += [
            {"kind": "label_issue", "group": "", "path": str(i.path), "split": i.split, "label": i.label,
             "detail": f"looks like {i.suggested} (p={i.suggested_probability:.2f}; "
                       f"p({i.label})={i.label_probability:.2f})"}
            for i in self.label_issues
        ]  # fmt: skip
        return rows

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (``audit.json``)."""
        return {
            "root": str(self.root),
            "classes": self.classes,
            "backbone": self.backbone,
            "near_threshold": self.near_threshold,
            "seconds": round(self.seconds, 2),
            "counts": self.counts(),
            "stats": self.stats,
            "unreadable": [{"path": str(s.path), "reason": s.reason} for s in self.unreadable],
            "groups": [
                {
                    "id": g.id,
                    "kind": g.name,
                    "similarity": g.similarity,
                    "members": [{**asdict(m), "path": str(m.path)} for m in g.members],
                }
                for g in self.groups
            ],
            "label_issues": [{**asdict(i), "path": str(i.path)} for i in self.label_issues],
        }

    def _repr_html_(self) -> str:
        """Counts, statistics and thumbnails of the flagged files, shown by Jupyter."""
        from headstart.insight.notebook import audit_view

        return audit_view(self)


def _skip_kind(skipped: Skipped) -> str:
    return "placeholder" if skipped.reason.startswith("placeholder") else "unreadable"


def _split_of(path: Path, root: Path) -> str:
    """Split of a skipped file, read from its folder (skipped files have no record)."""
    try:
        first = path.relative_to(root).parts[0]
    except (ValueError, IndexError):
        return ""
    return first if first in ("train", "val", "test") else ""


# -- the cheap checks ------------------------------------------------------------------------------------------------


def quick_audit(dataset: Dataset) -> list[str]:
    """Warnings about exact-duplicate leakage (a val/test file also in train) and conflicts (one file, two labels).

    Content digests only, no embeddings: cheap enough to run before every training.
    """
    train = {r.digest for r in dataset.train}
    leaks = [r for r in dataset.val + dataset.test if r.digest in train]
    labels: dict[str, set[int]] = {}
    paths: dict[str, list[Path]] = {}
    for r in dataset.train + dataset.val + dataset.test:
        labels.setdefault(r.digest, set()).add(r.label)
        paths.setdefault(r.digest, []).append(r.path)
    conflicts = [d for d, found in labels.items() if len(found) > 1]
    warnings = []
    if leaks:
        warnings.append(
            f"leakage: {len(leaks)} val/test image(s) are byte-identical to training images, e.g. {leaks[0].path}; "
            "validation accuracy will be optimistic (`headstart audit --fix clean.csv` writes a manifest without them)"
        )
    if conflicts:
        example = ", ".join(str(p) for p in paths[conflicts[0]][:2])
        warnings.append(
            f"label conflicts: {len(conflicts)} image(s) appear under two or more classes, e.g. {example}; "
            "decide on one label per image"
        )
    return warnings


def image_stats(dataset: Dataset) -> dict[str, Any]:
    """Class balance per split, image size quantiles and Pillow modes."""
    records = dataset.train + dataset.val + dataset.test
    widths = np.array([r.width for r in records])
    heights = np.array([r.height for r in records])
    train_counts = dataset.counts(dataset.train)
    smallest, largest = min(train_counts.values()), max(train_counts.values())

    def quantiles(values: np.ndarray) -> dict[str, int]:
        return {q: int(np.percentile(values, p)) for q, p in (("min", 0), ("median", 50), ("max", 100))}

    return {
        "images": {"train": len(dataset.train), "val": len(dataset.val), "test": len(dataset.test)},
        "class_counts": {
            split: dataset.counts(recs)
            for split, recs in (("train", dataset.train), ("val", dataset.val), ("test", dataset.test))
            if recs
        },
        "imbalance_ratio": round(largest / max(smallest, 1), 2),  # largest over smallest training class
        "width": quantiles(widths),
        "height": quantiles(heights),
        "small_images": int((np.minimum(widths, heights) < 64).sum()),  # below 64 px an upscale loses detail
        "modes": dict(Counter(r.mode for r in records).most_common()),
    }


# -- grouping --------------------------------------------------------------------------------------------------------


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


def near_pairs(features: np.ndarray, threshold: float, block: int = 2048) -> list[tuple[int, int, float]]:
    """Pairs (i < j) of rows whose cosine similarity is at least ``threshold``; rows must be L2-normalised.

    Exact blockwise search with numpy: a dataset of 50k images is 25 blocks of matrix products, no index needed.
    """
    pairs = []
    for start in range(0, len(features), block):
        sims = features[start : start + block] @ features.T
        rows, cols = np.nonzero(sims >= threshold)
        for i, j in zip(rows + start, cols, strict=True):
            if i < j:
                pairs.append((int(i), int(j), float(sims[i - start, j])))
    return pairs


def signature(path: Path, size: int = 16) -> np.ndarray:
    """Zero-mean, unit-length grayscale thumbnail of the centre square: survives resizing and re-encoding, and
    differs between two photos of similar things taken apart."""
    image = open_image(path, draft=size * 4).convert("L")
    w, h = image.size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    pixels = np.asarray(image.resize((size, size), Image.Resampling.BOX, box=box), dtype=np.float64).ravel()
    pixels -= pixels.mean()
    return pixels / max(float(np.linalg.norm(pixels)), 1e-6)


def verify_pairs(
    records: Sequence[ImageRecord], pairs: Sequence[tuple[int, int, float]], threshold: float = SIGNATURE_THRESHOLD
) -> list[tuple[int, int, float]]:
    """Keep the candidate pairs whose pixel signatures also agree (see :data:`SIGNATURE_THRESHOLD`)."""
    cache: dict[int, np.ndarray | None] = {}

    def sig(i: int) -> np.ndarray | None:
        if i not in cache:
            try:
                cache[i] = signature(records[i].path)
            except DataError:
                cache[i] = None
        return cache[i]

    kept = []
    for i, j, sim in pairs:
        a, b = sig(i), sig(j)
        if a is not None and b is not None and float(a @ b) >= threshold:
            kept.append((i, j, sim))
    return kept


def find_groups(
    records: Sequence[ImageRecord], splits: Sequence[str], classes: Sequence[str],
    pairs: Iterable[tuple[int, int, float]] = (),
) -> list[Group]:  # fmt: skip
    """Join exact copies (same digest) and near pairs into groups and name each by what it breaks."""
    uf = _UnionFind(len(records))
    first: dict[str, int] = {}
    for i, r in enumerate(records):
        if r.digest in first:
            uf.union(i, first[r.digest])
        else:
            first[r.digest] = i
    weakest: dict[int, float] = {}
    linked = []
    for i, j, sim in pairs:
        if records[i].digest != records[j].digest:
            uf.union(i, j)
            linked.append((i, sim))
    members: dict[int, list[int]] = {}
    for i in range(len(records)):
        members.setdefault(uf.find(i), []).append(i)
    for i, sim in linked:
        root = uf.find(i)
        weakest[root] = min(weakest.get(root, 1.0), sim)
    groups = []
    for root, idx in members.items():
        if len(idx) < 2:
            continue
        labels = {records[i].label for i in idx}
        split_set = {splits[i] for i in idx}
        kind = "conflict" if len(labels) > 1 else "leakage" if len(split_set) > 1 else "duplicate"
        exact = len({records[i].digest for i in idx}) == 1
        group_members = [
            Member(records[i].path, splits[i], classes[records[i].label] if records[i].label >= 0 else "") for i in idx
        ]
        groups.append(Group(0, kind, exact, group_members, weakest.get(root, 1.0)))
    order = {"conflict": 0, "leakage": 1, "duplicate": 2}
    groups.sort(key=lambda g: (order[g.kind], not g.exact, str(g.members[0].path)))
    for n, g in enumerate(groups, start=1):
        g.id = n
    return groups


def _fold_groups(records: Sequence[ImageRecord], groups: Sequence[Group]) -> np.ndarray:
    """Group id per record so that copies share a cross-validation fold (singletons get their own id)."""
    where = {r.path: i for i, r in enumerate(records)}
    ids = np.arange(len(records))
    for g in groups:
        positions = [where[m.path] for m in g.members if m.path in where]  # undecodable members have no row
        if positions:
            ids[positions] = positions[0]
    return ids


def label_issues(
    features: np.ndarray, labels: np.ndarray, fold_groups: np.ndarray | None = None, folds: int = 5, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of likely mislabelled rows (most suspicious first) and the out-of-fold probabilities.

    A logistic head (L2 strength chosen as in ``headstart train --strategy extract``) is trained on all but one fold
    and predicts the held-out fold; ``cleanlab.filter.find_label_issues`` then flags rows whose given label is
    unlikely under per-class confidence thresholds (confident learning).
    """
    try:
        from cleanlab.filter import find_label_issues
    except ImportError as error:  # pragma: no cover - cleanlab is a declared dependency
        raise ImportError("label-error detection needs cleanlab: pip install 'headstart[audit]'") from error
    from headstart.models.heads import choose_c, fit_logistic, group_folds, predict_proba

    groups = np.arange(len(labels)) if fold_groups is None else fold_groups
    num_classes = int(labels.max()) + 1
    folds = max(2, min(folds, int(np.bincount(labels).min())))
    c, _ = choose_c(features, labels, folds=folds, seed=seed, groups=groups)
    probs = np.zeros((len(labels), num_classes))
    for train_idx, test_idx in group_folds(labels, groups, folds, seed):
        head, _ = fit_logistic(features[train_idx], labels[train_idx], num_classes, c=c)
        probs[test_idx] = predict_proba(head, features[test_idx])
    issues = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence")
    return np.asarray(issues, dtype=int), probs


# -- the audit -------------------------------------------------------------------------------------------------------


def audit(
    data: str | Path | Dataset,
    *,
    backbone: str | None = DEFAULT_BACKBONE,
    weights: str | None = None,
    near_threshold: float = NEAR_THRESHOLD,
    cache_dir: str | Path | None = None,
    out: str | Path | None = None,
    find_label_errors: bool = True,
    batch_size: int = 32,
    workers: int = -1,
    precision: str = "auto",
    seed: int = 0,
) -> AuditResult:
    """Audit a dataset; with ``out`` also write ``audit.csv``, ``audit.json`` and ``audit.html`` (with thumbnails).

    Args:
        data: dataset folder or CSV manifest, or a loaded dataset.
        backbone: feature network for near duplicates and label errors; None runs the checks that need no
            embeddings only (unreadable files, exact duplicates, statistics).
        weights: weights file for the backbone.
        near_threshold: cosine similarity (of dataset-centred features) from which two images are near copies, if
            their pixel signatures agree too; the default is measured for efficientnet_lite0 (see
            :data:`NEAR_THRESHOLD`).
        cache_dir: feature cache root.
        out: folder for the report files.
        find_label_errors: run the confident-learning check (needs a backbone).
        batch_size: images per forward pass.
        workers: decoding processes (-1 picks).
        precision: ``auto``, ``bf16`` or ``fp32``.
        seed: fold shuffling seed.
    """
    if not 0.0 < near_threshold <= 1.0:
        raise ValueError(f"near_threshold {near_threshold} must be in (0, 1]; 0.6 suits efficientnet_lite0 features")
    start = time.perf_counter()
    dataset = data if isinstance(data, Dataset) else load_dataset(data)
    records = dataset.train + dataset.val + dataset.test
    splits = ["train"] * len(dataset.train) + ["val"] * len(dataset.val) + ["test"] * len(dataset.test)
    pairs: list[tuple[int, int, float]] = []
    issues: list[LabelIssue] = []
    features = None
    rows = np.arange(len(records))
    if backbone is not None:
        net = create_backbone(backbone, pretrained=True, weights=weights)
        device = pick_device()
        emb = embed(
            net, records, batch_size=batch_size, precision=resolve_precision(precision, device), device=device,
            cache_root=default_cache_root(cache_dir), workers=workers, description="audit features",
        )  # fmt: skip
        features, rows = emb.features, emb.index
        # Centring removes the direction every photo shares (features are non-negative after the last activation),
        # which is what separates re-encoded copies from merely similar photos (see NEAR_THRESHOLD).
        centred = features - features.mean(0)
        centred /= np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-12)
        candidates = [(int(rows[i]), int(rows[j]), s) for i, j, s in near_pairs(centred, near_threshold)]
        pairs = verify_pairs(records, candidates)
    groups = find_groups(records, splits, dataset.classes, pairs)
    if features is not None and find_label_errors:
        kept = [records[i] for i in rows]
        labels = np.array([r.label for r in kept])
        if np.bincount(labels, minlength=len(dataset.classes)).min() >= 2:
            flagged, probs = label_issues(features, labels, _fold_groups(kept, groups), seed=seed)
            for i in flagged:
                suggested = int(probs[i].argmax())
                issues.append(
                    LabelIssue(kept[i].path, splits[rows[i]], dataset.classes[labels[i]], dataset.classes[suggested],
                               float(probs[i, labels[i]]), float(probs[i, suggested]))
                )  # fmt: skip
        else:
            progress.log("[yellow]label-error check skipped: every class needs two or more decodable images")
    result = AuditResult(
        root=dataset.root, classes=dataset.classes, backbone=backbone, near_threshold=near_threshold,
        unreadable=list(dataset.skipped), groups=groups, label_issues=issues, stats=image_stats(dataset),
        records=list(zip(records, splits, strict=True)),
    )  # fmt: skip
    result.seconds = time.perf_counter() - start
    if out is not None:
        result.files = write_report(result, Path(out))
    return result


# -- reports ---------------------------------------------------------------------------------------------------------


def write_report(result: AuditResult, folder: Path) -> list[Path]:
    """Write ``audit.csv``, ``audit.json`` and ``audit.html`` (thumbnails in ``thumbs/``) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    csv_path = folder / "audit.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["kind", "group", "path", "split", "label", "detail"])
        writer.writeheader()
        writer.writerows(result.rows())
    json_path = folder / "audit.json"
    json_path.write_text(json.dumps(result.to_dict(), indent=2))
    html_path = folder / "audit.html"
    html_path.write_text(_html(result, folder))
    return [csv_path, json_path, html_path]


THUMB_SIDE = 128  # pixels, longer side of an audit thumbnail


@dataclass(frozen=True)
class Card:
    """One flagged file as the audit page shows it: thumbnail (None when undecodable), path and what is wrong."""

    url: str | None
    path: Path
    caption: str


def _card(path: Path, caption: str, folder: Path, name: str) -> Card:
    """The card of ``path``, its thumbnail written as ``folder/thumbs/<name>.jpg``."""
    try:
        image = thumbnail(path, THUMB_SIDE)
    except DataError:
        return Card(None, path, caption)
    target = folder / "thumbs" / f"{name}.jpg"
    target.parent.mkdir(exist_ok=True)
    image.save(target, quality=80)
    return Card(f"thumbs/{target.name}", path, caption)


def _html(result: AuditResult, folder: Path) -> str:
    """The audit page (``audit.html`` template); writes the thumbnails it shows into ``folder/thumbs``."""
    groups = [
        (f"group {g.id}: {g.name}", [_card(m.path, f"{m.split} / {m.label}", folder, f"g{g.id}_{n}")
                                     for n, m in enumerate(g.members)])
        for g in result.groups
    ]  # fmt: skip
    issues = [
        _card(i.path, f"{i.split} / {i.label} → {i.suggested} ({i.suggested_probability:.2f})", folder, f"li{n}")
        for n, i in enumerate(result.label_issues)
    ]
    return render(
        "audit.html",
        title="headstart audit",
        root=result.root,
        backbone=result.backbone,
        near_threshold=result.near_threshold,
        seconds=result.seconds,
        counts=Table(("kind", "files"), sorted(result.counts().items())),
        stats=json.dumps(result.stats, indent=1),
        unreadable=[_card(s.path, s.reason, folder, f"skip{n}") for n, s in enumerate(result.unreadable)],
        groups=groups,
        label_issues=issues,
    )


def write_clean_manifest(result: AuditResult, path: str | Path, drop: Sequence[str] = DROP_CHOICES) -> int:
    """Write a ``path,label,split`` CSV of the images that survive ``drop``; returns how many rows it has.

    ``duplicates`` keeps one file per duplicate or leakage group (a training copy when there is one, so that the
    evaluation splits lose the leaked images); ``conflicts`` drops every member of a conflict group, since which label
    is right is the user's call; ``label_issues`` drops the likely mislabelled files. Unreadable files are never
    listed (they have no usable image). The user's files are not touched; paths in the manifest are absolute.
    """
    unknown = sorted(set(drop) - set(DROP_CHOICES))
    if unknown:
        raise ValueError(f"unknown drop option(s) {unknown}; choose from {', '.join(DROP_CHOICES)}")
    target = Path(path)
    if target.suffix.lower() != ".csv":
        raise ValueError(f"{target}: a cleaned manifest must be a .csv file")
    removed: set[Path] = set()
    split_rank = {"train": 0, "val": 1, "test": 2}
    for g in result.groups:
        if g.kind == "conflict":
            if "conflicts" in drop:
                removed.update(m.path for m in g.members)
        elif "duplicates" in drop:
            keep = min(g.members, key=lambda m: (split_rank.get(m.split, 3), str(m.path)))
            removed.update(m.path for m in g.members if m is not keep)
    if "label_issues" in drop:
        removed.update(i.path for i in result.label_issues)
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with target.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split"])
        for record, split in result.records:
            if record.path in removed:
                continue
            writer.writerow([record.path.as_posix(), result.classes[record.label], split])
            written += 1
    return written
