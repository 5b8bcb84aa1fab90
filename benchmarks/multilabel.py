"""Multi-label classification on composites of real ants/bees photos: headstart against a hand-written baseline.

The set is made in a temporary folder from ``hymenoptera_data`` (never copied into the repository): square canvases of
two halves, an ant photo beside a bee photo (``ants|bees``, sides at random), or one photo beside a heavily blurred
photo of either kind (``ants`` or ``bees``), so the layout never tells which insect is there. Train rows use the
set's train photos, val rows its val photos.

For each strategy, ``headstart train DATA.csv --strategy S`` runs as a fresh process with an empty feature cache
(cold: its wall time includes the process start and every feature), then ``headstart evaluate RUN DATA.csv --json``.
The baseline, in the same process and on the very same features (the extract run's cached backbone features,
through ``Model.embed``): scikit-learn's ``OneVsRestClassifier(LogisticRegression(C=1))`` on the raw features, each
label predicted at probability 0.5, which is what a hand-written probe does. Both are scored by the same metric code
(and macro mAP is checked against scikit-learn's ``average_precision_score``).

    python benchmarks/multilabel.py [--data DIR] [--strategies extract,auto] [--train-per-group 60]

Results (per strategy: macro mAP, exact match, macro F1, per-label F1 and thresholds, wall times; the baseline and
the gaps; the machine with its load average before and after) go to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from suite import machine  # benchmarks/suite.py, beside this script

REPO_ROOT = Path(__file__).resolve().parent.parent
GROUPS = ("ants", "bees", "ants|bees")


def composites(source: Path, out: Path, per_group: dict[str, int], seed: int = 0) -> Path:
    """Write the composite set into ``out``; returns its manifest ``out/data.csv`` (path,labels,split)."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    rows = [["path", "labels", "split"]]
    for split, count in per_group.items():
        photos = {k: sorted((source / split / k).glob("*.jpg")) for k in ("ants", "bees")}
        photos = {k: [v[i] for i in rng.permutation(len(v))] for k, v in photos.items()}
        turn = dict.fromkeys(photos, 0)

        def take(kind: str, photos: dict[str, list[Path]] = photos, turn: dict[str, int] = turn) -> Image.Image:
            path = photos[kind][turn[kind] % len(photos[kind])]
            turn[kind] += 1
            return Image.open(path).convert("RGB").resize((224, 224))

        for group in GROUPS:
            for i in range(count):
                if group == "ants|bees":
                    halves = [take("ants"), take("bees")]
                else:
                    other = take(str(rng.choice(["ants", "bees"]))).filter(ImageFilter.GaussianBlur(24))
                    halves = [take(group), other]
                if rng.random() < 0.5:
                    halves.reverse()
                canvas = Image.new("RGB", (448, 448), (128, 128, 128))
                canvas.paste(halves[0], (0, 112))
                canvas.paste(halves[1], (224, 112))
                name = f"{split}_{group.replace('|', '_')}_{i:03d}.jpg"
                canvas.save(out / name, quality=90)
                rows.append([name, group, split])
    with (out / "data.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return out / "data.csv"


def cli(*args: str, env: dict[str, str]) -> float:
    """Run ``headstart ARGS`` as a fresh process; returns its wall time."""
    tic = time.perf_counter()
    subprocess.run([sys.executable, "-m", "headstart", *args], check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - tic


def summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The figures kept per model."""
    return {
        "n": metrics["n"],
        "mAP": metrics["mAP"],
        "exact_match": metrics["exact_match"],
        "macro_f1": metrics["macro_f1"],
        "hamming_loss": metrics["hamming_loss"],
        "per_label": {
            k: {"ap": v["ap"], "f1": v["f1"], "threshold": v["threshold"]} for k, v in metrics["per_class"].items()
        },
    }


def baseline(run: Path, data: Path) -> dict[str, Any]:
    """One-vs-rest scikit-learn logistic regression (C=1) on the extract run's own features, thresholds 0.5."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score
    from sklearn.multiclass import OneVsRestClassifier

    import headstart
    from headstart.data.scan import load_dataset
    from headstart.insight.metrics import multilabel_metrics

    model = headstart.load(run)
    dataset = load_dataset(data)
    x_train = model.embed([r.path for r in dataset.train])
    x_val = model.embed([r.path for r in dataset.val])
    tic = time.perf_counter()
    probe = OneVsRestClassifier(LogisticRegression(C=1.0, max_iter=5000)).fit(x_train, dataset.targets(dataset.train))
    seconds = time.perf_counter() - tic
    probs = probe.predict_proba(x_val)
    targets = dataset.targets(dataset.val)
    metrics = multilabel_metrics(targets, probs, dataset.classes, [0.5] * len(dataset.classes))
    assert abs(metrics["mAP"] - average_precision_score(targets, probs, average="macro")) < 1e-9
    return {**summary(metrics), "fit_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "datasets" / "hymenoptera_data")
    parser.add_argument("--strategies", default="extract,auto")
    parser.add_argument("--train-per-group", type=int, default=60, help="composites per label set in train")
    parser.add_argument("--val-per-group", type=int, default=40, help="composites per label set in val")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "multilabel_cpu.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    results: dict[str, Any] = {"strategies": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = composites(args.data, work / "data", {"train": args.train_per_group, "val": args.val_per_group})
        for strategy in args.strategies.split(","):
            env = {**os.environ, "HEADSTART_CACHE": str(work / f"cache-{strategy}"), "HEADSTART_QUIET": "1"}
            run = work / f"run-{strategy}"
            train_s = cli("train", str(data), "--strategy", strategy, "--out", str(run), "--no-report", env=env)
            evaluate_s = cli("evaluate", str(run), str(data), "--json", str(work / f"{strategy}.json"), env=env)
            metrics = json.loads((work / f"{strategy}.json").read_text())
            recipe = json.loads((run / "model.json").read_text())["recipe"]
            row = {**summary(metrics), "train_seconds_cold": train_s, "evaluate_seconds": evaluate_s, "recipe": recipe}
            results["strategies"][strategy] = row
            print(f"{strategy}: mAP {row['mAP']:.4f}, exact match {row['exact_match']:.4f}, macro F1 "
                  f"{row['macro_f1']:.4f}; train {train_s:.1f} s, evaluate {evaluate_s:.1f} s")  # fmt: skip
            if strategy == "extract":
                os.environ["HEADSTART_CACHE"] = env["HEADSTART_CACHE"]  # the baseline reads the same cached features
                results["baseline"] = baseline(run, data)
        base = results.get("baseline")
        if base:
            print(f"baseline (sklearn one-vs-rest, C=1, threshold 0.5, extract's features): mAP {base['mAP']:.4f}, "
                  f"exact match {base['exact_match']:.4f}, macro F1 {base['macro_f1']:.4f}")  # fmt: skip
            for row in results["strategies"].values():
                row["vs_baseline"] = {key: row[key] - base[key] for key in ("mAP", "exact_match", "macro_f1")}
        results["data"] = {"train_per_group": args.train_per_group, "val_per_group": args.val_per_group,
                           "groups": list(GROUPS), "source": str(args.data)}  # fmt: skip
    results["machine"] = {**machine("cpu"), "cpu_cores": os.cpu_count(),
                          "load_average_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
