"""Batched feature extraction with an on-disk cache keyed by image content, weights, preprocessing and precision.

Each image's features are computed once and kept: a second run over the same images recomputes nothing, a change of
weights, preprocessing or precision moves to another cache folder, and an edited image gets a new content digest.
Every entry carries a CRC-32; a corrupt one is detected, deleted and recomputed, never used.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from headstart import progress
from headstart.checksums import write_files
from headstart.data.scan import ImageRecord, content_digest
from headstart.errors import IntegrityError, StorageError
from headstart.features.inference import run_model
from headstart.features.shards import (
    DEFAULT_SHARD_SIZE,
    FORMAT,
    IDS_FILE,
    MATRIX_FILE,
    META_FILE,
    REMEDY,
    SHARD_FILE,
    SHARDS_DIR,
    digest_of,
    iter_embedding_shards,
    read_meta,
    read_shard,
    read_shard_info,
    shard_name,
    write_shard,
)  # fmt: skip
from headstart.files import atomic_write_bytes, default_cache_root
from headstart.hardware import distributed, pick_device, resolve_precision
from headstart.models.backbones import Backbone
from headstart.models.prepared import PreparedBackbone, load_backbone

_CRC = struct.Struct("<I")


class FeatureCache:
    """One folder of feature vectors for one (backbone weights, preprocessing, precision, view) combination.

    The cache only saves time: a damaged entry is discarded and computed again, and a cache that cannot be written
    (disk full, read-only) is skipped; :meth:`notes` says so.
    """

    def __init__(self, root: Path, key: str, dim: int):
        self.folder = root / "features" / key
        self.dim = dim
        self.hits = 0
        self.misses = 0
        self.corrupt = 0
        self.unwritable: StorageError | None = None  # the first failed write; no other is tried

    def _path(self, digest: str) -> Path:
        return self.folder / digest[:2] / f"{digest}.f32"

    def get(self, digest: str) -> np.ndarray | None:
        """The stored vector, or None when absent or corrupt (a corrupt entry is deleted)."""
        path = self._path(digest)
        try:
            data = path.read_bytes()
        except OSError:  # absent, or unreadable: computed again either way
            self.misses += 1
            return None
        body, tail = data[:-4], data[-4:]
        if len(body) != 4 * self.dim or _CRC.unpack(tail)[0] != zlib.crc32(body):
            self.corrupt += 1
            self.misses += 1
            path.unlink(missing_ok=True)
            return None
        self.hits += 1
        return np.frombuffer(body, dtype=np.float32)

    def put(self, digest: str, vector: np.ndarray) -> None:
        """Store a vector atomically."""
        if self.unwritable is not None:
            return
        body = np.ascontiguousarray(vector, dtype=np.float32).tobytes()
        try:
            atomic_write_bytes(self._path(digest), body + _CRC.pack(zlib.crc32(body)))
        except StorageError as error:
            self.unwritable = error

    def notes(self) -> list[str]:
        """One line per thing the user should know: damaged entries recomputed, a cache that could not be written."""
        notes = []
        if self.corrupt:
            notes.append(f"feature cache: {self.corrupt} damaged entr{'y' if self.corrupt == 1 else 'ies'} in "
                         f"{self.folder} discarded and computed again")  # fmt: skip
        if self.unwritable is not None:
            notes.append(f"feature cache not filled, so these features will be computed again next time: "
                         f"{self.unwritable} (or make room with `headstart cache clear`)")  # fmt: skip
        return notes


def cache_key(backbone: Backbone | PreparedBackbone, precision: str, view: str = "center") -> str:
    """Folder name for a backbone's features: weights fingerprint, preprocessing, precision and view."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in backbone.name)[:40]
    return f"{safe}-{backbone.fingerprint()[:16]}-{backbone.preprocessing.key()}-{precision}-{view}"


def file_digest(path: Path) -> str:
    """Content digest of a file, identical to the one the data scan computes."""
    return content_digest(path.read_bytes())


@dataclass
class Embeddings:
    """Features of the images that could be decoded, in input order."""

    features: np.ndarray  # [N_ok, D] float32
    index: np.ndarray  # positions of those images in the input sequence
    failed: list[tuple[Path, str]] = field(default_factory=list)  # (file, reason) of images that could not be read
    hits: int = 0  # served from the cache
    computed: int = 0  # run through the network


def as_records(items: Sequence[ImageRecord] | Sequence[Path]) -> list[ImageRecord]:
    """Records for a mix of records and bare paths (bare paths get a content digest and label -1)."""
    out: list[ImageRecord] = []
    for item in items:
        if isinstance(item, ImageRecord):
            out.append(item)
        else:
            path = Path(item)
            try:
                digest = file_digest(path)
            except OSError:
                digest = "unreadable-" + hashlib.blake2b(str(path).encode(), digest_size=8).hexdigest()
            out.append(ImageRecord(path, -1, digest, 0, 0, ""))
    return out


def embed(
    backbone: Backbone | PreparedBackbone,
    items: Sequence[ImageRecord] | Sequence[Path],
    *,
    batch_size: int = 32,
    precision: str = "auto",
    device: torch.device | None = None,
    cache_root: Path | None = None,
    use_cache: bool = True,
    workers: int = -1,
    channels_last: bool = True,
    l2_normalize: bool = False,
    description: str = "embedding",
    view: str = "center",
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Embeddings:
    """Features of every image, from the cache where possible.

    Args:
        backbone: the feature network (its preprocessing is used), or its stored description, which builds the
            network only when some image is not in the cache.
        items: image records (from a data scan) or file paths.
        batch_size: images per forward pass.
        precision: ``auto``, ``bf16`` or ``fp32``.
        device: where to run; default CUDA > MPS > CPU.
        cache_root: cache folder root; default :func:`default_cache_root`.
        use_cache: read and fill the cache.
        workers: worker processes; -1 picks (on a multi-core CPU one per core, each decoding and computing; see
            :func:`headstart.features.inference.run_model`); 0 does everything in this process.
        channels_last: NHWC memory format, faster for convolutions.
        l2_normalize: return unit-length rows (cosine geometry for retrieval).
        description: label of the progress bar.
        view: cache name of the view; anything but ``center`` must come with ``augment``.
        augment: transform of the decoded base image for augmented views.
    """
    device = device or pick_device()
    precision = resolve_precision(precision, device)
    records = as_records(items)
    dim = backbone.num_features
    features = np.zeros((len(records), dim), dtype=np.float32)
    ok = np.zeros(len(records), dtype=bool)
    cache = (
        FeatureCache(default_cache_root(cache_root), cache_key(backbone, precision, view), dim) if use_cache else None
    )
    todo = _lookup(cache, records, features, ok)
    network = backbone
    if todo and isinstance(backbone, PreparedBackbone):
        network = backbone.network()
        key = cache_key(backbone, precision, view)  # the built network's: differs when the stored entry was stale
        if cache is not None and key != cache.folder.name:
            cache = FeatureCache(default_cache_root(cache_root), key, dim)
            ok[:] = False
            todo = _lookup(cache, records, features, ok)
    failed: list[tuple[Path, str]] = []
    world, rank = distributed()
    if world > 1:
        # Every rank must take the same branch below and meet in the same collective. Their caches may disagree
        # (private caches, or a share another rank wrote while this one was still looking up), so they agree on
        # the union of what is missing.
        todo = _agree(todo, world)
        if todo and isinstance(network, PreparedBackbone):
            network = network.network()
    if todo:
        assert isinstance(network, Backbone)
        run = functools.partial(
            run_model, network, prep=backbone.preprocessing, width=dim, batch_size=batch_size,
            precision=precision, device=device, workers=workers, channels_last=channels_last, description=description,
            augment=augment,
        )  # fmt: skip
        failed = _compute_shares(run, records, todo, cache, features, ok, world, rank)
    for note in cache.notes() if cache is not None and rank == 0 else ():
        progress.log(f"[yellow]{note}")
    index = np.flatnonzero(ok)
    out = features[index]
    if l2_normalize:
        out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return Embeddings(out, index, failed, hits=len(records) - len(todo), computed=len(todo) - len(failed))


def _compute_shares(
    run: Callable[..., Any], records: list[ImageRecord], todo: list[int], cache: FeatureCache | None,
    features: np.ndarray, ok: np.ndarray, world: int, rank: int,
) -> list[tuple[Path, str]]:  # fmt: skip
    """Compute this rank's share of ``todo`` (every position when alone), cache it, and merge every rank's share into
    ``features``/``ok`` in input order; returns the files that could not be read, sorted."""
    mine = todo[rank::world]

    def keep(rows: np.ndarray, values: np.ndarray) -> None:  # cached batch by batch: a killed run loses one batch
        for j, vector in zip(rows, values, strict=True):
            cache.put(records[mine[int(j)]].digest, vector)  # type: ignore[union-attr]

    computed = run([records[i] for i in mine], on_batch=keep if cache is not None else None)
    shards = [(mine, computed.values, computed.ok, computed.failed)]
    if world > 1:
        import torch.distributed as dist

        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, shards[0])
        shards = gathered
    failed: list[tuple[Path, str]] = []
    for positions, values, done, lost in shards:
        for j in np.flatnonzero(done):
            features[positions[j]] = values[j]
            ok[positions[j]] = True
        failed += lost
    return sorted(failed, key=lambda item: str(item[0]))


def _agree(todo: list[int], world: int) -> list[int]:
    """The sorted union of every rank's missing positions (a collective: every rank calls it)."""
    import torch.distributed as dist

    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, todo)
    return sorted(set().union(*everyone))


def _lookup(cache: FeatureCache | None, records: list[ImageRecord], features: np.ndarray, ok: np.ndarray) -> list[int]:
    """Fill ``features``/``ok`` from the cache; returns the positions still to compute."""
    todo: list[int] = []
    for i, record in enumerate(records):
        vector = cache.get(record.digest) if cache is not None else None
        if vector is None:
            todo.append(i)
        else:
            features[i] = vector
            ok[i] = True
    return todo


def cache_info(cache_root: Path | None = None) -> list[tuple[str, int, int]]:
    """(folder, entries, bytes) of every feature-cache folder, then of the stored backbones and dataset scans."""
    root = default_cache_root(cache_root)
    rows = []
    if (root / "features").is_dir():
        for folder in sorted(p for p in (root / "features").iterdir() if p.is_dir()):
            files = list(folder.rglob("*.f32"))
            rows.append((folder.name, len(files), sum(f.stat().st_size for f in files)))
    for name, pattern in (("backbones", "*.safetensors"), ("scans", "*.json")):
        files = sorted((root / name).glob(pattern)) if (root / name).is_dir() else []
        if files:
            rows.append((f"{name}/", len(files), sum(f.stat().st_size for f in files)))
    return rows


def cache_clear(cache_root: Path | None = None) -> int:
    """Delete every cached feature vector, stored backbone and dataset scan; returns how many entries were removed."""
    import shutil

    root = default_cache_root(cache_root)
    count = sum(n for _, n, _ in cache_info(cache_root))
    for name in ("features", "backbones", "scans"):
        if (root / name).is_dir():
            shutil.rmtree(root / name)
    return count


def dataset_or_files(
    inputs: Sequence[str | os.PathLike[str]], cache_root: Path | None = None
) -> tuple[list[ImageRecord], list[str], list[str]]:
    """Records, their split names, and class names: a dataset when one folder/CSV of classes is given, else files.

    ``cache_root`` lets the dataset scan reuse what earlier scans learned (see :class:`headstart.data.scan.ScanCache`).
    """
    from headstart.data.scan import collect_files, load_dataset
    from headstart.errors import DataError

    if len(inputs) == 1:
        path = Path(inputs[0])
        is_dataset = path.suffix.lower() == ".csv" or (
            path.is_dir() and any(p.is_dir() for p in path.iterdir()) and not any(p.is_file() for p in path.iterdir())
        )
        if is_dataset:
            try:
                ds = load_dataset(path, cache_root=cache_root)
            except DataError:
                ds = None
            if ds is not None:
                records = ds.train + ds.val + ds.test
                splits = ["train"] * len(ds.train) + ["val"] * len(ds.val) + ["test"] * len(ds.test)
                return records, splits, ds.classes
    files = collect_files(inputs)
    return as_records(files), [""] * len(files), []


@dataclass
class EmbedRun:
    """What :func:`write_embeddings` did: the folder's totals and this run's share of the work."""

    folder: Path
    rows: int  # embedding rows in the folder (images that could be read)
    dim: int
    shards: int  # shards in the folder
    kept: int  # complete, verified shards an earlier (interrupted) run had written, not computed again
    hits: int  # images of the shards computed now that came from the feature cache
    computed: int  # images of the shards computed now that ran through the network
    failed: list[tuple[Path, str]] = field(default_factory=list)  # unreadable files of the whole folder
    notes: list[str] = field(default_factory=list)  # damaged shards recomputed, cache problems


def write_embeddings(
    inputs: Sequence[str | os.PathLike[str]],
    out: Path,
    backbone: str = "efficientnet_lite0",
    weights: str | None = None,
    l2_normalize: bool = False,
    batch_size: int = 32,
    precision: str = "auto",
    use_cache: bool = True,
    cache_dir: str | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    workers: int = -1,
) -> EmbedRun:
    """Embed a dataset or image files into ``out`` shard by shard (see :mod:`headstart.features.shards`).

    Shard ``k`` holds input records ``[k * shard_size, (k + 1) * shard_size)`` less the unreadable ones, and is
    written whole as soon as it is computed, so memory holds one shard and a killed run loses at most the shard it
    was in. Run again with the same inputs and settings, it keeps every complete, verified shard and computes the
    rest; a torn or corrupt shard is named in a note and computed again. ``meta.json`` comes last.

    Under ``torchrun``/``accelerate launch`` rank ``r`` computes the shards with ``k % world == r`` and writes them
    itself (no process ever holds all vectors); after all ranks are done, rank 0 writes ``meta.json``.

    :func:`load_embeddings` reads the folder back as one matrix, :func:`iter_embedding_shards` one shard at a time.

    Args:
        inputs: a dataset folder/CSV (labels and splits kept), or image files and folders.
        out: the embeddings folder.
        backbone: registry name.
        weights: weights file for the backbone.
        l2_normalize: store unit-length rows.
        batch_size: images per forward pass.
        precision: ``auto``, ``bf16`` or ``fp32``.
        use_cache: read and fill the feature cache (which also keeps the finished batches of a killed shard).
        cache_dir: cache root.
        shard_size: input records per shard.
        workers: worker processes per rank, as for :func:`embed` (none for a shard under 64 images: starting them
            would cost more than they save).
    """
    from headstart.models.backbones import create_backbone

    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {shard_size}")
    out = Path(out)
    root = default_cache_root(cache_dir)
    records, splits, classes = dataset_or_files(inputs, root if use_cache else None)
    # With the cache on, the stored description serves: the network is built only for images not in the cache.
    model = load_backbone(backbone, weights, root) if use_cache else create_backbone(backbone, weights=weights)
    world, rank = distributed()  # before picking the device: a GPU launch gives each rank its own card
    device = pick_device()
    resolved = resolve_precision(precision, device)
    settings = {"fingerprint": model.fingerprint(), "preprocessing": model.preprocessing.to_dict(),
                "precision": resolved, "l2_normalized": l2_normalize}  # fmt: skip
    key = digest_of([json.dumps(settings, sort_keys=True)])
    described = [_row(r, splits[i], classes) for i, r in enumerate(records)]
    count = max(1, -(-len(records) // shard_size))
    kept = hits = computed = 0
    notes: list[str] = []
    for k in range(rank, count, world):
        start, stop = k * shard_size, min((k + 1) * shard_size, len(records))
        source = digest_of(["\0".join(row) for row in described[start:stop]])
        if _shard_is_current(out, shard_name(k), (start, stop, source, key), notes):
            kept += 1
            continue
        options = {"batch_size": batch_size, "precision": resolved, "device": device, "use_cache": use_cache,
                   "cache_root": root, "l2_normalize": l2_normalize,
                   "workers": workers if stop - start >= 64 else 0}  # fmt: skip
        result = _embed_shard(out, k, count, model, records, described, (start, stop, source, key), rank, options)
        hits, computed = hits + result.hits, computed + result.computed
    if world > 1:  # every rank's shards are on the disk once this returns
        kept, hits, computed, notes = _gather_counts(world, kept, hits, computed, notes)
    run = _finish(out, count, model, weights, settings, classes, rank == 0)
    if world > 1:  # no rank returns before meta.json exists: the caller may read the folder next
        import torch.distributed as dist

        dist.barrier()
    return EmbedRun(out, run[0], run[1], count, kept, hits, computed, run[2], notes)


def _embed_shard(
    out: Path, k: int, count: int, model: Backbone | PreparedBackbone, records: Sequence[ImageRecord],
    described: Sequence[tuple[str, str, str, str]], span: tuple[int, int, str, str], rank: int, options: dict[str, Any],
) -> Embeddings:  # fmt: skip
    """Embed shard ``k`` of ``count`` (``span``: start, stop, source digest, settings key) by :func:`embed` with
    ``options``, write it with its description, and log its speed; returns what :func:`embed` returned."""
    from headstart.hardware import single_process

    start, stop, source, key = span
    tic, began = time.perf_counter(), time.time()
    with single_process():  # this rank's shard alone: no collective inside
        result = embed(model, records[start:stop], description=f"shard {k + 1}/{count}", **options)
    rows = [described[start + int(i)] for i in result.index]
    seconds = time.perf_counter() - tic
    write_shard(out, k, result.features, rows, {
        "start": start, "stop": stop, "source": source, "key": key,
        "failed": [[str(p), why] for p, why in result.failed], "rank": rank, "began": began,
        "finished": time.time(), "seconds": seconds, "hits": result.hits, "computed": result.computed,
    })  # fmt: skip
    progress.log(f"shard {k + 1}/{count} written: {len(rows)} rows, {(stop - start) / max(seconds, 1e-9):.1f} "
                 f"images/s")  # fmt: skip
    return result


def _shard_is_current(out: Path, name: str, expected: tuple[int, int, str, str], notes: list[str]) -> bool:
    """Whether shard ``name`` was made from these records and settings (``expected``: start, stop, source digest,
    settings key) and reads back whole; why it is computed again, where it exists but is not, goes to ``notes``."""
    try:
        info = read_shard_info(out, name)
        if (info.start, info.stop, info.source, info.key) == expected:
            read_shard(out, name, info.rows)  # every byte checked, not only the description
            return True
        notes.append(f"shard {out / SHARDS_DIR / name} was made from other images or settings; computed again")
    except FileNotFoundError:
        pass
    except IntegrityError as error:
        notes.append(f"{error} -- computing it again")
        progress.log(f"[yellow]{notes[-1]}")  # at once: the user sees which shard was damaged before waiting
    return False


def _gather_counts(
    world: int, kept: int, hits: int, computed: int, notes: list[str]
) -> tuple[int, int, int, list[str]]:
    """Every rank's shards kept, cache hits, images computed and notes, summed over the ``world`` ranks."""
    import torch.distributed as dist

    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, (kept, hits, computed, notes))
    kept, hits, computed = (sum(part[i] for part in everyone) for i in range(3))
    return kept, hits, computed, [note for part in everyone for note in part[3]]


def _row(record: ImageRecord, split: str, classes: Sequence[str]) -> tuple[str, str, str, str]:
    label = classes[record.label] if 0 <= record.label < len(classes) else ""
    return str(record.path), label, split, record.digest


def _finish(out: Path, count: int, model: Backbone | PreparedBackbone, weights: str | None, settings: dict[str, Any],
            classes: list[str], write: bool) -> tuple[int, int, list[tuple[Path, str]]]:  # fmt: skip
    """Read every shard's description (all ranks wrote theirs) and, when ``write``, write ``meta.json``; returns
    (rows, dimension, failed files)."""
    import shutil

    entries: list[dict[str, Any]] = []
    failed: list[tuple[Path, str]] = []
    rows = 0
    for k in range(count):
        name = shard_name(k)
        info = read_shard_info(out, name)
        raw = (out / SHARDS_DIR / name / SHARD_FILE).read_bytes()
        entries.append({"name": name, "start": info.start, "stop": info.stop, "rows": info.rows,
                        "sha256": hashlib.sha256(raw).hexdigest()})  # fmt: skip
        failed += [(Path(p), why) for p, why in info.failed]
        rows += info.rows
    dim = model.num_features
    if write:
        for stale in sorted((out / SHARDS_DIR).iterdir()):  # shards of a longer input, run before this one
            if stale.is_dir() and stale.name.isdigit() and int(stale.name) >= count:
                shutil.rmtree(stale)
        meta = {
            "format": FORMAT,
            "backbone": model.name,
            "weights": weights,
            "weights_source": model.weights_source,
            **settings,
            "shape": [rows, dim],
            "classes": classes,
            "failed": [[str(p), why] for p, why in failed],
            "shard_size": entries[0]["stop"] - entries[0]["start"] if count > 1 else None,
            "shards": entries,
        }
        write_files(out, {META_FILE: json.dumps(meta, indent=2).encode()})
        for old in (MATRIX_FILE, IDS_FILE):  # a format-1 folder written over: its matrix no longer belongs
            (out / old).unlink(missing_ok=True)
    return rows, dim, failed


def load_embeddings(folder: str | os.PathLike[str]) -> tuple[np.ndarray, list[dict[str, str]], dict[str, Any]]:
    """Read what ``headstart embed`` wrote, whole: the matrix, one row description per matrix row, and ``meta.json``.

    Sharded folders are concatenated (for collections that fit in memory; :func:`iter_embedding_shards` streams the
    others); folders written before shards existed are read as they were. Every file is checked against its
    ``checksums.json`` and the files against each other.

    Raises:
        IntegrityError: a file or shard is missing, truncated or modified, the files disagree, or the folder is from a
            newer headstart; the message names the file and what to do.
    """
    meta = read_meta(Path(folder))
    parts = list(iter_embedding_shards(Path(folder)))
    dim = int(meta["shape"][1])
    matrix = np.concatenate([v for v, _ in parts]) if parts else np.zeros((0, dim), dtype=np.float32)
    rows = [row for _, shard_rows in parts for row in shard_rows]
    if list(matrix.shape) != list(meta["shape"]):
        raise IntegrityError(f"{Path(folder)}: the shards hold {list(matrix.shape)} embeddings, {META_FILE} says "
                             f"{meta['shape']}; {REMEDY}")  # fmt: skip
    return matrix, rows, meta
