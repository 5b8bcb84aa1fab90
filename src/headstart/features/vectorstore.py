"""The exact unit vectors of an index, kept on disk as a memory-mappable ``.npy`` for re-ranking.

Row ``i`` holds the vector of persistent id ``i`` (rows of removed ids stay, unused), so a lookup by id is one seek
and the file only ever grows at the end. Vectors are written as they are added, to a temporary file of raw rows, so
building never holds all of them in memory; :meth:`VectorStore.write` streams the saved rows and the new ones into
one ``.npy`` file (for :func:`headstart.checksums.write_files`), and :meth:`VectorStore.open` memory-maps it back.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

CHUNK_ROWS = 65_536  # rows copied per step when a store is written: a few hundred MB at most


class VectorStore:
    """Exact vectors by persistent id: a saved, memory-mapped ``.npy`` (read-only) plus rows appended since.

    Args:
        dim: vector width.
        dtype: ``float16`` (half the disk, scores exact to about 1e-3) or ``float32``.
        tmp_dir: folder for the file of appended rows (default: the system's temporary folder).
    """

    def __init__(self, dim: int, dtype: str = "float16", tmp_dir: str | Path | None = None):
        if dtype not in ("float16", "float32"):
            raise ValueError(f"vector store dtype must be float16 or float32, got {dtype!r}")
        self.dim, self.dtype = dim, np.dtype(dtype)
        self._base: np.ndarray | None = None  # the saved rows, memory-mapped
        self._tmp_dir = tmp_dir
        self._tail: Path | None = None  # raw rows appended since, in a temporary file
        self._tail_rows = 0
        self._tail_map: np.ndarray | None = None  # memory map of the tail, renewed after an append

    @classmethod
    def open(cls, path: str | Path) -> VectorStore:
        """Memory-map a saved store (nothing is read until rows are looked up)."""
        base = np.load(path, mmap_mode="r")
        if base.ndim != 2 or base.dtype not in (np.float16, np.float32):
            raise ValueError(f"{path} holds a {base.dtype} array of shape {base.shape}, not [N, D] float vectors")
        store = cls(int(base.shape[1]), str(base.dtype))
        store._base = base
        return store

    def __len__(self) -> int:
        return (0 if self._base is None else len(self._base)) + self._tail_rows

    def __del__(self) -> None:
        self._tail_map = None
        if self._tail is not None:
            self._tail.unlink(missing_ok=True)

    def append(self, first_id: int, vectors: np.ndarray) -> None:
        """Store the rows of ids ``first_id, first_id + 1, ...`` (gaps from ids never stored are zero-filled)."""
        if vectors.shape[1] != self.dim:
            raise ValueError(f"vectors have {vectors.shape[1]} dimensions, the store {self.dim}")
        if first_id < len(self):
            raise ValueError(f"id {first_id} is already stored; ids only grow")
        if self._tail is None:
            fd, name = tempfile.mkstemp(prefix="headstart-vectors-", suffix=".raw", dir=self._tmp_dir)
            os.close(fd)
            self._tail = Path(name)
        gap = first_id - len(self)
        with self._tail.open("ab") as handle:
            if gap:
                handle.write(np.zeros((gap, self.dim), self.dtype).tobytes())
            handle.write(np.ascontiguousarray(vectors, dtype=self.dtype).tobytes())
        self._tail_rows += gap + len(vectors)
        self._tail_map = None

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """The vectors of ``ids`` (any order, each below ``len(self)``) as float32, [N, D]."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        split = 0 if self._base is None else len(self._base)
        low = ids < split
        if low.any():
            assert self._base is not None
            out[low] = self._base[ids[low]]
        if not low.all():
            if self._tail_map is None:
                assert self._tail is not None
                self._tail_map = np.memmap(self._tail, self.dtype, "r", shape=(self._tail_rows, self.dim))
            out[~low] = self._tail_map[ids[~low] - split]
        return out

    def write(self, path: str) -> None:
        """Write every row as one ``.npy`` file at ``path``, streaming (for :func:`headstart.checksums.write_files`)."""
        with open(path, "wb") as handle:
            np.lib.format.write_array_header_1_0(
                handle, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                         "shape": (len(self), self.dim)}
            )  # fmt: skip
            if self._base is not None:
                for start in range(0, len(self._base), CHUNK_ROWS):
                    handle.write(np.ascontiguousarray(self._base[start : start + CHUNK_ROWS]).tobytes())
            if self._tail is not None:
                with self._tail.open("rb") as tail:
                    shutil.copyfileobj(tail, handle, 16 << 20)
