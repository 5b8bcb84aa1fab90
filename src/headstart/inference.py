"""Batched inference over image files: decoding in worker processes, channels-last, bf16 autocast where fast.

One code path serves embedding (backbone features) and prediction (class logits), so both see identical inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from headstart import progress
from headstart.backbones import Preprocessing
from headstart.data import FileDataset, ImageRecord, collate_skip, normalize
from headstart.hardware import autocast, decode_workers


@dataclass
class Outputs:
    """Model outputs for every input that decoded; ``ok`` marks which."""

    values: np.ndarray  # [N, K] float32, rows of failed inputs are zero
    ok: np.ndarray  # [N] bool
    failed: list[tuple[Path, str]] = field(default_factory=list)


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
        workers: decoding processes (-1: automatic).
        channels_last: NHWC memory format.
        description: progress bar label.
        augment: decode base images and apply this instead of the centre crop (augmented views).
    """
    device = device or next(module.parameters()).device
    values = np.zeros((len(records), width), dtype=np.float32)
    ok = np.zeros(len(records), dtype=bool)
    if not len(records):
        return Outputs(values, ok)
    was_training = module.training
    module.eval().to(device)
    if channels_last:
        module.to(memory_format=torch.channels_last)
    n_workers = min(decode_workers(workers), max(0, (len(records) - 1) // batch_size))
    loader = DataLoader(
        FileDataset(records, prep, augment),
        batch_size=batch_size,
        num_workers=n_workers,
        collate_fn=collate_skip,
        prefetch_factor=4 if n_workers else None,
        pin_memory=device.type == "cuda",
    )
    # Only the loop runs in inference mode: moving the module to channels-last in it would turn its parameters
    # into inference tensors that can no longer be trained.
    with progress.bar() as bars, torch.inference_mode():
        task = bars.add_task(description, total=len(records), info="")
        for step, (images, _, index) in enumerate(loader):
            if len(index):
                x = normalize(images.to(device, non_blocking=True), prep)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast(device, precision):
                    out = module(x)
                rows = index.numpy()
                values[rows] = out.float().cpu().numpy()
                ok[rows] = True
            bars.update(task, completed=min(len(records), (step + 1) * batch_size))
    module.train(was_training)
    failed = []
    for i in np.flatnonzero(~ok):
        item = records[int(i)]
        failed.append((item.path if isinstance(item, ImageRecord) else Path(item), "cannot decode"))
    return Outputs(values, ok, failed)
