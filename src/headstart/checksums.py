"""Checksums of the files headstart writes and later reads back: one ``checksums.json`` per folder, verified on load.

Run folders (the model, its description, the training checkpoint), index folders, embedding outputs and exports are
written with :func:`write_files`, which records each file's SHA-256 and size in the folder's ``checksums.json``;
:func:`read_verified` reads a file back and raises :class:`IntegrityError` when it is missing, truncated or changed,
in one line that names the file, what is wrong and what to do.

A file the manifest does not list (a folder written before checksums existed, a file added by hand) is read
unchecked: old folders keep loading.

Crash safety: :func:`write_files` first writes every new file beside its destination (a full disk stops it there,
with nothing changed), then the manifest, listing each new checksum *and* the one it replaces, then renames the new
files into place. A crash at any point leaves every file matching one of its listed checksums; the next write drops
the older one.
"""

from __future__ import annotations

import hashlib
import json
import mmap
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from headstart.errors import IntegrityError
from headstart.files import Content, commit, discard, flush, stage

MANIFEST = "checksums.json"
FORMAT = 1


def write_files(folder: Path, files: Mapping[str, Content]) -> None:
    """Write files into ``folder`` and record their checksums; all of them, or (on a failed write) none.

    Args:
        folder: the folder holding ``checksums.json``.
        files: contents by name relative to ``folder`` (``/``-separated, e.g. ``checkpoints/last.pt``): bytes, or
            a function that writes the file (see :data:`headstart.files.Content`).

    Raises:
        StorageError: a file cannot be written (disk full, permission denied, read-only); every file and the
            manifest are as they were.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for name, content in files.items():
            staged.append(stage(folder / name, content, sync=False))
        with ThreadPoolExecutor(max_workers=1) as pool:  # hashing (which releases the GIL) overlaps the disk flush
            sums = pool.map(_checksum, [tmp for tmp, _ in staged])  # of the bytes on the disk, whoever wrote them
            flush(staged)
            entries = list(sums)
        recorded = _read(folder, strict=False)
        for name, entry in zip(files, entries, strict=True):
            # The version being replaced stays valid until the rename below has happened.
            recorded[name] = [entry] + [old for old in recorded.get(name, [])[:1] if old != entry]
        document = {"format": FORMAT, "algorithm": "sha256", "files": dict(sorted(recorded.items()))}
        staged.insert(0, stage(folder / MANIFEST, (json.dumps(document, indent=1) + "\n").encode()))
    except BaseException:
        discard(staged)
        raise
    commit(staged)


def read_verified(folder: Path, name: str, remedy: str) -> bytes:
    """The bytes of ``folder/name``, checked against the folder's manifest (unchecked when it does not list them).

    Args:
        folder: the folder holding ``checksums.json``.
        name: the file, relative to ``folder``.
        remedy: what the user should do when the file is bad, e.g. "train the model again (`headstart train`)".

    Raises:
        IntegrityError: the file is missing, truncated or modified, or the manifest is damaged.
        FileNotFoundError: the file is missing and the manifest does not list it.
    """
    path = folder / name
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if name in _read(folder, strict=True, remedy=remedy):
            raise IntegrityError(f"{path} is missing (it is listed in {folder / MANIFEST}); {remedy}") from None
        raise
    verify(folder, name, data, remedy)
    return data


def verify(folder: Path, name: str, data: bytes, remedy: str) -> bool:
    """Check bytes read from ``folder/name`` against the manifest; False when the manifest does not list the file.

    Raises:
        IntegrityError: the bytes match none of the checksums recorded for the file, or the manifest is damaged.
    """
    accepted = _read(folder, strict=True, remedy=remedy).get(name)
    if not accepted:
        return False
    if any(len(data) == e["size"] for e in accepted):
        digest = hashlib.sha256(data).hexdigest()
        if any(len(data) == e["size"] and digest == e["sha256"] for e in accepted):
            return True
    path, expected = folder / name, int(accepted[0]["size"])
    if len(data) < expected:
        problem = f"is truncated or replaced ({len(data):,} bytes where {expected:,} were written)"
    elif len(data) > expected:
        problem = f"was modified or replaced ({len(data):,} bytes where {expected:,} were written)"
    else:
        problem = f"was modified after it was written (its SHA-256 differs from the one in {folder / MANIFEST})"
    raise IntegrityError(f"{path} {problem}; {remedy}")


def verify_file(folder: Path, name: str, remedy: str) -> bool:
    """Check ``folder/name`` against the manifest without reading it into memory (hashed from a memory map, for
    files larger than RAM); False when the manifest does not list the file.

    Raises:
        IntegrityError: the file is missing, truncated or modified, or the manifest is damaged.
    """
    accepted = _read(folder, strict=True, remedy=remedy).get(name)
    if not accepted:
        return False
    path = folder / name
    if not path.is_file():
        raise IntegrityError(f"{path} is missing (it is listed in {folder / MANIFEST}); {remedy}")
    size = path.stat().st_size
    if any(size == e["size"] for e in accepted) and _checksum(path) in accepted:
        return True
    expected = int(accepted[0]["size"])
    if size != expected:
        problem = f"is truncated or replaced ({size:,} bytes where {expected:,} were written)"
    else:
        problem = f"was modified after it was written (its SHA-256 differs from the one in {folder / MANIFEST})"
    raise IntegrityError(f"{path} {problem}; {remedy}")


def _checksum(path: Path) -> dict[str, Any]:
    """SHA-256 and size of a file, hashed from a memory map (no copy of a large file in memory)."""
    size = path.stat().st_size
    if not size:
        return {"sha256": hashlib.sha256(b"").hexdigest(), "size": 0}
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
        return {"sha256": hashlib.sha256(view).hexdigest(), "size": size}


def _read(folder: Path, strict: bool, remedy: str = "") -> dict[str, list[dict[str, Any]]]:
    """The manifest's entries by file name: empty when there is none. A damaged manifest raises when ``strict``, and
    is started afresh when not (a writer replaces it)."""
    path = folder / MANIFEST
    try:
        document = json.loads(path.read_bytes())
        files = document["files"]
        return {str(k): [{"sha256": str(e["sha256"]), "size": int(e["size"])} for e in v] for k, v in files.items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        if not strict:
            return {}
        raise IntegrityError(
            f"{path} is damaged ({type(error).__name__}: {error}); it holds the checksums of the files beside it: "
            f"{remedy}, or delete it to use those files unchecked"
        ) from error
