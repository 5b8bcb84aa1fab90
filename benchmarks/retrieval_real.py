"""Compressed indexes on real image embeddings: recall@10 and ms/query of each kind and re-rank setting, built the way
``headstart index build --embeddings DIR --index KIND`` builds them.

``benchmarks/retrieval_scale.py`` measures 1M synthetic embedding-like vectors; this script checks its figures (and
chooses nothing by itself) on a real ``headstart embed`` folder, e.g. the 100,000 generated ants/bees crops that
``benchmarks/embed_memory.py --data DIR`` makes, embedded by ``headstart embed DIR --out EMB``.

Per kind (flat is the exact baseline): build seconds, bytes per vector (index file size / n), and for each re-rank
factor recall@10 against the flat index's top 10 and milliseconds per query, one at a time and in batches of 32.
The queries are ``--queries`` indexed vectors drawn at random; each query's own id is left out of both its truth and
its results (a query finds itself trivially). Then ``search_images`` (what ``headstart index search`` runs) searches
from the compressed index with ``--images`` real image files of the collection, which must come back first.

    python benchmarks/retrieval_real.py --embeddings EMB --work DIR [--kinds ivfpq,sq8,opq,ivfpq:m=64:nbits=8]

A kind may carry parameters after colons (``ivfpq:m=64:nbits=8`` is the 8-bit PQ code of 64 bytes that indexes
built before 4-bit fast-scan codes used), to compare codes of the same size on the same vectors.

Results go to ``benchmarks/results/retrieval_real_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from headstart.features.retrieval import ImageIndex, build_index, search_images
from headstart.features.shards import iter_embedding_shards, read_meta

RESULTS = Path(__file__).parent / "results" / "retrieval_real_cpu.json"
RERANKS = (0, 10, 20, 30)


def query_rows(embeddings: Path, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(positions, vectors, image paths) of ``count`` rows drawn at random from the embeddings folder."""
    total = int(read_meta(embeddings)["shape"][0])
    chosen = np.sort(np.random.default_rng(seed).choice(total, size=min(count, total), replace=False))
    vectors, paths, offset = [], [], 0
    for shard, rows in iter_embedding_shards(embeddings):
        lo, hi = np.searchsorted(chosen, [offset, offset + len(shard)])
        vectors.append(shard[chosen[lo:hi] - offset])
        paths += [rows[i - offset]["path"] for i in chosen[lo:hi]]
        offset += len(shard)
    return chosen, np.concatenate(vectors), paths


def without_self(ids: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """Each row's first ``k`` ids other than its own query's."""
    return np.array([[i for i in row if i != q][:k] for row, q in zip(ids.tolist(), own.tolist(), strict=True)])


def timed_search(index: ImageIndex, q: np.ndarray, k: int, rerank: int) -> tuple[np.ndarray, float, float]:
    """(ids [Q, k], ms per query one at a time, ms per query in batches of 32)."""
    tic = time.perf_counter()
    for row in q:
        index.search(row[None], k, rerank)
    single = 1000 * (time.perf_counter() - tic) / len(q)
    tic = time.perf_counter()
    parts = [index.search(q[i : i + 32], k, rerank)[1] for i in range(0, len(q), 32)]
    batched = 1000 * (time.perf_counter() - tic) / len(q)
    return np.concatenate(parts), single, batched


def measure(embeddings: Path, work: Path, kinds: list[str], n_queries: int, n_images: int) -> dict[str, Any]:
    """Build each kind from the embeddings folder, then time and score its searches."""
    own, q, paths = query_rows(embeddings, n_queries)
    k = 10
    rows: list[dict[str, Any]] = []
    truth: np.ndarray | None = None
    for spec in ["flat", *kinds]:
        kind, *pairs = spec.split(":")
        params = {key: int(value) for key, value in (pair.split("=") for pair in pairs)}
        folder = work / f"index-{spec.replace(':', '-').replace('=', '')}"
        tic = time.perf_counter()
        index, _ = build_index(None, folder, embeddings=embeddings, kind=kind, params=params or None, overwrite=True,
                               rerank=max(RERANKS) if kind != "flat" else None)  # fmt: skip
        build = time.perf_counter() - tic
        index = ImageIndex.load(folder, mmap=True)
        size = (folder / "index.faiss").stat().st_size
        for rerank in RERANKS if kind != "flat" else (0,):
            ids, single, batched = timed_search(index, q, k + 1, rerank)
            found = without_self(ids, own, k)
            if truth is None:
                truth = found
            recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found.tolist(), truth.tolist(),
                                                                               strict=True)]))  # fmt: skip
            row = {"kind": kind, "spec": spec, "params": index.params, "rerank": rerank, "build_s": round(build, 1),
                   "bytes_per_vector": round(size / len(index), 1), "recall_at_10": round(recall, 4),
                   "ms_per_query": round(single, 2), "ms_per_query_batch32": round(batched, 2),
                   "load_average": os.getloadavg()[0]}  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
        if kind != "flat":
            tic = time.perf_counter()
            results, failed = search_images(folder, paths[:n_images], k=k)
            first = [r.hits[0][0].path == str(r.query) for r in results]
            rows[-1]["image_search"] = {"images": len(results), "failed": len(failed),
                                        "first_hit_is_the_image": int(sum(first)),
                                        "seconds": round(time.perf_counter() - tic, 1)}  # fmt: skip
            print(kind, "image search:", rows[-1]["image_search"], flush=True)
    return {"embeddings": str(embeddings), "n": int(read_meta(embeddings)["shape"][0]), "queries": len(q),
            "faiss": faiss.__version__, "threads": faiss.omp_get_max_threads(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "rows": rows}  # fmt: skip


def main() -> None:
    """Parse arguments, measure, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--embeddings", type=Path, required=True, help="a `headstart embed` folder")
    parser.add_argument("--work", type=Path, required=True, help="folder for the index folders built")
    parser.add_argument("--kinds", default="ivfpq,sq8")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--images", type=int, default=20, help="image files searched through search_images")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = measure(args.embeddings, args.work, args.kinds.split(","), args.queries, args.images)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
