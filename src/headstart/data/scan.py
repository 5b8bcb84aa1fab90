"""Image data: find and validate the files, split them, decode them safely, and turn them into tensors.

Three layouts are understood:

* ``DATA/train/<class>/*`` with ``DATA/val/<class>/*`` (and optionally ``DATA/test/<class>/*``);
* one folder of class sub-folders, split stratified with a seed;
* a CSV manifest with ``path,label`` columns (paths relative to the CSV) and an optional ``split`` column.

A manifest whose label column is ``labels`` (or any manifest loaded with ``multi_label=True``) is **multi-label**: each
cell lists one or more labels separated by ``|`` (``ants|bees``), and every record carries its set of labels.

Every file is checked before any training: unreadable, truncated, zero-byte, non-image, placeholder and oversized
("decompression bomb") files are skipped and listed, never allowed to crash an epoch.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from headstart import progress
from headstart.errors import DataError, StorageError
from headstart.files import atomic_write_bytes

MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold (about 0.25 GB of RGB)
# A progressive JPEG's decoder passes over every block of the image once per scan, so a few bytes per extra scan
# buy a full pass each: 1,000 scans of a 9000x9000 image cost 7 s in an 11 KB file. A progressive photo has about
# 10; libtiff refuses JPEG data with more than 100 by default, and so do we.
MAX_JPEG_SCANS = 100
# The only formats Pillow is allowed to identify (JPEG includes its MPO variant): photo and scan formats that Pillow
# decodes itself. Others it knows are refused as "not an image": EPS is handed to Ghostscript (outside code) when
# that is installed, and the rest (icons, game textures, scientific containers) are rarely a photo at all.
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "DIB", "TIFF", "PPM", "TGA", "JPEG2000", "AVIF")
# The start of a JPEG segment: 0xFF then a marker code, which is neither stuffing (00) in entropy-coded data, nor a
# restart (D0-D7) inside it, nor fill (FF) before a marker.
_JPEG_MARKER = re.compile(rb"\xff[\x01-\xcf\xd8-\xfe]")
PLACEHOLDER_NAMES = re.compile(r"(not.?found|placeholder|unavailable|no.?image|missing.?image|image.?missing)", re.I)
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ImageRecord:
    """One usable image."""

    path: Path  # absolute path
    label: int  # index into the class list (-1 when unlabelled)
    digest: str  # BLAKE2b of the file's bytes: content identity for caches, duplicates and fingerprints
    width: int
    height: int
    mode: str  # Pillow mode before conversion to RGB (L, P, RGBA, CMYK, I;16, ...)
    blank: bool = False  # near-blank, few colours (see is_near_blank); a placeholder when the same file repeats
    # Multi-label data: the record's label indices, sorted (``label`` is then the first, so that code grouping by
    # one label still has a valid class); empty for single-label data.
    labels: tuple[int, ...] = ()


@dataclass(frozen=True)
class Skipped:
    """A file left out, and why."""

    path: Path
    reason: str


@dataclass
class Dataset:
    """A validated, split dataset."""

    root: Path
    classes: list[str]
    train: list[ImageRecord]
    val: list[ImageRecord]
    test: list[ImageRecord] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    layout: str = "folders"  # "splits", "folders" or "csv"
    multi_label: bool = False  # each image carries a set of labels (ImageRecord.labels), not one class

    def fingerprint(self) -> str:
        """Hash of every file's content, label (or label set) and split: two runs on equal data share it."""
        digest = hashlib.blake2b(digest_size=12)
        for split, records in (("train", self.train), ("val", self.val), ("test", self.test)):
            for r in sorted(records, key=lambda r: r.digest):
                indices = r.labels if self.multi_label else (r.label,) if r.label >= 0 else ()
                names = "|".join(self.classes[i] for i in indices)
                digest.update(f"{split}:{names}:{r.digest}\n".encode())
        return digest.hexdigest()

    def counts(self, records: Sequence[ImageRecord]) -> dict[str, int]:
        """Images per class in ``records`` (multi-label: images carrying each label)."""
        counter = Counter(i for r in records for i in (r.labels if self.multi_label else (r.label,)))
        return {name: counter.get(i, 0) for i, name in enumerate(self.classes)}

    def targets(self, records: Sequence[ImageRecord]) -> np.ndarray:
        """Multi-hot label matrix [N, C] (float32) of ``records``; single-label data gives one-hot rows."""
        out = np.zeros((len(records), len(self.classes)), dtype=np.float32)
        for row, r in enumerate(records):
            out[row, list(r.labels if self.multi_label else (r.label,) if r.label >= 0 else ())] = 1.0
        return out

    def write_skipped(self, path: Path) -> None:
        """Write the skipped files, one ``path<TAB>reason`` per line (an empty file when none)."""
        path.write_text("".join(f"{s.path}\t{s.reason}\n" for s in self.skipped))


# -- decoding --------------------------------------------------------------------------------------------------------


def open_image(source: Path | bytes, draft: int | None = None, name: str | None = None) -> Image.Image:
    """Decode an image file to RGB safely.

    EXIF orientation is applied; grayscale, palette, RGBA (composited on white), CMYK and 16-bit images become
    8-bit RGB; images above :data:`MAX_PIXELS` and JPEGs with more than :data:`MAX_JPEG_SCANS` scans are refused
    before decoding. ``draft`` lets JPEG decode at a reduced scale that still keeps the shorter side at least ``draft``
    pixels, which is several times faster for large photos.

    Raises:
        DataError: naming the file, for anything that is not a readable image, whatever the codec raised.
    """
    label = name or (str(source) if isinstance(source, Path) else "<bytes>")
    try:
        handle = io.BytesIO(source) if isinstance(source, bytes) else source
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(handle, formats=IMAGE_FORMATS)
            _refuse_costly(image, source, label)
            if draft and image.format == "JPEG":
                image.draft("RGB", (draft, draft))
            image.load()
            if image.getexif().get(0x0112, 1) != 1:  # transpose only when an EXIF orientation asks for it
                image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except DataError:
        raise
    except UnidentifiedImageError as error:  # Pillow's message names a BytesIO object, not what is wrong
        raise DataError(f"{label}: cannot decode (not an image: no known image format starts this way)") from error
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(f"{label}: cannot decode ({error})") from error
    except Warning as error:
        raise DataError(f"{label}: refused ({error})") from error
    except Exception as error:  # a codec's bug on a hostile file (struct.error, IndexError, ...): skip, never crash
        raise DataError(f"{label}: cannot decode ({type(error).__name__}: {error})") from error


def _refuse_costly(image: Image.Image, source: Path | bytes, label: str) -> None:
    """Refuse, before decoding, an image with no pixels or one whose decoding would cost too much."""
    if image.width < 1 or image.height < 1:
        raise DataError(f"{label}: cannot decode (the header declares {image.width}x{image.height} pixels)")
    if image.width * image.height > MAX_PIXELS:
        raise DataError(
            f"{label}: {image.width}x{image.height} pixels exceeds the {MAX_PIXELS:,}-pixel limit "
            "(possible decompression bomb); downscale the file if it is genuine"
        )
    if image.format in ("JPEG", "MPO"):
        data = source if isinstance(source, bytes) else source.read_bytes()
        # Every scan starts with the bytes FF DA, so their plain count (memchr speed) spares ordinary files the walk.
        if data.count(b"\xff\xda") > MAX_JPEG_SCANS and (scans := jpeg_scans(data)) > MAX_JPEG_SCANS:
            raise DataError(
                f"{label}: {scans:,} JPEG scans exceed the limit of {MAX_JPEG_SCANS} (a progressive photo has about "
                "10, and each scan is a full decoding pass); re-save the file as a baseline JPEG if it is genuine"
            )


def jpeg_scans(data: bytes) -> int:
    """Scans (SOS segments) in the first image of a JPEG file, found by walking its segments as a decoder does.

    Segment payloads are skipped by their length, so bytes that merely look like a marker inside metadata (an ICC
    profile, an EXIF thumbnail) do not count; the walk stops at the first end-of-image, since only the first picture
    of a multi-picture file is decoded.
    """
    scans, pos = 0, 2
    while (match := _JPEG_MARKER.search(data, pos)) is not None:
        marker = data[match.start() + 1]
        if marker == 0xD9:  # end of image
            break
        pos = match.start() + 2
        scans += marker == 0xDA
        if marker not in (0x01, 0xD8):  # every marker but TEM and SOI has a 2-byte length that counts itself
            pos += max(2, int.from_bytes(data[pos : pos + 2], "big"))
    return scans


def thumbnail(source: Path | bytes, side: int) -> Image.Image:
    """A small RGB copy of an image, at most ``side`` pixels on its longer side, aspect ratio kept.

    Decoded by :func:`open_image` (same safety checks; JPEGs decode at reduced scale), so a thumbnail of a huge
    photo costs little more than one of a small one.

    Raises:
        DataError: naming the file, for anything that is not a readable image.
    """
    image = open_image(source, draft=side)
    image.thumbnail((side, side), Image.Resampling.BICUBIC)
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB version of any Pillow image; transparency is composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image)
        if image.mode.startswith("I;16"):
            grey = _SIXTEEN_TO_EIGHT[array]
        else:
            grey = _scaled_to_uint8(array, 65535.0 if array.max() > 255 else 255.0)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


# 16-bit grey to 8 bits by one table lookup: scaling a whole 81-megapixel image in float64 took 16 s and 2 GB (a
# 157 KB PNG). The table holds what that arithmetic gives, so the pixels are the same.
_SIXTEEN_TO_EIGHT = (np.arange(65536, dtype=np.float64) / 65535.0 * 255.0).astype(np.uint8)


def _scaled_to_uint8(array: np.ndarray, top: float) -> np.ndarray:
    """``clip(array / top * 255)`` as uint8, a million pixels at a time (float64 copies of a whole large image would
    take 0.7 GB each)."""
    flat, out, step = array.reshape(-1), np.empty(array.size, dtype=np.uint8), 1 << 20
    for start in range(0, flat.size, step):
        out[start : start + step] = np.clip(flat[start : start + step] / top * 255.0, 0, 255).astype(np.uint8)
    return out.reshape(array.shape)


def is_placeholder_name(path: Path) -> bool:
    """A file name that says "image not found" (``imageNotFound.gif``, ``placeholder.png``, ...)."""
    return PLACEHOLDER_NAMES.search(path.stem) is not None


def is_near_blank(image: Image.Image) -> bool:
    """Few colours with one covering over 80% of the picture, like a stand-in graphic.

    Line drawings look the same to this test, so a near-blank image counts as a placeholder only when its file
    name says so or when the very same file appears more than once in the data (see :func:`scan_files`).
    """
    # Nearest-neighbour sampling keeps a flat graphic's few colours (a smoothing resize would invent new ones).
    colours = image.resize((64, 64), Image.Resampling.NEAREST).getcolors(maxcolors=64)
    return colours is not None and max(count for count, _ in colours) / (64 * 64) > 0.8


Facts = tuple[int, int, str, bool] | str  # (width, height, mode, near-blank) of a usable image, else why it is not


def _facts(data: bytes, path: Path) -> Facts:
    """What a file's bytes are: decoded in full (at reduced JPEG scale) to catch truncation."""
    try:
        image = open_image(data, draft=64, name=str(path))
        # Probed only after open_image accepted the file, so a non-image or a bomb gets its reason, not Pillow's error.
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as probe:
            mode, size = probe.mode, probe.size
            if probe.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # a quarter-turn EXIF orientation: size as displayed
                size = (size[1], size[0])
    except DataError as error:
        reason = str(error).split(": ", 1)[-1]
        if isinstance(error.__cause__, UnidentifiedImageError):
            reason = "not an image"
        elif "truncated" in reason.lower() or "broken" in reason:  # Pillow says both "truncated" and "Truncated"
            reason = "truncated image: " + reason
        return reason
    except Exception as error:  # a codec bug on a hostile file must not stop the scan
        return f"cannot decode ({type(error).__name__}: {error})"
    return size[0], size[1], mode, is_near_blank(image)


def _check(path: Path, cache: ScanCache | None = None) -> tuple[ImageRecord | None, str | None]:
    """Read and hash one file and learn (or recall, by its digest) what it holds: a record, or the reason to skip it."""
    try:
        data = path.read_bytes()
    except OSError as error:
        return None, f"unreadable: {error.strerror or error}"
    if not data:
        return None, "zero-byte file"
    digest = content_digest(data)
    facts = cache.get(digest) if cache is not None else None
    if facts is None:
        facts = _facts(data, path)
        if cache is not None:
            cache.put(digest, facts)
    if isinstance(facts, str):
        return None, facts
    width, height, mode, blank = facts
    if is_placeholder_name(path) and blank:
        return None, "placeholder image ('not found' stand-in)"
    return ImageRecord(path, -1, digest, width, height, mode, blank), None


def unreadable_reason(path: Path) -> str:
    """Why a file cannot be used, in the scan's words (for a file a batch dropped); "cannot decode" if it now can."""
    return _check(path)[1] or "cannot decode"


def content_digest(data: bytes) -> str:
    """Identity of a file's bytes: the key of the feature cache and of duplicate detection."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class ScanCache:
    """What earlier scans of one dataset learned about each file's bytes, keyed by content digest.

    Decoding every image to catch truncated files is most of a scan's time (0.4 s for the 397 ants/bees photos on
    2 cores); the bytes are still read and hashed on every scan (40 ms there), so an edited file is always seen as
    new. Only facts that depend on the bytes alone are kept (size, mode, near-blank, or why the bytes are unusable);
    decisions that depend on the file name are made again. One JSON file per dataset root, rewritten with the
    files of the latest scan; one from another Pillow version, or unreadable, is ignored.
    """

    FORMAT = 3  # 2: JPEG scan limit and reworded reasons; 3: formats outside IMAGE_FORMATS refused

    def __init__(self, cache_root: Path, dataset_root: Path):
        name = hashlib.blake2b(str(dataset_root).encode(), digest_size=8).hexdigest()
        self.path = cache_root / "scans" / f"{name}.json"
        self.version = f"{self.FORMAT}/{Image.__version__}"
        self.known: dict[str, Facts] = {}
        self.seen: dict[str, Facts] = {}
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, IndexError):  # unreadable: start empty
            stored = json.loads(self.path.read_text())
            if stored["version"] == self.version:
                self.known = {k: v if isinstance(v, str) else (int(v[0]), int(v[1]), str(v[2]), bool(v[3]))
                              for k, v in stored["files"].items()}  # fmt: skip

    def get(self, digest: str) -> Facts | None:
        """The facts of these bytes from an earlier scan, if any."""
        facts = self.known.get(digest)
        if facts is not None:
            self.seen[digest] = facts
        return facts

    def put(self, digest: str, facts: Facts) -> None:
        """Record the facts of newly decoded bytes."""
        self.seen[digest] = facts

    def save(self) -> None:
        """Write this scan's entries, atomically.

        Raises:
            StorageError: the cache folder cannot be written (disk full, read-only); no temporary file is left.
        """
        if self.seen == self.known:
            return
        # Not flushed to the disk: after a power cut a torn file is only ignored (the next scan decodes again).
        atomic_write_bytes(self.path, json.dumps({"version": self.version, "files": self.seen}).encode(), sync=False)


def scan_files(
    paths: Sequence[Path], workers: int | None = None, cache: ScanCache | None = None
) -> tuple[list[ImageRecord], list[Skipped]]:
    """Validate files in parallel threads (decoding releases the GIL); keeps input order.

    A near-blank picture whose exact bytes appear more than once is a placeholder that a download or a scraper
    saved in place of missing photos: every copy is skipped.

    Args:
        paths: the files.
        workers: threads (default: cores + 1, at most 8).
        cache: facts of earlier scans, read and then updated.
    """
    with ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 1) + 1)) as pool:
        results = list(pool.map(lambda path: _check(path, cache), paths))
    if cache is not None:
        try:
            cache.save()
        except StorageError as error:  # a full or read-only cache folder costs the next scan time, nothing else
            progress.log(f"scan cache not saved, so the next scan decodes every file again: {error.reason or error} "
                         "(or make room with `headstart cache clear`)")  # fmt: skip
    repeats = Counter(record.digest for record, _ in results if record is not None and record.blank)
    records: list[ImageRecord] = []
    skipped: list[Skipped] = []
    for path, (record, reason) in zip(paths, results, strict=True):
        if record is not None and record.blank and repeats[record.digest] > 1:
            reason = f"placeholder image: the same near-blank picture appears {repeats[record.digest]} times"
            record = None
        if record is not None:
            records.append(record)
        else:
            skipped.append(Skipped(path, reason or "unknown"))
    return records, skipped


def list_images(folder: Path) -> list[Path]:
    """Every non-hidden file below ``folder``, sorted (non-images are kept so that they get reported)."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


# -- layouts and splits ----------------------------------------------------------------------------------------------


def _class_folders(folder: Path) -> dict[str, list[Path]]:
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    return {c.name: list_images(c) for c in classes}


def stratified_split(
    items: Sequence[ImageRecord], fraction: float, seed: int
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Hold out ``fraction`` of each class (at least one image when a class has two or more), reproducibly.

    Multi-label records are stratified by their label set (``ants|bees`` is a group of its own).
    """
    rng = np.random.default_rng(seed)
    by_class: dict[tuple[int, ...], list[ImageRecord]] = {}
    for item in items:
        by_class.setdefault(item.labels or (item.label,), []).append(item)
    train: list[ImageRecord] = []
    val: list[ImageRecord] = []
    for label in sorted(by_class):
        group = sorted(by_class[label], key=lambda r: str(r.path))
        order = rng.permutation(len(group))
        n_val = min(len(group) - 1, max(1, round(len(group) * fraction))) if len(group) > 1 else 0
        val += [group[i] for i in order[:n_val]]
        train += [group[i] for i in order[n_val:]]
    return train, val


def _labelled(files: dict[str, list[Path]], classes: list[str]) -> list[tuple[Path, int]]:
    index = {name: i for i, name in enumerate(classes)}
    return [(p, index[name]) for name, paths in files.items() for p in paths]


def load_dataset(
    path: str | Path, val_fraction: float = 0.2, split_seed: int = 0, cache_root: Path | None = None,
    multi_label: bool = False,
) -> Dataset:  # fmt: skip
    """Find, validate and split a dataset in any supported layout.

    ``cache_root`` keeps what the scan learns about each file (see :class:`ScanCache`), so that a second load of
    the same images reads and hashes them but decodes none. ``multi_label`` reads a CSV manifest's label column as
    ``|``-separated label sets (a ``labels`` column does so by itself).

    Raises:
        DataError: before any work, for missing paths, empty classes, fewer than two classes, or val/test classes
            that train lacks; for multi-label data also an empty label, or a label on every training image.
    """
    root = Path(path).expanduser().resolve()
    if not root.exists():
        raise DataError(f"{root} does not exist; give a folder of class folders, a train/val folder, or a CSV file")
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise DataError(f"{root} is a file; a dataset is a folder or a .csv manifest with path,label columns")
        return _load_csv(root, val_fraction, split_seed, cache_root, multi_label)
    if multi_label:
        raise DataError(
            f"{root} is a folder, and a folder gives each image one class; multi-label data is a CSV manifest with "
            "path,labels columns (labels separated by '|', e.g. ants|bees): write one, or drop --multi-label"
        )
    if (root / "train").is_dir():
        layout = "splits"
        split_files = {s: _class_folders(root / s) for s in SPLITS if (root / s).is_dir()}
    else:
        layout = "folders"
        split_files = {"train": _class_folders(root)}
    classes = list(split_files["train"])
    for split, files in split_files.items():
        extra = sorted(set(files) - set(classes))
        if extra:
            raise DataError(
                f"{root / split} has class folder(s) {extra} that {root / 'train'} lacks; a model can only predict "
                "classes it was trained on. Add training images for them or remove the folders."
            )
    tagged = {s: _labelled(files, classes) for s, files in split_files.items()}
    return _finish(root, classes, tagged, layout, val_fraction, split_seed, cache_root)


def _load_csv(
    manifest: Path, val_fraction: float, split_seed: int, cache_root: Path | None, multi_label: bool = False
) -> Dataset:
    with manifest.open(newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        raise DataError(f"{manifest} is empty; expected a header 'path,label' and one row per image")
    header = [h.strip().lower() for h in rows[0]]
    if "path" in header and ("label" in header or "labels" in header):
        body = rows[1:]
        multi_label = multi_label or "labels" in header
        col_path, col_label = header.index("path"), header.index("labels" if "labels" in header else "label")
        col_split = header.index("split") if "split" in header else None
    else:
        body, col_path, col_label, col_split = rows, 0, 1, None
    entries: dict[str, list[tuple[Path, tuple[str, ...], int]]] = {}
    for number, row in enumerate(body, start=2 if body is not rows else 1):
        if not row or not "".join(row).strip():
            continue
        if len(row) <= max(col_path, col_label):
            raise DataError(f"{manifest}, line {number}: expected path,label, got {row!r}")
        split = row[col_split].strip().lower() if col_split is not None else "train"
        if split not in SPLITS:
            raise DataError(f"{manifest}, line {number}: split {split!r} is not one of {', '.join(SPLITS)}")
        file = Path(row[col_path].strip())
        names = _label_names(row[col_label], multi_label, manifest, number)
        entries.setdefault(split, []).append(((manifest.parent / file).resolve(), names, number))
    if "train" not in entries:
        raise DataError(f"{manifest} has no training rows")
    classes = sorted({name for _, names, _ in entries["train"] for name in names})
    piped = [name for name in classes if "|" in name]
    if piped and not multi_label:
        progress.log(f"[yellow]{manifest}: label(s) such as {piped[0]!r} are read as one class each; for label sets, "
                     "name the column 'labels' or pass --multi-label")  # fmt: skip
    for split, items in entries.items():
        for _, names, number in items:
            extra = sorted(set(names) - set(classes))
            if extra and multi_label:
                raise DataError(
                    f"{manifest}, line {number}: {split} row uses label(s) {extra} that no train row has; a model can "
                    "only learn labels it has training images of: add train rows with them, or remove them here"
                )
            if extra:
                raise DataError(f"{manifest}: {split} rows use label(s) {extra} that no train row has")
    index = {name: i for i, name in enumerate(classes)}
    tagged = {s: [(p, tuple(sorted(index[n] for n in names))) for p, names, _ in items] for s, items in entries.items()}
    return _finish(manifest, classes, tagged, "csv", val_fraction, split_seed, cache_root, multi_label)


def is_multilabel_manifest(path: str | Path) -> bool:
    """Whether ``path`` is a CSV manifest whose header names a ``labels`` column (read without scanning the images)."""
    path = Path(path)
    if path.suffix.lower() != ".csv" or not path.is_file():
        return False
    with path.open(newline="") as handle:
        header = next(csv.reader(handle), [])
    return "labels" in [h.strip().lower() for h in header]


def _label_names(cell: str, multi_label: bool, manifest: Path, number: int) -> tuple[str, ...]:
    """The label(s) of one manifest cell: the stripped cell, or its ``|``-separated names for multi-label data."""
    if not multi_label:
        return (cell.strip(),)
    names = [name.strip() for name in cell.split("|")]
    if not cell.strip() or not all(names):
        what = "no label" if not cell.strip() else f"an empty label in {cell.strip()!r}"
        raise DataError(
            f"{manifest}, line {number}: {what}; a multi-label row lists one or more labels separated by '|' "
            "(e.g. ants|bees): fill it in, or remove the row"
        )
    return tuple(dict.fromkeys(names))  # a label named twice counts once


def _finish(
    root: Path,
    classes: list[str],
    tagged: dict[str, list[tuple[Path, int]]] | dict[str, list[tuple[Path, tuple[int, ...]]]],
    layout: str,
    val_fraction: float,
    split_seed: int,
    cache_root: Path | None = None,
    multi_label: bool = False,
) -> Dataset:
    if len(classes) < 2:
        what = "label(s)" if multi_label else "class(es)"
        raise DataError(f"{root}: found {len(classes)} {what} {classes}; a classifier needs at least two")
    all_paths = [p for items in tagged.values() for p, _ in items]
    records, skipped = scan_files(all_paths, cache=ScanCache(cache_root, root) if cache_root is not None else None)
    by_path = {r.path: r for r in records}
    splits: dict[str, list[ImageRecord]] = {}
    for split, items in tagged.items():
        splits[split] = [_with_label(by_path[p], label, multi_label) for p, label in items if p in by_path]
    counts = Counter(i for r in splits["train"] for i in (r.labels if multi_label else (r.label,)))
    empty = [name for i, name in enumerate(classes) if counts.get(i, 0) == 0]
    if empty:
        raise DataError(
            f"{root}: class(es) {empty} have no usable training images"
            f"{' (see the skipped files listed)' if skipped else ''}; add images or remove the class"
        )
    everywhere = [name for i, name in enumerate(classes) if counts.get(i, 0) == len(splits["train"])]
    if multi_label and everywhere:
        raise DataError(
            f"{root}: label(s) {everywhere} are on every usable training image, so nothing shows the model what their "
            "absence looks like and no threshold can be chosen for them; add training images without them, or "
            "drop the label(s)"
        )
    if "val" not in splits:
        if min(counts.values()) < 2:
            raise DataError(f"{root}: every class needs at least two images to hold one out for validation")
        splits["train"], splits["val"] = stratified_split(splits["train"], val_fraction, split_seed)
    return Dataset(root, classes, splits["train"], splits["val"], splits.get("test", []), skipped, layout, multi_label)


def _with_label(record: ImageRecord, label: int | tuple[int, ...], multi_label: bool = False) -> ImageRecord:
    if isinstance(label, tuple):
        if multi_label:
            return dataclasses.replace(record, label=label[0], labels=label)
        label = label[0]
    return dataclasses.replace(record, label=label)


def collect_files(inputs: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Expand files and folders given on a command line into a sorted list of files."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser().resolve()
        if path.is_dir():
            files += list_images(path)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path} does not exist")
    return files
