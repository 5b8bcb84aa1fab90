"""Shared fixtures: tiny synthetic image folders made in tmp_path, tiny backbone weights, the real ants/bees set."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HEADSTART_QUIET", "1")
# Under pytest-xdist (`make test` runs two workers) each worker takes its share of the cores, at most two.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads() // _WORKERS)))

REPO = Path(__file__).resolve().parents[1]
HYMENOPTERA = REPO.parent / "shared" / "datasets" / "hymenoptera_data"


def stripes(label: int, rng: np.random.Generator, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A picture whose class is visible: horizontal reddish stripes for class 0, vertical bluish ones for class 1."""
    w, h = size
    period = int(rng.integers(4, 8))
    coords = np.arange(h if label == 0 else w)
    band = ((coords // period) % 2).astype(np.float32)
    grid = np.repeat(band[:, None], w, 1) if label == 0 else np.repeat(band[None, :], h, 0)
    a, b = rng.integers(0, 160, 3), rng.integers(0, 160, 3)
    a[0 if label == 0 else 2] += 95  # colour carries the class too, so even random features separate them
    pixels = grid[..., None] * a + (1 - grid[..., None]) * b + rng.normal(0, 8, (h, w, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def make_folder(root: Path, per_class: dict[str, int], classes: tuple[str, ...] = ("horizontal", "vertical"),
                seed: int = 0) -> Path:  # fmt: skip
    """Write ``root/<split>/<class>/*.jpg`` with ``per_class[split]`` images of each class."""
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                stripes(label % 2, rng).save(folder / f"{name}_{i:03d}.jpg", quality=92)
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """train/ (10 per class) and val/ (5 per class) of two striped classes."""
    return make_folder(tmp_path / "data", {"train": 10, "val": 5})


@pytest.fixture
def folder_factory(tmp_path: Path) -> Callable[..., Path]:
    """Make more synthetic folders: ``folder_factory("name", {"train": 4})``."""

    def make(name: str, per_class: dict[str, int], **kwargs: object) -> Path:
        return make_folder(tmp_path / name, per_class, **kwargs)  # type: ignore[arg-type]

    return make


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A safetensors file of tiny_cnn weights, standing in for "pretrained" weights in fast tests."""
    from safetensors.torch import save_file

    from headstart.models.backbones import TinyCNN

    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("weights") / "tiny_cnn.safetensors"
    save_file(TinyCNN().state_dict(), str(path))
    return path


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for a test. When other jobs hold the cores, two OpenMP threads wait on each other at every
    barrier: mobilenet_v3_small forward + backward took 20 s with 2 threads and 0.3 s with 1 on the shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """A private feature cache per test."""
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def ants_bees_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One feature cache for the tests that run the bundled weights on ants/bees: each computes only the features no
    earlier test did (the cache is keyed by weights, preprocessing, precision and view, so sharing changes no
    result). Tests of the cache itself keep private ones (``cache_dir``)."""
    return tmp_path_factory.mktemp("ants-bees-cache")


@pytest.fixture(scope="session")
def hymenoptera() -> Path:
    """The real ants/bees set beside the checkout (as published, with its placeholder file)."""
    if not HYMENOPTERA.is_dir():
        pytest.skip(f"{HYMENOPTERA} not present")
    return HYMENOPTERA.resolve()  # the data scan reports resolved paths (shared/ may be a link)
