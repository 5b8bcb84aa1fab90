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

from headstart.checksums import verify, write_files
from headstart.data.scan import ImageRecord, collect_files
from headstart.data.transforms import Preprocessing
from headstart.errors import ConfigError, DataError, IntegrityError
from headstart.features.embeddings import as_records, embed
from headstart.features.shards import DEFAULT_SHARD_SIZE
from headstart.hardware import distributed, pick_device
from headstart.models.backbones import DEFAULT_BACKBONE, Backbone, create_backbone

FORMAT_VERSION = 1
KINDS = ("flat", "ivf", "hnsw")
INDEX_FILE, ITEMS_FILE, META_FILE = "index.faiss", "items.csv", "meta.json"
REBUILD = "rebuild the index with `headstart index build`"


class IndexFileError(IntegrityError):
    """An index folder that is missing, corrupt, or inconsistent; the message names the file and what to do."""


class BackboneMismatchError(ConfigError):
    """A query embedded by a different network (or different weights) than the index."""


@dataclass(frozen=True)
class Item:
    """One indexed image."""

    id: int  # persistent id: never reused, unchanged by additions and removals
    path: str
    label: str  # class name, "" when unknown
    digest: str  # content digest (as in the feature cache)


def default_params(kind: str, n: int) -> dict[str, int]:
    """Index parameters for ``n`` vectors.

    IVF: ``nlist`` about 2 sqrt(n) lists (the low end of FAISS's 1-16 sqrt(n) guideline, which keeps k-means
    training of 100,000 1,280-d vectors within a minute on 2 cores), capped so that each list gets 39 training
    points; ``nprobe`` 16. HNSW: 16 links per node, ``ef_construction`` 40 (building costs about linearly in both),
    ``ef_search`` 64. Checked with ``benchmarks/retrieval.py`` (recall@10 against exact search).
    """
    if kind == "ivf":
        nlist = max(1, min(round(2 * math.sqrt(max(n, 1))), n // 39))
        return {"nlist": nlist, "nprobe": min(nlist, 16)}
    if kind == "hnsw":
        return {"m": 16, "ef_construction": 40, "ef_search": 64}
    if kind == "flat":
        return {}
    raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")


def _inner(index: faiss.Index) -> faiss.Index:
    """The index doing the search: inside the id map for flat and HNSW, the IVF index itself."""
    index = faiss.downcast_index(index)
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index


def _make_faiss(kind: str, dim: int, params: dict[str, int], train: np.ndarray | None) -> faiss.Index:
    inner: Any  # faiss's stubs type each index class apart; they share no declared interface
    if kind == "flat":
        inner = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        if train is None or len(train) < params["nlist"]:
            have = 0 if train is None else len(train)
            raise ValueError(
                f"an IVF index with nlist={params['nlist']} needs at least that many vectors to train its lists, "
                f"got {have}; use --index flat for small collections or lower --nlist"
            )
        quantizer = faiss.IndexFlatIP(dim)
        inner = faiss.IndexIVFFlat(quantizer, dim, params["nlist"], faiss.METRIC_INNER_PRODUCT)
        inner.train(train)
        inner.nprobe = params["nprobe"]
        # IVF stores ids itself, and removes without renumbering the rest (which an id map around it would assume);
        # the hash-table direct map lets reconstruct() and remove_ids() find an id's list.
        inner.set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]
        return inner
    elif kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, params["m"], faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = params["ef_construction"]
        inner.hnsw.efSearch = params["ef_search"]
    else:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
    # Persistent ids over positional indexes; the Python wrapper keeps ``inner`` alive (faiss's referenced_objects).
    return faiss.IndexIDMap2(inner)


def _apply_params(index: faiss.Index, kind: str, params: dict[str, int]) -> None:
    """Search-time parameters, which FAISS's file format does not keep for every index type."""
    inner: Any = _inner(index)
    if kind == "ivf":
        inner.nprobe = int(params["nprobe"])
    elif kind == "hnsw":
        inner.hnsw.efSearch = int(params["ef_search"])


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"expected a [N, D] matrix of vectors, got shape {vectors.shape}")
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ImageIndex:
    """A FAISS index of unit-length embeddings with persistent ids and per-item metadata.

    ``meta`` records how the vectors were made (``backbone``, ``fingerprint``, ``preprocessing``, ``precision``);
    :func:`build_index` fills it, and low-level users may leave it empty.
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
        self.index: faiss.Index | None = None  # created on the first add (IVF trains on it)

    def __len__(self) -> int:
        return len(self.items)

    # -- the FAISS verbs ---------------------------------------------------------------------------------------------

    def add(self, vectors: np.ndarray, items: Sequence[tuple[str, str, str]] | None = None) -> np.ndarray:
        """Add vectors (L2-normalised here) with ``(path, label, digest)`` per row; returns their new ids."""
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
        for i, (path, label, digest) in zip(ids.tolist(), rows, strict=True):
            self.items[i] = Item(i, str(path), str(label), str(digest))
        self.next_id += len(x)
        return ids

    def train(self, sample: np.ndarray, count: int | None = None) -> None:
        """Create the FAISS index, its parameters chosen for ``count`` vectors (default: the sample's size), and train
        it on ``sample`` (IVF lists; flat and HNSW learn nothing). Called by the first :meth:`add` when not before.

        Streaming a collection in (see :func:`build_index`) trains on a sample drawn across it first, then adds it
        shard by shard.
        """
        x = _unit(sample) if len(sample) else np.zeros((0, self.dim), dtype=np.float32)
        self.params = {**default_params(self.kind, len(x) if count is None else count), **self.params}
        self.index = _make_faiss(self.kind, self.dim, self.params, x)

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most similar indexed vectors per query: (scores [Q, k], ids [Q, k]), best first.

        Scores are cosine similarities; when fewer than ``k`` items exist, missing slots have id -1 and score -inf.
        """
        q = _unit(queries)
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have {q.shape[1]} dimensions, the index {self.dim}")
        if self.index is None or not len(self.items):
            return np.full((len(q), k), -np.inf, dtype=np.float32), np.full((len(q), k), -1, dtype=np.int64)
        scores, ids = self.index.search(q, k)
        scores[ids < 0] = -np.inf
        return scores, ids

    def remove(self, ids: Sequence[int] | np.ndarray) -> int:
        """Remove items by id; returns how many were present. HNSW cannot delete, so its graph is rebuilt."""
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
            self.index.remove_ids(faiss.IDSelectorArray(present))  # the only selector IVF's hash map takes
        for i in present.tolist():
            del self.items[i]
        return len(present)

    def vectors(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The stored unit vectors of ``ids``, [N, D]."""
        if self.index is None:
            return np.zeros((0, self.dim), dtype=np.float32)
        if not len(ids):
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self.index.reconstruct(int(i)) for i in ids])

    # -- persistence -------------------------------------------------------------------------------------------------

    def save(self, folder: str | Path) -> None:
        """Write ``index.faiss``, ``items.csv`` and ``meta.json``, all three or (on a failed write) none."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        index_bytes = b"" if self.index is None else faiss.serialize_index(self.index).tobytes()
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(["id", "path", "label", "digest"])
        for item in self.items.values():
            writer.writerow([item.id, item.path, item.label, item.digest])
        items_bytes = text.getvalue().encode()
        meta = {
            **self.meta,
            "format": FORMAT_VERSION,
            "kind": self.kind,
            "params": self.params,
            "dim": self.dim,
            "count": len(self.items),
            "next_id": self.next_id,
            "sha256": {INDEX_FILE: _sha256(index_bytes), ITEMS_FILE: _sha256(items_bytes)},
        }
        # Together: a failed write (disk full) leaves the previous index whole. meta.json keeps the two checksums for
        # readers older than checksums.json.
        write_files(
            folder, {INDEX_FILE: index_bytes, ITEMS_FILE: items_bytes, META_FILE: json.dumps(meta, indent=2).encode()}
        )

    @classmethod
    def load(cls, folder: str | Path) -> ImageIndex:
        """Read an index folder, checking that its three files belong together.

        Raises:
            IndexFileError: a missing, unreadable, corrupt or mismatched file, named in the message.
        """
        folder = Path(folder)
        meta_path = folder / META_FILE
        if not meta_path.is_file():
            raise IndexFileError(f"{meta_path} not found; is {folder} an index folder made by `headstart index build`?")
        meta_bytes = meta_path.read_bytes()
        try:
            meta = json.loads(meta_bytes)
            kind, dim, params = meta["kind"], int(meta["dim"]), dict(meta["params"])
            sums, count, next_id = dict(meta["sha256"]), int(meta["count"]), int(meta["next_id"])
        except (ValueError, KeyError, TypeError) as error:
            raise IndexFileError(f"{meta_path} is corrupt ({type(error).__name__}: {error}); {REBUILD}") from error
        checked = _verify(folder, META_FILE, meta_bytes)
        if meta.get("format") != FORMAT_VERSION:
            raise IndexFileError(f"{meta_path} has format {meta.get('format')!r}; this headstart reads format "
                                 f"{FORMAT_VERSION}. Rebuild the index with `headstart index build`.")  # fmt: skip
        blobs: dict[str, bytes] = {}
        for name in (INDEX_FILE, ITEMS_FILE):
            path = folder / name
            if not path.is_file():
                raise IndexFileError(f"{path} is missing; the index folder is incomplete, rebuild it")
            blobs[name] = path.read_bytes()
            if checked:
                _verify(folder, name, blobs[name])
            elif _sha256(blobs[name]) != sums.get(name):  # a folder older than checksums.json
                raise IndexFileError(
                    f"{path} does not match {meta_path} (checksum differs): it was modified, truncated or copied "
                    "from another index. Rebuild the index with `headstart index build`."
                )
        out = cls(dim, kind, params, {k: v for k, v in meta.items() if k not in _OWN_KEYS})
        out.next_id = next_id
        reader = csv.DictReader(io.StringIO(blobs[ITEMS_FILE].decode()))
        out.items = {int(r["id"]): Item(int(r["id"]), r["path"], r["label"], r["digest"]) for r in reader}
        if blobs[INDEX_FILE]:
            try:
                out.index = faiss.deserialize_index(np.frombuffer(blobs[INDEX_FILE], dtype=np.uint8))
            except RuntimeError as error:
                raise IndexFileError(
                    f"{folder / INDEX_FILE}: FAISS cannot read it ({error}); rebuild the index"
                ) from error
            _apply_params(out.index, kind, params)
            if out.index.d != dim:
                raise IndexFileError(f"{folder / INDEX_FILE} holds {out.index.d}-d vectors but {meta_path} says {dim}")
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


_OWN_KEYS = {"format", "kind", "params", "dim", "count", "next_id", "sha256"}


def _verify(folder: Path, name: str, data: bytes) -> bool:
    """Check a file of an index folder against its ``checksums.json``; False for a folder written before those.

    Raises:
        IndexFileError: the file is truncated or modified, or the manifest is damaged.
    """
    try:
        return verify(folder, name, data, REBUILD)
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
        kind: ``flat`` (exact), ``ivf`` or ``hnsw``.
        params: index parameters overriding :func:`default_params` (``nlist``, ``nprobe``, ``m``, ``ef_search``...).
        batch_size: images per forward pass.
        precision: ``auto``, ``bf16`` or ``fp32`` for the embedding network.
        cache_dir: feature cache root.
        overwrite: replace an existing index folder (complete embedding shards inside it are kept).
        shard_size: images per embedding shard.
        embeddings: build from this ``headstart embed`` folder instead of embedding ``data``.

    Returns:
        The index and the files that could not be read.
    """
    from headstart.features.embeddings import write_embeddings
    from headstart.features.shards import iter_embedding_shards, read_meta, sample_vectors

    folder = Path(out)
    if (folder / META_FILE).exists() and not overwrite:
        raise FileExistsError(f"index folder {folder} already exists; pass --overwrite or choose another --out")
    if embeddings is None:
        if data is None:
            raise ValueError("give images to index, or an embeddings folder (--embeddings DIR)")
        inputs = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        source = folder / EMBEDDINGS_DIR
        run = write_embeddings(inputs, source, backbone, weights, batch_size=batch_size, precision=precision,
                               cache_dir=cache_dir, shard_size=shard_size)  # fmt: skip
        failed = run.failed
        if not run.rows and not failed:
            raise DataError(f"no images found in {[str(i) for i in inputs]}")
    else:
        source = Path(embeddings)
        failed = []
    described = read_meta(source)
    failed = failed or [(Path(p), why) for p, why in described.get("failed", [])]
    meta = {key: described.get(key) for key in ("backbone", "weights", "weights_source", "fingerprint",
                                                 "preprocessing", "precision")}  # fmt: skip
    meta["classes"] = described.get("classes", [])
    total, dim = (int(n) for n in described["shape"])
    index = ImageIndex(dim, kind, params, meta)
    if distributed()[1] != 0:
        return index, failed  # rank 0 builds from the shards every rank wrote
    sample = sample_vectors(source, TRAIN_ROWS) if kind == "ivf" else np.zeros((0, dim), dtype=np.float32)
    index.train(sample, total)
    del sample
    for vectors, rows in iter_embedding_shards(source):
        index.add(vectors, [(r["path"], r["label"], r["digest"]) for r in rows])
    index.save(folder)
    return index, failed


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
                  cache_dir: str | None = None) -> tuple[list[SearchResult], list[tuple[Path, str]]]:  # fmt: skip
    """Embed query images exactly as the collection was and return their ``k`` nearest indexed images.

    Args:
        index_dir: index folder.
        queries: image files and folders.
        k: results per query.
        backbone: check that this network matches the index (default: use the index's own).
        weights: weights file for ``backbone``.
        batch_size: images per forward pass.
        cache_dir: feature cache root.
    """
    index = ImageIndex.load(index_dir)
    model = query_backbone(index, backbone, weights)
    records = as_records(collect_files(queries))
    if not records:
        raise DataError(f"no query images found in {[str(q) for q in queries]}")
    vectors, rows, failed = _embed(model, records, index.meta, batch_size, cache_dir)
    scores, ids = index.search(vectors, k)
    results = []
    for r, score_row, id_row in zip(rows.tolist(), scores, ids, strict=True):
        hits = [(index.items[i], float(s)) for i, s in zip(id_row.tolist(), score_row.tolist(), strict=True) if i >= 0]
        results.append(SearchResult(records[r].path, hits))
    return results, failed


def evaluate_index(index_dir: str | Path, ks: Sequence[int] = (1, 5, 10)) -> dict[str, Any]:
    """Leave-one-out precision@k, recall@k and mAP@k of a labelled index (see :meth:`ImageIndex.evaluate`)."""
    return ImageIndex.load(index_dir).evaluate(ks)


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
