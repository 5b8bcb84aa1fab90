"""Time and peak memory of the default recipe's head fit as the training set grows to 100,000 images.

The embedding of a large set streams (flat images/s and memory: ``benchmarks/embed_memory.py``); what grows with the
number of images N beyond it is the logistic head: its cross-validation (capped at ``heads.CV_MAX_IMAGES`` images)
and the final L-BFGS fit on every row, with a float64 standardised copy of the [N, D] features. This script fits the
head exactly as ``headstart train`` does for the default strategy (``fit_logistic(..., scaling="auto")``: C and the
feature scaling chosen by 5-fold CV, then the final fit) on synthetic features of the default ensemble's width
(3,840 = three EfficientNet-Lite backbones), and reports wall time, peak resident memory of the process, and the
accuracy on held-out synthetic rows (a check that the fit converged to something useful, not a claim about images).

The features imitate pooled CNN features: non-negative, each class a sparse positive pattern over a shared base,
with per-image noise as large as the class signal, so the problem is neither trivially separable nor hopeless.

    python benchmarks/head_scale.py                       # 10,000 and 100,000 rows, 100 classes
    python benchmarks/head_scale.py --rows 2000,20000 --classes 10

Each size runs in a fresh process (so peak memory is that size's alone). Results: ``--out`` JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WIDTH = 3840  # the default ensemble's feature width (efficientnet_lite0+lite1+lite2, 1,280 each)


def synthetic(n: int, classes: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` non-negative feature rows and their labels (classes as balanced as ``n`` allows)."""
    rng = np.random.default_rng(seed)
    base = rng.gamma(2.0, 0.15, width).astype(np.float32)
    patterns = (rng.random((classes, width)) < 0.01) * rng.gamma(2.0, 0.25, (classes, width))
    labels = np.arange(n) % classes
    rng.shuffle(labels)
    out = np.empty((n, width), dtype=np.float32)
    for start in range(0, n, 10_000):  # in blocks: the float64 temporaries stay small
        y = labels[start : start + 10_000]
        noise = rng.standard_normal((len(y), width)).astype(np.float32) * 0.7
        out[start : start + len(y)] = np.maximum(base + patterns[y] + noise, 0.0)
    return out, labels


def one(rows: int, classes: int, seed: int) -> dict[str, float | int | str]:
    """Fit the default head on ``rows`` synthetic rows; wall seconds, peak RSS and held-out accuracy."""
    from headstart.models.heads import CV_MAX_IMAGES, fit_logistic, predict_proba

    x, y = synthetic(rows + 5_000, classes, WIDTH, seed)
    x_test, y_test = x[rows:], y[rows:]
    x, y = x[:rows], y[:rows]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tic = time.perf_counter()
    head, info = fit_logistic(x, y, classes, seed=seed, scaling="auto")
    seconds = time.perf_counter() - tic
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    accuracy = float((predict_proba(head, x_test).argmax(1) == y_test).mean())
    return {
        "rows": rows, "classes": classes, "width": WIDTH, "cv_max_images": CV_MAX_IMAGES,
        "fit_seconds": round(seconds, 1), "peak_rss_mib": round(peak),
        "rss_before_fit_mib": round(before), "features_mib": round(x.nbytes / 2**20),
        "C": float(info["C"]), "scaling": str(info["scaling"]), "cv_accuracy": float(info.get("cv_accuracy", 0.0)),
        "heldout_accuracy": round(accuracy, 4),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="10000,100000", help="comma-separated training-set sizes")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "head_scale_cpu.json")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one size, in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.classes, args.seed)))
        return
    results = []
    for rows in (int(r) for r in args.rows.split(",")):
        command = [sys.executable, __file__, "--one", str(rows), "--classes", str(args.classes)]
        command += ["--seed", str(args.seed)]
        line = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results.append({**json.loads(line), "load_average": os.getloadavg()[0]})
        r = results[-1]
        print(f"{r['rows']:>7} rows x {r['width']} x {r['classes']} classes: fit {r['fit_seconds']:7.1f} s, "
              f"peak RSS {r['peak_rss_mib']:6} MiB (features {r['features_mib']} MiB), C={r['C']} {r['scaling']}, "
              f"held-out acc {r['heldout_accuracy']:.3f}, load {r['load_average']:.1f}", flush=True)  # fmt: skip
    args.out.write_text(json.dumps({"machine": os.uname().machine, "cores": os.cpu_count(), "results": results},
                                   indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
