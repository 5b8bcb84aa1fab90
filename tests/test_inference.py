"""Batched inference: the CPU worker-process path (decode and compute per process) gives the outputs of the
in-process path, in input order, with unreadable files reported; batches are balanced across processes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from headstart.data.scan import list_images
from headstart.features.inference import balanced_batches, run_model
from headstart.hardware import cpu_inference_workers, tune_allocator
from headstart.models.backbones import create_backbone


@pytest.mark.parametrize(
    ("total", "batch", "processes"), [(397, 32, 2), (5, 32, 2), (64, 32, 2), (100, 32, 8), (1, 4, 2)]
)
def test_balanced_batches_cover_everything_once(total: int, batch: int, processes: int) -> None:
    bounds = balanced_batches(total, batch, processes)
    assert [i for start, stop in bounds for i in range(start, stop)] == list(range(total))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) <= batch and max(sizes) - min(sizes) <= 1
    assert len(bounds) % processes == 0 or len(bounds) == total  # every process gets as many batches


def test_worker_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr("headstart.hardware.usable_cores", lambda: 16)
    assert cpu_inference_workers(cpu) == (8, 2)
    assert cpu_inference_workers(cpu, requested=0) == (0, 0)  # an explicit worker count keeps the decode-only path
    assert cpu_inference_workers(torch.device("cuda", 0)) == (0, 0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")  # cores are shared between the ranks of a launch
    assert cpu_inference_workers(cpu) == (0, 0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert cpu_inference_workers(cpu) == (4, 1)


def test_worker_processes_match_in_process(
    image_folder: Path, tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("headstart.hardware.usable_cores", lambda: 2)  # the worker path whatever the machine
    files = list_images(image_folder / "train")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    items = [*files[:7], broken, *files[7:]]
    backbone = create_backbone("tiny_cnn", weights=str(tiny_weights)).train()
    common = {"batch_size": 4, "precision": "fp32", "device": torch.device("cpu")}
    here = run_model(backbone, items, backbone.preprocessing, backbone.num_features, workers=0, **common)
    workers = run_model(backbone, items, backbone.preprocessing, backbone.num_features, workers=-1, **common)
    assert workers.ok.tolist() == here.ok.tolist() == [i != 7 for i in range(len(items))]
    assert [p.name for p, _ in workers.failed] == ["broken.jpg"]
    np.testing.assert_allclose(workers.values, here.values, rtol=0, atol=1e-5)
    assert np.abs(here.values[here.ok]).sum() > 0
    assert backbone.training  # left in the mode it was found in


def test_tune_allocator_is_idempotent_and_optional(monkeypatch: pytest.MonkeyPatch) -> None:
    first = tune_allocator()
    assert tune_allocator() is first
    monkeypatch.setattr("headstart.hardware._ALLOCATOR_TUNED", None)
    monkeypatch.setenv("HEADSTART_MALLOC", "0")
    assert tune_allocator() is False
