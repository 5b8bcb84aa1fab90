"""What headstart wrote, read back: checksums verified, files checked against each other, damage reported in one line.

Each test damages a copy of a real run (or index, embeddings, export, cache) the way a failed copy, a full disk or a
hand edit would, and runs the real CLI: the command must end with ``headstart CMD: error: <file>: <what is wrong>;
<what to do>``, exit 2, and show no traceback.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import headstart
from conftest import make_folder
from headstart.checksums import MANIFEST, read_verified, write_files
from headstart.cli import main
from headstart.errors import IntegrityError, StorageError
from headstart.features.embeddings import load_embeddings
from headstart.features.retrieval import ImageIndex, IndexFileError

FAST = {"backbone": "tiny_cnn", "batch_size": 8, "num_workers": 0, "precision": "fp32", "run.report": False,
        "run.audit": False}  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_weights: Path) -> tuple[Path, Path]:
    """(run folder of a tiny extract model, its data), trained once for the module; tests damage copies."""
    root = tmp_path_factory.mktemp("integrity")
    data = make_folder(root / "data", {"train": 6, "val": 3})
    headstart.train(data, strategy="extract", weights=str(tiny_weights), out=str(root / "run"),
                    cache_dir=str(root / "cache"), **FAST)  # fmt: skip
    return root / "run", data


@pytest.fixture
def run_copy(trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the trained run folder (and a private feature cache)."""
    monkeypatch.setenv("HEADSTART_CACHE", str(tmp_path / "cache"))
    return Path(shutil.copytree(trained[0], tmp_path / "run"))


def cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI, expecting a user error: exit 2, one ``error:`` line, no traceback; returns that line."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    return lines[0]


def predict_error(run: Path, data: Path, capsys: pytest.CaptureFixture[str]) -> str:
    return cli_error(["predict", str(run), str(data / "val")], capsys)


def test_run_folder_lists_its_files_with_checksums(trained: tuple[Path, Path]) -> None:
    run, _ = trained
    listed = json.loads((run / MANIFEST).read_text())["files"]
    assert set(listed) == {"model.safetensors", "model.json"}
    for name in listed:
        read_verified(run, name, "")  # every listed file matches its newest checksum


def test_truncated_weights_name_the_file_and_what_to_do(run_copy: Path, trained: tuple[Path, Path],
                                                        capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    weights = run_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    line = predict_error(run_copy, trained[1], capsys)
    assert line.startswith("headstart predict: error: ")
    assert f"{weights} is truncated" in line and "headstart train" in line
    # A folder from before checksums: the file's own format still tells, in the same one line (no "incomplete
    # metadata" traceback from safetensors).
    (run_copy / MANIFEST).unlink()
    line = predict_error(run_copy, trained[1], capsys)
    assert f"{weights} cannot be read" in line and "truncated or damaged" in line


def test_an_edited_byte_is_caught(
    run_copy: Path, trained: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    weights = run_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x40  # inside the last tensor: the file still parses, the numbers are wrong
    weights.write_bytes(bytes(data))
    line = predict_error(run_copy, trained[1], capsys)
    assert f"{weights} was modified after it was written" in line
    assert main(["evaluate", str(run_copy), str(trained[1])]) == 2  # the cached-feature path checks it too


def test_class_list_edited_in_model_json(run_copy: Path, trained: tuple[Path, Path],
                                         capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    info_path = run_copy / "model.json"
    info = json.loads(info_path.read_text())
    info["classes"].append("diagonal")
    info_path.write_text(json.dumps(info, indent=2))
    line = predict_error(run_copy, trained[1], capsys)
    assert f"{info_path} was modified or replaced" in line
    # Without checksums (an older folder), the class list is still checked against the weights: no "shape mismatch:
    # value array of shape (1,2) could not be broadcast".
    (run_copy / MANIFEST).unlink()
    line = predict_error(run_copy, trained[1], capsys)
    assert "lists 3 classes (horizontal, vertical, diagonal) but the head in" in line and "has 2 outputs" in line
    info["classes"] = ["horizontal", "horizontal"]
    info_path.write_text(json.dumps(info))
    assert "lists a class twice" in predict_error(run_copy, trained[1], capsys)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda p: p.update(mean=[0.485, 0.456, 0.406]), "are not those of backbone tiny_cnn"),
        (lambda p: p.update(std=[0.5, 0.0, 0.5]), "std above zero"),
        (lambda p: p.update(input_size=512), "at most resize_size"),
        (lambda p: p.pop("mean"), "unusable preprocessing (KeyError"),
    ],
)
def test_preprocessing_is_checked_against_the_backbone(
    run_copy: Path, trained: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
    edit: Callable[[dict[str, object]], object], expected: str,
) -> None:  # fmt: skip
    (run_copy / MANIFEST).unlink()  # as an older folder: the checksum would catch the edit first
    info = json.loads((run_copy / "model.json").read_text())
    edit(info["preprocessing"])
    (run_copy / "model.json").write_text(json.dumps(info))
    line = predict_error(run_copy, trained[1], capsys)
    assert str(run_copy / "model.json") in line and expected in line


def test_old_run_folder_without_checksums_still_loads(run_copy: Path, trained: tuple[Path, Path],
                                                      capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    (run_copy / MANIFEST).unlink()
    assert main(["predict", str(run_copy), str(trained[1] / "val")]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("\n") == 6 and not captured.err


def test_missing_weights_and_damaged_manifest(run_copy: Path, trained: tuple[Path, Path],
                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    shutil.copy(run_copy / "model.safetensors", run_copy / "saved.safetensors")
    (run_copy / "model.safetensors").unlink()
    assert "model.safetensors is missing" in predict_error(run_copy, trained[1], capsys)
    shutil.move(run_copy / "saved.safetensors", run_copy / "model.safetensors")
    (run_copy / MANIFEST).write_text('{"files": {')
    line = predict_error(run_copy, trained[1], capsys)
    assert f"{run_copy / MANIFEST} is damaged" in line and "delete it" in line


def test_checkpoint_damage_stops_resume_with_a_message(image_folder: Path, tiny_weights: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    run = tmp_path / "run"
    headstart.train(image_folder, strategy="finetune", weights=str(tiny_weights), epochs=1, out=str(run),
                    cache_dir=str(tmp_path / "cache"), **FAST)  # fmt: skip
    checkpoint = run / "checkpoints" / "last.pt"
    good = checkpoint.read_bytes()
    checkpoint.write_bytes(good[: len(good) // 3])
    line = cli_error(["train", "--resume", str(run)], capsys)
    assert f"{checkpoint} is truncated" in line and "start it again without --resume" in line
    (run / MANIFEST).unlink()  # an older folder: torch's reader finds the damage, reported the same way
    line = cli_error(["train", "--resume", str(run)], capsys)
    assert f"{checkpoint} cannot be used" in line


def test_index_damage_reported_by_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "ix"
    index = ImageIndex(8, "flat")
    rng = np.random.default_rng(0)
    index.add(rng.normal(size=(6, 8)).astype(np.float32), [(f"/img/{i}.jpg", "ab"[i % 2], "") for i in range(6)])
    index.save(folder)
    assert main(["index", "evaluate", str(folder), "-k", "1"]) == 0
    meta = json.loads((folder / "meta.json").read_text())
    meta["dim"] = 9  # an edit that still parses
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))  # the same length: only the checksum can tell
    line = cli_error(["index", "evaluate", str(folder), "-k", "1"], capsys)
    assert "meta.json was modified after it was written" in line and "headstart index build" in line
    with pytest.raises(IndexFileError):
        ImageIndex.load(folder)


def test_embeddings_are_written_with_checksums(image_folder: Path, tiny_weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "emb"
    assert main(["embed", str(image_folder), "--backbone", "tiny_cnn", "--weights", str(tiny_weights), "--out",
                 str(out), "--cache-dir", str(tmp_path / "cache")]) == 0  # fmt: skip
    matrix, rows, meta = load_embeddings(out)
    assert matrix.shape == (30, meta["shape"][1]) and len(rows) == 30 and rows[0]["label"]
    ids = out / "shards" / "00000" / "rows.csv"
    ids.write_bytes(ids.read_bytes().replace(b"horizontal", b"vertical__", 1))  # a relabelled row, same length
    with pytest.raises(IntegrityError, match=r"rows\.csv was modified.*headstart embed"):
        load_embeddings(out)


def test_export_is_verified_when_read_back(run_copy: Path) -> None:
    from headstart.serving.export import export, read_metadata

    path = export(run_copy, format="torchscript")
    assert read_metadata(path)["classes"] == ["horizontal", "vertical"]
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(IntegrityError, match=r"torchscript\.pt is truncated.*headstart export"):
        read_metadata(path)


def test_damaged_feature_cache_entries_are_recomputed_with_a_note(
    trained: tuple[Path, Path], tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from headstart import progress
    from headstart.features.embeddings import embed
    from headstart.models.backbones import create_backbone

    backbone = create_backbone("tiny_cnn", weights=str(tiny_weights))
    files = sorted((trained[1] / "val").rglob("*.jpg"))
    first = embed(backbone, files, cache_root=tmp_path / "cache", workers=0, precision="fp32")
    entries = sorted((tmp_path / "cache" / "features").rglob("*.f32"))
    entries[0].write_bytes(entries[0].read_bytes()[:-6])  # torn
    entries[1].write_bytes(b"\0" * entries[1].stat().st_size)  # zeroed
    notes: list[str] = []
    monkeypatch.setattr(progress, "log", notes.append)
    again = embed(backbone, files, cache_root=tmp_path / "cache", workers=0, precision="fp32")
    np.testing.assert_allclose(again.features, first.features, rtol=1e-6)
    assert again.hits == len(files) - 2 and again.computed == 2
    assert len(notes) == 1 and "2 damaged entries" in notes[0] and "computed again" in notes[0]


def test_a_cache_that_cannot_be_written_is_skipped_with_a_note(
    trained: tuple[Path, Path], tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from headstart import files, progress
    from headstart.features.embeddings import embed
    from headstart.models.backbones import create_backbone

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    notes: list[str] = []
    monkeypatch.setattr(progress, "log", notes.append)
    backbone = create_backbone("tiny_cnn", weights=str(tiny_weights))
    files_in = sorted((trained[1] / "val").rglob("*.jpg"))
    out = embed(backbone, files_in, cache_root=tmp_path / "cache", workers=0, precision="fp32")
    assert len(out.features) == len(files_in)
    assert len(notes) == 1 and "the disk is full" in notes[0] and "headstart cache clear" in notes[0]
    assert not list((tmp_path / "cache").rglob("*.f32*"))  # no entry, and no temporary file left behind


# -- the write path --------------------------------------------------------------------------------------------------


def test_a_failed_write_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from headstart import checksums

    write_files(tmp_path, {"a.bin": b"old a", "b.bin": b"old b"})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real, calls = checksums.stage, []

    def second_fails(path: Path, data: bytes, sync: bool = True) -> tuple[Path, Path]:
        calls.append(path)
        if len(calls) == 2:
            raise StorageError(f"cannot write {path}: no space left on the device (the disk is full)")
        return real(path, data, sync)

    monkeypatch.setattr(checksums, "stage", second_fails)
    with pytest.raises(StorageError, match="disk is full"):
        write_files(tmp_path, {"a.bin": b"new a", "b.bin": b"new b"})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # and no temporary file
    monkeypatch.undo()

    def late(fd: int) -> None:  # file systems that allocate late report a full disk when the data is flushed
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", late)
    with pytest.raises(StorageError, match=r"cannot write .*a\.bin: no space left on the device"):
        write_files(tmp_path, {"a.bin": b"new a", "b.bin": b"new b"})
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_crash_between_manifest_and_rename_leaves_a_readable_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from headstart import files

    write_files(tmp_path, {"model.bin": b"epoch 1"})
    real, calls = files.os.replace, []

    def crash_after_manifest(src: str, dst: str) -> None:
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after the manifest, before the file itself moved
        real(src, dst)

    monkeypatch.setattr(files.os, "replace", crash_after_manifest)
    with pytest.raises(KeyboardInterrupt):
        write_files(tmp_path, {"model.bin": b"epoch 2!"})
    monkeypatch.undo()
    assert read_verified(tmp_path, "model.bin", "") == b"epoch 1"  # the old file is still accepted
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST, "model.bin"]
    write_files(tmp_path, {"model.bin": b"epoch 2!"})
    assert read_verified(tmp_path, "model.bin", "") == b"epoch 2!"
    write_files(tmp_path, {"model.bin": b"epoch 3"})
    (tmp_path / "model.bin").write_bytes(b"epoch 1")  # two versions back: no longer accepted
    with pytest.raises(IntegrityError, match="was modified"):
        read_verified(tmp_path, "model.bin", "")


def test_saved_files_are_readable_like_any_other(tmp_path: Path) -> None:
    import os

    write_files(tmp_path, {"model.bin": b"x"})
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "model.bin").stat().st_mode & 0o777 == 0o666 & ~mask  # mkstemp alone would give 0600


def test_a_library_reporting_a_full_disk_in_words_is_a_storage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """safetensors reports a failed write as its own error, with the OS error in the text (as Rust prints it)."""
    import torch
    from safetensors import SafetensorError

    from headstart import files

    def full(*args: object, **kwargs: object) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    files.save_tensors({"w": torch.ones(3)}, tmp_path / "w.safetensors")
    monkeypatch.setattr(files, "save_file", full)
    with pytest.raises(StorageError, match=r"cannot write .*w\.safetensors: no space left on the device") as caught:
        files.save_tensors({"w": torch.zeros(3)}, tmp_path / "w.safetensors")
    assert caught.value.errno == 28
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]  # the old file, no temporary one
