"""Prepared backbones: an extract run whose features are all cached builds no network, and writes the same model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import headstart
import headstart.models.prepared as prepared
from conftest import stripes
from headstart.data.scan import load_dataset
from headstart.features.embeddings import cache_clear, cache_info
from headstart.models.backbones import TinyCNN

SMALL = {"batch_size": 8, "num_workers": 0, "run.report": False}


def extract(folder: Path, weights: Path, cache: Path, out: Path) -> headstart.TrainResult:
    return headstart.train(folder, strategy="extract", backbone="tiny_cnn", weights=str(weights), out=str(out),
                     cache_dir=str(cache), **SMALL)  # fmt: skip


def images(folder: Path) -> int:
    dataset = load_dataset(folder)
    return len(dataset.train + dataset.val)


def no_build(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the network was built")

    monkeypatch.setattr(prepared, "create_backbone", refuse)


def same_model(a: Path, b: Path) -> None:
    left, right = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert left.keys() == right.keys()
    for key in left:
        torch.testing.assert_close(left[key], right[key], rtol=0, atol=0)
    info_a, info_b = (json.loads((run / "model.json").read_text()) for run in (a, b))
    for key in ("backbone", "weights_source", "num_features", "num_classes", "head", "preprocessing", "classes"):
        assert info_a[key] == info_b[key]


def test_cached_run_builds_no_network_and_saves_the_same_model(
    image_folder: Path, tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    cold = extract(image_folder, tiny_weights, cache, tmp_path / "cold")
    assert cold.model is not None and len(list((cache / "backbones").iterdir())) == 1
    no_build(monkeypatch)
    warm = extract(image_folder, tiny_weights, cache, tmp_path / "warm")
    assert warm.model is None and warm.history[0]["feature_cache_hits"] == images(image_folder)
    assert warm.metrics["accuracy"] == cold.metrics["accuracy"]
    same_model(tmp_path / "cold", tmp_path / "warm")
    monkeypatch.undo()
    predictions = [headstart.load(tmp_path / run).predict(image_folder / "val")[0] for run in ("cold", "warm")]
    assert [(p.label, round(p.probability, 5)) for p in predictions[0]] == [
        (p.label, round(p.probability, 5)) for p in predictions[1]
    ]


def test_a_new_image_builds_the_network(image_folder: Path, tiny_weights: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    extract(image_folder, tiny_weights, cache, tmp_path / "first")
    stripes(0, np.random.default_rng(99)).save(image_folder / "train" / "horizontal" / "new.png")
    again = extract(image_folder, tiny_weights, cache, tmp_path / "again")
    assert again.model is not None  # one image had to go through it
    assert again.history[0]["feature_cache_hits"] == images(image_folder) - 1


def test_corrupt_entry_is_rebuilt_never_used(image_folder: Path, tiny_weights: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    extract(image_folder, tiny_weights, cache, tmp_path / "first")
    (entry,) = (cache / "backbones").iterdir()
    blob = bytearray(entry.read_bytes())
    blob[-100:-90] = bytes(10)  # tensor data, not the header: the description still reads
    entry.write_bytes(bytes(blob))
    second = extract(image_folder, tiny_weights, cache, tmp_path / "second")
    assert second.model is not None  # the tensors failed their fingerprint, so the network was built
    same_model(tmp_path / "first", tmp_path / "second")
    assert entry.read_bytes() != bytes(blob)  # and the entry written again
    entry.write_bytes(b"not a safetensors file")
    third = extract(image_folder, tiny_weights, cache, tmp_path / "third")
    assert third.model is not None
    same_model(tmp_path / "first", tmp_path / "third")


def test_new_weights_file_contents_get_their_own_entry(image_folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    weights = tmp_path / "w.safetensors"
    torch.manual_seed(1)
    save_file(TinyCNN().state_dict(), str(weights))
    extract(image_folder, weights, cache, tmp_path / "a")
    torch.manual_seed(2)
    save_file(TinyCNN().state_dict(), str(weights))  # same path, new bytes (and size/time)
    other = extract(image_folder, weights, cache, tmp_path / "b")
    assert other.model is not None and other.history[0]["feature_cache_hits"] == 0
    assert len(list((cache / "backbones").iterdir())) == 2
    a, b = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("a", "b"))
    assert not torch.equal(a["backbone.net.features.0.weight"], b["backbone.net.features.0.weight"])


def test_cache_info_and_clear_cover_backbones_and_scans(image_folder: Path, tiny_weights: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    extract(image_folder, tiny_weights, cache, tmp_path / "run")
    rows = {name: entries for name, entries, _ in cache_info(cache)}
    assert rows.pop("backbones/") == 1 and rows.pop("scans/") == 1
    ((features, vectors),) = rows.items()
    assert features.startswith("tiny_cnn-") and vectors == images(image_folder)
    assert cache_clear(cache) == vectors + 2
    assert cache_info(cache) == [] and not any(cache.iterdir())
