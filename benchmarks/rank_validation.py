"""Is `headstart rank` right? Rank the candidates on frozen training features, then train each one for real and
report the Spearman correlation between predicted and achieved validation accuracy, per dataset and strategy.

Datasets (both available offline):

* ``ants_bees``: the hymenoptera set beside the checkout (244 train / 153 val photos, 2 classes);
* ``digits``: scikit-learn's bundled handwritten digits (UCI optdigits test set, 1,797 8x8 grayscale scans, 10
  classes), written as upscaled PNGs, ``--per-class`` train and half as many val images per class. A far-from-ImageNet
  domain, which is exactly where backbone choice is hard to guess.

Expected runtime on a 2-core CPU with the three bundled efficientnet-lite backbones: ranking ~1 min per dataset
(embedding once, cached after), extract training seconds per backbone (cached features), finetune ~2-4 min per
backbone and epoch on ants/bees, so about 25-35 minutes with ``--epochs 2``. On one GPU it is a few minutes.

    python benchmarks/rank_validation.py                       # both datasets, extract + finetune
    python benchmarks/rank_validation.py --datasets digits --strategies extract --per-class 20   # quick look
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.stats import spearmanr

import headstart
from headstart.insight.rank import offline_candidates, rank

HYMENOPTERA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hymenoptera_data"


def digits_folder(root: Path, per_class: int, seed: int = 0) -> Path:
    """Write scikit-learn's digits as ``root/{train,val}/<digit>/*.png`` (64x64, nearest-neighbour upscale)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    rng = np.random.default_rng(seed)
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(bunch.target == digit))
        n_val = max(2, per_class // 2)
        for split, chosen in (("train", idx[:per_class]), ("val", idx[per_class : per_class + n_val])):
            folder = root / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                pixels = (bunch.images[i] / 16.0 * 255).astype(np.uint8)
                Image.fromarray(pixels, "L").resize((64, 64), Image.Resampling.NEAREST).save(folder / f"{i}.png")
    return root


def validate(name: str, data: Path, backbones: list[str], strategies: list[str], epochs: int, work: Path,
             cache: Path) -> dict[str, object]:  # fmt: skip
    """Rank, train every candidate with every strategy, and correlate."""
    start = time.perf_counter()
    rows = rank(data, backbones, cache_dir=cache)
    print(f"\n== {name}: ranking in {time.perf_counter() - start:.1f} s")
    for r in rows:
        print(f"  {r.backbone:22s} CV {r.cv_accuracy:.4f}  kNN {r.knn_accuracy:.4f}  LogME {r.logme:.4f}")
    report: dict[str, object] = {"ranking": [r.__dict__ for r in rows]}
    for strategy in strategies:
        achieved = {}
        for r in rows:
            t = time.perf_counter()
            result = headstart.train(
                str(data), strategy=strategy, backbone=r.backbone, epochs=epochs if strategy == "finetune" else None,
                out=str(work / f"{name}-{strategy}-{r.backbone}"), overwrite=True, cache_dir=str(cache), seed=0,
            )  # fmt: skip
            achieved[r.backbone] = float(result.metrics["accuracy"])
            print(f"  {strategy:8s} {r.backbone:22s} val accuracy {achieved[r.backbone]:.4f} "
                  f"({time.perf_counter() - t:.0f} s)")  # fmt: skip
        truth = [achieved[r.backbone] for r in rows]
        line = {}
        for score in ("cv_accuracy", "knn_accuracy", "logme"):
            rho = spearmanr([getattr(r, score) for r in rows], truth).statistic
            line[score] = None if np.isnan(rho) else float(rho)
        print(f"  Spearman(predicted, achieved {strategy}): " + ", ".join(f"{k} {v}" for k, v in line.items()))
        report[strategy] = {"achieved": achieved, "spearman": line}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="ants_bees,digits")
    parser.add_argument("--backbones", help="comma-separated (default: every backbone with offline weights)")
    parser.add_argument("--strategies", default="extract,finetune")
    parser.add_argument("--epochs", type=int, default=2, help="finetune epochs (short on purpose)")
    parser.add_argument("--per-class", type=int, default=60, help="digits training images per class")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    backbones = args.backbones.split(",") if args.backbones else offline_candidates()
    if len(backbones) < 3:
        print(f"note: only {len(backbones)} candidates; a rank correlation of so few is coarse")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.datasets.split(","):
            if name == "ants_bees":
                data = HYMENOPTERA
            elif name == "digits":
                data = digits_folder(work / "digits", args.per_class)
            else:
                raise SystemExit(f"unknown dataset {name!r}; choose ants_bees or digits")
            results[name] = validate(name, data, backbones, args.strategies.split(","), args.epochs, work / "runs",
                                     work / "cache")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
