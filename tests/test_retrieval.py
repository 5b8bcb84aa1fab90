"""FAISS retrieval index: exact search against numpy, persistence, ids, errors, and the image-level commands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file

from headstart import cli
from headstart.cli.retrieval import add_parsers
from headstart.features.retrieval import (
    BackboneMismatchError,
    ImageIndex,
    IndexFileError,
    add_images,
    build_index,
    evaluate_index,
    remove_images,
    search_images,
)
from headstart.models.backbones import TinyCNN


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def vectors() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((200, 24)).astype(np.float32)


def test_exact_search_equals_brute_force(vectors: np.ndarray) -> None:
    index = ImageIndex(24, "flat")
    ids = index.add(vectors)
    queries = np.random.default_rng(1).standard_normal((7, 24)).astype(np.float32)
    scores, found = index.search(queries, 5)
    sims = unit(queries) @ unit(vectors).T
    expected = np.argsort(-sims, axis=1)[:, :5]
    np.testing.assert_array_equal(found, ids[expected])
    np.testing.assert_allclose(scores, np.take_along_axis(sims, expected, axis=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_self_query_returns_itself_first(kind: str, vectors: np.ndarray) -> None:
    index = ImageIndex(24, kind, {"nlist": 4, "nprobe": 4} if kind == "ivf" else None)
    ids = index.add(vectors)
    scores, found = index.search(vectors[:20], 3)
    np.testing.assert_array_equal(found[:, 0], ids[:20])
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_save_load_round_trip_and_persistent_ids(kind: str, vectors: np.ndarray, tmp_path: Path) -> None:
    index = ImageIndex(24, kind, {"nlist": 4, "nprobe": 2} if kind == "ivf" else None, meta={"backbone": "x"})
    index.add(vectors[:150], [(f"/img/{i}.jpg", "ab"[i % 2], f"d{i}") for i in range(150)])
    assert index.remove([3, 7, 500]) == 2  # 500 was never there
    index.save(tmp_path / "ix")
    loaded = ImageIndex.load(tmp_path / "ix")
    assert loaded.kind == kind and loaded.params == index.params and loaded.meta["backbone"] == "x"
    assert len(loaded) == 148 and 3 not in loaded.items and loaded.items[8].path == "/img/8.jpg"
    queries = vectors[140:150]
    np.testing.assert_array_equal(loaded.search(queries, 4)[1], index.search(queries, 4)[1])
    new_ids = loaded.add(vectors[150:])
    assert new_ids[0] == 150  # ids are never reused, even after removals
    assert loaded.search(vectors[160:161], 1)[1][0, 0] == 160
    assert 3 not in loaded.search(vectors[3:4], 5)[1]


def test_evaluate_matches_hand_computed_leave_one_out() -> None:
    # Three items per class on two well separated axes, plus one confusing item of class a near class b.
    base = np.array([[1, 0.1], [1, 0.2], [1, 0.3], [0.1, 1], [0.2, 1], [0.3, 1], [0.6, 1]], dtype=np.float32)
    labels = ["a", "a", "a", "b", "b", "b", "a"]
    index = ImageIndex(2, "flat")
    index.add(base, [(str(i), label, "") for i, label in enumerate(labels)])
    metrics = index.evaluate(ks=(1, 3))
    sims = unit(base) @ unit(base).T
    p1, p3, r3 = [], [], []
    for q in range(7):
        order = [i for i in np.argsort(-sims[q]) if i != q]
        hits = np.array([labels[i] == labels[q] for i in order])
        relevant = labels.count(labels[q]) - 1
        p1.append(hits[:1].mean())
        p3.append(hits[:3].mean())
        r3.append(hits[:3].sum() / relevant)
    assert metrics["precision@1"] == pytest.approx(np.mean(p1))
    assert metrics["precision@3"] == pytest.approx(np.mean(p3))
    assert metrics["recall@3"] == pytest.approx(np.mean(r3))
    assert metrics["precision@3"] < 1.0 and metrics["queries"] == 7


def test_corrupt_and_mismatched_files_give_clear_errors(vectors: np.ndarray, tmp_path: Path) -> None:
    folder = tmp_path / "ix"
    index = ImageIndex(24, "flat")
    index.add(vectors)
    index.save(folder)
    with pytest.raises(IndexFileError, match=r"meta\.json not found"):
        ImageIndex.load(tmp_path / "nowhere")
    blob = (folder / "index.faiss").read_bytes()
    (folder / "index.faiss").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(IndexFileError, match=r"index\.faiss is truncated .*[Rr]ebuild"):
        ImageIndex.load(folder)
    (folder / "index.faiss").write_bytes(blob)
    ImageIndex.load(folder)
    other = tmp_path / "other"
    small = ImageIndex(24, "flat")
    small.add(vectors[:10])
    small.save(other)
    (folder / "items.csv").write_bytes((other / "items.csv").read_bytes())
    with pytest.raises(IndexFileError, match=r"items\.csv (is truncated|was modified)"):
        ImageIndex.load(folder)
    (folder / "meta.json").write_text("{not json")
    with pytest.raises(IndexFileError, match=r"meta\.json is corrupt"):
        ImageIndex.load(folder)
    with pytest.raises(ValueError, match="12 dimensions, the index 24"):
        small.search(vectors[:1, :12], 1)


# -- images --------------------------------------------------------------------------------------------------------

TINY = {"backbone": "tiny_cnn", "batch_size": 8}


def test_build_search_add_remove_images(image_folder: Path, tiny_weights: Path, cache_dir: Path, tmp_path: Path,
                                        folder_factory) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
    out = tmp_path / "ix"
    index, failed = build_index(image_folder, out, weights=str(tiny_weights), cache_dir=str(cache_dir), **TINY)
    assert len(index) == 30 and not failed
    assert index.meta["classes"] == ["horizontal", "vertical"] and index.meta["preprocessing"]["input_size"] == 64
    query = image_folder / "val" / "vertical" / "vertical_002.jpg"
    results, _ = search_images(out, [query], k=3, cache_dir=str(cache_dir))
    top, score = results[0].hits[0]
    assert Path(top.path) == query.resolve() and score == pytest.approx(1.0, abs=1e-4)
    # Even random conv features put same-class stripes nearer than chance (14 of the 29 others share a class).
    assert evaluate_index(out, ks=(5,))["precision@5"] > 14 / 29

    extra = folder_factory("extra", {"new": 5}, seed=7)
    ids, _ = add_images(out, [extra], label="new", cache_dir=str(cache_dir))
    assert len(ids) == 10 and ids.min() == 30  # appended with fresh ids, the first 30 untouched
    for path in sorted((extra / "new").rglob("*.jpg"))[:3]:
        hit = search_images(out, [path], k=1, cache_dir=str(cache_dir))[0][0].hits[0][0]
        assert Path(hit.path) == path.resolve() and hit.label == "new"
    assert remove_images(out, [str(query), "31"]) == 2
    hits = search_images(out, [query], k=40, cache_dir=str(cache_dir))[0][0].hits
    assert len(hits) == 38 and Path(hits[0][0].path) != query.resolve()


def test_query_with_another_backbone_is_refused(image_folder: Path, tiny_weights: Path, cache_dir: Path,
                                                tmp_path: Path) -> None:  # fmt: skip
    build_index(image_folder / "val", tmp_path / "ix", weights=str(tiny_weights), cache_dir=str(cache_dir), **TINY)
    other = tmp_path / "other.safetensors"
    save_file(TinyCNN().state_dict(), str(other))
    with pytest.raises(BackboneMismatchError, match=r"tiny_cnn.*not comparable.*omit --backbone"):
        search_images(tmp_path / "ix", [image_folder / "val"], backbone="tiny_cnn", weights=str(other))
    same = search_images(tmp_path / "ix", [image_folder / "val"], k=1, backbone="tiny_cnn", weights=str(tiny_weights),
                         cache_dir=str(cache_dir))[0]  # fmt: skip
    assert all(Path(r.hits[0][0].path) == r.query for r in same)


def test_cli_index_and_search(image_folder: Path, tiny_weights: Path, cache_dir: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command", required=True))

    def run(*argv: str) -> str:
        args = parser.parse_args(list(argv))
        assert cli.COMMANDS[args.command](args) == 0
        return capsys.readouterr().out

    ix = str(tmp_path / "ix")
    common = ["--cache-dir", str(cache_dir)]
    out = run("index", "build", str(image_folder), "--out", ix, "--backbone", "tiny_cnn", "--weights",
              str(tiny_weights), "--index", "hnsw", "--ef-search", "32", *common)  # fmt: skip
    assert "indexed 30 images (64-d, hnsw m=16, ef_construction=40, ef_search=32)" in out
    assert "precision" in run("index", "evaluate", ix, "-k", "1", "5", "--json", str(tmp_path / "m.json"))
    assert json.loads((tmp_path / "m.json").read_text())["queries"] == 30
    query = image_folder / "train" / "horizontal" / "horizontal_004.jpg"
    text = run("search", ix, str(query), "-k", "2", "--json", "-", "--sheet", str(tmp_path / "sheet.png"), *common)
    rows = json.loads(text)
    assert rows[0]["results"][0]["path"] == str(query.resolve()) and len(rows[0]["results"]) == 2
    from PIL import Image

    with Image.open(tmp_path / "sheet.png") as sheet:
        assert sheet.size == (3 * 132, 146)
    assert "removed 1 items" in run("index", "remove", ix, str(query))
    assert "added 1 images" in run("index", "add", ix, str(query), *common)
