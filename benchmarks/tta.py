"""Accuracy and time of test-time augmentation (``--tta none|flip|crops``) on ants/bees and the development suite.

For each set (``<data-root>/dev_suite/<set>`` and ``<data-root>/hymenoptera_data``, each with ``train/`` and ``val/``)
the default extract model is trained once (``strategy="extract"``, no report), then val is evaluated three times:
without TTA, with ``flip`` and with ``crops``. Each evaluation starts from its own empty feature cache, with the
network already built, so its seconds are the features' real cost; the ratio is against ``none`` in the same process.

    python benchmarks/tta.py                                      # every set
    python benchmarks/tta.py --sets hymenoptera,beans,eurosat     # a shorter run
    python benchmarks/tta.py --train-crops                        # crops as the head's training features

``--train-crops`` measures the extract option ``--crops`` instead: per set, the default extract model (centre
features) and the same recipe trained on features averaged over the five crops, each trained from its own empty
feature cache (time ratio = crops training / plain training, in the same process), then val evaluated three ways:
the plain model without TTA, the plain model with ``--tta crops``, and the crops model (which predicts with crops).
Results go to ``benchmarks/results/tta_train_crops_cpu.json`` unless ``--out`` says otherwise.

Results (per set: accuracy per mode, seconds, ratio; the machine) go to ``--out``, rewritten after each set and
merged with the sets already there, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import headstart
from headstart.data.scan import load_dataset

REPO_ROOT = Path(__file__).resolve().parent.parent
SETS = ("hymenoptera", "beans", "brain_tumor_mri", "dtd10", "eurosat", "food101_10")
MODES = ("none", "flip", "crops")


def set_path(root: Path, name: str) -> Path:
    """Folder of a set under the data root."""
    return root / "hymenoptera_data" if name == "hymenoptera" else root / "dev_suite" / name


def measure(data: Path, work: Path, seed: int) -> dict[str, Any]:
    """Train the default extract model on ``data`` once and evaluate val with every TTA mode."""
    os.environ["HEADSTART_CACHE"] = str(work / "train-cache")
    result = headstart.train(data, strategy="extract", out=str(work / "run"), seed=seed,
                             **{"run.report": False, "run.audit": False})  # fmt: skip
    model = headstart.load(work / "run")
    dataset = load_dataset(data, 0.2, 0, work / "scan")
    model.classifier  # noqa: B018 - build the network now, so no mode pays for importing timm
    row: dict[str, Any] = {"backbone": result.config.model.backbone, "train_accuracy_none": result.metrics["accuracy"]}
    for mode in MODES:
        os.environ["HEADSTART_CACHE"] = str(work / f"cache-{mode}")  # empty: every feature is computed
        tic = time.perf_counter()
        metrics = model.evaluate(dataset, tta=mode)
        row[mode] = {"accuracy": metrics["accuracy"], "balanced_accuracy": metrics["balanced_accuracy"],
                     "seconds": time.perf_counter() - tic, "n": metrics["n"]}  # fmt: skip
    for mode in MODES:
        row[mode]["time_ratio"] = row[mode]["seconds"] / row["none"]["seconds"]
    return row


def measure_train_crops(data: Path, work: Path, seed: int) -> dict[str, Any]:
    """Train the default extract model and its ``--crops`` twin on ``data``; evaluate val with each."""
    options = {"strategy": "extract", "seed": seed, "run.report": False, "run.audit": False}
    dataset = load_dataset(data, 0.2, 0, work / "scan")
    row: dict[str, Any] = {}
    for name, crops in (("plain", False), ("crops", True)):
        os.environ["HEADSTART_CACHE"] = str(work / f"cache-{name}")  # empty: every feature is computed
        tic = time.perf_counter()
        result = headstart.train(data, crops=crops, out=str(work / name), **options)
        row[f"{name}_train_seconds"] = time.perf_counter() - tic
        row["backbone"] = result.config.model.backbone
    # The crops cache holds every view of val (training computed them), so these evaluations cost only the heads.
    os.environ["HEADSTART_CACHE"] = str(work / "cache-crops")
    plain, crops = headstart.load(work / "plain"), headstart.load(work / "crops")
    for key, model, tta in (("none", plain, "none"), ("tta_crops", plain, "crops"), ("train_crops", crops, None)):
        metrics = model.evaluate(dataset, tta=tta)
        row[key] = {"accuracy": metrics["accuracy"], "balanced_accuracy": metrics["balanced_accuracy"],
                    "n": metrics["n"]}  # fmt: skip
    row["train_time_ratio"] = row["crops_train_seconds"] / row["plain_train_seconds"]
    return row


def crops_table(results: dict[str, Any]) -> str:
    """Markdown table of ``--train-crops`` results."""
    lines = [
        "| set | val images | none | tta crops | train crops | train time |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in results.items():
        acc = [f"{row[k]['accuracy']:.3f}" for k in ("none", "tta_crops", "train_crops")]
        lines.append(f"| {name} | {row['none']['n']} | {' | '.join(acc)} | {row['train_time_ratio']:.1f}x |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_at_start": os.getloadavg()}  # fmt: skip


def table(results: dict[str, Any]) -> str:
    """Markdown table of the accuracies and time ratios."""
    lines = [
        "| set | val images | none | flip | crops | time flip | time crops |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in results.items():
        acc = [f"{row[m]['accuracy']:.3f}" for m in MODES]
        lines.append(f"| {name} | {row['none']['n']} | {' | '.join(acc)} | "
                     f"{row['flip']['time_ratio']:.1f}x | {row['crops']['time_ratio']:.1f}x |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    """Parse the arguments, measure each set, write and print the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=REPO_ROOT.parent / "shared" / "datasets")
    parser.add_argument("--sets", default=",".join(SETS), help="comma-separated; default every set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="results JSON (default in benchmarks/results/)")
    parser.add_argument("--train-crops", action="store_true", help="measure crops as training features (--crops)")
    args = parser.parse_args()
    results_dir = REPO_ROOT / "benchmarks" / "results"
    args.out = args.out or results_dir / ("tta_train_crops_cpu.json" if args.train_crops else "tta_cpu.json")
    run, show = (measure_train_crops, crops_table) if args.train_crops else (measure, table)
    saved = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results: dict[str, Any] = saved.get("sets", {})
    for name in args.sets.split(","):
        with tempfile.TemporaryDirectory(prefix=f"tta-{name}-") as work:
            results[name] = run(set_path(args.data_root, name), Path(work), args.seed)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine(), "sets": results}, indent=2) + "\n")
        print(show({name: results[name]}).splitlines()[-1], flush=True)
    print(show(results))


if __name__ == "__main__":
    main()
