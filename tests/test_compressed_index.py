"""Compressed retrieval indexes: the memory planner, SQ8 / IVF-PQ / OPQ recall, re-ranking with the exact vectors on
disk, memory-mapped loading, and their bad inputs (a budget no index fits, a damaged vectors file, a newer format)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from headstart import cli
from headstart.cli.retrieval import add_parsers
from headstart.errors import ConfigError
from headstart.features.retrieval import (
    ImageIndex,
    IndexFileError,
    default_params,
    estimate_bytes,
    parse_size,
    plan_index,
    training_size,
)

DIM = 64


def clustered(n: int, seed: int) -> np.ndarray:
    """Unit vectors around 50 centres in a 16-d subspace, plus noise: neighbours are meaningful, as in embeddings."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).standard_normal((50, 16)).astype(np.float32) * 2
    mixing = np.random.default_rng(98).standard_normal((16, DIM)).astype(np.float32)
    z = centres[rng.integers(0, 50, n)] + rng.standard_normal((n, 16)).astype(np.float32)
    x = z @ mixing + rng.standard_normal((n, DIM)).astype(np.float32) * 2
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def collection() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """12,000 vectors (enough to train 256 PQ centroids), 50 queries, and their exact top 10."""
    x, q = clustered(12_000, 0), clustered(50, 1)
    truth = np.argsort(-(q @ x.T), axis=1)[:, :10]
    return x, q, truth


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth, strict=True)]))


def test_parse_size_reads_decimal_and_binary_units() -> None:
    assert parse_size("2GB") == 2 * 10**9 and parse_size("500 MB") == 5 * 10**8 and parse_size("1.5GiB") == 3 * 2**29
    assert parse_size(1234) == 1234
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


def test_planner_steps_down_to_smaller_codes_as_the_budget_shrinks() -> None:
    n, dim = 1_000_000, 1280
    assert plan_index(50_000, dim, "10GB")[0] == "flat"
    assert plan_index(n, dim, "10GB")[0] == "ivf"
    kind, params = plan_index(n, dim, "2GB")
    assert kind == "ivfsq8" and estimate_bytes(kind, n, dim, params) <= 2e9
    kind, params = plan_index(n, dim, "1GB")
    # 128-byte codes of 256 4-bit sub-quantizers, each over 5 of the 1,280 dimensions.
    assert kind == "opq" and params["m"] == 128 and params["nbits"] == 4 and params["rerank"] == 10
    assert dim % (2 * params["m"]) == 0
    small_kind, small = plan_index(n, dim, "300MB")
    assert small_kind == "opq" and small["m"] < 128 and estimate_bytes("opq", n, dim, small) <= 3e8
    with pytest.raises(ConfigError, match=r"too small for 1,000,000 vectors .*needs about .*Give --memory-budget"):
        plan_index(n, dim, "100MB")
    # An explicit kind is only sized, never swapped.
    assert plan_index(n, dim, "1GB", kind="ivfpq")[0] == "ivfpq"


@pytest.mark.parametrize(
    ("kind", "floor"), [("sq8", 0.95), ("ivfsq8", 0.85), ("ivfpq", 0.85), ("opq", 0.85)]
)  # fmt: skip
def test_compressed_kinds_find_the_exact_neighbours(kind: str, floor: float, collection) -> None:  # type: ignore[no-untyped-def]
    x, q, truth = collection
    params = {"nlist": 64, "nprobe": 16, "m": 16} if kind != "sq8" else {}
    index = ImageIndex(DIM, kind, params)
    index.train(x[: training_size(kind, default_params(kind, len(x), DIM) | params)], count=len(x))
    for start in range(0, len(x), 4000):  # streamed in chunks, as a build from shards does
        index.add(x[start : start + 4000])
    got = recall(index.search(q, 10)[1], truth)
    assert got >= floor, f"{kind} recall@10 {got:.3f}"
    if kind in ("ivfpq", "opq"):
        # Codes of 16 bytes lose order among close neighbours; re-scoring 10 k candidates with the exact vectors
        # restores it, and without them (rerank 0) the recall is lower.
        assert index.store is not None and len(index.store) == len(x)
        assert got > recall(index.search(q, 10, rerank=0)[1], truth)
        scores, ids = index.search(q, 10)
        np.testing.assert_allclose(scores, np.take_along_axis(q @ x.T, ids, 1), atol=2e-3)  # exact (float16) scores


def test_pq_index_round_trips_and_searches_memory_mapped(collection, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    x, q, _ = collection
    index = ImageIndex(DIM, "opq", {"nlist": 32, "nprobe": 8, "m": 8, "rerank": 5}, meta={"backbone": "b"})
    index.add(x[:11_000], [(f"/i/{i}.jpg", "ab"[i % 2], f"d{i}") for i in range(11_000)])
    index.save(tmp_path / "ix")
    assert (tmp_path / "ix" / "vectors.npy").is_file()
    assert json.loads((tmp_path / "ix" / "meta.json").read_text())["vectors"] == "vectors.npy"
    expected = index.search(q, 10)
    for mmap in (False, True):
        loaded = ImageIndex.load(tmp_path / "ix", mmap=mmap)
        got = loaded.search(q, 10)
        np.testing.assert_array_equal(got[1], expected[1])
        np.testing.assert_allclose(got[0], expected[0], atol=1e-6)
    with pytest.raises(ValueError, match=r"memory-mapped .*read-only"):
        loaded.add(x[:1])
    # Loaded normally it grows: new vectors join the store, ids keep counting.
    grown = ImageIndex.load(tmp_path / "ix")
    new = grown.add(x[11_000:11_010], [(f"/n/{i}.jpg", "a", "") for i in range(10)])
    assert new[0] == 11_000
    assert grown.search(x[11_005:11_006], 1)[1][0, 0] == 11_005
    grown.save(tmp_path / "ix")
    assert len(ImageIndex.load(tmp_path / "ix", mmap=True).store or []) == 11_010


def test_pq_codes_are_fast_scan_and_indexes_with_8_bit_codes_still_load(collection, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    x, q, _ = collection
    labels = [(f"/i/{i}.jpg", "ab"[i % 2] if i < 500 else "", "") for i in range(11_000)]  # 500 evaluation queries
    fast = ImageIndex(DIM, "ivfpq", {"nlist": 16, "nprobe": 8, "m": 16, "rerank": 0})
    fast.add(x[:11_000], labels)
    assert fast.params["nbits"] == 4
    assert type(faiss.downcast_index(faiss.extract_index_ivf(fast.index))).__name__ == "IndexIVFPQFastScan"
    # 4-bit codes cannot be decoded, so the exact vectors are kept even without re-ranking: evaluate() uses them.
    assert fast.store is not None and len(fast.store) == 11_000
    np.testing.assert_allclose(fast.vectors(np.array([5])), x[5:6], atol=1e-3)
    assert fast.evaluate((1,))["queries"] == 500
    assert fast.remove([0, 1, 2, 99_999]) == 3  # the lists are scanned: fast-scan has no id-to-list map
    assert not {0, 1, 2} & set(fast.search(x[:3], 10, rerank=10)[1].ravel().tolist())
    # An index written before 4-bit codes has no "nbits" in its parameters: it loads as 8-bit PQ and still removes.
    old = ImageIndex(DIM, "ivfpq", {"nlist": 16, "nprobe": 8, "m": 8, "rerank": 0, "nbits": 8})
    old.add(x[:11_000], labels)
    del old.params["nbits"]
    old.save(tmp_path / "old")
    loaded = ImageIndex.load(tmp_path / "old")
    assert "nbits" not in loaded.params and loaded.store is None
    assert type(faiss.downcast_index(faiss.extract_index_ivf(loaded.index))).__name__ == "IndexIVFPQ"
    np.testing.assert_array_equal(loaded.search(q, 10)[1], old.search(q, 10)[1])
    assert loaded.remove([4]) == 1 and 4 not in loaded.search(x[4:5], 10)[1]
    assert loaded.evaluate((1,))["queries"] == 500 - 1  # vectors decoded from the 8-bit codes


def test_damaged_vectors_file_and_newer_format_are_named(collection, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    x, _, _ = collection
    folder = tmp_path / "ix"
    index = ImageIndex(DIM, "ivfpq", {"nlist": 16, "nprobe": 4, "m": 8})
    index.add(x[:11_000])
    index.save(folder)
    vectors = folder / "vectors.npy"
    blob = vectors.read_bytes()
    vectors.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(IndexFileError, match=r"vectors\.npy is truncated .*rebuild the index"):
        ImageIndex.load(folder)
    vectors.unlink()
    with pytest.raises(IndexFileError, match=r"vectors\.npy is missing"):
        ImageIndex.load(folder)
    vectors.write_bytes(blob)
    meta = json.loads((folder / "meta.json").read_text())
    meta["format"] = 99
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(IndexFileError, match=r"format 99, written by a newer headstart.*[Uu]pgrade"):
        ImageIndex.load(folder)


def test_cli_builds_from_embeddings_by_budget_and_searches_with_rerank(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], image_folder: Path, tiny_weights: Path, cache_dir: Path
) -> None:
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command", required=True))

    def run(*argv: str) -> str:
        args = parser.parse_args(list(argv))
        assert cli.COMMANDS[args.command](args) == 0
        return capsys.readouterr().out

    common = ["--backbone", "tiny_cnn", "--weights", str(tiny_weights), "--cache-dir", str(cache_dir)]
    ix = str(tmp_path / "ix")
    with pytest.raises(ConfigError, match="too small for 30 vectors"):
        run("index", "build", str(image_folder), "--out", ix, "--index", "auto", "--memory-budget", "1KB", *common)
    out = run("index", "build", str(image_folder), "--out", ix, "--index", "auto", "--memory-budget", "12KB",
              "--overwrite", *common)  # fmt: skip
    assert "indexed 30 images (64-d, sq8" in out  # flat (about 15 KB) does not fit, 1 byte per dimension does
    query = image_folder / "train" / "horizontal" / "horizontal_004.jpg"
    rows = json.loads(run("search", ix, str(query), "-k", "3", "--json", "-", "--cache-dir", str(cache_dir)))
    assert rows[0]["results"][0]["path"] == str(query.resolve())
    assert rows[0]["results"][0]["score"] == pytest.approx(1.0, abs=0.02)
