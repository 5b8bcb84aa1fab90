"""Strategy comparison: extract vs finetune vs scratch on the same data, split and backbone, over several seeds.

The claim behind transfer learning is that pretrained weights beat the same architecture trained from scratch on
small data, and that a frozen-feature head gets most of the way at a fraction of the cost. ``compare`` measures
that on the user's own data: every strategy x seed is an ordinary ``headstart train`` run (with its own report)
under ``OUT/<strategy>-seed<k>/``, and the comparison writes ``summary.json``, ``summary.csv``, ``comparison.png``
and ``report.html`` into ``OUT``.

Fairness: all runs use the same ``split_seed`` (the same validation images) and backbone. Unless a cache folder is
given, each run gets a fresh, private feature cache, so the wall time of ``extract`` and ``finetune`` includes
computing their features instead of reading what an earlier run cached.
"""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure

from headstart import progress
from headstart.config import STRATEGIES
from headstart.data.scan import is_multilabel_manifest
from headstart.errors import ConfigError
from headstart.hardware import launch_rank
from headstart.insight.pages import Link, Section, Table, render_sections
from headstart.insight.report import FIGURES, read_history
from headstart.models.backbones import DEFAULT_BACKBONE
from headstart.models.classifier import read_model_info

if TYPE_CHECKING:
    from headstart.training.run import TrainResult

# Trained strategies need pretrained weights; scratch is the control and must never load them.
PRETRAINED = ("auto", "extract", "finetune")


@dataclass
class RunRow:
    """One training run of the comparison."""

    strategy: str
    seed: int
    run_dir: str
    accuracy: float
    balanced_accuracy: float
    seconds: float  # wall time of the whole ``train`` call
    trainable_params: int  # parameters the strategy updates (extract: the head alone)
    images_per_s: float  # training throughput; extract: train+val images embedded per second of the run


@dataclass
class StrategyRow:
    """One strategy's results over its seeds (std is the sample standard deviation; 0 with one seed)."""

    strategy: str
    seeds: int
    accuracy_mean: float
    accuracy_std: float
    balanced_accuracy_mean: float
    balanced_accuracy_std: float
    seconds_mean: float
    trainable_params: int
    images_per_s_mean: float


@dataclass
class CompareResult:
    """What ``compare`` returns: every run, the per-strategy table, and where the files are."""

    out: Path
    runs: list[RunRow]
    table: list[StrategyRow]
    report: Path
    n_val: int  # validation images: 1 / n_val is what one image moves accuracy by

    def _repr_html_(self) -> str:
        """The strategy table, the runs and the bar chart, shown by Jupyter."""
        return compare_view(self)


def trainable_parameters(run_dir: Path) -> int:
    """Parameters the run's strategy trains, counted on the saved model with the strategy's own freezing rules."""
    from headstart.insight.predictor import load
    from headstart.training.strategies import FROZEN, apply_bn_policy

    model = load(run_dir)
    classifier = model.classifier
    strategy = model.info.get("strategy")
    if strategy in FROZEN:
        return sum(p.numel() for p in classifier.head.parameters())
    policy = model.info.get("config", {}).get("optim", {}).get("bn_policy") or "train"
    classifier.requires_grad_(True)
    apply_bn_policy(classifier, policy)  # frozen BatchNorm affine parameters do not train
    return sum(p.numel() for p in classifier.parameters() if p.requires_grad)


def images_per_second(history: list[dict[str, Any]], info: dict[str, Any], seconds: float) -> float:
    """Mean training throughput over epochs; for extract (no epochs), images embedded per second of the run."""
    rates = [float(r["train_images_per_s"]) for r in history if r.get("train_images_per_s")]
    if rates:
        return float(np.mean(rates))
    embedded = sum((info.get("train_counts") or {}).values()) + sum((info.get("val_counts") or {}).values())
    return embedded / seconds if seconds > 0 else 0.0


def summarise(runs: list[RunRow], strategies: tuple[str, ...]) -> list[StrategyRow]:
    """Mean and sample standard deviation per strategy."""
    table = []
    for strategy in strategies:
        rows = [r for r in runs if r.strategy == strategy]
        if not rows:
            continue
        acc = np.array([r.accuracy for r in rows])
        bal = np.array([r.balanced_accuracy for r in rows])
        ddof = 1 if len(rows) > 1 else 0
        table.append(
            StrategyRow(
                strategy=strategy,
                seeds=len(rows),
                accuracy_mean=float(acc.mean()),
                accuracy_std=float(acc.std(ddof=ddof)),
                balanced_accuracy_mean=float(bal.mean()),
                balanced_accuracy_std=float(bal.std(ddof=ddof)),
                seconds_mean=float(np.mean([r.seconds for r in rows])),
                trainable_params=rows[0].trainable_params,
                images_per_s_mean=float(np.mean([r.images_per_s for r in rows])),
            )
        )
    return table


def plot_comparison(table: list[StrategyRow], path: Path) -> str:
    """The bar chart of :func:`comparison_figure`, saved as ``path``; returns its file name."""
    fig = comparison_figure(table)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight", facecolor="white")
    return path.name


def comparison_figure(table: list[StrategyRow]) -> Figure:
    """Bars of mean accuracy and balanced accuracy per strategy, error bars one standard deviation."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(table))
    for k, (key, label) in enumerate((("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"))):
        means = [getattr(r, f"{key}_mean") for r in table]
        stds = [getattr(r, f"{key}_std") for r in table]
        bars = ax.bar(x + (k - 0.5) * 0.38, means, 0.38, yerr=stds, capsize=4, label=label)
        ax.bar_label(bars, labels=[f"{m:.3f}" for m in means], padding=2, fontsize=8)
    ax.set_xticks(x, [f"{r.strategy}\n({r.seeds} seed{'s' if r.seeds > 1 else ''})" for r in table])
    ax.set_ylim(0, 1.25)  # headroom above a perfect score for the value labels and the legend
    ax.set_ylabel("validation score")
    ax.legend(loc="upper center", ncols=2)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("Strategies compared (mean ± std over seeds)")
    return fig


def table_rows(table: list[StrategyRow]) -> list[tuple[str, ...]]:
    """The comparison table as text cells (scores in percent, so gaps read as points): the CLI prints these, the
    HTML report shows the same."""
    return [
        (
            r.strategy,
            str(r.seeds),
            f"{100 * r.accuracy_mean:.1f} ± {100 * r.accuracy_std:.1f}",
            f"{100 * r.balanced_accuracy_mean:.1f} ± {100 * r.balanced_accuracy_std:.1f}",
            f"{r.seconds_mean:.1f}",
            f"{r.trainable_params:,}",
            f"{r.images_per_s_mean:.1f}",
        )
        for r in table
    ]


TABLE_HEADER = ("strategy", "seeds", "accuracy %", "balanced acc. %", "wall s", "trainable params", "images/s")


def write_outputs(out: Path, runs: list[RunRow], table: list[StrategyRow], meta: dict[str, Any]) -> Path:
    """``summary.json``, ``summary.csv``, the bar chart and ``report.html`` in ``out``; returns the report path."""
    (out / "summary.json").write_text(
        json.dumps({**meta, "strategies": [asdict(r) for r in table], "runs": [asdict(r) for r in runs]}, indent=2)
    )
    with (out / "summary.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(list(asdict(runs[0])))
        writer.writerows(list(asdict(r).values()) for r in runs)
    chart = plot_comparison(table, out / FIGURES / "comparison.png")
    n_val = int(meta["n_val"])
    run_rows = [
        (r.strategy, r.seed, f"{r.accuracy:.4f}", f"{r.balanced_accuracy:.4f}", f"{r.seconds:.1f}",
         _report_link(out, Path(r.run_dir)))
        for r in runs
    ]  # fmt: skip
    sections = [
        Section(
            "Results",
            table=Table(TABLE_HEADER, table_rows(table), "comparison"),
            text=f"{n_val} validation images: one image moves accuracy by {100 / max(1, n_val):.2f} points. "
            "Std is the sample standard deviation over seeds.",
        ),
        Section("Accuracy by strategy", image=chart, alt="bar chart of accuracy and balanced accuracy per strategy"),
        Section("Runs", table=Table(RUNS_HEADER, run_rows, "runs")),
    ]
    title = f"headstart compare: {meta['backbone']} on {Path(str(meta['data'])).name}"
    subtitle = f"data {meta['data']} | split seed {meta['split_seed']} | {meta['started']}"
    report = out / "report.html"
    report.write_text(render_sections(title, subtitle, sections, FIGURES), encoding="utf-8")
    return report


RUNS_HEADER = ("strategy", "seed", "accuracy", "balanced accuracy", "wall time (s)", "report")


def compare_view(result: CompareResult) -> str:
    """The comparison as a notebook shows it: the tables of ``report.html`` and its chart inline."""
    from headstart.insight.notebook import fragment, png_uri

    runs = [(r.strategy, r.seed, f"{r.accuracy:.4f}", f"{r.balanced_accuracy:.4f}", f"{r.seconds:.1f}")
            for r in result.runs]  # fmt: skip
    sections = [
        Section("Results", table=Table(TABLE_HEADER, table_rows(result.table), "comparison"),
                text=f"{result.n_val} validation images: one image moves accuracy by "
                f"{100 / max(1, result.n_val):.2f} points."),
        Section("Runs", table=Table(RUNS_HEADER[:-1], runs, "runs")),
    ]  # fmt: skip
    chart = Section("Accuracy by strategy", png_uri(comparison_figure(result.table)), "accuracy per strategy")
    return fragment(f"headstart compare: {len(result.runs)} runs", f"{result.out} | report {result.report}",
                    sections, [chart])  # fmt: skip


def _report_link(out: Path, run_dir: Path) -> Link | str:
    target = run_dir / "report.html"
    if not target.is_file():
        return "(no report)"
    rel = target.relative_to(out).as_posix() if target.is_relative_to(out) else target.resolve().as_uri()
    return Link(rel, run_dir.name)


def compare(
    data: str | Path,
    backbone: str = DEFAULT_BACKBONE,
    strategies: tuple[str, ...] | list[str] = ("extract", "finetune", "scratch"),
    seeds: int = 3,
    out: str | Path | None = None,
    *,
    weights: str | None = None,
    epochs: dict[str, int] | None = None,
    cache_dir: str | Path | None = None,
    split_seed: int = 0,
    overwrite: bool = False,
    **train_overrides: Any,
) -> CompareResult:
    """Train each strategy with ``seeds`` seeds on the same split, and summarise accuracy, cost and size.

    Args:
        data: dataset folder or CSV manifest.
        backbone: registry name, shared by every strategy.
        strategies: any of ``extract``, ``finetune``, ``scratch``, in the order to run and show them.
        seeds: runs per strategy (seeds 0..seeds-1); the mean ± std tells a real gap from seed noise.
        out: comparison folder (default ``runs/compare-<time>``).
        weights: weights file for the pretrained strategies (never given to ``scratch``).
        epochs: per-strategy epochs, e.g. ``{"finetune": 3, "scratch": 10}``; strategy defaults otherwise.
        cache_dir: shared feature cache; by default each run gets a fresh one so wall times include feature work.
        split_seed: seed of the train/val split when the data has no val/ folder, the same for every run.
        overwrite: replace an existing comparison folder.
        **train_overrides: passed to every ``headstart.training.run.train`` call (``batch_size``, ``num_workers``, ...).

    Returns:
        The runs, the per-strategy table and the report path.
    """
    strategies = _check_options(strategies, seeds, train_overrides)
    if is_multilabel_manifest(data) or train_overrides.get("multi_label") or train_overrides.get("data.multi_label"):
        raise ConfigError(
            f"{data} is multi-label, and compare ranks strategies by accuracy, which label sets do not have; train "
            "each strategy with `headstart train DATA --strategy S` and compare the macro mAP that `headstart "
            "evaluate` reports"
        )
    root = Path(out) if out else Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    # Under torchrun every rank trains its share of each run; rank 0 alone keeps the books and writes.
    is_main = launch_rank() == 0
    if is_main and root.exists() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(f"comparison folder {root} already exists; pass --overwrite or choose another --out")
        shutil.rmtree(root)
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    runs: list[RunRow] = []
    n_val = 0
    for strategy in strategies:
        for seed in range(seeds):
            run_dir = root / f"{strategy}-seed{seed}"
            progress.log(f"[bold]compare: {strategy}, seed {seed} -> {run_dir}")
            result = _train_one(
                data, run_dir, strategy, seed, cache_dir, backbone=backbone,
                weights=weights if strategy in PRETRAINED else None, epochs=(epochs or {}).get(strategy),
                split_seed=split_seed, **train_overrides,
            )  # fmt: skip
            if not is_main:
                continue
            n_val = int(result.metrics.get("n", n_val))
            runs.append(_run_row(strategy, seed, run_dir, result))
    table = summarise(runs, strategies)
    if not is_main:
        return CompareResult(root, runs, table, root / "report.html", n_val)
    meta = {
        "data": str(data),
        "backbone": backbone,
        "split_seed": split_seed,
        "seeds": seeds,
        "epochs": epochs or {},
        "n_val": n_val,
        "started": started,
    }
    report = write_outputs(root, runs, table, meta)
    return CompareResult(root, runs, table, report, n_val)


def _check_options(
    strategies: tuple[str, ...] | list[str], seeds: int, train_overrides: dict[str, Any]
) -> tuple[str, ...]:
    """The strategies as a tuple, once the options of :func:`compare` are known to make sense."""
    strategies = tuple(strategies)
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies:
        raise ValueError(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    for key in ("strategy", "seed", "out", "split_seed"):
        if key in train_overrides:
            raise TypeError(f"compare sets {key!r} itself for every run; remove it from the options")
    return strategies


def _train_one(
    data: str | Path, run_dir: Path, strategy: str, seed: int, cache_dir: str | Path | None, **options: Any
) -> TrainResult:
    """One ``train`` run of the comparison; without a shared ``cache_dir`` it gets a fresh cache, deleted after."""
    from headstart.training.run import train

    private = None if cache_dir else tempfile.mkdtemp(prefix="headstart-compare-cache-")
    try:
        return train(
            data, strategy=strategy, seed=seed, out=str(run_dir), cache_dir=str(cache_dir or private), **options
        )
    finally:
        if private:
            shutil.rmtree(private, ignore_errors=True)


def _run_row(strategy: str, seed: int, run_dir: Path, result: TrainResult) -> RunRow:
    """The comparison's row for a finished run, after writing its report if ``train`` did not."""
    from headstart.insight.report import build_report

    if not (run_dir / "report.html").is_file():  # train() may already have written it
        build_report(run_dir)
    info = read_model_info(run_dir)
    return RunRow(
        strategy=strategy,
        seed=seed,
        run_dir=str(run_dir),
        accuracy=float(result.metrics["accuracy"]),
        balanced_accuracy=float(result.metrics["balanced_accuracy"]),
        seconds=round(result.seconds, 2),
        trainable_params=trainable_parameters(run_dir),
        images_per_s=round(images_per_second(read_history(run_dir), info, result.seconds), 2),
    )


# The demo's epochs: scratch gets three times finetune's, so the control is not starved, and three seeds of all
# three strategies finish in about ten minutes on 2 CPU cores.
DEMO_EPOCHS = {"finetune": 3, "scratch": 10}


def demo(out: str | Path = "runs/demo", seeds: int = 3) -> CompareResult:
    """The ants-vs-bees demo: find (or download) the data, compare the three strategies, print the table."""
    from rich.console import Console
    from rich.table import Table

    from headstart.data.demo import hymenoptera

    data = hymenoptera()
    progress.log(f"demo data: {data}")
    result = compare(data, seeds=seeds, out=out, epochs=DEMO_EPOCHS, overwrite=True)
    if launch_rank() != 0:
        return result
    table = Table(*TABLE_HEADER, title=f"ants vs bees, {result.n_val} validation images")
    for row in table_rows(result.table):
        table.add_row(*row)
    Console().print(table)
    print(f"report: {result.report}")
    return result
