"""Embedding throughput: `headstart embed` (JPEG files in, features out) vs the raw backbone forward on pre-decoded
tensors, at the same batch size, threads and precision, measured in the same process.

    python benchmarks/embed_throughput.py [--data DIR] [--input-size N] [--precision bf16|fp32] [--repeats 3]

Prints images/s of both, their ratio, and the share of one core's time that JPEG decoding takes. Two embed figures:
one pass over the images per call (what one `headstart embed` of this set costs, including each worker process's
first, slower batch), and ``--passes`` passes in one call (steady state, the figure for large sets). The raw forward
is always warm: it runs in this process after a warm-up batch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HEADSTART_QUIET", "1")

import torch

from headstart.data.demo import hymenoptera
from headstart.data.scan import load_dataset
from headstart.data.transforms import eval_tensor, normalize
from headstart.features.embeddings import embed
from headstart.hardware import autocast, pick_device, resolve_precision, tune_allocator
from headstart.models.backbones import create_backbone
from headstart.training.strategies import resolve_preprocessing


def raw_forward(backbone: torch.nn.Module, images: torch.Tensor, prep: object, batch: int, precision: str) -> float:
    """Seconds for the backbone alone over pre-decoded uint8 images (normalisation included, as embed does)."""
    device = torch.device("cpu")
    tic = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x = normalize(images[i : i + batch], prep).contiguous(memory_format=torch.channels_last)  # type: ignore[arg-type]
            with autocast(device, precision):
                backbone(x)
    return time.perf_counter() - tic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="image folder (default: the ants/bees set)")
    parser.add_argument("--input-size", type=int, help="crop size (default: what --strategy extract uses)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--passes", type=int, default=4, help="passes over the images in the steady-state call")
    args = parser.parse_args()

    tuned = tune_allocator()  # before either side allocates, so the baseline runs on the same allocator as embed
    dataset = load_dataset(args.data or hymenoptera())
    records = dataset.train + dataset.val
    backbone = create_backbone().eval().to(memory_format=torch.channels_last)
    backbone.preprocessing = resolve_preprocessing("extract", backbone.preprocessing, args.input_size, mirror=False)
    prep = backbone.preprocessing
    precision = resolve_precision(args.precision, pick_device())
    print(f"{len(records)} images, {prep.input_size}px, batch {args.batch_size}, {precision}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} cores, malloc tuned: {tuned}")  # fmt: skip

    tic = time.perf_counter()
    images = torch.stack([eval_tensor(r.path, prep) for r in records])
    decode_ms = 1000 * (time.perf_counter() - tic) / len(records)

    raw_forward(backbone, images[: args.batch_size * 2], prep, args.batch_size, precision)  # warm-up
    embed(backbone, records[: args.batch_size * 2], use_cache=False, precision=precision)
    raw_s, pipe_s, long_s = [], [], []
    for _ in range(args.repeats):  # interleaved, so both see the same machine state
        raw_s.append(raw_forward(backbone, images, prep, args.batch_size, precision))
        tic = time.perf_counter()
        out = embed(backbone, records, batch_size=args.batch_size, precision=precision, use_cache=False)
        pipe_s.append(time.perf_counter() - tic)
        assert out.features.shape[0] == len(records)
        tic = time.perf_counter()
        embed(backbone, records * args.passes, batch_size=args.batch_size, precision=precision, use_cache=False)
        long_s.append((time.perf_counter() - tic) / args.passes)
    raw = len(records) / statistics.median(raw_s)
    pipe = len(records) / statistics.median(pipe_s)
    steady = len(records) / statistics.median(long_s)

    def runs(seconds: list[float]) -> list[float]:
        return [round(len(records) / s, 1) for s in seconds]

    print(f"raw forward on pre-decoded tensors:        {raw:7.1f} images/s  (runs: {runs(raw_s)})")
    print(f"embed, JPEG files in, one pass per call:   {pipe:7.1f} images/s  (runs: {runs(pipe_s)})")
    print(f"embed, JPEG files in, {args.passes} passes in one call: {steady:7.1f} images/s  (runs: {runs(long_s)})")
    print(f"ratio embed / raw: one pass {pipe / raw:.2f}, steady state {steady / raw:.2f}")
    print(f"decode + resize + crop: {decode_ms:.2f} ms per image on one core = "
          f"{decode_ms / (1000 / steady):.0%} of the pipeline's wall time per image (steady state)")  # fmt: skip


if __name__ == "__main__":
    main()
