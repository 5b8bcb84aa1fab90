"""Which images should be labelled first? Rank a pool of unlabelled images for labelling (active learning).

Two rankings. The default, ``typical``, is TypiClust (Hacohen, Dekel and Weinshall, "Active learning on a budget",
ICML 2022) with the model's uncertainty choosing between the groups, built for the few-labels regime headstart's
users are in (there, in ``benchmarks/active_learning.py``, neither margin alone nor the mix below reached 70%):

* the labelled and unlabelled images together are clustered (k-means on the model's L2-normalised embeddings) into
  as many groups as there are labelled images plus the budget, so the budget can put one label into each group that
  has none;
* each pick goes to the group with the fewest labelled (or already picked) images; among those, the one with the most
  uncertainty mass, ``size * mean uncertainty`` of its unpicked images (the model hesitates over many images there);
* within the group it takes the most *typical* image: the one with the smallest mean distance to its 20 nearest
  neighbours in the group (its label tells the model about the whole group, not about an outlier).

``benchmarks/active_learning.py`` measured it against the mix below and random choice (README).

The ``mix`` ranking (``method="mix"``) mixes two things, picked greedily one image at a time:

* **uncertainty**: ``1 - margin``, where the margin is the model's top probability minus its second; an image the
  model hesitates over (margin 0) scores 1, one it is sure of scores 0. Margin rather than entropy: with many
  classes, entropy rewards an image spread thinly over classes it is not really confused between.
* **novelty** (diversity): the cosine distance, on the model's own L2-normalised embeddings, from the image to the
  nearest image that is labelled or already picked, divided by the largest such distance in the pool at the start.
  This is k-center greedy: after each pick the distances shrink around it, so the next picks go elsewhere and a
  cluster of similar uncertain images is not labelled five times over.

``score = (1 - diversity) * uncertainty + diversity * novelty`` (``diversity`` defaults to 0.5), recomputed after every
pick; the CSV records the score at the moment each image was picked, and which term carried it (``why``).

Before ranking, images that are copies of labelled ones are left out: the same bytes, or embeddings at a cosine of
:data:`NEAR_COPY` or more whose pixel signatures also agree (the audit's check, :mod:`headstart.insight.audit`).
Labelling them would cost an expert's time and teach the model nothing.

``benchmarks/active_learning.py`` measures the ranking against random choice, by simulation on labelled sets.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from headstart import progress
from headstart.data.scan import Dataset, ImageRecord, Skipped, list_images, scan_files
from headstart.errors import BackboneError, ConfigError, DataError
from headstart.files import atomic_write_bytes, new_run_dir
from headstart.insight.audit import near_pairs, verify_pairs
from headstart.insight.predictor import Model, load

METHODS = ("typical", "mix")
METHOD = "typical"  # the default ranking (see the module's docstring)
DIVERSITY = 0.5  # weight of novelty against uncertainty in the ``mix`` ranking
TYPICAL_NEIGHBOURS = 20  # neighbours whose mean distance measures typicality (TypiClust's choice)
# Cosine of the model's embeddings from which a pool image is a candidate copy of a labelled one (then confirmed by
# the pixel signatures). Stricter than the audit's 0.60, which lists candidates for a person to look at: here a false
# match silently hides an image from labelling. On ants/bees with the default three backbones, 0.60 matched four
# different photos (0.61-0.69) to labelled ones; re-encoded or resized copies score above 0.95.
NEAR_COPY = 0.90
SHEET_COLUMNS = 8
SHEET_MAX = 64  # images on the contact sheet, best first


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return np.asarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))


def uncertainty(probs: np.ndarray) -> np.ndarray:
    """``1 - (top probability - second)`` per row: 1 where the model cannot choose, 0 where it is certain."""
    if probs.shape[1] < 2:
        return np.zeros(len(probs))
    top2 = np.sort(probs, axis=1)[:, -2:]
    return np.asarray(1.0 - (top2[:, 1] - top2[:, 0]))


@dataclass
class Ranked:
    """The pool's picks in order: positions into the pool, and each pick's score and its two terms at pick time."""

    order: np.ndarray
    score: np.ndarray
    uncertainty: np.ndarray
    novelty: np.ndarray
    typicality: np.ndarray | None = None  # ``typical`` ranking: each pick's typicality in its group (0 to 1)
    group: np.ndarray | None = None  # ``typical`` ranking: [P, 2] per pick, its group's size and labelled images


def _nearest_distance(pool: np.ndarray, labelled: np.ndarray) -> np.ndarray:
    """Cosine distance from each unit row of ``pool`` to the nearest unit row of ``labelled``; with nothing labelled,
    every image is as far as can be (2)."""
    if not len(labelled):
        return np.full(len(pool), 2.0)
    return np.asarray(np.maximum(1.0 - (pool @ labelled.T).max(1), 0.0))


def rank_typical(probs: np.ndarray, pool: np.ndarray, labelled: np.ndarray, budget: int, seed: int = 0) -> Ranked:
    """Pick ``budget`` images of the pool: typical images of uncovered, uncertain groups (module docstring).

    Args:
        probs: [N, C] the model's probabilities for the pool.
        pool: [N, D] embeddings of the pool.
        labelled: [M, D] embeddings of the labelled images (M may be 0).
        budget: how many to pick (at most N).
        seed: k-means seed.

    ``score`` is the group's uncertainty mass at the pick, over the largest at the start; ``novelty`` is the cosine
    distance to the nearest labelled image, for the record.
    """
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    budget = min(budget, len(pool))
    u = uncertainty(probs)
    n = len(pool)
    z = _unit(np.concatenate([pool, labelled]) if len(labelled) else pool)
    groups = min(len(labelled) + budget, len(z))
    with warnings.catch_warnings():  # repeated images make fewer distinct groups than asked for: that is fine
        warnings.simplefilter("ignore", ConvergenceWarning)
        assign = KMeans(groups, n_init=1, random_state=seed).fit_predict(z) if groups > 1 else np.zeros(len(z), int)
    sizes = np.bincount(assign, minlength=groups)
    covered = np.bincount(assign[n:], minlength=groups)  # labelled (later: or picked) images per group
    nearest = _nearest_distance(z[:n], z[n:])
    available = np.arange(len(z)) < n  # pool images not yet picked (labelled rows never are)
    # Per group: unpicked pool images and the sum of their uncertainty, updated after each pick (O(groups) a pick).
    free_count = np.bincount(assign[:n], minlength=groups).astype(np.float64)
    free_u = np.bincount(assign[:n], weights=u, minlength=groups)
    mass0: float | None = None  # the largest mass at the start: scores are shares of it
    order, scores, us, ns, ts, gs = [], [], [], [], [], []
    for _ in range(budget):
        mass = np.where(free_count > 0, sizes * free_u / np.maximum(free_count, 1), -np.inf)
        mass0 = max(float(mass.max()), 1e-12) if mass0 is None else mass0
        # The fewest labelled images first, then the most uncertainty mass (lexsort: the last key sorts first).
        candidates = np.flatnonzero(free_count > 0)
        c = int(candidates[np.lexsort((-mass[candidates], covered[candidates]))[0]])
        best_mass = float(mass[c])
        members = np.flatnonzero(assign == c)
        inside = z[members]
        distance = np.sqrt(np.maximum(2.0 - 2.0 * inside @ inside.T, 0.0))
        k = min(TYPICAL_NEIGHBOURS, len(members) - 1)
        typical = 1.0 / (np.sort(distance, axis=1)[:, 1 : k + 1].mean(1) + 1e-6) if k > 0 else np.ones(len(members))
        typical = typical / typical.max()
        at = int(np.argmax(np.where(available[members], typical, -np.inf)))
        pick = int(members[at])
        order.append(pick)
        scores.append(best_mass / mass0)
        us.append(float(u[pick]))
        ns.append(float(nearest[pick]))
        ts.append(float(typical[at]))
        gs.append((int(sizes[c]), int(covered[c])))
        available[pick] = False
        covered[c] += 1
        free_count[c] -= 1
        free_u[c] -= u[pick]
    return Ranked(np.array(order, dtype=np.int64), np.array(scores), np.array(us), np.array(ns), np.array(ts),
                  np.array(gs, dtype=np.int64).reshape(-1, 2))  # fmt: skip


def rank_pool(
    probs: np.ndarray, pool: np.ndarray, labelled: np.ndarray, budget: int, diversity: float = DIVERSITY
) -> Ranked:
    """Pick ``budget`` images of the pool greedily by the mix of uncertainty and novelty (module docstring).

    Args:
        probs: [N, C] the model's probabilities for the pool.
        pool: [N, D] embeddings of the pool.
        labelled: [M, D] embeddings of the labelled images (M may be 0).
        budget: how many to pick (at most N).
        diversity: weight of novelty, 0 (uncertainty alone) to 1 (k-center greedy alone).
    """
    if not 0.0 <= diversity <= 1.0:
        raise ValueError(f"diversity must lie in [0, 1], got {diversity}")
    budget = min(budget, len(pool))
    u = uncertainty(probs)
    pool_u = _unit(pool)
    nearest = _nearest_distance(pool_u, _unit(labelled))
    scale = max(float(nearest.max()), 1e-6)
    taken = np.zeros(len(pool), dtype=bool)
    order, scores, us, ns = [], [], [], []
    for _ in range(budget):
        novelty = nearest / scale
        score = (1.0 - diversity) * u + diversity * novelty
        score[taken] = -np.inf
        pick = int(np.argmax(score))
        order.append(pick)
        scores.append(float(score[pick]))
        us.append(float(u[pick]))
        ns.append(float(novelty[pick]))
        taken[pick] = True
        nearest = np.minimum(nearest, np.maximum(1.0 - pool_u @ pool_u[pick], 0.0))
    return Ranked(np.array(order, dtype=np.int64), np.array(scores), np.array(us), np.array(ns))


@dataclass
class Suggestion:
    """One image to label."""

    rank: int
    path: Path
    score: float
    predicted: str
    probability: float
    uncertainty: float
    novelty: float
    why: str
    typicality: float = 0.0  # ``typical`` ranking: how typical of its group (1: the most)


@dataclass
class SuggestResult:
    """What :func:`suggest` returns."""

    suggestions: list[Suggestion]
    out: Path
    pool: int  # readable images of the folder, before duplicates were left out
    excluded: list[tuple[Path, str]] = field(default_factory=list)  # (image, why) left out before ranking
    skipped: list[Skipped] = field(default_factory=list)  # unreadable files
    notes: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def _why(u: float, n: float, predicted: str, second: str, p1: float, p2: float) -> str:
    if u >= n:
        return f"uncertain: {predicted} {p1:.2f} vs {second} {p2:.2f}"
    return f"novel: unlike the labelled images and earlier picks (novelty {n:.2f})"


def _why_typical(size: int, covered: int, u: float, predicted: str, second: str, p1: float, p2: float) -> str:
    where = "none labelled yet" if covered == 0 else f"{covered} labelled so far"
    group = "alone: like no other image" if size == 1 else f"typical of a group of {size} similar images ({where})"
    return f"{group}; model: {predicted} {p1:.2f} vs {second} {p2:.2f} (uncertainty {u:.2f})"


def _labelled_dataset(model: Model, labelled: str | Path | Dataset | None) -> Dataset:
    if isinstance(labelled, Dataset):
        return labelled
    source = labelled or model.info.get("data_path")
    if not source or not Path(source).exists():
        raise DataError(
            f"the labelled data of {model.run_dir} ({source}) is not there: pass it with --labelled DATA, so that "
            "copies of labelled images are left out and novelty is measured against them"
        )
    return model._dataset(source)


def _check_features(model: Model, features: np.ndarray, what: str) -> None:
    """Embeddings of the wrong width mean the features do not come from the run's backbone."""
    expected = int(model.info.get("num_features") or features.shape[1])
    if features.ndim != 2 or features.shape[1] != expected:
        raise BackboneError(
            f"{what} have {features.shape[-1]} features, but {model.run_dir}'s backbone {model.info.get('backbone')} "
            f"gives {expected}: they come from another backbone; embed them with this run's model"
        )


def suggest(
    run: str | Path | Model, unlabelled: str | Path, budget: int, *, out: str | Path | None = None,
    labelled: str | Path | Dataset | None = None, method: str = METHOD, diversity: float = DIVERSITY,
    symlinks: bool = False, overwrite: bool = False, batch_size: int = 32,
) -> SuggestResult:  # fmt: skip
    """Rank the images of ``unlabelled`` for labelling with the model of ``run``; write the picks.

    Args:
        run: run folder of a trained classifier (or a loaded model).
        unlabelled: folder of images (searched recursively).
        budget: how many images to suggest; a budget larger than the pool suggests the whole pool (with a note).
        out: folder for ``suggestions.csv``, ``contact_sheet.png``, ``excluded.csv`` and ``skipped.txt``
            (default ``runs/suggest-<time>``).
        labelled: the labelled data (default: the data the run was trained on, from its ``model.json``).
        method: ``typical`` (default) or ``mix`` (see the module's docstring).
        diversity: weight of novelty against uncertainty in the ``mix`` ranking.
        symlinks: also write ``by_class/<predicted class>/<rank>_<name>`` links to the picks, to label by folder.
        overwrite: replace an existing ``out`` folder.

    Raises:
        DataError: no readable image in ``unlabelled``, a budget below 1, or the labelled data is missing.
        BackboneError: the run's features do not match its backbone.
    """
    if budget < 1:
        raise DataError(f"--budget must be 1 or more, got {budget}")
    if method not in METHODS:
        raise ConfigError(f"unknown suggest method {method!r}; choose one of {', '.join(METHODS)}")
    folder = Path(unlabelled)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder of images")
    model = run if isinstance(run, Model) else load(run)
    if model.info.get("exported"):
        raise ConfigError(f"{run} is an ONNX export; suggest needs the run folder (its embeddings)")
    if model.multi_label:
        raise ConfigError(
            f"{run} is a multi-label model: suggest ranks by the margin between one image's top two classes, which "
            "label sets do not have; it is not built for multi-label models yet"
        )
    records, skipped = scan_files(list_images(folder))
    notes: list[str] = []
    if skipped:
        notes.append(f"{len(skipped)} unreadable file(s) left out, listed in skipped.txt (e.g. {skipped[0].path.name}: "
                     f"{skipped[0].reason})")  # fmt: skip
    if not records:
        raise DataError(f"no readable image in {folder}" + (f" ({len(skipped)} unreadable files)" if skipped else ""))
    data = _labelled_dataset(model, labelled)
    known = data.train + data.val + data.test
    progress.log(f"suggest: {len(records)} unlabelled images, {len(known)} labelled")
    all_x = _embed(model, records, batch_size, f"the embeddings of {folder}")
    known_x = _embed(model, known, batch_size, "the embeddings of the labelled images")
    excluded, keep = _exclude_copies(records, all_x, known, known_x)
    if excluded:
        notes.append(f"{len(excluded)} image(s) left out as copies of labelled images or of each other (excluded.csv)")
    pool = [records[i] for i in keep]
    if not pool:
        raise DataError(f"every image of {folder} is a copy of a labelled image: nothing new to label")
    if budget > len(pool):
        notes.append(f"budget {budget} is more than the {len(pool)} candidate images: all of them are ranked")
    probs, outputs = model.predict_proba(pool, batch_size, from_cache=True)
    if not outputs.ok.all():
        raise DataError(f"{int((~outputs.ok).sum())} image(s) of {folder} could not be read for prediction: "
                        f"{outputs.failed[:3]}")  # fmt: skip
    if method == "typical":
        ranked = rank_typical(probs, all_x[keep], known_x, budget)
    else:
        ranked = rank_pool(probs, all_x[keep], known_x, budget, diversity)
    rows = _suggestions(ranked, probs, pool, model.classes)
    target = new_run_dir(out, "suggest", overwrite)
    result = SuggestResult(rows, target, len(records), excluded, skipped, notes)
    result.files = _write(result, symlinks)
    return result


def _suggestions(ranked: Ranked, probs: np.ndarray, pool: list[ImageRecord], classes: list[str]) -> list[Suggestion]:
    """The picks as rows: predicted class and probability, the ranking's terms, and why each was picked."""
    rows = []
    for k, (i, s, u, n) in enumerate(zip(ranked.order, ranked.score, ranked.uncertainty, ranked.novelty, strict=True)):
        top = np.argsort(-probs[i])[:2]
        first, second = classes[top[0]], classes[top[-1]]
        p1, p2 = float(probs[i, top[0]]), float(probs[i, top[-1]])
        if ranked.group is not None and ranked.typicality is not None:
            size, covered = (int(v) for v in ranked.group[k])
            why, typical = _why_typical(size, covered, float(u), first, second, p1, p2), float(ranked.typicality[k])
        else:
            why, typical = _why(float(u), float(n), first, second, p1, p2), 0.0
        rows.append(Suggestion(k + 1, pool[i].path, float(s), first, p1, float(u), float(n), why, typical))
    return rows


def _embed(model: Model, records: list[ImageRecord], batch_size: int, what: str) -> np.ndarray:
    """The model's embeddings of ``records``, one row each (each record was scanned readable)."""
    if not records:
        return np.zeros((0, int(model.info.get("num_features", 0))), dtype=np.float32)
    features = model.embed([r.path for r in records], batch_size)
    _check_features(model, features, what)
    if len(features) != len(records):
        raise DataError(f"{len(records) - len(features)} image(s) among {what} could not be decoded; run "
                        "`headstart audit` on them and remove the broken files")  # fmt: skip
    return features


def _exclude_copies(
    records: list[ImageRecord], features: np.ndarray, known: list[ImageRecord], known_x: np.ndarray
) -> tuple[list[tuple[Path, str]], list[int]]:
    """Pool positions to keep, and the images left out: copies (exact or near) of labelled images, and repeats of a
    pool image already kept."""
    by_digest = {r.digest: r.path for r in known}
    excluded: list[tuple[Path, str]] = []
    seen: dict[str, Path] = {}
    keep: list[int] = []
    for i, r in enumerate(records):
        if r.digest in by_digest:
            excluded.append((r.path, f"same file as labelled {by_digest[r.digest]}"))
        elif r.digest in seen:
            excluded.append((r.path, f"same file as {seen[r.digest]}, kept in the pool"))
        else:
            seen[r.digest] = r.path
            keep.append(i)
    if not known or not keep:
        return excluded, keep
    # Near copies: the audit's rule, on the model's embeddings, confirmed by pixel signatures.
    candidates = [records[i] for i in keep]
    both = np.concatenate([_unit(features[keep]), _unit(known_x)])
    pairs = [(i, j, s) for i, j, s in near_pairs(both, NEAR_COPY) if i < len(candidates) <= j]
    near: dict[int, tuple[int, float]] = {}
    for i, j, s in verify_pairs(candidates + known, pairs):
        near.setdefault(i, (j, s))
    for i, (j, s) in near.items():
        excluded.append((candidates[i].path, f"near copy of labelled {known[j - len(candidates)].path} ({s:.2f})"))
    return excluded, [keep[i] for i in range(len(candidates)) if i not in near]


def _write(result: SuggestResult, symlinks: bool) -> list[Path]:
    out = result.out
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["rank", "path", "score", "predicted", "probability", "uncertainty", "novelty", "typicality",
                     "why"])  # fmt: skip
    for s in result.suggestions:
        writer.writerow([s.rank, str(s.path), f"{s.score:.4f}", s.predicted, f"{s.probability:.4f}",
                         f"{s.uncertainty:.4f}", f"{s.novelty:.4f}", f"{s.typicality:.4f}", s.why])  # fmt: skip
    files = [out / "suggestions.csv"]
    atomic_write_bytes(files[0], text.getvalue().encode(), sync=False)
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["path", "why"])
    writer.writerows([[str(p), why] for p, why in result.excluded])
    atomic_write_bytes(out / "excluded.csv", text.getvalue().encode(), sync=False)
    (out / "skipped.txt").write_text("".join(f"{s.path}\t{s.reason}\n" for s in result.skipped))
    files += [out / "excluded.csv", out / "skipped.txt", contact_sheet(result.suggestions[:SHEET_MAX],
                                                                         out / "contact_sheet.png")]  # fmt: skip
    if symlinks:
        files.append(_link_by_class(result.suggestions, out / "by_class"))
    return files


def contact_sheet(suggestions: list[Suggestion], path: Path, thumb: int = 128) -> Path:
    """A grid of the picks, best first, each captioned with its rank, predicted class and score."""
    from PIL import Image, ImageDraw

    from headstart.data.scan import thumbnail

    columns = min(SHEET_COLUMNS, max(1, len(suggestions)))
    rows = max(1, -(-len(suggestions) // columns))
    caption = 14
    sheet = Image.new("RGB", (columns * (thumb + 4), rows * (thumb + caption + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, s in enumerate(suggestions):
        x, y = (k % columns) * (thumb + 4) + 2, (k // columns) * (thumb + caption + 4) + 2
        try:
            image = thumbnail(s.path, thumb)
            sheet.paste(image, (x + (thumb - image.width) // 2, y + (thumb - image.height) // 2))
        except (DataError, OSError):
            draw.text((x + 4, y + thumb // 2), "unreadable", fill="red")
        draw.text((x, y + thumb + 1), f"#{s.rank} {s.predicted} {s.score:.2f}"[: thumb // 6], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def _link_by_class(suggestions: list[Suggestion], root: Path) -> Path:
    """``root/<predicted>/<rank>_<name>`` -> the image: sort the picks into class folders while labelling."""
    width = len(str(len(suggestions)))
    for s in suggestions:
        folder = root / s.predicted
        folder.mkdir(parents=True, exist_ok=True)
        link = folder / f"{s.rank:0{width}d}_{s.path.name}"
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(s.path.resolve(), link)
    return root


def summary_rows(result: SuggestResult, top: int = 10) -> list[dict[str, Any]]:
    """The first ``top`` suggestions as plain values (for printing)."""
    return [{"rank": s.rank, "path": str(s.path), "score": round(s.score, 3), "predicted": s.predicted,
             "why": s.why} for s in result.suggestions[:top]]  # fmt: skip
