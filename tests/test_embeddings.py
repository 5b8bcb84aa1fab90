"""The feature cache: hits and misses keyed by content, weights, preprocessing and precision; corruption detected;
cached features equal fresh ones; a head fitted on cached features matches the saved model run end to end."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from threadpoolctl import threadpool_limits

import headstart
from conftest import stripes
from headstart.data.scan import list_images, load_dataset
from headstart.features.embeddings import cache_clear, cache_info, embed
from headstart.models.backbones import Backbone, TinyCNN, create_backbone
from headstart.models.heads import fit_logistic, predict_proba

FAST = {"batch_size": 8, "workers": 0, "device": torch.device("cpu")}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One compute thread for torch and for BLAS. On the shared 2-core machine two threads wait on each other at every
    barrier when other jobs hold the cores: mobilenet_v3_small forward + backward took 20 s with 2 threads and 0.3 s
    with 1, and fit_logistic's L-BFGS (OpenBLAS) on 20 x 64 features 2.0 s against 0.4 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(threads)


@pytest.fixture
def files(image_folder: Path) -> list[Path]:
    return list_images(image_folder / "train")[:8]


@pytest.fixture
def backbone(tiny_weights: Path) -> Backbone:
    return create_backbone("tiny_cnn", weights=str(tiny_weights))


def test_second_run_hits_the_cache(backbone: Backbone, files: list[Path], cache_dir: Path) -> None:
    first = embed(backbone, files, precision="fp32", cache_root=cache_dir, **FAST)
    assert (first.computed, first.hits, first.failed) == (len(files), 0, [])
    assert first.features.shape == (len(files), backbone.num_features) and first.features.dtype == np.float32
    assert first.index.tolist() == list(range(len(files)))
    second = embed(backbone, files, precision="fp32", cache_root=cache_dir, **FAST)
    assert (second.computed, second.hits) == (0, len(files))
    np.testing.assert_array_equal(second.features, first.features)
    fresh = embed(backbone, files, precision="fp32", use_cache=False, **FAST)
    assert fresh.computed == len(files)
    np.testing.assert_allclose(fresh.features, first.features, rtol=0, atol=1e-6)
    assert [(name.split("-")[0], n) for name, n, _ in cache_info(cache_dir)] == [("tiny_cnn", len(files))]


def test_an_interrupted_pass_keeps_the_batches_it_finished(
    backbone: Backbone, files: list[Path], cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Features are cached batch by batch: a run stopped in its second batch computes only that batch again."""
    calls = 0
    real = backbone.forward

    def stop_in_second_batch(x: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt
        return real(x)

    monkeypatch.setattr(backbone, "forward", stop_in_second_batch)
    with pytest.raises(KeyboardInterrupt):
        embed(backbone, files, precision="fp32", cache_root=cache_dir, batch_size=4, workers=0, device=FAST["device"])
    monkeypatch.setattr(backbone, "forward", real)
    resumed = embed(backbone, files, precision="fp32", cache_root=cache_dir, batch_size=4, workers=0,
                    device=FAST["device"])  # fmt: skip
    assert (resumed.hits, resumed.computed) == (4, len(files) - 4)


def test_edited_image_is_recomputed_alone(backbone: Backbone, files: list[Path], cache_dir: Path) -> None:
    before = embed(backbone, files, precision="fp32", cache_root=cache_dir, **FAST)
    stripes(1, np.random.default_rng(42)).save(files[3], quality=80)
    after = embed(backbone, files, precision="fp32", cache_root=cache_dir, **FAST)
    assert (after.computed, after.hits) == (1, len(files) - 1)
    changed = [i for i in range(len(files)) if not np.array_equal(after.features[i], before.features[i])]
    assert changed == [3]
    np.testing.assert_allclose(
        after.features[3], embed(backbone, [files[3]], precision="fp32", use_cache=False, **FAST).features[0],
        atol=1e-6,
    )  # fmt: skip


def test_weights_preprocessing_and_precision_each_get_their_own_folder(
    backbone: Backbone, files: list[Path], cache_dir: Path, tmp_path: Path
) -> None:
    base = embed(backbone, files, precision="fp32", cache_root=cache_dir, **FAST)
    torch.manual_seed(999)
    save_file(TinyCNN().state_dict(), str(tmp_path / "other.safetensors"))
    other = create_backbone("tiny_cnn", weights=str(tmp_path / "other.safetensors"))
    assert other.fingerprint() != backbone.fingerprint()
    retrained = embed(other, files, precision="fp32", cache_root=cache_dir, **FAST)
    assert retrained.computed == len(files) and not np.allclose(retrained.features, base.features)

    bigger = create_backbone("tiny_cnn", weights=str(backbone.weights_source.removeprefix("file:")))
    assert bigger.fingerprint() == backbone.fingerprint()
    bigger.preprocessing = dataclasses.replace(bigger.preprocessing, input_size=96, resize_size=108)
    assert embed(bigger, files, precision="fp32", cache_root=cache_dir, **FAST).computed == len(files)

    half = embed(backbone, files, precision="bf16", cache_root=cache_dir, **FAST)
    assert half.computed == len(files)
    np.testing.assert_allclose(half.features, base.features, rtol=0.05, atol=0.05)  # same net, rounded arithmetic
    assert embed(backbone, files, precision="fp32", cache_root=cache_dir, **FAST).hits == len(files)
    assert len(cache_info(cache_dir)) == 4 and all(n == len(files) for _, n, _ in cache_info(cache_dir))


def test_corrupt_entries_are_recomputed(backbone: Backbone, files: list[Path], cache_dir: Path) -> None:
    clean = embed(backbone, files, precision="fp32", cache_root=cache_dir, **FAST)
    entries = sorted((cache_dir / "features").rglob("*.f32"))
    assert len(entries) == len(files)
    truncated, flipped = entries[0], entries[1]
    truncated.write_bytes(truncated.read_bytes()[:-9])
    data = bytearray(flipped.read_bytes())
    data[5] ^= 0x40  # one bit of one float: the length is right, only the checksum can tell
    flipped.write_bytes(bytes(data))
    again = embed(backbone, files, precision="fp32", cache_root=cache_dir, **FAST)
    assert (again.computed, again.hits) == (2, len(files) - 2)
    np.testing.assert_array_equal(again.features, clean.features)
    assert embed(backbone, files, precision="fp32", cache_root=cache_dir, **FAST).hits == len(files)  # repaired


def test_cache_info_and_clear(backbone: Backbone, files: list[Path], cache_dir: Path) -> None:
    assert cache_info(cache_dir) == [] and cache_clear(cache_dir) == 0
    embed(backbone, files[:5], precision="fp32", cache_root=cache_dir, **FAST)
    [(name, count, size)] = cache_info(cache_dir)
    assert name.startswith("tiny_cnn-") and "-fp32-center" in name
    assert count == 5 and size == 5 * (4 * backbone.num_features + 4)  # float32 vector + CRC-32 each
    assert cache_clear(cache_dir) == 5
    assert cache_info(cache_dir) == []
    assert embed(backbone, files[:5], precision="fp32", cache_root=cache_dir, **FAST).computed == 5


def test_unreadable_inputs_fail_alone(backbone: Backbone, files: list[Path], cache_dir: Path, tmp_path: Path) -> None:
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture")
    items = [files[0], text, files[1], tmp_path / "gone.jpg", files[2]]
    result = embed(backbone, items, precision="fp32", cache_root=cache_dir, **FAST)
    assert result.index.tolist() == [0, 2, 4]
    assert sorted(p.name for p, _ in result.failed) == ["gone.jpg", "notes.jpg"]
    assert result.features.shape == (3, backbone.num_features) and result.computed == 3
    expected = embed(backbone, [files[0], files[1], files[2]], precision="fp32", use_cache=False, **FAST)
    np.testing.assert_allclose(result.features, expected.features, atol=1e-6)
    again = embed(backbone, items, precision="fp32", cache_root=cache_dir, **FAST)
    assert again.hits == 3 and len(again.failed) == 2  # failures are never cached as features


def test_l2_normalize(backbone: Backbone, files: list[Path]) -> None:
    raw = embed(backbone, files, precision="fp32", use_cache=False, **FAST).features
    unit = embed(backbone, files, precision="fp32", use_cache=False, l2_normalize=True, **FAST).features
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)


def test_head_on_cached_features_matches_saved_model(
    image_folder: Path, tiny_weights: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """The extract contract: a head fitted on cached features predicts exactly what the saved model predicts."""
    run = tmp_path / "run"
    headstart.train(image_folder, strategy="extract", backbone="tiny_cnn", weights=str(tiny_weights), out=str(run),
              cache_dir=str(cache_dir), batch_size=8, num_workers=0)  # fmt: skip
    model = headstart.load(run)
    dataset = load_dataset(image_folder)
    common = {"precision": model.precision, "cache_root": cache_dir, "batch_size": 8, "workers": 0}
    train = embed(model.classifier.backbone, dataset.train, **common)
    val = embed(model.classifier.backbone, dataset.val, **common)
    assert train.computed == 0 and val.computed == 0  # the run filled the cache with exactly these features
    head_info = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    labels = np.array([r.label for r in dataset.train])
    head, _ = fit_logistic(train.features, labels, len(dataset.classes), c=head_info["C"], scaling=head_info["scaling"])
    ours = predict_proba(head, val.features)
    theirs, outputs = model.predict_proba(dataset.val, batch_size=8)
    assert outputs.ok.all() and theirs.shape == ours.shape == (len(dataset.val), 2)
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    assert (theirs.argmax(1) == ours.argmax(1)).all()
    val_labels = np.array([r.label for r in dataset.val])
    assert (ours.argmax(1) == val_labels).mean() >= 0.8
