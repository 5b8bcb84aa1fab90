"""Approximate vs exact search on 100,000 random 1,280-d vectors: build time, query latency, recall@10.

Exact search (``flat``) is the baseline, run in the same process; IVF and HNSW are measured at a few search-time
settings, with their latency as a ratio of exact search's and their recall@10 against exact search's top 10.

Two collections:

* ``embedding-like`` (the target): image embeddings fill a low-dimensional, clustered part of their space, so the
  vectors are a 32-d Gaussian mixture (1,000 groups) mapped linearly into 1,280 dimensions, plus isotropic noise
  carrying half of the energy, then L2-normalised; queries are fresh draws from the same distribution.
* ``iid`` (worst case, ``--iid``): independent Gaussian vectors. In 1,280 dimensions every pair is nearly
  equidistant, so no index finds "neighbours" faster than a scan; shown for honesty, not as a target.

Usage: ``python benchmarks/retrieval.py [--n 100000] [--queries 500] [--iid]`` (about 2 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from headstart.features.retrieval import ImageIndex


def embedding_like(n: int, rng: np.random.Generator, centres: np.ndarray, mixing: np.ndarray) -> np.ndarray:
    """``n`` unit vectors: mixture draws around ``centres`` (in latent space) mapped by ``mixing``, plus noise."""
    z = centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, centres.shape[1]), dtype=np.float32)
    x = z @ mixing
    # Per-dimension signal variance is |z|^2 (unit-variance mixing weights); the noise gets as much.
    x += rng.standard_normal(x.shape, dtype=np.float32) * np.sqrt((z**2).sum(1, keepdims=True))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Share of the exact top ``k`` that the approximate top ``k`` contains."""
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(found, truth, strict=True)]))


def timed_search(index: ImageIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Ids and per-query latency in milliseconds (queries answered one at a time, as an interactive search does)."""
    ids = np.zeros((len(queries), k), dtype=np.int64)
    tic = time.perf_counter()
    for i in range(len(queries)):
        ids[i] = index.search(queries[i : i + 1], k)[1][0]
    return ids, 1000 * (time.perf_counter() - tic) / len(queries)


def run(base: np.ndarray, queries: np.ndarray, k: int) -> None:
    """Print, row by row, build time, latency and recall for flat, IVF and HNSW over ``base``."""
    tic = time.perf_counter()
    flat = ImageIndex(base.shape[1], "flat")
    flat.add(base)
    flat_build = time.perf_counter() - tic
    truth, flat_ms = timed_search(flat, queries, k)
    tic = time.perf_counter()
    batched = flat.search(queries, k)[1]
    batch_ms = 1000 * (time.perf_counter() - tic) / len(queries)
    assert (batched[:, 0] == truth[:, 0]).mean() > 0.99  # one-at-a-time and batched exact search agree
    del flat
    print(f"exact search, all queries in one batch: {batch_ms:.2f} ms per query")
    print(f"{'index':<32}{'build s':>9}{'ms/query':>10}{'speed-up':>10}{f'recall@{k}':>11}")

    def row(name: str, build: float, ms: float, recall: float) -> None:
        print(f"{name:<32}{build:>9.1f}{ms:>10.2f}{flat_ms / ms:>9.1f}x{recall:>11.3f}", flush=True)

    row("flat (exact)", flat_build, flat_ms, 1.0)
    tic = time.perf_counter()
    ivf = ImageIndex(base.shape[1], "ivf")
    ivf.add(base)
    ivf_build = time.perf_counter() - tic
    for nprobe in (4, 8, 16, 32):
        faiss.extract_index_ivf(ivf.index).nprobe = nprobe
        ids, ms = timed_search(ivf, queries, k)
        row(f"ivf nlist={ivf.params['nlist']} nprobe={nprobe}", ivf_build, ms, recall_at(ids, truth, k))
    del ivf
    tic = time.perf_counter()
    hnsw = ImageIndex(base.shape[1], "hnsw")
    hnsw.add(base)
    hnsw_build = time.perf_counter() - tic
    for ef in (16, 32, 64, 128):
        faiss.downcast_index(faiss.downcast_index(hnsw.index).index).hnsw.efSearch = ef
        ids, ms = timed_search(hnsw, queries, k)
        row(f"hnsw M={hnsw.params['m']} ef_search={ef}", hnsw_build, ms, recall_at(ids, truth, k))


def main() -> None:
    """Parse arguments and run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="indexed vectors")
    parser.add_argument("--dim", type=int, default=1280, help="dimensions (EfficientNet-Lite0 features: 1280)")
    parser.add_argument("--queries", type=int, default=200, help="query vectors, searched one at a time")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--iid", action="store_true", help="also run the independent-Gaussian worst case")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, {args.n:,} x {args.dim} vectors")
    centres = 2 * rng.standard_normal((1000, 32), dtype=np.float32)
    mixing = rng.standard_normal((32, args.dim), dtype=np.float32)
    print("\nembedding-like (32-d clustered structure in 1,280 dimensions):")
    base = embedding_like(args.n, rng, centres, mixing)
    run(base, embedding_like(args.queries, rng, centres, mixing), args.k)
    if args.iid:
        print("\niid Gaussian (worst case):")
        base = rng.standard_normal((args.n, args.dim), dtype=np.float32)
        run(base, rng.standard_normal((args.queries, args.dim), dtype=np.float32), args.k)


if __name__ == "__main__":
    main()
