"""Would labelling more images pay, and how many? A learning curve of the default head, fitted and projected.

The head that ``train`` fits on frozen features is trained on nested, stratified fractions of the training split
(several seeds each; seconds, since the features come from the cache), and its validation error is fitted by a
saturating power law of the training-set size ``n``::

    err(n) = a + b * (n / n_full) ** -c        a >= 0 (the floor more data cannot pass), b >= 0, c > 0

The fit projects the gain from the accuracy measured on the whole training split to 2x, 5x and 10x the data
(:func:`anchored`). The interval is a bootstrap that resamples the seeds at every
fraction and the validation images (so it holds the noise of the seeds' draws and of a finite validation set), refits
and projects each time. ``benchmarks/curve_backtest.py`` checks the projection where the truth is known: fitted on
fractions up to half of the training split, it predicts the accuracy at the full split.

The validation error is measured on the data's validation split: a ``val/`` folder, or the stratified share that
``load_dataset`` holds out (``val_fraction``) when the data has none.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import least_squares

from headstart import progress
from headstart.config import TrainConfig
from headstart.data.scan import Dataset, load_dataset
from headstart.errors import ConfigError, DataError
from headstart.files import atomic_write_bytes, default_cache_root, new_run_dir
from headstart.models.heads import fit_logistic, predict_proba
from headstart.training.run import build_config, frozen_features, resolve_config

# Fractions of the training split, nested: each is a superset of the one before. Spaced evenly on a log scale from
# a tenth, where a power law is still informative, to the full split.
FRACTIONS = (0.1, 0.16, 0.25, 0.4, 0.63, 1.0)
MULTIPLIERS = (2, 5, 10)  # the projections: the training split's size times these
MIN_PER_CLASS = 5  # a curve needs a class to keep two images at its smallest fraction and to grow from there
KEEP_PER_CLASS = 2  # images of each class in every fraction, however small: the head can then cross-validate
BOOTSTRAP = 200  # resamples for the interval
LEVEL = 0.8  # the interval's nominal coverage
# Bounds of the power law's exponent: below 0.05 the curve is flat (the fit then only says "no gain"); above 2 no
# learning curve of a linear head on fixed features has been reported, and a steep fit on a few noisy points
# would project an implausible gain.
EXPONENT = (0.05, 2.0)

HeadFit = Callable[[np.ndarray, np.ndarray, int, int], Callable[[np.ndarray], np.ndarray]]


@dataclass(frozen=True)
class PowerLaw:
    """``err(n) = a + b * (n / n0) ** -c``."""

    a: float
    b: float
    c: float
    n0: float

    def error(self, n: np.ndarray | float) -> np.ndarray:
        """The fitted error at training-set size ``n``."""
        return np.asarray(self.a + self.b * (np.asarray(n, dtype=np.float64) / self.n0) ** -self.c)


def fit_power_law(n: np.ndarray, err: np.ndarray, n0: float | None = None) -> PowerLaw:
    """Least-squares fit of ``err(n) = a + b * (n / n0) ** -c`` (``n0`` defaults to the largest ``n``).

    Starts from several exponents and keeps the best: the objective has a flat valley along which the floor ``a``
    trades against the exponent ``c``.
    """
    n = np.asarray(n, dtype=np.float64)
    err = np.asarray(err, dtype=np.float64)
    if len(np.unique(n)) < 3:
        raise ValueError(f"a power law needs three training-set sizes or more, got {sorted(set(n.tolist()))}")
    n0 = float(n0 or n.max())
    x = n / n0
    top = max(float(err.max()), 1e-6)

    def residual(p: np.ndarray) -> np.ndarray:
        return np.asarray(p[0] + p[1] * x ** -p[2] - err)

    best = None
    for c0 in (0.2, 0.5, 1.0):
        start = np.array([min(float(err.min()), top) * 0.5, max(top * 0.5, 1e-6), c0])
        fit = least_squares(residual, start, bounds=([0.0, 0.0, EXPONENT[0]], [1.0, 10.0, EXPONENT[1]]))
        if best is None or fit.cost < best.cost:
            best = fit
    assert best is not None
    a, b, c = (float(v) for v in best.x)
    return PowerLaw(a, b, c, n0)


def nested_fractions(
    labels: np.ndarray, fractions: Sequence[float], seed: int, keep: int = KEEP_PER_CLASS
) -> list[np.ndarray]:
    """Row indices of each fraction of ``labels``: stratified (every class keeps its share, and at least ``keep``
    rows), nested (each fraction contains the ones before it) for one seed's order of each class."""
    rng = np.random.default_rng(seed)
    orders = {int(k): rng.permutation(np.flatnonzero(labels == k)) for k in np.unique(labels)}
    out = []
    for f in sorted(fractions):
        rows = [order[: min(len(order), max(keep, round(f * len(order))))] for order in orders.values()]
        out.append(np.sort(np.concatenate(rows)))
    return out


def default_head(config: TrainConfig) -> HeadFit:
    """The head ``train`` fits with ``config`` (logistic, C and feature scaling by cross-validation unless fixed),
    as a function of (features, labels, classes, seed) returning a probability function."""
    optim = config.optim
    class_weight = "balanced" if config.run.class_weights == "auto" else None

    def fit(x: np.ndarray, y: np.ndarray, num_classes: int, seed: int) -> Callable[[np.ndarray], np.ndarray]:
        head, _ = fit_logistic(x, y, num_classes, c=optim.head_c, class_weight=class_weight, seed=seed,
                               scaling=optim.head_scaling or "feature")  # fmt: skip
        return lambda features: predict_proba(head, features)

    return fit


@dataclass
class Projection:
    """Accuracy projected at ``multiplier`` times the training split."""

    multiplier: float
    n: int
    accuracy: float
    low: float
    high: float


@dataclass
class ClassGain:
    """One class: its validation recall now, projected at 2x, and the gain."""

    name: str
    train_images: int
    recall: float
    projected: float
    gain: float


@dataclass
class CurveResult:
    """What :func:`learning_curve` returns (and ``curve.json`` holds)."""

    classes: list[str]
    n_train: int  # images in the training split
    n_val: int
    sizes: list[int]  # training-set size of each fraction
    accuracy: list[list[float]]  # [seed][fraction]
    fit: PowerLaw
    projections: list[Projection]
    per_class: list[ClassGain]  # largest gain first
    answer: str  # the one line for the screen
    level: float = LEVEL
    seconds: float = 0.0
    out: Path | None = None
    files: list[Path] = field(default_factory=list)

    @property
    def accuracy_now(self) -> float:
        """Mean validation accuracy over seeds at the full training split."""
        return float(np.mean([row[-1] for row in self.accuracy]))

    def to_dict(self) -> dict[str, Any]:
        """Plain values for JSON."""
        out = asdict(self)
        out["out"] = str(self.out) if self.out else None
        out["files"] = [str(p) for p in self.files]
        out["accuracy_now"] = self.accuracy_now
        return out


def _correct(
    x: np.ndarray, y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, num_classes: int, sizes_rows: list[np.ndarray],
    seed: int, head: HeadFit,
) -> np.ndarray:  # fmt: skip
    """[fraction, val image] correctness of the head fitted on each fraction's rows."""
    rows = []
    for idx in sizes_rows:
        probs = head(x[idx], y[idx], num_classes, seed)(val_x)
        rows.append(probs.argmax(1) == val_y)
    return np.array(rows)


def _project(
    sizes: np.ndarray, correct: np.ndarray, val_y: np.ndarray, targets: np.ndarray, n0: float, rng: np.random.Generator,
    boot: int,
) -> tuple[PowerLaw, np.ndarray, np.ndarray]:  # fmt: skip
    """The fit to every (seed, fraction) point, and ``boot`` bootstrap projections of accuracy at ``targets``.

    ``correct`` is [seed, fraction, val image]. A resample draws seeds with replacement at each fraction and validation
    images with replacement within each class (so every class keeps its weight).
    """
    seeds, fracs, _ = correct.shape
    n_all = np.tile(sizes, seeds)
    acc = correct.mean(2)
    fit = fit_power_law(n_all, 1.0 - acc.reshape(-1), n0)
    by_class = [np.flatnonzero(val_y == k) for k in np.unique(val_y)]
    draws = np.empty((boot, len(targets)))
    for b in range(boot):
        images = np.concatenate([rng.choice(rows, len(rows)) for rows in by_class])
        pick = rng.integers(0, seeds, (seeds, fracs))
        resampled = correct[:, :, images].mean(2)[pick, np.arange(fracs)[None, :]]  # [seed, fraction]
        try:
            draws[b] = anchored(resampled[:, -1].mean(), fit_power_law(n_all, 1.0 - resampled.reshape(-1), n0), targets)
        except ValueError:
            draws[b] = np.nan
    return fit, draws, anchored(acc[:, -1].mean(), fit, targets)


def anchored(now: float, fit: PowerLaw, targets: np.ndarray) -> np.ndarray:
    """Accuracy at ``targets``: the accuracy measured at the reference size ``fit.n0`` plus the gain the fit
    predicts from there. The fit's own value at ``n0`` is pulled by the small fractions' points (on the backtest it
    missed the measured accuracy by up to 2.7 points); what the curve's shape answers is the gain."""
    return np.clip(now + fit.error(fit.n0) - fit.error(targets), 0.0, 1.0)


def curve_from_features(
    x: np.ndarray, y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, classes: Sequence[str], *,
    head: HeadFit, fractions: Sequence[float] = FRACTIONS, seeds: int = 3, targets: Sequence[float] = MULTIPLIERS,
    boot: int = BOOTSTRAP, level: float = LEVEL, seed: int = 0, show: bool = False,
) -> CurveResult:  # fmt: skip
    """The learning curve from training and validation features (see the module's docstring).

    Args:
        x, y: training features and labels (one row per image).
        val_x, val_y: validation features and labels.
        classes: class names.
        head: fits a head on (features, labels, classes, seed); see :func:`default_head`.
        fractions: of the training split, nested; the largest is the reference size the projections multiply.
        seeds: draws of the nested fractions.
        targets: multiples of the largest fraction's size to project to.
        boot: bootstrap resamples; level: the interval's nominal coverage.

    Raises:
        DataError: a class has fewer than :data:`MIN_PER_CLASS` training images, or no validation image.
    """
    counts = np.bincount(y, minlength=len(classes))
    small = [f"{classes[k]} ({int(counts[k])})" for k in range(len(classes)) if counts[k] < MIN_PER_CLASS]
    if small:
        raise DataError(
            f"a learning curve needs at least {MIN_PER_CLASS} training images in every class; "
            f"{', '.join(small)} {'has' if len(small) == 1 else 'have'} fewer: label a few more of "
            f"{'it' if len(small) == 1 else 'them'}, or leave the class out"
        )
    if len(val_y) == 0 or len(np.unique(val_y)) < 2:
        raise DataError("a learning curve measures validation error: the data needs validation images of two classes")
    fractions = sorted(fractions)
    draws_rows = [nested_fractions(y, fractions, seed + s) for s in range(seeds)]
    sizes = np.array([len(r) for r in draws_rows[0]], dtype=np.float64)
    correct = []
    for s, rows in enumerate(draws_rows):
        correct.append(_correct(x, y, val_x, val_y, len(classes), rows, seed + s, head))
        if show:
            progress.log(f"curve: seed {s + 1}/{seeds} done")
    stack = np.array(correct)  # [seed, fraction, val image]
    n0 = float(sizes[-1])
    tgt = np.array([n0 * m for m in targets])
    rng = np.random.default_rng(seed)
    fit, draws, point = _project(sizes, stack, val_y, tgt, n0, rng, boot)
    tail = (1.0 - level) / 2 * 100
    low, high = np.nanpercentile(draws, tail, axis=0), np.nanpercentile(draws, 100 - tail, axis=0)
    projections = [
        Projection(float(m), round(t), float(p), float(lo), float(hi))
        for m, t, p, lo, hi in zip(targets, tgt, point, low, high, strict=True)
    ]
    per_class = _class_gains(stack, sizes, val_y, classes, counts)
    accuracy = stack.mean(2).tolist()
    result = CurveResult(list(classes), len(y), len(val_y), [int(s) for s in sizes], accuracy, fit,
                         projections, per_class, "", level)  # fmt: skip
    result.answer = answer_line(result)
    return result


def _class_gains(
    correct: np.ndarray, sizes: np.ndarray, val_y: np.ndarray, classes: Sequence[str], counts: np.ndarray
) -> list[ClassGain]:
    """Each class's recall curve fitted alone and projected at 2x: which classes gain most from more examples."""
    gains = []
    for k, name in enumerate(classes):
        rows = val_y == k
        if not rows.any():
            continue
        recall = correct[:, :, rows].mean(2)  # [seed, fraction]
        now = float(recall[:, -1].mean())
        fit = fit_power_law(np.tile(sizes, len(recall)), 1.0 - recall.reshape(-1), float(sizes[-1]))
        projected = float(anchored(now, fit, np.array([2 * sizes[-1]]))[0])
        gains.append(ClassGain(name, int(counts[k]), now, projected, projected - now))
    return sorted(gains, key=lambda g: -g.gain)


def answer_line(result: CurveResult) -> str:
    """One line: what doubling (and ten times) the labelled images would buy, with the interval."""
    now = result.accuracy_now
    two = result.projections[0]
    pct = round(result.level * 100)
    line = "labelling more would hardly pay: " if two.accuracy - now < 0.01 else ""
    line += (
        f"about {two.n - result.n_train} more labelled images ({two.multiplier:g}x) would take accuracy from "
        f"{now:.3f} to {two.accuracy:.3f} ({two.low:.3f}-{two.high:.3f}, {pct}% interval)"
    )
    last = result.projections[-1]
    if last is not two:
        more = last.n - result.n_train
        line += f"; {more} more ({last.multiplier:g}x): {last.accuracy:.3f} ({last.low:.3f}-{last.high:.3f})"
    return line


def curve_figure(result: CurveResult, path: Path) -> Path:
    """Points (each seed's accuracy at each size), the fit, and the projection's interval, on a log size axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    sizes = np.array(result.sizes, dtype=np.float64)
    for row in result.accuracy:
        ax.scatter(sizes, row, s=14, color="tab:blue", alpha=0.6)
    grid = np.geomspace(sizes[0], sizes[-1] * result.projections[-1].multiplier, 100)
    ax.plot(grid, 1.0 - result.fit.error(grid), color="tab:blue", label="power-law fit")
    proj_n = [sizes[-1]] + [p.n for p in result.projections]
    now = result.accuracy_now
    low, high = [now] + [p.low for p in result.projections], [now] + [p.high for p in result.projections]
    band = f"projection, {round(result.level * 100)}% interval"
    ax.fill_between(proj_n, low, high, color="tab:orange", alpha=0.3, label=band)
    for p in result.projections:
        ax.annotate(f"{p.multiplier:g}x: {p.accuracy:.3f}", (p.n, p.accuracy), textcoords="offset points",
                    xytext=(-10, -14), fontsize=8)  # fmt: skip
    ax.axvline(sizes[-1], color="gray", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("labelled training images")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Learning curve of the default head")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return path


def _page(result: CurveResult, data: str, figure: str) -> str:
    from headstart.insight.pages import Section, Table, render_sections

    rows = [[f"{result.n_train} (now)", f"{result.accuracy_now:.3f}", "measured"]]
    rows += [
        [f"{p.n} ({p.multiplier:g}x)", f"{p.accuracy:.3f}", f"{p.low:.3f}-{p.high:.3f}"] for p in result.projections
    ]
    projections = Table(["training images", "accuracy", f"{round(result.level * 100)}% interval"], rows)
    classes = Table(
        ["class", "training images", "recall now", "projected at 2x", "gain"],
        [[g.name, g.train_images, f"{g.recall:.3f}", f"{g.projected:.3f}", f"{g.gain:+.3f}"] for g in result.per_class],
    )
    fit = result.fit
    sections = [
        Section("Would more labels pay?", image=figure, alt="learning curve", table=projections, text=result.answer),
        Section("Which classes gain most from more examples", table=classes,
                text="Each class's recall fitted by its own power law; a few validation images make it noisy."),
        Section("The fit", text=f"err(n) = {fit.a:.4f} + {fit.b:.4f} * (n / {fit.n0:g})^-{fit.c:.3f}; sizes "
                f"{result.sizes}, {len(result.accuracy)} seeds, {result.n_val} validation images."),
    ]  # fmt: skip
    return render_sections("Learning curve", data, sections, ".")


def learning_curve(
    data: str | Path | Dataset, *, out: str | Path | None = None, seeds: int = 3,
    fractions: Sequence[float] = FRACTIONS, overwrite: bool = False, run: str | Path | None = None,
    config: TrainConfig | None = None, **overrides: Any,
) -> CurveResult:  # fmt: skip
    """Would labelling more pay? Fit the learning curve of the head ``train`` would fit on ``data`` and project it.

    Args:
        data: dataset folder or CSV manifest (or a loaded :class:`~headstart.data.scan.Dataset`).
        out: folder for ``curve.json``, ``curve.png`` and ``report.html`` (default ``runs/curve-<time>``).
        seeds: draws of the nested fractions.
        fractions: of the training split.
        overwrite: replace an existing ``out`` folder.
        run: a run folder whose report gets the curve: the files go to ``RUN/curve/`` (replacing an earlier curve)
            and ``RUN/report.html`` is rebuilt with it.
        config, overrides: as for :func:`headstart.train` (e.g. ``backbone=``, ``cache_dir=``); frozen-feature
            strategies only (``auto``, the default, or ``extract``).

    Returns:
        The curve, its projections and per-class gains; ``answer`` is the one-line summary.
    """
    tic = time.perf_counter()
    if run is not None:
        if not (Path(run) / "model.json").is_file():
            raise DataError(
                f"{run} is not a run folder (no model.json); --run takes the folder `headstart train` wrote"
            )
        out, overwrite = Path(run) / "curve", True
    path = data.root if isinstance(data, Dataset) else data
    config = resolve_config(build_config(path, config, **overrides))
    dataset = data if isinstance(data, Dataset) else load_dataset(
        config.data.path, config.data.val_fraction, config.data.split_seed, default_cache_root(config.run.cache_dir)
    )  # fmt: skip
    if dataset.multi_label:
        raise ConfigError(
            f"{dataset.root} is multi-label: the learning curve projects single-label accuracy and is not built for "
            "label sets yet; give it a manifest with one label per image"
        )
    counts = dataset.counts(dataset.train)
    small = [f"{name} ({n})" for name, n in counts.items() if n < MIN_PER_CLASS]
    if small:  # before any feature is computed
        raise DataError(
            f"a learning curve needs at least {MIN_PER_CLASS} training images in every class of {dataset.root}; "
            f"{', '.join(small)} {'has' if len(small) == 1 else 'have'} fewer: label a few more, or leave the class out"
        )
    if dataset.skipped:
        progress.log(f"[yellow]skipped {len(dataset.skipped)} unreadable file(s), e.g. {dataset.skipped[0].path}")
    (x, y, _), (val_x, val_y), _ = frozen_features(config, dataset)
    result = curve_from_features(x, y, val_x, val_y, dataset.classes, head=default_head(config), fractions=fractions,
                                 seeds=seeds, seed=config.run.seed, show=True)  # fmt: skip
    folder = new_run_dir(out, "curve", overwrite)
    result.out = folder
    figure = curve_figure(result, folder / "curve.png")
    page = folder / "report.html"
    page.write_text(_page(result, str(dataset.root), figure.name), encoding="utf-8")
    result.seconds = round(time.perf_counter() - tic, 2)
    result.files = [folder / "curve.json", figure, page]
    atomic_write_bytes(folder / "curve.json", json.dumps(result.to_dict(), indent=2).encode(), sync=False)
    if run is not None:
        _add_to_report(Path(run))
    return result


def _add_to_report(run: Path) -> None:
    """Rebuild the run's report with the curve; the curve is written already, so a failing report must not fail it."""
    from headstart.insight.report import build_report

    try:
        build_report(run)
    except Exception as error:  # reporting is best effort, as after training
        progress.log(
            f"[yellow]report not rebuilt ({type(error).__name__}: {error}); retry with `headstart report {run}`"
        )
