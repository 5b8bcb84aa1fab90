"""Data validation and decoding: bad files are skipped with reasons, odd image modes become 8-bit RGB, layout errors
come before any work, CSV manifests and stratified splits behave, and the dataset fingerprint follows the bytes."""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import stripes
from headstart.data.scan import (
    MAX_PIXELS,
    ImageRecord,
    collect_files,
    load_dataset,
    open_image,
    scan_files,
    stratified_split,
)
from headstart.data.transforms import Preprocessing, center_crop, eval_tensor, normalize, resize_short, train_augment
from headstart.errors import DataError

PREP = Preprocessing(32, 36, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear")


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _photo(seed: int = 0) -> Image.Image:
    return stripes(seed % 2, np.random.default_rng(seed))


def _one_bit_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of the given size, written by hand: a few KB on disk, ``width * height`` pixels decoded."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\x00" + bytes((width + 7) // 8)
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(row * height, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _bad_files(folder: Path) -> dict[str, str]:
    """Write one file of each broken kind into ``folder``; returns file name -> expected words in the reason."""
    folder.mkdir(parents=True, exist_ok=True)
    good = _encode(_photo(), "JPEG", quality=90)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "notes.jpg").write_text("these are my notes, not a picture\n" * 20)
    Image.new("P", (120, 90), 0).save(folder / "imageNotFound.gif")
    blank = Image.new("RGB", (200, 150), (242, 242, 242))
    blank.paste((90, 90, 90), (80, 60, 120, 90))  # a small dark icon on a flat background
    blank.save(folder / "IMG_2041.png")
    (folder / "huge.png").write_bytes(_one_bit_png(10_000, MAX_PIXELS // 10_000 + 1))
    return {
        "empty.jpg": "zero-byte",
        "truncated.jpg": "truncated",
        "notes.jpg": "not an image",
        "imageNotFound.gif": "placeholder",
        "IMG_2041.png": "placeholder",
        "huge.png": "decompression bomb",
    }


# -- bad files ---------------------------------------------------------------------------------------------------------


def test_bad_files_are_skipped_with_reasons(folder_factory: Callable[..., Path], tmp_path: Path) -> None:
    root = folder_factory("bad", {"train": 6, "val": 3}).resolve()
    expected = {
        f"{folder}/{name}": why
        for folder in ("train/horizontal", "val/vertical")
        for name, why in _bad_files(root / folder).items()
    }
    dataset = load_dataset(root)
    assert dataset.layout == "splits" and dataset.classes == ["horizontal", "vertical"]
    assert dataset.counts(dataset.train) == {"horizontal": 6, "vertical": 6}
    assert dataset.counts(dataset.val) == {"horizontal": 3, "vertical": 3}
    reasons = {s.path.relative_to(root).as_posix(): s.reason for s in dataset.skipped}
    assert set(reasons) == set(expected)
    for name, words in expected.items():
        assert words in reasons[name], (name, reasons[name])
        assert "BytesIO" not in reasons[name]  # a reason is for people: no object reprs from the decoder
    listing = tmp_path / "skipped_files.txt"
    dataset.write_skipped(listing)
    rows = [line.split("\t") for line in listing.read_text().splitlines()]
    assert {Path(path).relative_to(root).as_posix() for path, _ in rows} == set(expected)
    assert all(Path(path).is_absolute() and reason for path, reason in rows)


def test_no_skipped_files_writes_an_empty_list(image_folder: Path, tmp_path: Path) -> None:
    dataset = load_dataset(image_folder)
    assert dataset.skipped == []
    dataset.write_skipped(tmp_path / "skipped.txt")
    assert (tmp_path / "skipped.txt").read_text() == ""


def test_scan_files_keeps_order_and_reports(tmp_path: Path) -> None:
    reasons = _bad_files(tmp_path / "mixed")
    good = []
    for i in range(3):
        path = tmp_path / "mixed" / f"ok_{i}.jpg"
        _photo(i).save(path, quality=90)
        good.append(path)
    paths = sorted((tmp_path / "mixed").iterdir())
    records, skipped = scan_files(paths, workers=2)
    # a near-blank picture that appears once, under an ordinary name, may be a drawing: kept, marked blank
    lone_blank = tmp_path / "mixed" / "IMG_2041.png"
    assert [r.path for r in records] == sorted([*good, lone_blank])
    assert [s.path.name for s in skipped] == sorted(set(reasons) - {"IMG_2041.png"})
    photos = [r for r in records if r.path != lone_blank]
    assert all(r.label == -1 and r.mode == "RGB" and (r.width, r.height) == (48, 40) for r in photos)
    assert not any(r.blank for r in photos) and next(r for r in records if r.path == lone_blank).blank
    assert len({r.digest for r in photos}) == 3


def test_open_image_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("hello")
    with pytest.raises(DataError, match=r"notes\.png: cannot decode"):
        open_image(path)
    with pytest.raises(DataError, match="decompression bomb"):
        open_image(_one_bit_png(10_000, MAX_PIXELS // 10_000 + 1), name="bomb.png")
    small = open_image(_one_bit_png(64, 48))
    assert small.size == (64, 48) and small.mode == "RGB"


def test_real_set_skips_only_the_placeholder(hymenoptera: Path) -> None:
    dataset = load_dataset(hymenoptera)
    assert dataset.layout == "splits" and dataset.classes == ["ants", "bees"]
    assert [s.path.relative_to(hymenoptera).as_posix() for s in dataset.skipped] == ["train/ants/imageNotFound.gif"]
    assert "placeholder" in dataset.skipped[0].reason
    assert (len(dataset.train), len(dataset.val), len(dataset.test)) == (244, 153, 0)


# -- conversions -------------------------------------------------------------------------------------------------------


def _decoded(image: Image.Image, fmt: str = "PNG", **params: object) -> np.ndarray:
    rgb = open_image(_encode(image, fmt, **params))
    assert rgb.mode == "RGB" and rgb.size == image.size
    return np.asarray(rgb).astype(int)


def test_grayscale_and_palette_become_rgb() -> None:
    assert (_decoded(Image.new("L", (8, 6), 100)) == 100).all()
    palette = Image.new("P", (8, 6), 0)
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.paste(1, (0, 0, 4, 6))
    pixels = _decoded(palette)
    assert pixels[0, 0].tolist() == [200, 100, 50] and pixels[0, 7].tolist() == [10, 20, 30]


def test_transparency_is_composited_on_white() -> None:
    palette = Image.new("P", (8, 6), 0)
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.paste(1, (0, 0, 4, 6))
    pixels = _decoded(palette, transparency=0)  # index 0 (the right half) is transparent
    assert pixels[0, 7].tolist() == [255, 255, 255] and pixels[0, 0].tolist() == [200, 100, 50]

    rgba = Image.new("RGBA", (8, 6), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 4, 6))
    rgba.paste((0, 0, 0, 128), (4, 0, 6, 6))
    pixels = _decoded(rgba)
    assert pixels[0, 0].tolist() == [0, 0, 255]
    assert pixels[0, 7].tolist() == [255, 255, 255]
    assert all(abs(v - 127) <= 1 for v in pixels[0, 4])  # half-transparent black over white is mid grey

    la = Image.new("LA", (8, 6), (0, 0))
    la.paste((50, 255), (0, 0, 4, 6))
    pixels = _decoded(la)
    assert pixels[0, 0].tolist() == [50, 50, 50] and pixels[0, 7].tolist() == [255, 255, 255]


def test_cmyk_becomes_rgb() -> None:
    cmyk = Image.new("CMYK", (8, 6), (0, 0, 0, 0))
    cmyk.paste((0, 255, 255, 0), (0, 0, 4, 6))
    pixels = _decoded(cmyk, "TIFF")
    assert pixels[0, 0].tolist() == [255, 0, 0] and pixels[0, 7].tolist() == [255, 255, 255]
    jpeg = _decoded(cmyk, "JPEG", quality=95)
    assert jpeg[2, 1, 0] > 200 and jpeg[2, 1, 1] < 60


def test_sixteen_bit_is_scaled_to_eight_bits(tmp_path: Path) -> None:
    values = np.array([[0, 32768, 65535, 65535]] * 4, dtype=np.uint16)
    path = tmp_path / "depth.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    pixels = np.asarray(open_image(path))
    assert pixels.dtype == np.uint8 and pixels.shape == (4, 4, 3)
    assert pixels[0, 0].tolist() == [0, 0, 0] and pixels[0, 3].tolist() == [255, 255, 255]
    assert 126 <= pixels[0, 1, 0] <= 128
    records, _ = scan_files([path])
    assert records[0].mode == "I;16"


def test_exif_orientation_rotates(tmp_path: Path) -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "phone.jpg"
    image.save(path, quality=95, exif=exif)
    upright = open_image(path)
    assert upright.size == (20, 40)
    top, bottom = np.asarray(upright)[5, 10].astype(int), np.asarray(upright)[35, 10].astype(int)
    assert top[0] > 200 and top[2] < 60, top  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60, bottom
    assert eval_tensor(path, PREP).shape == (3, 32, 32)
    records, _ = scan_files([path])
    assert (records[0].width, records[0].height) == (20, 40)  # the record describes the picture as displayed


# -- tensors -----------------------------------------------------------------------------------------------------------


def test_eval_tensor_matches_resize_then_crop(tmp_path: Path) -> None:
    y, x = np.mgrid[0:90, 0:150]
    smooth = np.stack([x * 255 // 149, y * 255 // 89, (x + y) * 255 // 238], -1).astype(np.uint8)
    path = tmp_path / "gradient.png"
    Image.fromarray(smooth).save(path)
    fast = eval_tensor(path, PREP)
    assert fast.dtype == torch.uint8 and fast.shape == (3, 32, 32)
    slow = np.asarray(center_crop(resize_short(Image.open(path), 36, "bilinear"), 32))
    assert np.abs(fast.permute(1, 2, 0).numpy().astype(int) - slow.astype(int)).mean() < 3.0
    batch = normalize(fast[None], PREP)
    expected = (fast[None].float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(batch, expected)


def test_train_augment_levels() -> None:
    image = torch.randint(0, 255, (3, 36, 50), dtype=torch.uint8)
    for level in ("none", "light", "strong"):
        out = train_augment(PREP, level)(image)
        assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    with pytest.raises(ValueError, match=r"'wild'.*none, light or strong"):
        train_augment(PREP, "wild")


# -- layout errors -----------------------------------------------------------------------------------------------------


def test_empty_class_is_an_error(folder_factory: Callable[..., Path]) -> None:
    root = folder_factory("empty", {"train": 3, "val": 2})
    for path in (root / "train" / "vertical").iterdir():
        path.unlink()
    with pytest.raises(DataError, match=r"\['vertical'\] have no usable training images; add images"):
        load_dataset(root)
    (root / "train" / "vertical" / "blank.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"no usable training images \(see the skipped files listed\)"):
        load_dataset(root)


def test_one_class_is_an_error(folder_factory: Callable[..., Path]) -> None:
    root = folder_factory("one", {"train": 3}, classes=("only",))
    with pytest.raises(DataError, match=r"found 1 class\(es\) \['only'\]; a classifier needs at least two"):
        load_dataset(root)


def test_val_class_missing_from_train(folder_factory: Callable[..., Path]) -> None:
    root = folder_factory("extra", {"train": 3, "val": 2})
    (root / "val" / "diagonal").mkdir()
    _photo().save(root / "val" / "diagonal" / "d.jpg")
    with pytest.raises(DataError, match=r"class folder\(s\) \['diagonal'\] that .*train lacks"):
        load_dataset(root)


def test_missing_path_and_non_csv_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere does not exist; give a folder"):
        load_dataset(tmp_path / "nowhere")
    (tmp_path / "data.txt").write_text("path,label\n")
    with pytest.raises(DataError, match=r"data\.txt is a file; a dataset is a folder or a \.csv"):
        load_dataset(tmp_path / "data.txt")
    with pytest.raises(DataError, match="does not exist"):
        collect_files([tmp_path / "nowhere.jpg"])


def test_class_needs_two_images_to_split(folder_factory: Callable[..., Path]) -> None:
    root = folder_factory("tiny", {"flat": 1})
    with pytest.raises(DataError, match="at least two images"):
        load_dataset(root / "flat")


# -- CSV manifests -----------------------------------------------------------------------------------------------------


def _csv_images(root: Path, count: int) -> list[tuple[str, str]]:
    """``count`` images per class under ``root/images``; (relative path, label) rows."""
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(count * 2):
        label = ("cat", "dog")[i % 2]
        stripes(i % 2, np.random.default_rng(i)).save(root / "images" / f"{i:03d}.jpg", quality=90)
        rows.append((f"images/{i:03d}.jpg", label))
    return rows


def test_csv_without_split_column(tmp_path: Path) -> None:
    rows = _csv_images(tmp_path, 5)
    manifest = tmp_path / "labels.csv"
    manifest.write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in rows))
    dataset = load_dataset(manifest, val_fraction=0.4, split_seed=1)
    assert dataset.layout == "csv" and dataset.classes == ["cat", "dog"]
    assert dataset.counts(dataset.train) == {"cat": 3, "dog": 3}
    assert dataset.counts(dataset.val) == {"cat": 2, "dog": 2}
    by_name = {r.path.name: dataset.classes[r.label] for r in dataset.train + dataset.val}
    assert by_name == {Path(p).name: label for p, label in rows}
    assert all(r.path.is_absolute() and r.path.is_file() for r in dataset.train + dataset.val)


def test_csv_with_split_column_and_errors(tmp_path: Path) -> None:
    rows = _csv_images(tmp_path / "set", 4)
    splits = ["train"] * 4 + ["val"] * 2 + ["test"] * 2
    manifest = tmp_path / "set" / "manifest.csv"
    lines = [f"{split},{label},{path}\n" for split, (path, label) in zip(splits, rows, strict=True)]
    manifest.write_text("split,label,path\n" + "".join(lines))
    dataset = load_dataset(manifest)
    assert (len(dataset.train), len(dataset.val), len(dataset.test)) == (4, 2, 2)
    assert [r.path.name for r in dataset.test] == ["006.jpg", "007.jpg"]
    assert [dataset.classes[r.label] for r in dataset.val] == ["cat", "dog"]

    manifest.write_text(
        "path,label,split\nimages/000.jpg,cat,train\nimages/001.jpg,dog,train\nimages/002.jpg,eel,val\n"
    )
    with pytest.raises(DataError, match=r"val rows use label\(s\) \['eel'\] that no train row has"):
        load_dataset(manifest)
    manifest.write_text("path,label,split\nimages/000.jpg,cat,holdout\n")
    with pytest.raises(DataError, match=r"line 2: split 'holdout' is not one of train, val, test"):
        load_dataset(manifest)
    manifest.write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_dataset(manifest)


def test_headerless_csv(tmp_path: Path) -> None:
    rows = _csv_images(tmp_path, 3)
    manifest = tmp_path / "plain.csv"
    manifest.write_text("".join(f"{p},{label}\n" for p, label in rows))
    dataset = load_dataset(manifest)
    assert dataset.classes == ["cat", "dog"] and len(dataset.train) + len(dataset.val) == 6


# -- splits and fingerprints -------------------------------------------------------------------------------------------


def _records(sizes: dict[int, int]) -> list[ImageRecord]:
    return [
        ImageRecord(Path(f"/data/{label}/{i:03d}.jpg"), label, f"{label}-{i}", 8, 8, "RGB")
        for label, n in sizes.items()
        for i in range(n)
    ]


def test_stratified_split() -> None:
    items = _records({0: 40, 1: 20, 2: 10, 3: 2})
    train, val = stratified_split(items, 0.25, seed=3)
    assert len(train) + len(val) == len(items) and not {r.path for r in train} & {r.path for r in val}
    assert Counter(r.label for r in val) == {0: 10, 1: 5, 2: 2, 3: 1}  # a quarter of each, at least one
    again = stratified_split(list(reversed(items)), 0.25, seed=3)[1]
    assert {r.path for r in again} == {r.path for r in val}  # same seed, same split, whatever the input order
    other = stratified_split(items, 0.25, seed=4)[1]
    assert {r.path for r in other} != {r.path for r in val}
    assert Counter(r.label for r in other) == Counter(r.label for r in val)
    single_train, single_val = stratified_split(_records({0: 5, 1: 1}), 0.2, seed=0)
    assert [r.label for r in single_val] == [0] and Counter(r.label for r in single_train) == {0: 4, 1: 1}


def test_folder_of_classes_is_split_reproducibly(folder_factory: Callable[..., Path]) -> None:
    root = folder_factory("flat", {"all": 6}) / "all"
    first = load_dataset(root, val_fraction=0.34, split_seed=7)
    assert first.layout == "folders"
    assert first.counts(first.val) == {"horizontal": 2, "vertical": 2}
    assert first.counts(first.train) == {"horizontal": 4, "vertical": 4}
    same = load_dataset(root, val_fraction=0.34, split_seed=7)
    assert [r.path for r in same.val] == [r.path for r in first.val]
    assert first.fingerprint() == same.fingerprint()
    assert any({r.path for r in load_dataset(root, 0.34, seed).val} != {r.path for r in first.val} for seed in (8, 9))


def test_fingerprint_follows_the_bytes(image_folder: Path) -> None:
    dataset = load_dataset(image_folder)
    assert dataset.fingerprint() == dataset.fingerprint() == load_dataset(image_folder).fingerprint()
    target = image_folder / "val" / "vertical" / "vertical_002.jpg"
    _photo(99).save(target, quality=70)
    changed = load_dataset(image_folder)
    assert changed.fingerprint() != dataset.fingerprint()
    assert [r.path for r in changed.val] == [r.path for r in dataset.val]


def test_a_unique_line_drawing_is_kept_but_a_repeated_blank_file_is_a_placeholder(
    folder_factory: Callable[..., Path],
) -> None:
    root = folder_factory("drawings", {"train": 4, "val": 2})
    sketch = Image.new("L", (120, 120), 255)
    sketch.paste(0, (20, 58, 100, 62))  # one black stroke on white: near-blank by colour statistics alone
    sketch.save(root / "train" / "horizontal" / "sketch_001.png")
    stand_in = Image.new("RGB", (100, 80), (250, 250, 250))
    stand_in.save(root / "train" / "horizontal" / "download_a.png")
    stand_in.save(root / "train" / "vertical" / "download_b.png")
    dataset = load_dataset(root)
    assert "sketch_001.png" in {r.path.name for r in dataset.train}
    reasons = {s.path.name: s.reason for s in dataset.skipped}
    assert set(reasons) == {"download_a.png", "download_b.png"}
    assert all("appears 2 times" in reason for reason in reasons.values())


# -- scan cache --------------------------------------------------------------------------------------------------------


def test_a_second_scan_decodes_nothing_and_finds_the_same(
    folder_factory: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import headstart.data.scan as data

    root = folder_factory("scanned", {"train": 4, "val": 2}).resolve()
    _bad_files(root / "train" / "horizontal")
    cache = tmp_path / "cache"
    first = load_dataset(root, cache_root=cache)
    assert first == load_dataset(root)  # the cache changes nothing about the result
    decoded: list[Path] = []
    real_facts = data._facts
    monkeypatch.setattr(data, "_facts", lambda blob, path: decoded.append(path) or real_facts(blob, path))
    second = load_dataset(root, cache_root=cache)
    assert decoded == [] and second == first  # bad files too: their reasons come back from the cache
    # An edited file has new bytes, so a new digest: it alone is decoded again.
    edited = first.train[0].path
    stripes(1, np.random.default_rng(7)).save(edited)
    third = load_dataset(root, cache_root=cache)
    assert decoded == [edited]
    assert third.train[0].digest != first.train[0].digest and third.train[1:] == first.train[1:]
    # A damaged cache file is ignored, never half-read.
    (scan_file,) = (cache / "scans").iterdir()
    scan_file.write_text('{"version": "1/')
    decoded.clear()
    assert load_dataset(root, cache_root=cache) == third
    assert set(decoded) == {p for p in root.rglob("*") if p.is_file() and p.name != "empty.jpg"}  # all decoded again
    assert json.loads(scan_file.read_text())["files"]  # and rewritten whole
