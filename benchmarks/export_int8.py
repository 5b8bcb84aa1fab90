"""Exported models on the CPU: PyTorch fp32 against ONNX fp32 and ONNX int8 (``headstart export --quantize int8``),
side by side in one process, on the same decoded ants/bees images.

    python benchmarks/export_int8.py                 # trains an extract run of EfficientNet-Lite0 on ants/bees first
    python benchmarks/export_int8.py --run runs/x    # an existing run folder (its training data must be in place)
    python benchmarks/export_int8.py --threads 1     # one intra-op thread per engine (steadier on a shared machine)

Prints, for each engine, latency at batch 1 (median and 90th percentile over single-image calls) and throughput at
batch 32 (images/s), with ratios against PyTorch fp32 measured in the same run; top-1 agreement with PyTorch fp32
and accuracy on the validation images; file sizes. Engines run interleaved, repeat after repeat, so a machine shared
with other jobs slows each of them alike. PyTorch bf16 is added where the CPU runs it natively (headstart's default
precision there). Decoding is outside every timing: the figures are the network's. Writes the figures as JSON
(default ``benchmarks/results/export_int8_cpu.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HEADSTART_QUIET", "1")

import numpy as np
import onnxruntime as ort
import torch

import headstart
from headstart.data.demo import hymenoptera
from headstart.data.scan import load_dataset
from headstart.data.transforms import eval_tensor, normalize
from headstart.hardware import autocast, cpu_has_bf16
from headstart.models.classifier import load_classifier
from headstart.serving.export import export, read_metadata
from suite import machine  # benchmarks/suite.py, beside this script

RESULTS = Path(__file__).resolve().parent / "results"
Engine = Callable[[np.ndarray], np.ndarray]  # normalised float32 NCHW batch -> logits


def pytorch_engine(run: Path, precision: str) -> Engine:
    """The saved classifier in eager PyTorch, channels-last as headstart's inference runs it."""
    model = load_classifier(run)[0].float().eval().to(memory_format=torch.channels_last)
    cpu = torch.device("cpu")

    def forward(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), autocast(cpu, precision):
            batch = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
            return model(batch).float().numpy()

    return forward


def onnx_engine(path: Path, threads: int) -> Engine:
    """An onnxruntime CPU session with as many intra-op threads as PyTorch uses."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"images": x})[0]


def latencies(engine: Engine, images: np.ndarray, calls: int) -> list[float]:
    """Milliseconds of single-image calls, cycling through the images."""
    out = []
    for i in range(calls):
        x = images[i % len(images)][None]
        tic = time.perf_counter()
        engine(x)
        out.append(1000 * (time.perf_counter() - tic))
    return out


def throughput(engine: Engine, images: np.ndarray, batch: int, batches: int) -> float:
    """Images per second over ``batches`` full batches of ``batch`` images."""
    tic = time.perf_counter()
    for i in range(batches):
        start = (i * batch) % (len(images) - batch + 1)
        engine(images[start : start + batch])
    return batch * batches / (time.perf_counter() - tic)


def logits(engine: Engine, images: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate([engine(images[i : i + batch]) for i in range(0, len(images), batch)])


def prepare(args: argparse.Namespace) -> tuple[Path, dict[str, float]]:
    """The run folder (trained here unless given) and its fp32 and int8 exports; returns the seconds each step took."""
    seconds: dict[str, float] = {}
    run = args.run
    if run is None:
        run = Path(tempfile.mkdtemp(prefix="headstart-int8-")) / "run"
        tic = time.perf_counter()
        headstart.train(args.data or hymenoptera(), strategy="extract", backbone=args.backbone, out=str(run),
                        **{"run.report": False})  # fmt: skip
        seconds["train_extract"] = time.perf_counter() - tic
    if args.reuse_exports and (run / "classifier.int8.onnx").is_file():
        return run, seconds
    tic = time.perf_counter()
    export(run, "onnx", quantize="int8")  # the fp32 export, then its int8 version beside it
    seconds["export_fp32_and_int8"] = time.perf_counter() - tic
    return run, seconds


def measure(engines: dict[str, Engine], images: np.ndarray, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Latency and throughput of every engine, interleaved over ``args.repeats`` rounds."""
    for engine in engines.values():  # warm-up: first calls allocate and pick kernels
        latencies(engine, images, 3)
        throughput(engine, images, args.batch, 1)
    ms: dict[str, list[float]] = {name: [] for name in engines}
    rates: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.repeats):
        for name, engine in engines.items():
            ms[name] += latencies(engine, images, args.calls)
            rates[name].append(throughput(engine, images, args.batch, args.batches))
    return {
        name: {
            "latency_ms_median": statistics.median(ms[name]),
            "latency_ms_p90": float(np.percentile(ms[name], 90)),
            "throughput_images_per_s": statistics.median(rates[name]),
            "throughput_runs": [round(r, 1) for r in rates[name]],
        }
        for name in engines
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="run folder of a trained classifier (default: train extract here)")
    parser.add_argument("--data", type=Path, help="dataset to train on without --run (default: ants/bees)")
    parser.add_argument("--backbone", default="efficientnet_lite0", help="backbone to train on without --run")
    parser.add_argument("--calls", type=int, default=30, help="single-image calls per engine and repeat")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=4, help="batches per engine and repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="intra-op threads of every engine (default: torch's default)")
    parser.add_argument("--reuse-exports", action="store_true", help="with --run: use the exports already there")
    parser.add_argument("--out", type=Path, default=RESULTS / "export_int8_cpu.json")
    args = parser.parse_args()
    if args.threads:  # before any engine exists; onnxruntime sessions get the same number below
        torch.set_num_threads(args.threads)

    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    load_before = os.getloadavg()
    run, seconds = prepare(args)
    info = json.loads((run / "model.json").read_text())
    settings = info.get("config", {}).get("data", {})
    dataset = load_dataset(
        info["data_path"], float(settings.get("val_fraction", 0.2)), int(settings.get("split_seed", 0))
    )
    prep = load_classifier(run)[0].backbone.preprocessing
    images = normalize(torch.stack([eval_tensor(r.path, prep) for r in dataset.val]), prep).numpy()
    labels = np.array([info["classes"].index(dataset.classes[r.label]) for r in dataset.val])
    threads = torch.get_num_threads()
    engines = {"pytorch_fp32": pytorch_engine(run, "fp32")}
    if cpu_has_bf16():
        engines["pytorch_bf16"] = pytorch_engine(run, "bf16")
    engines["onnx_fp32"] = onnx_engine(run / "classifier.onnx", threads)
    engines["onnx_int8"] = onnx_engine(run / "classifier.int8.onnx", threads)
    predictions = {name: logits(engine, images).argmax(1) for name, engine in engines.items()}
    figures = measure(engines, images, args)
    base = figures["pytorch_fp32"]
    for name, row in figures.items():
        row["latency_ratio"] = row["latency_ms_median"] / base["latency_ms_median"]
        row["throughput_ratio"] = row["throughput_images_per_s"] / base["throughput_images_per_s"]
        row["top1_agreement_with_pytorch_fp32"] = float((predictions[name] == predictions["pytorch_fp32"]).mean())
        row["accuracy"] = float((predictions[name] == labels).mean())
    sizes = {name: (run / name).stat().st_size for name in ("model.safetensors", "classifier.onnx",
                                                             "classifier.int8.onnx")}  # fmt: skip
    result = {
        "date": started,
        "machine": {
            **machine("cpu"),
            "onnxruntime": ort.__version__,
            "threads": threads,
            "load_average_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        },
        "command": "python benchmarks/export_int8.py"
        + (f" --run {args.run}" if args.run else "")
        + (f" --threads {args.threads}" if args.threads else "")
        + (" --reuse-exports" if args.reuse_exports else ""),
        "run": str(run),
        "input_size": prep.input_size,
        "val_images": len(images),
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "quantization": read_metadata(run / "classifier.int8.onnx")["quantization"],
        "file_bytes": sizes,
        "engines": figures,
    }
    report(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


def report(result: dict[str, Any]) -> None:
    """The side-by-side table."""
    m = result["machine"]
    print(f"{m['cpu']}, {m['cores']} cores, {m['threads']} threads, load average {m['load_average_1min']} "
          f"(before, after); torch {m['torch']}, onnxruntime {m['onnxruntime']}")  # fmt: skip
    print(f"{result['val_images']} val images at {result['input_size']} px; ratios against pytorch_fp32")
    print(f"{'engine':<14}{'batch 1 ms':>11}{'p90':>8}{'ratio':>7}{'batch 32 img/s':>16}{'ratio':>7}"
          f"{'agree':>8}{'acc':>7}")  # fmt: skip
    for name, r in result["engines"].items():
        print(f"{name:<14}{r['latency_ms_median']:>11.1f}{r['latency_ms_p90']:>8.1f}{r['latency_ratio']:>7.2f}"
              f"{r['throughput_images_per_s']:>16.1f}{r['throughput_ratio']:>7.2f}"
              f"{r['top1_agreement_with_pytorch_fp32']:>8.3f}{r['accuracy']:>7.3f}")  # fmt: skip
    q = result["quantization"]
    print(f"int8 export check: agreement with ONNX fp32 {q['agreement']:.3f} on {q['images']} images, "
          f"calibrated on {q['calibration_images']} training images")  # fmt: skip
    print("files: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in result["file_bytes"].items()))
    if result["seconds"]:
        print("seconds: " + ", ".join(f"{k} {v}" for k, v in result["seconds"].items()))


if __name__ == "__main__":
    main()
