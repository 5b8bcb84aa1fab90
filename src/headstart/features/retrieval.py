"""Image retrieval: a FAISS index of L2-normalised embeddings with persistent ids, search, and retrieval metrics.

An index folder holds three files:

* ``index.faiss``: the FAISS index (``IndexIDMap2`` around a flat, IVF or HNSW inner-product index), so ids stay
  the same across additions and removals;
* ``items.csv``: ``id,path,label,digest`` for every indexed image;
* ``meta.json``: backbone name, weights fingerprint and source, preprocessing, precision, dimension, index kind and
  its parameters, class names, the next free id, and the SHA-256 of the other two files;

written together, with the checksums of all three in ``checksums.json`` (see :mod:`headstart.checksums`): a full disk
leaves the previous index whole, and a file replaced, edited or torn behind the index's back is refused on load.
(Folders written before ``checksums.json`` existed are checked against the SHA-256 sums in ``meta.json``.)

A query is embedded with the backbone and preprocessing recorded in ``meta.json`` and refused when that backbone's
weights fingerprint differs from the index's: vectors from two networks are not comparable.

Scores are inner products of unit vectors, i.e. cosine similarities; results come in FAISS's ``(scores, ids)``
order. Exact (``flat``) search is the default; ``ivf`` and ``hnsw`` trade a little recall for speed on large
collections (see ``benchmarks/retrieval.py``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from headstart.checksums import verify, verify_file, write_files
from headstart.data.scan import ImageRecord, collect_files
from headstart.data.transforms import Preprocessing
from headstart.errors import ConfigError, DataError, IntegrityError
from headstart.features.embeddings import as_records, embed
from headstart.features.shards import DEFAULT_SHARD_SIZE
from headstart.features.vectorstore import VectorStore
from headstart.files import Content
from headstart.hardware import distributed, pick_device
from headstart.models.backbones import DEFAULT_BACKBONE, Backbone, create_backbone

FORMAT_VERSION = 2  # 2: compressed kinds, vectors.npy, checksums.json only (1 kept sha256 sums in meta.json)
READABLE_FORMATS = (1, 2)
KINDS = ("flat", "ivf", "hnsw", "sq8", "ivfsq8", "ivfpq", "opq")
IVF_KINDS = ("ivf", "ivfsq8", "ivfpq", "opq")
PQ_KINDS = ("ivfpq", "opq")
INDEX_FILE, ITEMS_FILE, META_FILE, VECTORS_FILE = "index.faiss", "items.csv", "meta.json", "vectors.npy"
REBUILD = "rebuild the index with `headstart index build`"

# The planner's memory model, bytes (checked against measured RSS by benchmarks/retrieval_scale.py).
ID_BYTES = 56  # per vector: the stored 8-byte id plus its entry in the id -> position hash map (IDMap2, direct map)
ITEM_BYTES = 200  # per vector: the Python record of its image (id, path, label, digest), short paths assumed
EXACT_MAX = 100_000  # above this many vectors an exact scan (about 0.7 us per vector per query) is too slow
MAX_PQ_M = 128  # largest PQ code, bytes (256 4-bit sub-quantizers): fast-scan search grows slowly with m
PQ_BITS = 4  # bits per sub-quantizer code: FAISS's fast-scan PQ (SIMD lookup tables); indexes without "nbits"
# in their parameters were written before it, with 8-bit codes (one byte per sub-quantizer), and load as such


class IndexFileError(IntegrityError):
    """An index folder that is missing, corrupt, or inconsistent; the message names the file and what to do."""


class BackboneMismatchError(ConfigError):
    """A query embedded by a different network (or different weights) than the index."""


@dataclass(frozen=True, slots=True)
class Item:
    """One indexed image."""

    id: int  # persistent id: never reused, unchanged by additions and removals
    path: str
    label: str  # class name, "" when unknown
    digest: str  # content digest (as in the feature cache)


def _compressed_nlist(n: int) -> int:
    # The power of two nearest sqrt(n): k-means training costs nlist^2 (40 points per list), search scans n/nlist
    # codes per probed list; at 1M vectors 1,024 lists train in about a minute on 2 cores.
    return max(1, min(2 ** round(math.log2(max(math.sqrt(max(n, 1)), 1))), n // 40))


def default_params(kind: str, n: int, dim: int = 0) -> dict[str, int]:
    """Index parameters for ``n`` vectors of ``dim`` dimensions (``dim`` is needed by the PQ kinds only).

    IVF: ``nlist`` about 2 sqrt(n) lists (the low end of FAISS's 1-16 sqrt(n) guideline, which keeps k-means
    training of 100,000 1,280-d vectors within a minute on 2 cores), capped so that each list gets 39 training
    points; ``nprobe`` 16. HNSW: 16 links per node, ``ef_construction`` 40 (building costs about linearly in both),
    ``ef_search`` 64. Checked with ``benchmarks/retrieval.py`` (recall@10 against exact search).

    Compressed kinds (``sq8``, ``ivfsq8``, ``ivfpq``, ``opq``): ``nlist`` the power of two nearest sqrt(n) with an
    HNSW coarse quantizer (adding then costs log(nlist), not nlist, per vector), ``nprobe`` 32; PQ codes of ``m``
    bytes up to 128, as ``2 m`` sub-quantizers of ``nbits`` 4 bits each, the largest with ``2 m`` dividing ``dim``
    (FAISS's fast-scan PQ, SIMD lookup tables: at 1M vectors half the search and build time of 8-bit codes; on real
    embeddings 128 4-bit bytes rank as well as 64 8-bit ones); ``rerank`` 10 for PQ (search fetches 10 k candidates
    and re-scores them with the exact vectors kept on disk), 0 for SQ8 (accurate enough alone). Checked with
    ``benchmarks/retrieval_scale.py`` and ``benchmarks/retrieval_real.py``.
    """
    if kind == "ivf":
        nlist = max(1, min(round(2 * math.sqrt(max(n, 1))), n // 39))
        return {"nlist": nlist, "nprobe": min(nlist, 16)}
    if kind == "hnsw":
        return {"m": 16, "ef_construction": 40, "ef_search": 64}
    if kind == "flat":
        return {}
    if kind == "sq8":
        return {"rerank": 0}
    if kind in ("ivfsq8", *PQ_KINDS):
        nlist = _compressed_nlist(n)
        params = {"nlist": nlist, "nprobe": min(nlist, 32), "rerank": 10 if kind in PQ_KINDS else 0}
        if kind in PQ_KINDS:
            if dim <= 0:
                raise ValueError(f"default_params({kind!r}) needs the vector dimension to choose the PQ code size")
            params["m"], params["nbits"] = _pq_sizes(dim)[0], PQ_BITS
        return params
    raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")


def _pq_sizes(dim: int) -> list[int]:
    """PQ code sizes in bytes for ``dim``, 128 to 4, largest first: ``2 m`` 4-bit sub-vectors must split the vector
    evenly."""
    top = min(dim // 2, MAX_PQ_M)
    return [m for m in range(top, min(top, 4) - 1, -1) if dim % (2 * m) == 0] or [max(dim // 2, 1)]


def _subquantizers(params: dict[str, int]) -> int:
    """Sub-quantizers of a PQ code of ``params["m"]`` bytes at ``params["nbits"]`` bits each (8 when absent)."""
    return params["m"] * 8 // params.get("nbits", 8)


def _fast_scan(kind: str, params: dict[str, int]) -> bool:
    """A PQ kind with 4-bit codes (FAISS's fast-scan lists: no reconstruction from codes, so the exact vectors are
    always kept on disk)."""
    return kind in PQ_KINDS and params.get("nbits", 8) == PQ_BITS


def training_size(kind: str, params: dict[str, int]) -> int:
    """How many sample vectors :meth:`ImageIndex.train` wants: 40 per IVF list, and 10,240 (40 per centroid of an
    8-bit PQ codebook) for PQ codes; 0 for kinds without training (flat, HNSW), 1,000 for SQ8's per-dimension
    ranges."""
    need = 40 * params.get("nlist", 0) if kind in IVF_KINDS else 0
    if kind in PQ_KINDS:
        need = max(need, 256 * 40)  # 4-bit codebooks have 16 centroids, but the more points the better they fit
    if kind in ("sq8", "ivfsq8"):
        need = max(need, 1000)
    return need


def estimate_bytes(kind: str, n: int, dim: int, params: dict[str, int]) -> int:
    """Memory an index of ``n`` vectors takes while loaded, per :data:`ID_BYTES` and :data:`ITEM_BYTES`: codes, ids
    and records per vector, plus the trained parts (IVF centroids, PQ codebooks, the OPQ rotation)."""
    code = {"flat": 4 * dim, "ivf": 4 * dim, "sq8": dim, "ivfsq8": dim}.get(kind)
    if kind == "hnsw":
        code = 4 * dim + 8 * params.get("m", 16) + 8  # level 0 has 2 M links of 4 bytes, upper levels add ~1/M
    if kind in PQ_KINDS:
        code = params["m"]
    if code is None:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
    fixed = 0
    if kind in IVF_KINDS:
        fixed += params["nlist"] * (4 * dim + 300)  # centroids (and the HNSW graph over them)
    if kind in PQ_KINDS:
        fixed += 256 * dim * 4
    if kind == "opq":
        fixed += dim * dim * 4
    return n * (code + ID_BYTES + ITEM_BYTES) + fixed


_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9, "T": 10**12,
          "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(text: str | int) -> int:
    """Bytes from ``2GB``, ``500MB``, ``1.5GiB`` or a plain number (decimal units; ``KiB``... binary)."""
    if isinstance(text, int):
        return text
    number = text.strip().upper().rstrip()
    unit = number.lstrip("0123456789.").strip()
    try:
        return int(float(number[: len(number) - len(unit)].strip()) * _UNITS[unit])
    except (KeyError, ValueError):
        raise ValueError(f"memory budget {text!r} is not a size; write e.g. 2GB, 500MB or 1.5GiB") from None


def format_size(size: float) -> str:
    """``1.23 GB``, ``450 MB``: decimal units, as :func:`parse_size` reads them."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{int(size)} B"


def plan_index(n: int, dim: int, memory_budget: str | int, kind: str = "auto") -> tuple[str, dict[str, int]]:
    """The index kind and parameters for ``n`` vectors of ``dim`` dimensions within ``memory_budget``.

    Rules, in order, each taken when its :func:`estimate_bytes` fits the budget:

    1. up to 100,000 vectors: ``flat`` (exact); beyond: ``ivf`` (IVF-Flat), exact vectors, fast;
    2. scalar quantization, 1 byte per dimension (4x smaller, recall about 0.99): ``sq8`` up to 100,000 vectors, else
       ``ivfsq8``;
    3. ``opq`` (OPQ rotation + IVF-PQ) with the largest code of at most 128 bytes that fits (PQ alone loses recall;
       the rotation costs one matrix product per vector and wins some back), re-ranking 10 k candidates with the
       exact vectors on disk.

    ``kind`` other than ``auto`` keeps the kind and only sizes it (the PQ code size for ``ivfpq``/``opq``).

    Raises:
        ConfigError: no index fits; the message names the smallest budget that would.
    """
    budget = parse_size(memory_budget)
    if kind == "auto":
        kinds = ["flat" if n <= EXACT_MAX else "ivf", "sq8" if n <= EXACT_MAX else "ivfsq8", "opq"]
    elif kind in KINDS:
        kinds = [kind]
    else:
        raise ValueError(f"unknown index kind {kind!r}; choose auto or one of {', '.join(KINDS)}")
    smallest: tuple[int, str] | None = None
    for name in kinds:
        base = default_params(name, n, dim)
        for m in _pq_sizes(dim) if name in PQ_KINDS else [0]:
            params = {**base, "m": m} if name in PQ_KINDS else base
            need = estimate_bytes(name, n, dim, params)
            if need <= budget:
                return name, params
            if smallest is None or need < smallest[0]:
                smallest = (need, name + (f" with {m}-byte codes" if m else ""))
    assert smallest is not None
    raise ConfigError(
        f"--memory-budget {format_size(budget)} is too small for {n:,} vectors of {dim} dimensions: the smallest "
        f"index ({smallest[1]}) needs about {format_size(smallest[0])}. Give --memory-budget "
        f"{format_size(smallest[0] * 1.05)} or more, or index fewer images."
    )


def _factory(kind: str, dim: int, params: dict[str, int]) -> str:
    """FAISS index-factory description of a compressed kind."""
    ivf = f"IVF{params.get('nlist', 0)}_HNSW32"
    if kind in ("sq8", "ivfsq8"):
        return {"sq8": "SQ8", "ivfsq8": f"{ivf},SQ8"}[kind]
    subs = _subquantizers(params)
    pq = f"PQ{subs}x{PQ_BITS}fs" if _fast_scan(kind, params) else f"PQ{subs}"
    return f"{ivf},{pq}" if kind == "ivfpq" else f"OPQ{subs},{ivf},{pq}"


def _make_faiss(kind: str, dim: int, params: dict[str, int], train: np.ndarray | None) -> faiss.Index:
    inner: Any  # faiss's stubs type each index class apart; they share no declared interface
    if kind == "flat":
        inner = faiss.IndexFlatIP(dim)
    elif kind in IVF_KINDS:
        need = params["nlist"] if kind == "ivf" else training_size(kind, params)
        if kind in PQ_KINDS:
            need = max(params["nlist"], 2 ** params.get("nbits", 8))  # the hard floor: a point per centroid
        if train is None or len(train) < need:
            have = 0 if train is None else len(train)
            raise ValueError(
                f"a {kind} index with nlist={params['nlist']} needs at least {need} vectors to train, got {have}; "
                "use --index flat for small collections or lower --nlist"
            )
        if kind in PQ_KINDS and dim % _subquantizers(params):
            raise ValueError(
                f"a PQ code of {params['m']} bytes splits each vector into {_subquantizers(params)} parts, which "
                f"{dim} dimensions do not divide evenly; choose --pq-m from {', '.join(map(str, _pq_sizes(dim)))}"
            )
        if kind == "ivf":
            quantizer = faiss.IndexFlatIP(dim)
            inner = faiss.IndexIVFFlat(quantizer, dim, params["nlist"], faiss.METRIC_INNER_PRODUCT)
        else:
            inner = faiss.index_factory(dim, _factory(kind, dim, params), faiss.METRIC_INNER_PRODUCT)
        if kind == "opq":
            chain: Any = faiss.downcast_index(inner)  # IndexPreTransform: the OPQ rotation, then the IVF-PQ
            opq: Any = faiss.downcast_VectorTransform(chain.chain.at(0))
            opq.niter = 20  # FAISS's 50 iterations cost minutes on 1,280-d vectors; the rotation settles by 20
        if kind in PQ_KINDS and not _fast_scan(kind, params):
            # The index factory asks for polysemous training (reordering codes for Hamming pre-filtering, which this
            # search never uses): 10 times the training time (PQ16 on 10,240 x 64: 33 s, 3.2 s without).
            ivfpq: Any = faiss.downcast_index(faiss.extract_index_ivf(inner))
            ivfpq.do_polysemous_training = False
        inner.train(train)
        # IVF stores ids itself, and removes without renumbering the rest (which an id map around it would assume);
        # the hash-table direct map lets reconstruct() and remove_ids() find an id's list. Fast-scan lists cannot
        # remove through it (FAISS 1.15) and cannot decode codes at all; remove_ids() scans their lists instead.
        if not _fast_scan(kind, params):
            faiss.extract_index_ivf(inner).set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]
        _apply_params(inner, kind, params)
        return inner
    elif kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, params["m"], faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = params["ef_construction"]
        inner.hnsw.efSearch = params["ef_search"]
    elif kind == "sq8":
        inner = faiss.index_factory(dim, "SQ8", faiss.METRIC_INNER_PRODUCT)
        if train is None or not len(train):
            raise ValueError("an sq8 index learns each dimension's range from the vectors it is trained on; got none")
        inner.train(train)
    else:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
    # Persistent ids over positional indexes; the Python wrapper keeps ``inner`` alive (faiss's referenced_objects).
    return faiss.IndexIDMap2(inner)


def _apply_params(index: faiss.Index, kind: str, params: dict[str, int]) -> None:
    """Search-time parameters, which FAISS's file format does not keep for every index type."""
    if kind in IVF_KINDS:
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = int(params["nprobe"])
        quantizer = faiss.downcast_index(ivf.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):
            quantizer.hnsw.efSearch = max(64, 2 * int(params["nprobe"]))  # the nprobe nearest lists, reliably
    elif kind == "hnsw":
        wrapper: Any = faiss.downcast_index(index)  # IndexIDMap2 around the graph
        inner: Any = faiss.downcast_index(wrapper.index)
        inner.hnsw.efSearch = int(params["ef_search"])


def _check_files(folder: Path, meta: dict[str, Any], checked: bool, sums: dict[str, str]) -> None:
    """Every file ``meta`` lists is in ``folder`` and matches its checksum (``checked``: by checksums.json; format 1
    folders older than it: by ``sums``, the digests in meta.json).

    Raises:
        IndexFileError: a file missing or not matching, named.
    """
    fmt = meta.get("format")
    names = [INDEX_FILE, ITEMS_FILE] + ([VECTORS_FILE] if meta.get("vectors") else [])
    for name in names:
        path = folder / name
        if not path.is_file():
            raise IndexFileError(f"{path} is missing; the index folder is incomplete, {REBUILD}")
        if checked:
            _verify_file(folder, name)
        elif fmt == 1 and _file_sha256(path) == sums.get(name):
            pass  # a folder older than checksums.json
        else:
            reference = folder / (META_FILE if fmt == 1 else "checksums.json")
            raise IndexFileError(
                f"{path} does not match {reference} (checksum differs or is missing): it was modified, truncated or "
                f"copied from another index. {REBUILD.capitalize()}."
            )


def _read_faiss(folder: Path, kind: str, dim: int, params: dict[str, int], mmap: bool) -> Any:
    """The FAISS index in ``folder`` (memory-mapped with ``mmap``), its search parameters applied.

    Raises:
        IndexFileError: FAISS cannot read the file, or its width is not ``dim``.
    """
    # IVF lists map through FAISS's on-disk lists (which need a plain file reader); flat and SQ codes through
    # IO_FLAG_MMAP_IFC (FAISS 1.8+; older ones read them into memory).
    flags = (faiss.IO_FLAG_MMAP if kind in IVF_KINDS else getattr(faiss, "IO_FLAG_MMAP_IFC", 0)) if mmap else 0
    try:
        index = faiss.read_index(str(folder / INDEX_FILE), flags)
    except RuntimeError as error:
        raise IndexFileError(
            f"{folder / INDEX_FILE}: FAISS cannot read it ({str(error).strip().splitlines()[-1]}); {REBUILD}"
        ) from error
    _apply_params(index, kind, params)
    if index.d != dim:
        raise IndexFileError(f"{folder / INDEX_FILE} holds {index.d}-d vectors but {folder / META_FILE} says {dim}")
    return index


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"expected a [N, D] matrix of vectors, got shape {vectors.shape}")
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def _file_sha256(path: Path) -> str:
    """SHA-256 of a file, streamed (an index may be larger than RAM)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(16 << 20):
            digest.update(block)
    return digest.hexdigest()


class ImageIndex:
    """A FAISS index of unit-length embeddings with persistent ids and per-item metadata.

    ``meta`` records how the vectors were made (``backbone``, ``fingerprint``, ``preprocessing``, ``precision``);
    :func:`build_index` fills it, and low-level users may leave it empty.

    Streaming use (collections larger than memory): choose the kind and parameters for the total count up front
    (:func:`plan_index`, or :func:`default_params` with the total), :meth:`train` on a sample of about
    :func:`training_size` vectors, then :meth:`add` chunk by chunk; with ``rerank`` > 0 the exact vectors go to a
    file on disk as they are added, never all in memory. :meth:`add` on an untrained index trains on its first chunk.
    """

    def __init__(self, dim: int, kind: str = "flat", params: dict[str, int] | None = None,
                 meta: dict[str, Any] | None = None):  # fmt: skip
        if kind not in KINDS:
            raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
        self.dim = dim
        self.kind = kind
        self.params = dict(params or {})
        self.meta = dict(meta or {})
        self.items: dict[int, Item] = {}
        self.next_id = 0
        self.index: faiss.Index | None = None  # created by train(), or by the first add (IVF trains on it)
        self.store: VectorStore | None = None  # exact vectors on disk: for re-ranking (params["rerank"] > 0), and
        # always for 4-bit PQ, whose codes FAISS cannot decode (evaluate() reads the vectors of its queries)
        self.read_only = False  # loaded memory-mapped: search only

    def __len__(self) -> int:
        return len(self.items)

    # -- the FAISS verbs ---------------------------------------------------------------------------------------------

    def train(self, sample: np.ndarray, count: int | None = None) -> None:
        """Create the FAISS index and train it (IVF lists, quantizer codebooks) on ``sample``; adds nothing.

        Args:
            sample: vectors representative of the collection (L2-normalised here), about
                :func:`training_size` of them.
            count: the collection's total size, which sizes parameters not given (default: the sample's size).
        """
        if self.index is not None:
            raise ValueError("the index is already trained; train() comes before the first add()")
        x = _unit(sample)
        if x.shape[1] != self.dim:
            raise ValueError(f"vectors have {x.shape[1]} dimensions, the index {self.dim}")
        self.params = {**default_params(self.kind, count or len(x), self.dim), **self.params}
        self.index = _make_faiss(self.kind, self.dim, self.params, x)
        if (self.params.get("rerank", 0) > 0 or _fast_scan(self.kind, self.params)) and self.store is None:
            self.store = VectorStore(self.dim)

    def add(self, vectors: np.ndarray, items: Sequence[tuple[str, str, str]] | None = None) -> np.ndarray:
        """Add vectors (L2-normalised here) with ``(path, label, digest)`` per row; returns their new ids."""
        self._writable()
        x = _unit(vectors)
        if x.shape[1] != self.dim:
            raise ValueError(f"vectors have {x.shape[1]} dimensions, the index {self.dim}")
        rows = list(items) if items is not None else [("", "", "")] * len(x)
        if len(rows) != len(x):
            raise ValueError(f"{len(x)} vectors but {len(rows)} item descriptions")
        if self.index is None:
            self.train(x)
        assert self.index is not None
        ids = np.arange(self.next_id, self.next_id + len(x), dtype=np.int64)
        self.index.add_with_ids(x, ids)
        if self.store is not None:
            self.store.append(self.next_id, x)
        for i, (path, label, digest) in zip(ids.tolist(), rows, strict=True):
            self.items[i] = Item(i, str(path), str(label), str(digest))
        self.next_id += len(x)
        return ids

    def search(self, queries: np.ndarray, k: int = 10, rerank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most similar indexed vectors per query: (scores [Q, k], ids [Q, k]), best first.

        Scores are cosine similarities; when fewer than ``k`` items exist, missing slots have id -1 and score -inf.
        With exact vectors on disk, ``rerank`` (default ``params["rerank"]``) > 1 fetches ``k * rerank`` candidates
        from the compressed index and orders them by their exact scores; 0 or 1 returns the index's own ranking.
        """
        q = _unit(queries)
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have {q.shape[1]} dimensions, the index {self.dim}")
        if self.index is None or not len(self.items):
            return np.full((len(q), k), -np.inf, dtype=np.float32), np.full((len(q), k), -1, dtype=np.int64)
        factor = self.params.get("rerank", 0) if rerank is None else rerank
        if factor <= 1 or self.store is None:
            scores, ids = self.index.search(q, k)
            scores[ids < 0] = -np.inf
            return scores, ids
        _, candidates = self.index.search(q, k * factor)
        return self._rerank(q, candidates, k)

    def _rerank(self, q: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores of each query's candidates (read once each from the store, in file order), top ``k``."""
        assert self.store is not None
        valid = candidates >= 0
        unique, where = np.unique(candidates[valid], return_inverse=True)
        exact = np.full(candidates.shape, -np.inf, dtype=np.float32)
        if len(unique):
            rows = self.store.rows(unique)
            position = np.zeros(candidates.shape, dtype=np.int64)
            position[valid] = where
            # One [U, Q] product and a gather: copying the rows per query ([Q, C, D]) cost more than the scores.
            exact = (rows @ q.T)[position, np.arange(len(q))[:, None]]
            exact[~valid] = -np.inf
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        scores, ids = np.take_along_axis(exact, order, 1), np.take_along_axis(candidates, order, 1)
        if ids.shape[1] < k:
            pad = k - ids.shape[1]
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        ids[~np.isfinite(scores)] = -1
        return scores, ids

    def remove(self, ids: Sequence[int] | np.ndarray) -> int:
        """Remove items by id; returns how many were present. HNSW cannot delete, so its graph is rebuilt."""
        self._writable()
        present = np.array(sorted({int(i) for i in ids} & set(self.items)), dtype=np.int64)
        if not len(present) or self.index is None:
            return 0
        if self.kind == "hnsw":
            keep = np.array(sorted(set(self.items) - set(present.tolist())), dtype=np.int64)
            vectors = self.vectors(keep)
            self.index = _make_faiss(self.kind, self.dim, self.params, None)
            if len(keep):
                self.index.add_with_ids(vectors, keep)
        else:
            # IDSelectorArray: the only selector IVF's hash map takes. The store keeps the rows (ids are not reused).
            self.index.remove_ids(faiss.IDSelectorArray(present))
        for i in present.tolist():
            del self.items[i]
        return len(present)

    def vectors(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The unit vectors of ``ids``, [N, D]: exact from the store when there is one, else as the index keeps them
        (decoded, hence approximate, for the compressed kinds)."""
        if self.index is None or not len(ids):
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.store is not None:
            return self.store.rows(np.asarray(ids, dtype=np.int64))
        return np.stack([self.index.reconstruct(int(i)) for i in ids])

    def _writable(self) -> None:
        if self.read_only:
            raise ValueError("this index was loaded memory-mapped (read-only, for search); load it with mmap=False "
                             "to add or remove items")  # fmt: skip

    # -- persistence -------------------------------------------------------------------------------------------------

    def save(self, folder: str | Path) -> None:
        """Write ``index.faiss``, ``items.csv``, ``meta.json`` (and ``vectors.npy`` when the exact vectors are kept),
        all or (on a failed write) none; the index and the vectors are streamed to disk, not copied in memory."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(["id", "path", "label", "digest"])
        for item in self.items.values():
            writer.writerow([item.id, item.path, item.label, item.digest])
        meta = {
            **self.meta,
            "format": FORMAT_VERSION,
            "kind": self.kind,
            "params": self.params,
            "dim": self.dim,
            "count": len(self.items),
            "next_id": self.next_id,
            "vectors": VECTORS_FILE if self.store is not None else None,
        }
        index = self.index

        def write_index(path: str) -> None:
            if index is not None:
                faiss.write_index(index, path)

        files: dict[str, Content] = {INDEX_FILE: write_index, ITEMS_FILE: text.getvalue().encode(),
                                     META_FILE: json.dumps(meta, indent=2).encode()}  # fmt: skip
        if self.store is not None:
            files[VECTORS_FILE] = self.store.write
        # Together, with their checksums in checksums.json: a failed write (disk full) leaves the previous index whole.
        write_files(folder, files)

    @classmethod
    def load(cls, folder: str | Path, mmap: bool = False) -> ImageIndex:
        """Read an index folder, checking that its files belong together (hashing them streamed, not in memory).

        Args:
            folder: the index folder.
            mmap: memory-map what FAISS can (IVF lists, flat and SQ8 codes) instead of reading it into memory, for
                indexes larger than RAM; the index is then read-only (search and evaluate, no add or remove). FAISS
                1.15 reads the 4-bit PQ lists into memory all the same (m bytes per vector, 136 MB at 1M).

        Raises:
            IndexFileError: a missing, unreadable, corrupt or mismatched file, or one from a newer headstart, named
                in the message.
        """
        folder = Path(folder)
        meta_path = folder / META_FILE
        if not meta_path.is_file():
            raise IndexFileError(f"{meta_path} not found; is {folder} an index folder made by `headstart index build`?")
        meta_bytes = meta_path.read_bytes()
        try:
            meta = json.loads(meta_bytes)
            fmt = meta.get("format")
        except (ValueError, AttributeError) as error:
            raise IndexFileError(f"{meta_path} is corrupt ({type(error).__name__}: {error}); {REBUILD}") from error
        # Before anything else: a newer headstart may lay the folder out (and check it) differently.
        if isinstance(fmt, int) and fmt > FORMAT_VERSION:
            raise IndexFileError(
                f"{meta_path} has index format {fmt}, written by a newer headstart; this one reads formats "
                f"{', '.join(map(str, READABLE_FORMATS))}. Upgrade headstart (pip install -U headstart), or {REBUILD}."
            )
        try:
            kind, dim, params = meta["kind"], int(meta["dim"]), dict(meta["params"])
            count, next_id = int(meta["count"]), int(meta["next_id"])
            sums = dict(meta["sha256"]) if fmt == 1 else {}
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise IndexFileError(f"{meta_path} is corrupt ({type(error).__name__}: {error}); {REBUILD}") from error
        checked = _verify(folder, META_FILE, meta_bytes)
        if fmt not in READABLE_FORMATS:
            readable = ", ".join(map(str, READABLE_FORMATS))
            raise IndexFileError(f"{meta_path} has format {fmt!r}; this headstart reads formats {readable}: {REBUILD}")
        if kind not in KINDS:
            raise IndexFileError(f"{meta_path} names index kind {kind!r}, unknown here (known: {', '.join(KINDS)})")
        _check_files(folder, meta, checked, sums)
        out = cls(dim, kind, params, {k: v for k, v in meta.items() if k not in _OWN_KEYS})
        out.next_id = next_id
        with (folder / ITEMS_FILE).open(newline="") as handle:
            out.items = {int(r["id"]): Item(int(r["id"]), r["path"], r["label"], r["digest"])
                         for r in csv.DictReader(handle)}  # fmt: skip
        if (folder / INDEX_FILE).stat().st_size:
            out.index = _read_faiss(folder, kind, dim, params, mmap)
        out.read_only = mmap
        if meta.get("vectors"):
            try:
                out.store = VectorStore.open(folder / VECTORS_FILE)
            except ValueError as error:
                raise IndexFileError(f"{folder / VECTORS_FILE}: {error}; {REBUILD}") from error
            if out.store.dim != dim or len(out.store) != next_id:
                raise IndexFileError(f"{folder / VECTORS_FILE} holds {len(out.store)} x {out.store.dim} vectors, "
                                     f"expected {next_id} x {dim}; {REBUILD}")  # fmt: skip
        ntotal = 0 if out.index is None else int(out.index.ntotal)
        if not ntotal == len(out.items) == count:
            raise IndexFileError(
                f"{folder}: {ntotal} vectors in {INDEX_FILE}, {len(out.items)} rows in {ITEMS_FILE}, {count} in "
                f"{META_FILE}; the files do not belong together, rebuild the index"
            )
        return out

    # -- quality -----------------------------------------------------------------------------------------------------

    def evaluate(self, ks: Sequence[int] = (1, 5, 10)) -> dict[str, Any]:
        """Leave-one-out retrieval quality over the labelled items: each one queries the rest.

        Per query with ``R`` other items of its class: precision@k = relevant in the top k / k; recall@k = relevant
        in the top k / R; AP@k = sum over relevant ranks i <= k of precision@i, divided by min(k, R). Means over
        queries; queries whose class has no other item are left out.
        """
        labelled = np.array([i for i, item in self.items.items() if item.label], dtype=np.int64)
        if not len(labelled):
            raise ValueError("the index has no labelled items; leave-one-out evaluation needs class labels")
        labels = {i: self.items[i].label for i in labelled.tolist()}
        sizes: dict[str, int] = {}
        for name in labels.values():
            sizes[name] = sizes.get(name, 0) + 1
        k_max = max(ks)
        _, ids = self.search(self.vectors(labelled), k_max + 1)
        sums = {f"{m}@{k}": 0.0 for k in ks for m in ("precision", "recall", "map")}
        used = 0
        for query, row in zip(labelled.tolist(), ids, strict=True):
            relevant_total = sizes[labels[query]] - 1
            if relevant_total == 0:
                continue
            used += 1
            ranked = [i for i in row.tolist() if i != query and i >= 0][:k_max]
            hits = np.array([labels.get(i) == labels[query] for i in ranked], dtype=np.float64)
            hits = np.pad(hits, (0, k_max - len(hits)))
            cumulative = np.cumsum(hits)
            precision_at = cumulative / np.arange(1, k_max + 1)
            for k in ks:
                sums[f"precision@{k}"] += cumulative[k - 1] / k
                sums[f"recall@{k}"] += cumulative[k - 1] / relevant_total
                sums[f"map@{k}"] += float((precision_at[:k] * hits[:k]).sum()) / min(k, relevant_total)
        if not used:
            raise ValueError("every class in the index has a single item; leave-one-out evaluation needs two per class")
        return {**{key: float(value / used) for key, value in sums.items()}, "queries": used}


_OWN_KEYS = {"format", "kind", "params", "dim", "count", "next_id", "sha256", "vectors"}


def _verify(folder: Path, name: str, data: bytes) -> bool:
    """Check a file of an index folder against its ``checksums.json``; False for a folder written before those.

    Raises:
        IndexFileError: the file is truncated or modified, or the manifest is damaged.
    """
    try:
        return verify(folder, name, data, REBUILD)
    except IntegrityError as error:
        raise IndexFileError(str(error)) from error


def _verify_file(folder: Path, name: str) -> bool:
    """:func:`_verify` for a file hashed where it lies (it may be larger than memory)."""
    try:
        return verify_file(folder, name, REBUILD)
    except IntegrityError as error:
        raise IndexFileError(str(error)) from error


# -- images in, images out -------------------------------------------------------------------------------------------


def _backbone(name: str, weights: str | None) -> Backbone:
    return create_backbone(name, pretrained=True, weights=weights)


def _embed(backbone: Backbone, records: Sequence[ImageRecord], meta: dict[str, Any], batch_size: int,
           cache_dir: str | None) -> tuple[np.ndarray, np.ndarray, list[tuple[Path, str]]]:  # fmt: skip
    device = pick_device()
    out = embed(backbone, records, batch_size=batch_size, precision=meta["precision"], device=device,
                cache_root=Path(cache_dir) if cache_dir else None, l2_normalize=True,
                workers=0 if len(records) < 64 else -1)  # fmt: skip
    return out.features, out.index, out.failed


TRAIN_ROWS = 50_000  # IVF training sample drawn across the shards: 79 rows per list at 100,000 vectors (nlist 632)
EMBEDDINGS_DIR = "embeddings"  # inside an index folder: the shards `index build` embedded


def build_index(
    data: Sequence[str | os.PathLike[str]] | str | os.PathLike[str] | None,
    out: str | Path,
    backbone: str = DEFAULT_BACKBONE,
    weights: str | None = None,
    kind: str = "flat",
    params: dict[str, int] | None = None,
    batch_size: int = 32,
    precision: str = "auto",
    cache_dir: str | None = None,
    overwrite: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
    embeddings: str | Path | None = None,
    memory_budget: str | int | None = None,
    rerank: int | None = None,
) -> tuple[ImageIndex, list[tuple[Path, str]]]:
    """Embed a dataset (every split) or image files into shards, then stream the shards into an index folder.

    The images are embedded through the feature cache into ``out/embeddings/`` (see
    :func:`headstart.features.embeddings.write_embeddings`: resumable, shard by shard), or read from an existing
    ``headstart embed`` folder given as ``embeddings`` (nothing is embedded; its backbone and settings are the
    index's). The index is then trained on at most :data:`TRAIN_ROWS` vectors drawn across the shards and filled
    shard by shard: memory holds one shard of embeddings besides the index itself.

    Under ``torchrun``/``accelerate launch`` each process embeds and writes its own shards; rank 0 alone builds and
    writes the index, and the others return it empty.

    Args:
        data: a labelled dataset folder or CSV (labels are kept for evaluation), or image files and folders; None
            with ``embeddings``.
        out: index folder to write.
        backbone: registry name, ``ae:RUN`` or ``run:RUN``.
        weights: weights file for the backbone.
        kind: ``flat`` (exact), ``ivf``, ``hnsw``, ``sq8``, ``ivfsq8``, ``ivfpq``, ``opq``, or ``auto``: chosen by
            :func:`plan_index` from the collection's size and ``memory_budget``.
        params: index parameters overriding :func:`default_params` (``nlist``, ``nprobe``, ``m``, ``ef_search``...).
        memory_budget: memory the loaded index may take (``2GB``, ``500MB``); sizes ``auto`` and the PQ kinds.
        rerank: keep the exact vectors on disk (``vectors.npy``) and re-score ``k * rerank`` candidates per query
            (0: keep none; default 10 for the PQ kinds, 0 otherwise).
        batch_size: images per forward pass.
        precision: ``auto``, ``bf16`` or ``fp32`` for the embedding network.
        cache_dir: feature cache root.
        overwrite: replace an existing index folder (complete embedding shards inside it are kept).
        shard_size: images per embedding shard.
        embeddings: build from this ``headstart embed`` folder instead of embedding ``data``.

    Returns:
        The index and the files that could not be read.
    """
    from headstart.features.shards import iter_embedding_shards, read_meta, sample_vectors

    folder = Path(out)
    if (folder / META_FILE).exists() and not overwrite:
        raise FileExistsError(f"index folder {folder} already exists; pass --overwrite or choose another --out")
    if embeddings is None:
        source = folder / EMBEDDINGS_DIR
        failed = _embed_into(data, source, backbone, weights, batch_size=batch_size, precision=precision,
                             cache_dir=cache_dir, shard_size=shard_size)  # fmt: skip
    else:
        source, failed = Path(embeddings), []
    described = read_meta(source)
    failed = failed or [(Path(p), why) for p, why in described.get("failed", [])]
    meta = {key: described.get(key) for key in ("backbone", "weights", "weights_source", "fingerprint",
                                                 "preprocessing", "precision")}  # fmt: skip
    meta["classes"] = described.get("classes", [])
    total, dim = (int(n) for n in described["shape"])
    index = ImageIndex(dim, *_plan(kind, total, dim, params, memory_budget, rerank), meta)
    if distributed()[1] != 0:
        return index, failed  # rank 0 builds from the shards every rank wrote
    wanted = training_size(index.kind, default_params(index.kind, total, dim) | index.params)
    sample = sample_vectors(source, max(TRAIN_ROWS, wanted)) if wanted else np.zeros((0, dim), dtype=np.float32)
    index.train(sample, total)
    del sample
    for vectors, rows in iter_embedding_shards(source):
        index.add(vectors, [(r["path"], r["label"], r["digest"]) for r in rows])
    index.save(folder)
    return index, failed


def _embed_into(
    data: Sequence[str | os.PathLike[str]] | str | os.PathLike[str] | None, source: Path, backbone: str,
    weights: str | None, **options: Any,
) -> list[tuple[Path, str]]:  # fmt: skip
    """Embed ``data`` into the shards folder ``source`` (resumable, see
    :func:`headstart.features.embeddings.write_embeddings`, which takes ``options``); returns the files that could
    not be read.

    Raises:
        ValueError: no ``data``.
        DataError: ``data`` holds no image.
    """
    from headstart.features.embeddings import write_embeddings

    if data is None:
        raise ValueError("give images to index, or an embeddings folder (--embeddings DIR)")
    inputs = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    run = write_embeddings(inputs, source, backbone, weights, **options)
    if not run.rows and not run.failed:
        raise DataError(f"no images found in {[str(i) for i in inputs]}")
    return run.failed


def _plan(kind: str, n: int, dim: int, params: dict[str, int] | None, memory_budget: str | int | None,
          rerank: int | None) -> tuple[str, dict[str, int]]:  # fmt: skip
    """Kind and parameters of a new index: planned for ``auto`` or a budget, given ones winning."""
    if kind == "auto" or memory_budget is not None:
        kind, planned = plan_index(n, dim, memory_budget if memory_budget is not None else "1TB", kind)
    else:
        planned = {}
    out = {**planned, **(params or {})}
    if rerank is not None:
        out["rerank"] = rerank
    return kind, out


def _describe(record: ImageRecord, classes: Sequence[str]) -> tuple[str, str, str]:
    label = classes[record.label] if 0 <= record.label < len(classes) else ""
    return str(record.path), label, record.digest


def query_backbone(index: ImageIndex, backbone: str | None = None, weights: str | None = None) -> Backbone:
    """The network that embeds queries for ``index``: by default the one it was built with.

    Raises:
        BackboneMismatchError: when the network (given, or rebuilt from the index's record) has other weights than
            the index's vectors were made with.
    """
    name = backbone or index.meta.get("backbone")
    if not name:
        raise IndexFileError("the index records no backbone; pass the one it was built with")
    model = _backbone(name, weights if backbone else weights or index.meta.get("weights"))
    expected = index.meta.get("fingerprint")
    if model.fingerprint() != expected:
        raise BackboneMismatchError(
            f"the index was built with backbone {index.meta.get('backbone')!r} (weights fingerprint "
            f"{str(expected)[:12]}), but queries would be embedded with {model.name!r} (fingerprint "
            f"{model.fingerprint()[:12]}); their vectors are not comparable. Search with the index's own backbone "
            "(omit --backbone) or build an index with this one."
        )
    model.preprocessing = Preprocessing.from_dict(index.meta["preprocessing"])
    return model


def add_images(
    index_dir: str | Path,
    inputs: Sequence[str | os.PathLike[str]],
    label: str = "",
    batch_size: int = 32,
    cache_dir: str | None = None,
) -> tuple[np.ndarray, list[tuple[Path, str]]]:
    """Embed image files with the index's backbone and add them in place (new persistent ids, no rebuild).

    Sharded across the processes of a multi-process launch like :func:`build_index`; rank 0 writes.

    Returns:
        The new ids and the files that could not be read.
    """
    index = ImageIndex.load(index_dir)
    _, rank = distributed()
    model = query_backbone(index)
    records = as_records(collect_files(inputs))
    if not records:
        raise DataError(f"no files found in {[str(i) for i in inputs]}")
    vectors, rows, failed = _embed(model, records, index.meta, batch_size, cache_dir)
    ids = index.add(vectors, [(str(records[i].path), label, records[i].digest) for i in rows])
    if rank == 0:
        index.save(index_dir)
    return ids, failed


def remove_images(index_dir: str | Path, targets: Sequence[str]) -> int:
    """Remove items given by id or by path (a folder removes every item below it); returns how many were removed."""
    index = ImageIndex.load(index_dir)
    ids: set[int] = set()
    for target in targets:
        if str(target).isdigit():
            ids.add(int(target))
            continue
        path = str(Path(target).expanduser().resolve())
        found = {i for i, item in index.items.items() if item.path == path or item.path.startswith(path + os.sep)}
        if not found:
            raise ValueError(f"{target} is neither an id nor the path of an indexed image")
        ids |= found
    removed = index.remove(sorted(ids))
    index.save(index_dir)
    return removed


@dataclass
class SearchResult:
    """The ranked neighbours of one query image."""

    query: Path
    hits: list[tuple[Item, float]] = field(default_factory=list)  # (indexed item, cosine similarity), best first


def search_images(index_dir: str | Path, queries: Sequence[str | os.PathLike[str]], k: int = 10,
                  backbone: str | None = None, weights: str | None = None, batch_size: int = 32,
                  cache_dir: str | None = None, rerank: int | None = None,
                  ) -> tuple[list[SearchResult], list[tuple[Path, str]]]:  # fmt: skip
    """Embed query images exactly as the collection was and return their ``k`` nearest indexed images.

    Args:
        index_dir: index folder.
        queries: image files and folders.
        k: results per query.
        backbone: check that this network matches the index (default: use the index's own).
        weights: weights file for ``backbone``.
        batch_size: images per forward pass.
        cache_dir: feature cache root.
        rerank: candidates re-scored exactly per result (default: the index's own ``rerank``; needs vectors on disk).

    The index is memory-mapped (see :meth:`ImageIndex.load`), so one larger than memory can be searched.
    """
    index = ImageIndex.load(index_dir, mmap=True)
    model = query_backbone(index, backbone, weights)
    records = as_records(collect_files(queries))
    if not records:
        raise DataError(f"no query images found in {[str(q) for q in queries]}")
    vectors, rows, failed = _embed(model, records, index.meta, batch_size, cache_dir)
    scores, ids = index.search(vectors, k, rerank)
    results = []
    for r, score_row, id_row in zip(rows.tolist(), scores, ids, strict=True):
        hits = [(index.items[i], float(s)) for i, s in zip(id_row.tolist(), score_row.tolist(), strict=True) if i >= 0]
        results.append(SearchResult(records[r].path, hits))
    return results, failed


def evaluate_index(index_dir: str | Path, ks: Sequence[int] = (1, 5, 10)) -> dict[str, Any]:
    """Leave-one-out precision@k, recall@k and mAP@k of a labelled index (see :meth:`ImageIndex.evaluate`)."""
    return ImageIndex.load(index_dir, mmap=True).evaluate(ks)


def contact_sheet(results: Sequence[SearchResult], path: str | Path, thumb: int = 128) -> Path:
    """Write a picture with one row per query: the query (blue frame), then its results with scores and labels."""
    from PIL import Image, ImageDraw

    from headstart.data.scan import thumbnail

    columns = 1 + max((len(r.hits) for r in results), default=0)
    caption = 14
    sheet = Image.new("RGB", (columns * (thumb + 4), max(1, len(results)) * (thumb + caption + 4)), "white")
    draw = ImageDraw.Draw(sheet)

    def paste(source: Path | str, row: int, col: int, text: str, frame: str | None) -> None:
        x, y = col * (thumb + 4) + 2, row * (thumb + caption + 4) + 2
        try:
            image = thumbnail(Path(source), thumb)
            sheet.paste(image, (x + (thumb - image.width) // 2, y + (thumb - image.height) // 2))
        except (DataError, OSError):
            draw.text((x + 4, y + thumb // 2), "unreadable", fill="red")
        if frame:
            draw.rectangle((x - 2, y - 2, x + thumb + 1, y + thumb + 1), outline=frame, width=2)
        draw.text((x, y + thumb + 1), text[: thumb // 6], fill="black")

    for row, result in enumerate(results):
        paste(result.query, row, 0, "query: " + result.query.name, "blue")
        for col, (item, score) in enumerate(result.hits, start=1):
            paste(item.path, row, col, f"{score:.3f} {item.label}", None)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
