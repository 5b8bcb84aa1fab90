"""The on-disk layout of ``headstart embed`` output: embeddings in shards, each one written whole or not at all.

An embeddings folder (format 2)::

    OUT/meta.json                  backbone, fingerprint, preprocessing, precision, shape, classes, failed files,
                                   shard size and the list of shards; written last, by rank 0
    OUT/checksums.json             its checksum
    OUT/shards/00000/vectors.npy   float32 [rows, D]: the embeddings of records [start, stop) that could be read
    OUT/shards/00000/rows.csv      path,label,split,digest: one row per vector, in input order
    OUT/shards/00000/shard.json    its slice (start, stop), a digest of the slice's input (paths and content
                                   digests) and of the settings, the failed files, timings, which rank wrote it
    OUT/shards/00000/checksums.json  the three files' SHA-256 (see :mod:`headstart.checksums`)

Shard ``k`` holds records ``[k * shard_size, (k + 1) * shard_size)`` of the input; under ``torchrun`` rank ``r``
computes the shards with ``k % world == r``. A shard is complete when its three files match its ``checksums.json``
and its ``shard.json`` names the same slice of the same input made with the same settings: a run started again keeps
every such shard and computes the rest (a torn or corrupt shard is named in a note and computed again).

The shard is the unit of memory too: :func:`iter_embedding_shards` yields one verified shard at a time, so a
collection larger than memory can be streamed into an index. Folders written before shards existed (format 1: one
``embeddings.npy`` + ``ids.csv`` + ``meta.json``) read as a single shard.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from headstart.checksums import read_verified, write_files
from headstart.errors import IntegrityError

FORMAT = 2  # the newest layout this headstart writes and reads
MATRIX_FILE, IDS_FILE, META_FILE = "embeddings.npy", "ids.csv", "meta.json"  # format 1 (one file each), and meta
SHARDS_DIR = "shards"
VECTORS_FILE, ROWS_FILE, SHARD_FILE = "vectors.npy", "rows.csv", "shard.json"
ROW_FIELDS = ("path", "label", "split", "digest")
DEFAULT_SHARD_SIZE = 100_000  # 100,000 x 1,280 float32 is 512 MB: a shard in memory, not the collection
REMEDY = "run the same `headstart embed` (or `headstart index build`) command again: it recomputes that shard alone"


@dataclass(frozen=True)
class ShardInfo:
    """What ``shard.json`` records about one shard."""

    name: str  # folder name under shards/, e.g. "00003"
    start: int  # first input position of the slice
    stop: int  # one past the last
    rows: int  # vectors in the shard (the slice less its unreadable files)
    source: str  # digest of the slice's (path, content digest) pairs
    key: str  # digest of the settings (backbone fingerprint, preprocessing, precision, normalisation)
    failed: list[list[str]]  # [path, reason] of the slice's unreadable files
    extra: dict[str, Any]  # timings, counts and the writing rank: informative, not checked


def shard_name(k: int) -> str:
    """Folder name of shard ``k``."""
    return f"{k:05d}"


def digest_of(parts: Sequence[str]) -> str:
    """A SHA-256 over strings, unambiguous about their boundaries."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def write_shard(folder: Path, k: int, vectors: np.ndarray, rows: Sequence[Sequence[str]], info: dict[str, Any]) -> None:
    """Write shard ``k`` of an embeddings folder: all of its files, or (killed or failing mid-way) an incomplete
    shard that :func:`read_shard_info` refuses and the next run computes again.

    Args:
        folder: the embeddings folder.
        k: shard number.
        vectors: float32 [rows, D].
        rows: ``(path, label, split, digest)`` per vector.
        info: ``shard.json``'s content (``start``, ``stop``, ``source``, ``key``, ``failed``, and any extras).
    """
    if len(rows) != len(vectors):
        raise ValueError(f"{len(vectors)} vectors but {len(rows)} rows")
    target = folder / SHARDS_DIR / shard_name(k)
    if target.exists():  # a torn or stale shard: nothing of it may survive beside the new files
        shutil.rmtree(target)
    matrix = io.BytesIO()
    np.save(matrix, np.ascontiguousarray(vectors, dtype=np.float32), allow_pickle=False)
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(ROW_FIELDS)
    writer.writerows(rows)
    document = {"format": FORMAT, "shard": k, "rows": len(rows), **info}
    # shard.json last in the group: checksums.json is staged before any rename, so a kill between renames leaves a
    # listed file missing, which reading detects.
    write_files(target, {VECTORS_FILE: matrix.getvalue(), ROWS_FILE: text.getvalue().encode(),
                         SHARD_FILE: json.dumps(document, indent=1).encode()})  # fmt: skip


def read_shard_info(folder: Path, name: str) -> ShardInfo:
    """The verified ``shard.json`` of a shard.

    Raises:
        IntegrityError: the shard is incomplete, torn or modified (the message names it and what to do).
        FileNotFoundError: there is no such shard.
    """
    shard = folder / SHARDS_DIR / name
    if not (shard / SHARD_FILE).is_file() and not (shard / "checksums.json").is_file():
        raise FileNotFoundError(shard / SHARD_FILE)
    try:
        document = json.loads(read_verified(shard, SHARD_FILE, _remedy(shard)))
    except FileNotFoundError as error:
        raise IntegrityError(f"shard {shard} is incomplete ({SHARD_FILE} missing); {REMEDY}") from error
    except ValueError as error:
        raise IntegrityError(f"shard {shard}: {SHARD_FILE} is unreadable ({error}); {REMEDY}") from error
    if document.get("format", 0) > FORMAT:
        raise IntegrityError(_newer(shard / SHARD_FILE, document.get("format")))
    known = {"start", "stop", "rows", "source", "key", "failed", "format", "shard"}
    return ShardInfo(name, int(document["start"]), int(document["stop"]), int(document["rows"]),
                     str(document["source"]), str(document["key"]), list(document.get("failed", [])),
                     {k: v for k, v in document.items() if k not in known})  # fmt: skip


def read_shard(folder: Path, name: str, verify_rows: int | None = None) -> tuple[np.ndarray, list[dict[str, str]]]:
    """The vectors and rows of one shard, each file checked against the shard's ``checksums.json``.

    Args:
        folder: the embeddings folder.
        name: the shard's folder name.
        verify_rows: the row count the shard must have (from ``meta.json`` or ``shard.json``).

    Raises:
        IntegrityError: a file is missing, truncated or modified, or the files disagree; the message names the
            shard and says to run the same command again.
    """
    shard = folder / SHARDS_DIR / name
    remedy = _remedy(shard)
    try:
        matrix = np.load(io.BytesIO(read_verified(shard, VECTORS_FILE, remedy)), allow_pickle=False)
        rows = list(csv.DictReader(io.StringIO(read_verified(shard, ROWS_FILE, remedy).decode())))
    except FileNotFoundError as error:
        raise IntegrityError(f"shard {shard} is missing {Path(str(error.filename)).name}; {REMEDY}") from error
    except (ValueError, EOFError, UnicodeDecodeError) as error:
        raise IntegrityError(f"shard {shard} is unreadable ({type(error).__name__}: {error}); {REMEDY}") from error
    expected = len(rows) if verify_rows is None else verify_rows
    if matrix.ndim != 2 or matrix.shape[0] != len(rows) or len(rows) != expected:
        raise IntegrityError(f"shard {shard}: {VECTORS_FILE} holds {list(matrix.shape)}, {ROWS_FILE} {len(rows)} rows "
                             f"where {expected} were recorded: the files do not belong together; {REMEDY}")  # fmt: skip
    return matrix, rows


def _remedy(shard: Path) -> str:
    return f"shard {shard.name} is damaged: {REMEDY}"


def _newer(path: Path, found: object) -> str:
    return (f"{path} has format {found!r}, newer than this headstart reads (format {FORMAT}); upgrade headstart "
            "(pip install -U headstart), or write the embeddings again with this version")  # fmt: skip


def read_meta(folder: str | Path) -> dict[str, Any]:
    """The verified ``meta.json`` of an embeddings folder (either format).

    Raises:
        FileNotFoundError: the folder holds no ``meta.json``.
        IntegrityError: it is modified, unreadable or from a newer headstart.
    """
    root = Path(folder)
    remedy = "write the embeddings again with `headstart embed`"
    try:
        meta = json.loads(read_verified(root, META_FILE, remedy))
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{root / META_FILE} not found; is {root} a folder written by `headstart embed`? (an interrupted run "
            "writes it last: run the same command again to finish it)"
        ) from error
    except ValueError as error:
        raise IntegrityError(f"{root / META_FILE} is unreadable ({error}); {remedy}") from error
    if not isinstance(meta, dict):
        raise IntegrityError(f"{root / META_FILE} is not an embeddings description; {remedy}")
    if int(meta.get("format", 1)) > FORMAT:
        raise IntegrityError(_newer(root / META_FILE, meta.get("format")))
    return meta


def iter_embedding_shards(folder: str | Path) -> Iterator[tuple[np.ndarray, list[dict[str, str]]]]:
    """Yield ``(vectors [n, D] float32, rows)`` shard by shard, in input order, each verified as it is read.

    ``rows`` has ``path``, ``label``, ``split`` and ``digest`` per vector. Memory holds one shard at a time. A folder
    written before shards existed yields its one matrix.

    Raises:
        IntegrityError: a shard (named in the message) is missing, torn or modified, or the folder is from a newer
            headstart; run the same ``headstart embed`` command again to recompute what is missing.
    """
    root = Path(folder)
    meta = read_meta(root)
    if int(meta.get("format", 1)) < 2:
        yield _read_single(root, meta)
        return
    for entry in meta["shards"]:
        shard = root / SHARDS_DIR / entry["name"]
        if not shard.is_dir():
            raise IntegrityError(f"shard {shard} is missing (listed in {root / META_FILE}); {REMEDY}")
        description = shard / SHARD_FILE
        if description.is_file() and hashlib.sha256(description.read_bytes()).hexdigest() != entry.get("sha256"):
            raise IntegrityError(f"shard {shard} is not the one {root / META_FILE} lists: a later run replaced it and "
                                 f"did not finish; {REMEDY}")  # fmt: skip
        vectors, rows = read_shard(root, entry["name"], int(entry["rows"]))
        if vectors.shape[0] and vectors.shape[1] != meta["shape"][1]:
            raise IntegrityError(f"shard {shard} holds {vectors.shape[1]}-d vectors, {root / META_FILE} says "
                                 f"{meta['shape'][1]}; {REMEDY}")  # fmt: skip
        yield vectors, rows


def _read_single(root: Path, meta: dict[str, Any]) -> tuple[np.ndarray, list[dict[str, str]]]:
    """Format 1: ``embeddings.npy`` and ``ids.csv``, checked against each other and ``meta.json``."""
    remedy = "write the embeddings again with `headstart embed`"
    try:
        matrix = np.load(io.BytesIO(read_verified(root, MATRIX_FILE, remedy)), allow_pickle=False)
        rows = list(csv.DictReader(io.StringIO(read_verified(root, IDS_FILE, remedy).decode())))
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{error.filename} not found; is {root} a folder written by `headstart embed`?"
        ) from error
    except IntegrityError:
        raise
    except (ValueError, EOFError) as error:  # a folder without checksums: numpy and csv find the damage
        raise IntegrityError(f"{root}: unreadable embeddings ({type(error).__name__}: {error}); {remedy}") from error
    if matrix.ndim != 2 or len(rows) != matrix.shape[0] or list(matrix.shape) != meta.get("shape", list(matrix.shape)):
        raise IntegrityError(
            f"{root}: {MATRIX_FILE} holds {list(matrix.shape)}, {IDS_FILE} {len(rows)} rows and {META_FILE} says "
            f"{meta.get('shape')}: the files do not belong together; {remedy}"
        )
    return matrix, rows


def sample_vectors(folder: str | Path, count: int, seed: int = 0) -> np.ndarray:
    """At most ``count`` rows drawn uniformly without replacement across all shards (one shard in memory at a time):
    the training sample of an index that must not hold the whole collection to learn its lists."""
    meta = read_meta(folder)
    total = int(meta["shape"][0])
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(total, size=min(count, total), replace=False))
    parts, offset = [], 0
    for vectors, _ in iter_embedding_shards(folder):
        lo, hi = np.searchsorted(chosen, [offset, offset + len(vectors)])
        parts.append(vectors[chosen[lo:hi] - offset])
        offset += len(vectors)
    dim = int(meta["shape"][1])
    return np.concatenate(parts) if parts else np.zeros((0, dim), dtype=np.float32)
