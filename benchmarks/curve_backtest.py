"""Backtest of ``headstart curve``: does the learning curve predict what more labels buy?

For each set (``<data-root>/dev_suite/<set>`` and ``<data-root>/hymenoptera_data``) the curve is fitted exactly as
``headstart curve`` fits it (the default ``auto`` head, cross-validated at every point; the same nested stratified
fractions, seeds and bootstrap), but on fractions of only the first half of each class's shuffled training images;
it then projects the accuracy at twice that size, the full training split. The truth is the validation accuracy of
the head ``train`` fits on the full split (seed 0). Reported per set: the projection, its interval, the truth, the
error in points and whether the truth fell inside the interval; over the sets, the mean absolute error and coverage
(targets: <= 2 points, >= 80%).

Features come from the shared feature cache (the first run extracts them).

    python benchmarks/curve_backtest.py
    python benchmarks/curve_backtest.py --sets hymenoptera,beans

Results go to ``--out`` (default ``benchmarks/results/curve_backtest_cpu.json``), rewritten after each set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from headstart.config import TrainConfig
from headstart.data.scan import load_dataset
from headstart.files import default_cache_root
from headstart.training.curve import FRACTIONS, curve_from_features, default_head
from headstart.training.run import build_config, frozen_features, resolve_config

REPO_ROOT = Path(__file__).resolve().parent.parent
SETS = ("hymenoptera", "beans", "brain_tumor_mri", "dtd10", "eurosat", "food101_10")


def set_path(root: Path, name: str) -> Path:
    """Folder of a set under the data root."""
    return root / "hymenoptera_data" if name == "hymenoptera" else root / "dev_suite" / name


def set_features(path: Path) -> tuple[TrainConfig, Any, tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(config, dataset, (train features, labels), (val features, labels)) of the default recipe, via the feature
    cache; the path ``train`` itself takes."""
    config = resolve_config(build_config(path))
    dataset = load_dataset(path, config.data.val_fraction, config.data.split_seed, default_cache_root())
    (x, y, _), val, _ = frozen_features(config, dataset)
    return config, dataset, (x, y), val


def half_split(y: np.ndarray, seed: int) -> np.ndarray:
    """Rows of the first half of each class, in a seeded shuffle: the 'labelled so far' of the backtest."""
    rng = np.random.default_rng(seed)
    rows = [rng.permutation(np.flatnonzero(y == k))[: int(np.ceil((y == k).sum() / 2))] for k in np.unique(y)]
    return np.sort(np.concatenate(rows))


def backtest(path: Path, seeds: int) -> dict[str, Any]:
    """One set: the curve on half the training split, projected to the full split, against the truth."""
    config, dataset, (x, y), (vx, vy) = set_features(path)
    head = default_head(config)
    tic = time.perf_counter()
    truth = float((head(x, y, len(dataset.classes), config.run.seed)(vx).argmax(1) == vy).mean())
    half = half_split(y, 1234)
    result = curve_from_features(x[half], y[half], vx, vy, dataset.classes, head=head, fractions=FRACTIONS,
                                 seeds=seeds, targets=(len(y) / len(half),), seed=config.run.seed)  # fmt: skip
    p = result.projections[0]
    return {
        "classes": len(dataset.classes), "n_train": len(y), "n_half": len(half), "n_val": len(vy),
        "sizes": result.sizes, "accuracy_at_half": result.accuracy_now, "projected": p.accuracy, "low": p.low,
        "high": p.high, "truth": truth, "error_points": 100 * (p.accuracy - truth),
        "inside": bool(p.low <= truth <= p.high), "fit": vars(result.fit), "points": result.accuracy,
        "projected_by_the_fit_alone": float(1.0 - result.fit.error(len(y))),
        "seconds": round(time.perf_counter() - tic, 1),
    }  # fmt: skip


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_average_at_start": os.getloadavg()}  # fmt: skip


def summary(sets: dict[str, Any]) -> dict[str, float]:
    """Mean absolute error (points) and coverage over the sets."""
    errors = [abs(r["error_points"]) for r in sets.values()]
    return {"mae_points": float(np.mean(errors)), "coverage": float(np.mean([r["inside"] for r in sets.values()])),
            "mean_gain_predicted_points": float(np.mean([100 * (r["projected"] - r["accuracy_at_half"])
                                                        for r in sets.values()])),
            "mean_gain_true_points": float(np.mean([100 * (r["truth"] - r["accuracy_at_half"])
                                                   for r in sets.values()]))}  # fmt: skip


def table(results: dict[str, Any]) -> str:
    """Markdown table of the backtest."""
    lines = ["| set | train (half -> full) | acc. at half | projected at full (80% interval) | truth | error | inside "
             "|", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in results["sets"].items():
        lines.append(f"| {name} | {r['n_half']} -> {r['n_train']} | {r['accuracy_at_half']:.3f} | {r['projected']:.3f} "
                     f"({r['low']:.3f}-{r['high']:.3f}) | {r['truth']:.3f} | {r['error_points']:+.1f} | "
                     f"{'yes' if r['inside'] else 'no'} |")  # fmt: skip
    s = results["summary"]
    lines.append(f"| **mean** | | | | | MAE {s['mae_points']:.1f} | {100 * s['coverage']:.0f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=REPO_ROOT.parent / "shared" / "datasets")
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "curve_backtest_cpu.json")
    args = parser.parse_args()
    results: dict[str, Any] = {"machine": machine(), "seeds": args.seeds, "sets": {}}
    for name in args.sets.split(","):
        results["sets"][name] = backtest(set_path(args.data_root, name), args.seeds)
        r = results["sets"][name]
        print(f"{name}: projected {r['projected']:.3f} ({r['low']:.3f}-{r['high']:.3f}), truth {r['truth']:.3f}, "
              f"error {r['error_points']:+.1f} points, {r['seconds']} s", flush=True)  # fmt: skip
        results["summary"] = summary(results["sets"])
        results["load_average_at_end"] = os.getloadavg()
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
