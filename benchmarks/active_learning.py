"""Simulation of ``headstart suggest`` against random choice, and of self-training on unlabelled images.

For each set (``<data-root>/dev_suite/<set>`` and ``<data-root>/hymenoptera_data``) the training split becomes the
unlabelled pool (its labels hidden) and the validation split measures accuracy. Each seed starts from 5 labelled
images per class, then adds ``--per-class`` x classes images per round, for ``--rounds`` rounds, chosen by:

* ``random``: uniformly from the pool;
* ``suggest``: :func:`headstart.insight.suggest.rank_typical`, the ranking ``headstart suggest`` uses by default
  (typical images of uncovered, uncertain groups), from the current head's probabilities and the frozen features;
* ``mix``: :func:`headstart.insight.suggest.rank_pool` (``--method mix``: margin uncertainty and k-center novelty,
  ``diversity`` 0.5), the default before; ``margin`` (diversity 0) and ``kcenter`` (diversity 1): the mix's two
  ends, as an ablation.

After each round the head is refitted on the labelled images and scored on val. The head is the default recipe's
logistic head on the default features, but with its C and feature scaling chosen once per seed, by the default
cross-validation on the 5-per-class start, and then fixed: cross-validating every round of every arm would take
the 2 shared cores hours. (``headstart suggest`` itself ranks with the real trained model.)

The ``self-training`` arm measures ``train --unlabelled``'s candidate: at each round of ``random``, the head labels
the rest of the pool, the images it gives a probability >= ``CONFIDENT`` join the training rows with those
pseudo-labels, and the head is refitted; its gain over ``random`` at the same labels is what the unlabelled images
would add.

Reported: accuracy per round (mean over seeds) of each arm, and the labels ``suggest`` needs to reach ``random``'s
final accuracy (linear interpolation between rounds), as a share of ``random``'s labels (target: <= 70% on average).

    python benchmarks/active_learning.py
    python benchmarks/active_learning.py --sets hymenoptera,beans --seeds 2

Results go to ``--out`` (default ``benchmarks/results/active_learning_cpu.json``), rewritten after each set; with
``--figure`` a PNG of the curves.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# The script's own folder is first on sys.path when it runs: the backtest's loaders are shared.
from curve_backtest import SETS, machine, set_features, set_path
from headstart.insight.suggest import rank_pool, rank_typical
from headstart.models.heads import fit_logistic, predict_proba

REPO_ROOT = Path(__file__).resolve().parent.parent
START = 5  # labelled images per class at the start
CONFIDENT = 0.9  # pseudo-label threshold of the self-training arm
ARMS: dict[str, float | None] = {"suggest": None, "mix": 0.5, "margin": 0.0, "kcenter": 1.0}  # mix diversity


def fixed_head(x: np.ndarray, y: np.ndarray, k: int, seed: int) -> Callable[..., Callable[[np.ndarray], np.ndarray]]:
    """The default head's C and scaling, chosen by CV on (x, y), then a fitter that reuses them."""
    _, info = fit_logistic(x, y, k, seed=seed, scaling="auto")
    c, scaling = float(info["C"]), str(info["scaling"])

    def fit(xs: np.ndarray, ys: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        head, _ = fit_logistic(xs, ys, k, c=c, seed=seed, scaling=scaling)
        return lambda f: predict_proba(head, f)

    return fit


def simulate(path: Path, seeds: int, rounds: int, per_class: int, first_seed: int = 0) -> dict[str, Any]:
    """Every arm on one set: accuracy after each round, per seed."""
    _, dataset, (x, y), (vx, vy) = set_features(path)
    k = len(dataset.classes)
    step = per_class * k
    tic = time.perf_counter()
    curves: dict[str, list[list[float]]] = {a: [] for a in ("random", *ARMS, "self-training")}
    for seed in range(first_seed, first_seed + seeds):
        rng = np.random.default_rng(seed)
        start = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:START] for c in range(k)])
        fit = fixed_head(x[start], y[start], k, seed)

        def score(rows: np.ndarray) -> tuple[float, Callable[[np.ndarray], np.ndarray]]:
            proba = fit(x[rows], y[rows])  # noqa: B023 (each seed's own head)
            return float((proba(vx).argmax(1) == vy).mean()), proba

        # random: one shuffled order of the rest of the pool, taken round by round
        order = np.concatenate([start, rng.permutation(np.setdiff1d(np.arange(len(y)), start))])
        accs, self_accs = [], []
        for r in range(rounds + 1):
            rows = order[: len(start) + r * step]
            acc, proba = score(rows)
            accs.append(acc)
            rest = np.setdiff1d(np.arange(len(y)), rows)
            p = proba(x[rest])
            confident = rest[p.max(1) >= CONFIDENT]
            pseudo = np.concatenate([y[rows], p.argmax(1)[p.max(1) >= CONFIDENT]])
            head = fit(np.concatenate([x[rows], x[confident]]), pseudo)
            self_accs.append(float((head(vx).argmax(1) == vy).mean()))
        curves["random"].append(accs)
        curves["self-training"].append(self_accs)
        for arm, diversity in ARMS.items():
            rows = start.copy()
            accs = []
            for r in range(rounds + 1):
                acc, proba = score(rows)
                accs.append(acc)
                if r == rounds:
                    break
                rest = np.setdiff1d(np.arange(len(y)), rows)
                if diversity is None:
                    picked = rank_typical(proba(x[rest]), x[rest], x[rows], step).order
                else:
                    picked = rank_pool(proba(x[rest]), x[rest], x[rows], step, diversity).order
                rows = np.concatenate([rows, rest[picked]])
            curves[arm].append(accs)
    labels = [k * START + r * step for r in range(rounds + 1)]
    mean = {a: np.mean(v, axis=0).tolist() for a, v in curves.items()}
    return {"classes": k, "pool": len(y), "n_val": len(vy), "labels": labels, "per_seed": curves, "mean": mean,
            "share_to_match_random": {a: share(labels, mean[a], mean["random"][-1]) for a in ARMS},
            "self_training_gain_points": float(100 * np.mean(np.array(mean["self-training"]) - mean["random"])),
            "seconds": round(time.perf_counter() - tic, 1)}  # fmt: skip


def share(labels: list[int], curve: list[float], target: float) -> dict[str, Any]:
    """The labels at which ``curve`` first reaches ``target`` (linear between rounds), as a share of the last."""
    for i, acc in enumerate(curve):
        if acc >= target:
            if i == 0:
                needed = float(labels[0])
            else:
                t = (target - curve[i - 1]) / max(acc - curve[i - 1], 1e-12)
                needed = labels[i - 1] + t * (labels[i] - labels[i - 1])
            return {"labels": needed, "share": needed / labels[-1], "reached": True}
    return {"labels": None, "share": 1.0, "reached": False}


def summary(sets: dict[str, Any]) -> dict[str, Any]:
    """Over the sets: the mean share of random's labels each arm needs, and self-training's mean gain."""
    return {
        **{f"mean_share_{a}": float(np.mean([s["share_to_match_random"][a]["share"] for s in sets.values()]))
           for a in ARMS},
        "not_reached": {a: [n for n, s in sets.items() if not s["share_to_match_random"][a]["reached"]] for a in ARMS},
        "mean_self_training_gain_points": float(np.mean([s["self_training_gain_points"] for s in sets.values()])),
    }  # fmt: skip


def figure(results: dict[str, Any], path: Path) -> None:
    """One panel per set: accuracy against labels, each arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = results["sets"]
    fig, axes = plt.subplots(1, len(sets), figsize=(3.2 * len(sets), 3.0), squeeze=False)
    for ax, (name, s) in zip(axes[0], sets.items(), strict=True):
        for arm, style in (("random", "k--"), ("suggest", "C0-"), ("mix", "C4:"), ("margin", "C1:"), ("kcenter", "C2:"),
                           ("self-training", "C3-.")):  # fmt: skip
            ax.plot(s["labels"], s["mean"][arm], style, label=arm, lw=1.5 if arm in ("random", "suggest") else 1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("labelled images", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("val accuracy", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80, facecolor="white")
    plt.close(fig)


def table(results: dict[str, Any]) -> str:
    """Markdown table: accuracy at the start and at the end, labels to match random."""
    lines = [
        "| set | labels (start -> end) | random start -> end | suggest end | suggest: share of random's labels "
        "to match it | mix | margin | k-center | self-training gain (points) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in results["sets"].items():
        m, sh = s["mean"], s["share_to_match_random"]

        def cell(a: str, sh: dict[str, Any] = sh) -> str:
            return f"{100 * sh[a]['share']:.0f}%" if sh[a]["reached"] else "not reached"

        lines.append(f"| {name} | {s['labels'][0]} -> {s['labels'][-1]} | {m['random'][0]:.3f} -> {m['random'][-1]:.3f}"
                     f" | {m['suggest'][-1]:.3f} | {cell('suggest')} | {cell('mix')} | {cell('margin')} | "
                     f"{cell('kcenter')} | "
                     f"{s['self_training_gain_points']:+.1f} |")  # fmt: skip
    s = results["summary"]
    lines.append(f"| **mean** | | | | {100 * s['mean_share_suggest']:.0f}% | {100 * s['mean_share_mix']:.0f}% | "
                 f"{100 * s['mean_share_margin']:.0f}% | "
                 f"{100 * s['mean_share_kcenter']:.0f}% | {s['mean_self_training_gain_points']:+.1f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=REPO_ROOT.parent / "shared" / "datasets")
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed ... first-seed + seeds - 1")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--per-class", type=int, default=2, help="images added per round, per class of the set")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "active_learning_cpu.json")
    parser.add_argument("--figure", type=Path, help="PNG of the curves")
    args = parser.parse_args()
    results: dict[str, Any] = {"machine": machine(), "seeds": args.seeds, "first_seed": args.first_seed,
                               "rounds": args.rounds,
                               "per_class": args.per_class, "start_per_class": START, "sets": {}}  # fmt: skip
    for name in args.sets.split(","):
        s = simulate(set_path(args.data_root, name), args.seeds, args.rounds, args.per_class, args.first_seed)
        results["sets"][name] = s
        print(f"{name}: random {s['mean']['random'][-1]:.3f}, suggest {s['mean']['suggest'][-1]:.3f}, share "
              f"{s['share_to_match_random']['suggest']}, self-training {s['self_training_gain_points']:+.2f} points, "
              f"{s['seconds']} s", flush=True)  # fmt: skip
        results["summary"] = summary(results["sets"])
        results["load_average_at_end"] = os.getloadavg()
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    if args.figure:
        figure(results, args.figure)
    print(table(results))


if __name__ == "__main__":
    main()
