"""Batched inference over image files: decoding in worker processes, channels-last, bf16 autocast where fast.

One code path serves embedding (backbone features) and prediction (class logits), so both see identical inputs.
On a CPU the worker processes also run the network, one single-threaded process per core, each on its own batches
(see :func:`headstart.hardware.cpu_inference_workers`); on a GPU they decode and the main process computes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from headstart import progress
from headstart.data.scan import ImageRecord, unreadable_reason
from headstart.data.transforms import FileDataset, Preprocessing, collate_skip, normalize
from headstart.hardware import autocast, cpu_inference_workers, decode_workers, tune_allocator


@dataclass
class Outputs:
    """Model outputs for every input that decoded; ``ok`` marks which."""

    values: np.ndarray  # [N, K] float32, rows of failed inputs are zero
    ok: np.ndarray  # [N] bool
    failed: list[tuple[Path, str]] = field(default_factory=list)


class _Forward:
    """Normalise a uint8 batch and run the module on it under inference mode; float32 [B, width] on the CPU."""

    def __init__(self, module: nn.Module, prep: Preprocessing, precision: str, channels_last: bool):
        self.module = module
        self.prep = prep
        self.precision = precision
        self.channels_last = channels_last

    def __call__(self, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        # Only the forward runs in inference mode: moving the module to channels-last inside it would turn its
        # parameters into inference tensors that can no longer be trained.
        with torch.inference_mode():
            x = normalize(images.to(device, non_blocking=True), self.prep)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, self.precision):
                out = self.module(x)
            return out.float().cpu()


class _BatchForward(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Item ``i``: decode batch ``i`` of the files and run the network on it, inside a DataLoader worker process.

    The module reaches the workers by fork (shared copy-on-write) or by pickling under spawn/forkserver.
    Returns (outputs [B_ok, width], positions of the decoded images); a batch that decodes nothing gives empty ones.
    """

    def __init__(self, files: FileDataset, forward: _Forward, bounds: list[tuple[int, int]], width: int, threads: int):
        self.files = files
        self.forward = forward
        self.bounds = bounds
        self.width = width
        self.threads = threads

    def __len__(self) -> int:
        return len(self.bounds)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.get_num_threads() != self.threads:  # DataLoader starts each worker with one thread
            torch.set_num_threads(self.threads)
        images, _, index = collate_skip([self.files[j] for j in range(*self.bounds[i])])
        if not len(index):
            return torch.zeros(0, self.width), index
        return self.forward(images, torch.device("cpu")), index


def balanced_batches(total: int, batch_size: int, processes: int) -> list[tuple[int, int]]:
    """(start, stop) of batches of at most ``batch_size``, as many as a multiple of ``processes``, sizes within one.

    With 397 images, batches of 32 and 2 processes, plain batching leaves the 13th batch (13 images) to one process
    while the other idles; 14 batches of 28-29 keep both busy to the end.
    """
    count = -(-total // batch_size)
    count = min(total, -(-count // processes) * processes)
    edges = [round(i * total / count) for i in range(count + 1)]
    return [(a, b) for a, b in itertools.pairwise(edges) if b > a]


def run_model(
    module: nn.Module,
    records: Sequence[ImageRecord] | Sequence[Path],
    prep: Preprocessing,
    width: int,
    *,
    batch_size: int = 32,
    precision: str = "fp32",
    device: torch.device | None = None,
    workers: int = -1,
    channels_last: bool = True,
    description: str = "inference",
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    on_batch: Callable[[np.ndarray, np.ndarray], None] | None = None,
) -> Outputs:
    """Run ``module`` over image files in batches.

    Args:
        module: maps a normalised NCHW batch to [B, width].
        records: image records or paths.
        prep: preprocessing (resize, crop, normalisation) the module expects.
        width: output width.
        batch_size: images per forward pass.
        precision: resolved precision, ``bf16`` or ``fp32``.
        device: where to run (default: the module's device).
        workers: worker processes; -1 picks: on a multi-core CPU they decode and compute (one per core), elsewhere
            they decode (see :mod:`headstart.hardware`); 0 decodes and computes in this process.
        channels_last: NHWC memory format.
        description: progress bar label.
        augment: decode base images and apply this instead of the centre crop (augmented views).
        on_batch: called with (positions, outputs) of every batch as it finishes, e.g. to cache it at once, so a run
            killed half-way keeps what it computed.
    """
    device = device or next(module.parameters()).device
    values = np.zeros((len(records), width), dtype=np.float32)
    ok = np.zeros(len(records), dtype=bool)
    if not len(records):
        return Outputs(values, ok)
    tune_allocator()
    was_training = module.training
    module.eval().to(device)
    if channels_last:
        module.to(memory_format=torch.channels_last)
    forward = _Forward(module, prep, precision, channels_last)
    files = FileDataset(records, prep, augment)
    with progress.bar() as bars:
        task = bars.add_task(description, total=len(records), info="")
        done = 0
        for out, index, size in _batches(files, forward, batch_size, width, device, workers):
            rows = index.numpy()
            values[rows] = out.numpy()
            ok[rows] = True
            if on_batch is not None and len(rows):
                on_batch(rows, values[rows])
            done += size
            bars.update(task, completed=done)
    module.train(was_training)
    return Outputs(values, ok, _failures(records, ok))


def _batches(
    files: FileDataset, forward: _Forward, batch_size: int, width: int, device: torch.device, workers: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """(outputs, positions, images tried) per batch, in order: computed in worker processes on a multi-core CPU,
    else here."""
    processes, threads = cpu_inference_workers(device, workers)
    processes = min(processes, -(-len(files) // batch_size))
    if processes >= 2:
        bounds = balanced_batches(len(files), batch_size, processes)
        computed = DataLoader(
            _BatchForward(files, forward, bounds, width, threads), batch_size=None, num_workers=processes,
            prefetch_factor=2,
        )  # fmt: skip
        for (out, index), (start, stop) in zip(computed, bounds, strict=True):
            yield out, index, stop - start
        return
    n_workers = min(decode_workers(workers), max(0, (len(files) - 1) // batch_size))
    loader = DataLoader(
        files,
        batch_size=batch_size,
        num_workers=n_workers,
        collate_fn=collate_skip,
        prefetch_factor=4 if n_workers else None,
        pin_memory=device.type == "cuda",
    )
    for step, (images, _, index) in enumerate(loader):
        size = min(batch_size, len(files) - step * batch_size)
        yield (forward(images, device) if len(index) else torch.zeros(0, width)), index, size


def _failures(records: Sequence[ImageRecord] | Sequence[Path], ok: np.ndarray) -> list[tuple[Path, str]]:
    """(file, reason) of every input that did not decode; the reason is learnt again here, where it can be returned
    (the batches dropped these files in worker processes)."""
    failed = []
    for i in np.flatnonzero(~ok):
        item = records[int(i)]
        path = item.path if isinstance(item, ImageRecord) else Path(item)
        failed.append((path, unreadable_reason(path)))
    return failed
