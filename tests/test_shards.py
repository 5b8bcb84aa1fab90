"""Sharded, resumable embeddings: a run killed with SIGKILL and started again keeps its complete shards and ends
equal to an uninterrupted run; a damaged shard is named and recomputed; the streaming reader and the index built
from shards agree with the in-memory paths."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from headstart.errors import IntegrityError
from headstart.features.embeddings import load_embeddings, write_embeddings
from headstart.features.retrieval import ImageIndex, build_index
from headstart.features.shards import iter_embedding_shards, sample_vectors

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HEADSTART_QUIET": "1"}

# Planted through sitecustomize: the third shard's write stops half-way (its vectors on disk, no description), as a
# SIGKILL there would leave it, and then the process is SIGKILLed.
KILL_IN_THIRD_SHARD = """
import os, signal
import headstart.features.shards as shards
real = shards.write_files
calls = 0
def torn(folder, files):
    global calls
    calls += 1
    if calls == 3:
        real(folder, {"vectors.npy": files["vectors.npy"]})
        os.kill(os.getpid(), signal.SIGKILL)
    real(folder, files)
shards.write_files = torn
"""


def _embed(image_folder: Path, tiny_weights: Path, out: Path, cache: Path, **kw: object) -> object:
    return write_embeddings([image_folder], out, backbone="tiny_cnn", weights=str(tiny_weights), precision="fp32",
                            cache_dir=str(cache), workers=0, batch_size=4, **kw)  # type: ignore[arg-type]  # fmt: skip


def _stamps(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted((folder / "shards").rglob("*")) if p.is_file()}  # fmt: skip


def test_shards_read_back_as_one_matrix_and_stream(image_folder: Path, tiny_weights: Path, tmp_path: Path) -> None:
    whole = _embed(image_folder, tiny_weights, tmp_path / "whole", tmp_path / "c1", shard_size=1000)
    sharded = _embed(image_folder, tiny_weights, tmp_path / "sharded", tmp_path / "c2", shard_size=8)
    assert (whole.shards, sharded.shards, sharded.rows) == (1, 4, 30)  # type: ignore[attr-defined]
    a, rows_a, _meta_a = load_embeddings(tmp_path / "whole")
    b, rows_b, meta_b = load_embeddings(tmp_path / "sharded")
    np.testing.assert_array_equal(a, b)
    assert rows_a == rows_b and rows_a[0]["label"] in ("horizontal", "vertical") and rows_a[0]["split"] == "train"
    assert meta_b["format"] == 2 and [s["rows"] for s in meta_b["shards"]] == [8, 8, 8, 6]
    parts = list(iter_embedding_shards(tmp_path / "sharded"))
    assert [len(v) for v, _ in parts] == [8, 8, 8, 6]
    np.testing.assert_array_equal(np.concatenate([v for v, _ in parts]), a)
    sample = sample_vectors(tmp_path / "sharded", 10)
    assert sample.shape == (10, a.shape[1]) and all((a == row).all(1).any() for row in sample)


def test_sigkill_mid_run_then_rerun_equals_uninterrupted(image_folder: Path, tiny_weights: Path,
                                                         tmp_path: Path) -> None:  # fmt: skip
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_IN_THIRD_SHARD)
    out = tmp_path / "emb"
    command = [sys.executable, "-m", "headstart", "embed", str(image_folder), "--backbone", "tiny_cnn", "--weights",
               str(tiny_weights), "--precision", "fp32", "--shard-size", "8", "--out", str(out),
               "--no-cache"]  # fmt: skip
    planted = {**ENV, "PYTHONPATH": os.pathsep.join([str(hook), ENV.get("PYTHONPATH", "")])}
    killed = subprocess.run(command, env=planted, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "meta.json").exists()  # written last: a killed run never passes for a finished one
    with pytest.raises(FileNotFoundError, match="run the same command again"):
        load_embeddings(out)
    before = _stamps(out)
    assert {name.split("/")[1] for name in before} == {"00000", "00001", "00002"}  # two whole, one torn
    rerun = subprocess.run(
        command, env={**ENV, "HEADSTART_QUIET": "0", "COLUMNS": "300"}, capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "2 complete shards kept from an earlier run" in rerun.stdout and "14 computed" in rerun.stdout
    assert "shards/00002 is incomplete" in " ".join(rerun.stderr.split())  # the torn shard is named, then recomputed
    after = _stamps(out)
    for name, stamp in before.items():  # the complete shards were not touched: same inode, same mtime
        if name.startswith(("shards/00000/", "shards/00001/")):
            assert after[name] == stamp, name
    expected = _embed(image_folder, tiny_weights, tmp_path / "straight", tmp_path / "c", shard_size=8, use_cache=False)
    assert expected.computed == 30  # type: ignore[attr-defined]
    a, rows_a, _ = load_embeddings(out)
    b, rows_b, _ = load_embeddings(tmp_path / "straight")
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert rows_a == rows_b


def test_a_corrupt_shard_is_named_and_recomputed(image_folder: Path, tiny_weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "emb"
    _embed(image_folder, tiny_weights, out, tmp_path / "c", shard_size=8)
    clean, clean_rows, _ = load_embeddings(out)
    target = out / "shards" / "00001" / "vectors.npy"
    data = bytearray(target.read_bytes())
    data[-7] ^= 0x10  # one bit of one float
    target.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"shards/00001/vectors\.npy was modified.*run the same `headstart embed`"):
        load_embeddings(out)
    with pytest.raises(IntegrityError, match="00001"):
        list(iter_embedding_shards(out))
    before = _stamps(out)
    again = _embed(image_folder, tiny_weights, out, tmp_path / "c", shard_size=8)
    assert (again.kept, again.hits, again.computed) == (3, 8, 0)  # type: ignore[attr-defined]
    assert any("00001" in note and "computing it again" in note for note in again.notes)  # type: ignore[attr-defined]
    after = _stamps(out)
    assert [n for n in before if before[n] != after.get(n)] == [n for n in before if "/00001/" in n]
    fixed, rows, _ = load_embeddings(out)
    np.testing.assert_array_equal(fixed, clean)
    assert rows == clean_rows
    # a shard deleted from a finished folder is named too, with what to do
    import shutil

    shutil.rmtree(out / "shards" / "00002")
    with pytest.raises(IntegrityError, match=r"shards/00002 is missing.*run the same"):
        load_embeddings(out)


def test_changed_settings_recompute_and_newer_format_is_refused(image_folder: Path, tiny_weights: Path,
                                                                tmp_path: Path) -> None:  # fmt: skip
    out = tmp_path / "emb"
    _embed(image_folder, tiny_weights, out, tmp_path / "c", shard_size=8)
    normalized = _embed(image_folder, tiny_weights, out, tmp_path / "c", shard_size=8, l2_normalize=True)
    assert normalized.kept == 0  # type: ignore[attr-defined]  # other settings: no shard may be reused
    matrix, _, meta = load_embeddings(out)
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-5)
    meta["format"] = 99
    from headstart.checksums import write_files

    write_files(out, {"meta.json": json.dumps(meta).encode()})
    with pytest.raises(IntegrityError, match="format 99, newer than this headstart reads"):
        load_embeddings(out)


def test_old_single_file_folders_still_load(tmp_path: Path) -> None:
    import csv
    import io

    from headstart.checksums import write_files

    matrix = np.arange(12, dtype=np.float32).reshape(3, 4)
    buffer, text = io.BytesIO(), io.StringIO()
    np.save(buffer, matrix)
    csv.writer(text).writerows(
        [["path", "label", "split", "digest"], *[[f"/x/{i}.jpg", "", "", "d"] for i in range(3)]]
    )
    write_files(tmp_path, {"embeddings.npy": buffer.getvalue(), "ids.csv": text.getvalue().encode(),
                           "meta.json": json.dumps({"shape": [3, 4]}).encode()})  # fmt: skip
    loaded, rows, _ = load_embeddings(tmp_path)
    np.testing.assert_array_equal(loaded, matrix)
    assert [r["path"] for r in rows] == ["/x/0.jpg", "/x/1.jpg", "/x/2.jpg"]
    assert len(list(iter_embedding_shards(tmp_path))) == 1


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_index_from_shards_equals_index_in_memory(kind: str, image_folder: Path, tiny_weights: Path,
                                                  tmp_path: Path) -> None:  # fmt: skip
    params = {"nlist": 4, "nprobe": 4} if kind == "ivf" else None
    common = {"backbone": "tiny_cnn", "weights": str(tiny_weights), "precision": "fp32", "kind": kind,
              "params": params}  # fmt: skip
    _streamed, _ = build_index(image_folder, tmp_path / "streamed", cache_dir=str(tmp_path / "c"), shard_size=8,
                              **common)  # type: ignore[arg-type]  # fmt: skip
    assert (tmp_path / "streamed" / "embeddings" / "shards" / "00003").is_dir()
    # in memory: the embeddings of the same images, added at once
    matrix, rows, _meta = load_embeddings(tmp_path / "streamed" / "embeddings")
    whole = ImageIndex(matrix.shape[1], kind, params, {})
    whole.add(matrix, [(r["path"], r["label"], r["digest"]) for r in rows])
    loaded = ImageIndex.load(tmp_path / "streamed")
    assert [(i.id, i.path, i.label) for i in loaded.items.values()] == [
        (i.id, i.path, i.label) for i in whole.items.values()
    ]
    if kind == "flat":
        s1, i1 = loaded.search(matrix[:5], 5)
        s2, i2 = whole.search(matrix[:5], 5)
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_allclose(s1, s2, atol=1e-6)
    # built from an existing `headstart embed` folder, nothing embedded again
    again, _ = build_index(image_folder, tmp_path / "from", embeddings=tmp_path / "streamed" / "embeddings",
                           **common)  # type: ignore[arg-type]  # fmt: skip
    assert [i.path for i in again.items.values()] == [i.path for i in loaded.items.values()]
    assert not (tmp_path / "from" / "embeddings").exists()
    if kind == "flat":
        np.testing.assert_array_equal(ImageIndex.load(tmp_path / "from").search(matrix[:5], 5)[1], i1)
