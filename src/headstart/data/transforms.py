"""Tensors from images: the preprocessing a backbone's weights expect, decoding, augmentation, torch datasets."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from headstart.data.scan import ImageRecord, open_image
from headstart.errors import DataError


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the tensor a backbone's weights expect. Stored with every model and export."""

    input_size: int  # side of the square crop fed to the network
    resize_size: int  # shorter side after resizing, before the centre crop (input_size / crop_pct)
    mean: tuple[float, float, float]  # per-channel mean subtracted after scaling to [0, 1]
    std: tuple[float, float, float]  # per-channel standard deviation divided by
    interpolation: str  # "bilinear" or "bicubic", as the weights were trained
    # Features are the mean of the image's and its mirror image's: a second view at test time and in training the
    # head, for twice the forward cost (the auto recipe; measured in benchmarks/suite.py).
    mirror: bool = False
    # Features averaged over the centre and four corner crops (the views of test-time augmentation ``crops``): in
    # training the head on frozen features and, by default, at prediction, for five times the forward cost.
    crops: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Preprocessing:
        """Inverse of :meth:`to_dict`."""
        return cls(
            input_size=int(values["input_size"]),
            resize_size=int(values["resize_size"]),
            mean=tuple(float(v) for v in values["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in values["std"]),  # type: ignore[arg-type]
            interpolation=str(values["interpolation"]),
            mirror=bool(values.get("mirror", False)),  # models saved before the field existed had none
            crops=bool(values.get("crops", False)),
        )

    def key(self) -> str:
        """Short stable string identifying this preprocessing, used in cache keys (unchanged for ``mirror=False``,
        so that caches made before the field existed stay valid). ``crops`` says which views are averaged, not how
        one view is computed: each view has a cache folder of its own, shared by models with and without it."""
        values = self.to_dict()
        del values["crops"]
        if not self.mirror:
            del values["mirror"]
        return hashlib.sha1(repr(sorted(values.items())).encode()).hexdigest()[:12]


# -- tensors ---------------------------------------------------------------------------------------------------------

_INTERPOLATION = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
# Longest side a training image keeps, in shorter sides. Beyond 20:3 the random crops of train_augment (area at least
# 0.2 of the image, aspect at most 4:3) cannot fit and torchvision falls back to the centre crop, so the rest of a
# longer image only costs memory: a 474-byte PNG of 1x100,000 pixels would otherwise become a 20 GB tensor.
MAX_ASPECT = 8


def resize_short(image: Image.Image, size: int, interpolation: str) -> Image.Image:
    """Resize so that the shorter side is ``size``, keeping the aspect ratio."""
    w, h = image.size
    scale = size / min(w, h)
    target = (max(size, round(w * scale)), max(size, round(h * scale)))
    return image.resize(target, _INTERPOLATION.get(interpolation, Image.Resampling.BICUBIC), reducing_gap=3.0)


def clip_aspect(image: Image.Image, ratio: float = MAX_ASPECT) -> Image.Image:
    """Cut the longer side, around the centre, to at most ``ratio`` times the shorter one."""
    w, h = image.size
    keep = int(ratio * min(w, h))
    if max(w, h) <= keep:
        return image
    if w > h:
        left = (w - keep) // 2
        return image.crop((left, 0, left + keep, h))
    top = (h - keep) // 2
    return image.crop((0, top, w, top + keep))


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Square centre crop."""
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """HWC RGB Pillow image -> CHW uint8 tensor."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def eval_tensor(source: Path | bytes, prep: Preprocessing) -> torch.Tensor:
    """Decode and preprocess one image for inference (resize the shorter side, centre crop); uint8 CHW.

    The centre crop is cut from the decoded image first (the region that resizing the shorter side to
    ``resize_size`` then cropping ``input_size`` keeps, rounded to whole source pixels) and only that region is
    resampled, with torch's antialiased uint8 kernels (Pillow-compatible filters). Measured on the ants/bees photos,
    one core: 0.5 ms per image against 1.7 ms for Pillow's resize of the same box; decoding itself is 1.5 ms.
    """
    image = open_image(source, draft=prep.resize_size)
    w, h = image.size
    side = max(1, min(w, h, round(min(w, h) * prep.input_size / prep.resize_size)))
    left, top = (w - side) // 2, (h - side) // 2
    pixels = torch.from_numpy(np.array(image.crop((left, top, left + side, top + side)), dtype=np.uint8))
    pixels = pixels.permute(2, 0, 1).unsqueeze(0)
    mode = "bilinear" if prep.interpolation == "bilinear" else "bicubic"
    size = (prep.input_size, prep.input_size)
    out = torch.nn.functional.interpolate(pixels, size=size, mode=mode, antialias=True, align_corners=False)
    return out[0].contiguous()


def base_tensor(source: Path | bytes, prep: Preprocessing) -> torch.Tensor:
    """Decode once for training: shorter side resized to ``resize_size``; augmentation crops from this.

    An image longer than :data:`MAX_ASPECT` shorter sides keeps only its centre (see there why nothing is lost).
    """
    image = clip_aspect(open_image(source, draft=prep.resize_size))
    return pil_to_uint8(resize_short(image, prep.resize_size, prep.interpolation))


def normalize(batch: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """uint8 NCHW batch -> float, scaled to [0, 1] and normalised with the weights' mean and std."""
    mean = torch.tensor(prep.mean, device=batch.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(prep.std, device=batch.device).view(1, 3, 1, 1) * 255.0
    return (batch.float() - mean) / std


def train_augment(prep: Preprocessing, level: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Augmentation of a decoded uint8 image for training: ``none``, ``light`` or ``strong``."""
    import torchvision.transforms.v2 as T  # here, not at the top: it costs seconds that cached extract runs never need

    interp = T.InterpolationMode.BICUBIC if prep.interpolation == "bicubic" else T.InterpolationMode.BILINEAR
    size = prep.input_size
    if level == "none":
        return T.Compose([T.CenterCrop(size)])
    if level == "light":
        return T.Compose(
            [
                T.RandomResizedCrop(size, scale=(0.35, 1.0), interpolation=interp, antialias=True),
                T.RandomHorizontalFlip(),
            ]
        )
    if level == "strong":
        return T.Compose(
            [
                T.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=interp, antialias=True),
                T.RandomHorizontalFlip(),
                T.ColorJitter(0.3, 0.3, 0.3, 0.05),
            ]
        )
    raise ValueError(f"unknown augment level {level!r}; choose none, light or strong")


# -- test-time augmentation -----------------------------------------------------------------------------------------

TTA_MODES = ("none", "flip", "crops")
# Corner crops of the resized image, as (row, column) of the corner: with the centre view, the classic five crops.
CORNERS = {"tl": (0, 0), "tr": (0, 1), "bl": (1, 0), "br": (1, 1)}

View = tuple[str, Callable[[torch.Tensor], torch.Tensor] | None]


def _corner_crop(row: int, column: int, size: int, image: torch.Tensor) -> torch.Tensor:
    h, w = image.shape[-2:]
    top, left = row * max(0, h - size), column * max(0, w - size)
    return image[..., top : top + size, left : left + size].contiguous()


def corner_crop(corner: str, size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Square crop of side ``size`` at a corner (``tl``, ``tr``, ``bl``, ``br``) of a decoded base image.

    A partial of a module-level function, not a closure: DataLoader workers started by spawn must pickle it.
    """
    row, column = CORNERS[corner]
    return functools.partial(_corner_crop, row, column, size)


def tta_views(mode: str | None, prep: Preprocessing) -> tuple[Preprocessing, list[View]]:
    """The preprocessing and the views whose outputs test-time augmentation averages.

    ``mode`` None is the model's own: ``crops`` when its head was trained on crop-averaged features
    (:attr:`Preprocessing.crops`), else ``none``. An explicit mode overrides it (``none`` on such a model reads the
    centre crop alone: faster, usually a little less accurate).

    ``flip`` is the mirrored feature view of :attr:`Preprocessing.mirror` (features of the image and its mirror
    averaged inside the backbone), so a model trained with ``--mirror`` already has it. ``crops`` adds the four corner
    crops of the resized image (shorter side ``resize_size``) to the centre crop; their outputs are averaged by the
    caller. A view is ``(cache name, transform of the decoded base image)``; the centre view's transform is None (the
    ordinary inference crop).

    Raises:
        ValueError: an unknown mode, naming the valid ones.
    """
    if mode is None:
        mode = "crops" if prep.crops else "none"
    if mode == "none":
        return prep, [("center", None)]
    if mode == "flip":
        return dataclasses.replace(prep, mirror=True), [("center", None)]
    if mode == "crops":
        corners: list[View] = [(f"crop-{c}", corner_crop(c, prep.input_size)) for c in CORNERS]
        return prep, [("center", None), *corners]
    raise ValueError(f"unknown test-time augmentation {mode!r}; choose one of {', '.join(TTA_MODES)}")


def seeded(transform: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, key: int) -> torch.Tensor:
    """Apply a random transform with randomness fixed by ``key`` (which encodes seed, epoch and index).

    Augmentation then depends on nothing else: not on how many batches a resumed run skips, not on which worker
    process decodes the image, and it leaves the global RNG (dropout, shuffling) untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(key)
        return transform(image)


class FileDataset(torch.utils.data.Dataset[tuple[torch.Tensor, int, int]]):
    """Decodes files on access: (uint8 CHW tensor, label, index). A file that fails is returned as ``None``.

    Without ``augment`` images are resized and centre-cropped for inference; with it, the resized base image goes
    through ``augment`` (training, or augmented feature views). Indices past ``len(self)`` select the same image
    with other augmentation randomness (:class:`headstart.training.trainer.EpochSampler` adds ``epoch * len`` to them).
    """

    def __init__(
        self,
        records: Sequence[ImageRecord] | Sequence[Path],
        prep: Preprocessing,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        seed: int = 0,
    ):
        self.records: list[ImageRecord | Path] = list(records)
        self.prep = prep
        self.augment = augment
        self.seed = seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int) -> tuple[torch.Tensor, int, int]:
        index = key % len(self.records)
        item = self.records[index]
        path: Path = item.path if isinstance(item, ImageRecord) else Path(item)
        label = item.label if isinstance(item, ImageRecord) else -1
        try:
            if self.augment is not None:
                return seeded(self.augment, base_tensor(path, self.prep), self.seed * 1_000_003 + key), label, index
            return eval_tensor(path, self.prep), label, index
        except DataError:
            return None, label, index  # type: ignore[return-value]  # dropped by collate_skip


def collate_skip(batch: list[tuple[torch.Tensor | None, int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack a batch, dropping items that failed to decode (their indices go missing from the third tensor)."""
    kept = [b for b in batch if b[0] is not None]
    if not kept:
        return (
            torch.empty(0, 3, 1, 1, dtype=torch.uint8),
            torch.empty(0, dtype=torch.long),
            torch.empty(0, dtype=torch.long),
        )
    images = torch.stack([b[0] for b in kept])  # type: ignore[misc]
    return images, torch.tensor([b[1] for b in kept]), torch.tensor([b[2] for b in kept])


class MemoryDataset(torch.utils.data.Dataset[tuple[torch.Tensor, int, int]]):
    """Decoded base images kept in memory, augmented on access: decoding happens once per run, not per epoch."""

    def __init__(
        self,
        images: list[torch.Tensor],
        labels: list[int],
        transform: Callable[[torch.Tensor], torch.Tensor] | None,
        seed: int = 0,
    ):
        self.images = images
        self.labels = labels
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int) -> tuple[torch.Tensor, int, int]:
        index = key % len(self.images)
        image = self.images[index]
        if self.transform is not None:
            image = seeded(self.transform, image, self.seed * 1_000_003 + key)
        return image, self.labels[index], index


def decode_all(
    records: Sequence[ImageRecord], prep: Preprocessing, crop: bool = False, workers: int | None = None
) -> list[torch.Tensor]:
    """Decode a whole split in parallel threads: base images for augmentation, or centre crops (``crop=True``)."""
    decode = eval_tensor if crop else base_tensor
    with ThreadPoolExecutor(max_workers=workers or (os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda r: decode(r.path, prep), records))


def estimated_bytes(records: Sequence[ImageRecord], prep: Preprocessing) -> int:
    """Memory the decoded base images of ``records`` would take."""
    total = 0
    for r in records:
        short = min(r.width, r.height) or 1
        total += 3 * prep.resize_size * prep.resize_size * min(max(r.width, r.height), MAX_ASPECT * short) // short
    return total
