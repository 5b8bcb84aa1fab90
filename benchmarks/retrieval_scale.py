"""Retrieval at scale: 1,000,000 x 1,280 embedding-like vectors in flat, IVF, HNSW, SQ8, IVF-PQ and OPQ+IVF-PQ indexes.

Per index: bytes per vector (index file size / n), RAM (growth of the process's anonymous resident memory while
building, i.e. what stays in memory; the exact vectors kept for re-ranking are a file on disk, read through the page
cache), build seconds, milliseconds per query one at a time and in batches of 32, and recall@10 against exact search
over the same vectors. The vectors are the embedding-like mixture of ``benchmarks/retrieval.py``, generated in chunks
from per-chunk seeds, so every phase sees the same collection and no phase holds more than the index plus one chunk;
the ground truth is exact search merged chunk by chunk.

Phases (``--phase``), each a separate process so that its RSS figures stand alone:

* ``compressed``: flat (the exact baseline), sq8, ivfsq8, ivfpq and opq at ``--n`` (default 1M);
* ``graph``: IVF-Flat and HNSW at ``--n`` (HNSW time-boxed by ``--hnsw-seconds``: what is not added in time is not
  measured, and the row says so);
* ``scale``: ivfpq and opq at ``--n`` (run at 2M and 4M for the 10M extrapolation; ``--kinds`` narrows a phase).

Before timing queries each phase waits (30 s polls, at most ``--max-wait`` s) for the 1-minute load average to fall
below 1.5, and records the load beside the figures. Results go to ``benchmarks/results/retrieval_scale_cpu.json``
(merged by phase and n). ``--report`` prints the table and the 10M extrapolation from what the file holds.

Usage: ``python benchmarks/retrieval_scale.py --phase compressed --n 1000000`` (about 15 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from headstart.features.retrieval import IVF_KINDS, TRAIN_ROWS, ImageIndex, default_params, training_size
from retrieval import embedding_like

RESULTS = Path(__file__).parent / "results" / "retrieval_scale_cpu.json"
CHUNK = 100_000
DIM = 1280


def anon_rss() -> int:
    """Anonymous resident memory of this process, bytes (file-backed pages, e.g. memory maps, left out)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def wait_for_quiet(max_wait: float) -> float:
    """Wait until the 1-minute load is below 1.5 (30 s polls, at most ``max_wait`` s); returns the load then."""
    start = time.time()
    while load1() >= 1.5 and time.time() - start < max_wait:
        print(f"  load {load1():.2f}, waiting for < 1.5 before timing queries", flush=True)
        time.sleep(30)
    return load1()


class Collection:
    """The benchmark's vectors, chunk by chunk from per-chunk seeds (the same chunks in every phase)."""

    def __init__(self, n: int, dim: int = DIM, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.centres = 2 * rng.standard_normal((1000, 32), dtype=np.float32)
        self.mixing = rng.standard_normal((32, dim), dtype=np.float32)
        self.n, self.seed = n, seed

    def chunks(self) -> list[tuple[int, int]]:
        return [(s, min(s + CHUNK, self.n)) for s in range(0, self.n, CHUNK)]

    def chunk(self, start: int, stop: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, start // CHUNK])
        return embedding_like(stop - start, rng, self.centres, self.mixing)

    def queries(self, n: int) -> np.ndarray:
        return embedding_like(n, np.random.default_rng([self.seed, 10**9]), self.centres, self.mixing)


def timed(index: ImageIndex, queries: np.ndarray, k: int, **kw: int) -> tuple[np.ndarray, float, float]:
    """Ids of all queries, ms per query one at a time, and ms per query in batches of 32."""
    ids = np.zeros((len(queries), k), dtype=np.int64)
    tic = time.perf_counter()
    for i in range(len(queries)):
        ids[i] = index.search(queries[i : i + 1], k, **kw)[1][0]
    single = 1000 * (time.perf_counter() - tic) / len(queries)
    tic = time.perf_counter()
    for s in range(0, len(queries), 32):
        index.search(queries[s : s + 32], k, **kw)
    batch = 1000 * (time.perf_counter() - tic) / len(queries)
    return ids, single, batch


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(a[:k]) & set(b[:k]) - {-1}) / k for a, b in zip(found, truth, strict=True)]))


def index_bytes(index: ImageIndex) -> int:
    with tempfile.NamedTemporaryFile(dir=os.environ.get("TMPDIR")) as handle:
        faiss.write_index(index.index, handle.name)
        return os.path.getsize(handle.name)


def build(kinds: list[str], data: Collection, queries: np.ndarray, k: int, hnsw_seconds: float,
          ) -> tuple[dict[str, ImageIndex], dict[str, dict], np.ndarray]:  # fmt: skip
    """Build every kind from one pass over the chunks (each timed alone) and the exact top ``k`` of each query."""
    indexes = {name: ImageIndex(DIM, name) for name in kinds}
    stats = {name: {"build_s": 0.0, "ram_bytes": 0, "n": 0} for name in kinds}
    best_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(queries), k), -1, dtype=np.int64)
    for start, stop in data.chunks():
        x = data.chunk(start, stop)
        sims = queries @ x.T  # exact ground truth, merged with the best so far
        top = np.argpartition(-sims, k, axis=1)[:, :k]
        cand_s = np.concatenate([best_s, np.take_along_axis(sims, top, 1)], 1)
        cand_i = np.concatenate([best_i, top + start], 1)
        order = np.argsort(-cand_s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_i, order, 1)
        del sims
        for name, index in indexes.items():
            if name == "hnsw" and stats[name]["build_s"] > hnsw_seconds:
                continue  # time-boxed
            before, tic = anon_rss(), time.perf_counter()
            if index.index is None:  # on as many rows as the product trains on (build_index samples these)
                need = training_size(name, default_params(name, data.n, DIM))
                index.train(x[: max(need, TRAIN_ROWS) if need else len(x)], count=data.n)
            index.add(x)
            stats[name]["build_s"] += time.perf_counter() - tic
            stats[name]["ram_bytes"] += anon_rss() - before
            stats[name]["n"] = stop
        print(f"  {stop:,} vectors: " + ", ".join(f"{n} {s['build_s']:.0f} s" for n, s in stats.items()), flush=True)
    return indexes, stats, best_i


PHASES = {"compressed": ["flat", "sq8", "ivfsq8", "ivfpq", "opq"], "graph": ["ivf", "hnsw"], "scale": ["ivfpq", "opq"]}


def codec(index: ImageIndex) -> str:
    """The FAISS class that holds the codes (e.g. IndexIVFPQFastScan), and the PQ layout where there is one."""
    inner = faiss.downcast_index(index.index)
    inner = faiss.downcast_index(getattr(inner, "index", inner))  # inside the id map
    if index.kind in IVF_KINDS:
        inner = faiss.downcast_index(faiss.extract_index_ivf(index.index))
    pq = getattr(inner, "pq", None)
    return type(inner).__name__ + (f" M={pq.M} nbits={pq.nbits}" if pq is not None else "")


def run_phase(phase: str, n: int, n_queries: int, k: int, hnsw_seconds: float, max_wait: float,
              kinds: list[str] | None = None) -> list[dict]:  # fmt: skip
    kinds = kinds or PHASES[phase]
    data = Collection(n)
    queries = data.queries(n_queries)
    print(f"phase {phase}: {n:,} x {DIM}, kinds {kinds}, faiss {faiss.__version__}, "
          f"{faiss.omp_get_max_threads()} threads", flush=True)  # fmt: skip
    indexes, stats, truth = build(kinds, data, queries, k, hnsw_seconds)
    load = wait_for_quiet(max_wait)
    rows = []
    for name, index in indexes.items():
        size = index_bytes(index)
        settings: list[dict[str, int]] = [{}]
        if name in ("ivfsq8", "ivfpq", "opq", "ivf"):
            settings = [{"nprobe": p} for p in (8, 16, 32, 64)]
        if name in ("ivfpq", "opq", "sq8", "ivfsq8"):
            settings = [{**s, "rerank": r} for s in settings for r in (0, 10, 20, 30)]
        if name == "hnsw":
            settings = [{"ef_search": e} for e in (64, 128)]
        partial = stats[name]["n"] < n
        for setting in settings:
            if "nprobe" in setting:
                index.params["nprobe"] = setting["nprobe"]
                faiss.extract_index_ivf(index.index).nprobe = setting["nprobe"]
            if "ef_search" in setting:
                faiss.downcast_index(faiss.downcast_index(index.index).index).hnsw.efSearch = setting["ef_search"]
            if setting.get("rerank") and index.store is None:
                continue  # no vectors kept: only the rerank-free setting is measured
            kw = {"rerank": setting["rerank"]} if "rerank" in setting and index.store is not None else {}
            ids, single, batch = timed(index, queries, k, **kw)
            rec = None if partial else recall(ids, truth)  # partial: exact neighbours among the indexed unknown
            row = {"phase": phase, "kind": name, "codec": codec(index), "n": n, "indexed": stats[name]["n"],
                   "params": {**index.params, **setting}, "bytes_per_vector": size / max(stats[name]["n"], 1),
                   "index_file_bytes": size, "ram_bytes": stats[name]["ram_bytes"],
                   "disk_vectors_bytes": 2 * DIM * stats[name]["n"] if index.store is not None else 0,
                   "build_s": stats[name]["build_s"], "ms_per_query_1": single, "ms_per_query_32": batch,
                   "recall_at_10": rec, "load1_at_timing": load, "load1_after": load1()}  # fmt: skip
            rows.append(row)
            print(f"  {name:<7} {json.dumps(setting):<32} {row['bytes_per_vector']:>7.0f} B/vec "
                  f"RAM {row['ram_bytes'] / 1e6:>6.0f} MB build {row['build_s']:>6.0f} s {single:>7.2f} ms "
                  f"{batch:>7.2f} ms/q@32 recall {rec if rec is None else round(rec, 3)} load {load1():.2f}",
                  flush=True)  # fmt: skip
        indexes[name] = None  # type: ignore[assignment]  # free before the next kind is measured
        del index
    return rows


def save(rows: list[dict]) -> None:
    document = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": []}
    keys = {(r["phase"], r["n"]) for r in rows}
    document["rows"] = [r for r in document["rows"] if (r["phase"], r["n"]) not in keys] + rows
    cpu = platform.processor() or platform.machine()
    threads = faiss.omp_get_max_threads()
    document["machine"] = f"{cpu}, {os.cpu_count()} CPU cores, faiss {faiss.__version__} ({threads} threads)"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(document, indent=1))


def report() -> None:
    """The table of the defaults (one row per kind and n) and the 10M extrapolation, from the results file."""
    document = json.loads(RESULTS.read_text())
    print(document.get("machine", ""))
    print(f"{'kind':<8}{'n':>10}{'params':>40}{'B/vec':>8}{'RAM MB':>8}{'build s':>9}{'ms/q 1':>8}{'ms/q 32':>8}"
          f"{'R@10':>7}{'load':>6}")  # fmt: skip
    for r in sorted(document["rows"], key=lambda r: (r["n"], r["kind"])):
        p = ",".join(f"{k}={v}" for k, v in r["params"].items() if k in ("nprobe", "rerank", "m", "ef_search"))
        rec = "-" if r["recall_at_10"] is None else f"{r['recall_at_10']:.3f}"
        print(f"{r['kind']:<8}{r['n']:>10,}{p:>40}{r['bytes_per_vector']:>8.0f}{r['ram_bytes'] / 1e6:>8.0f}"
              f"{r['build_s']:>9.0f}{r['ms_per_query_1']:>8.2f}{r['ms_per_query_32']:>8.2f}{rec:>7}"
              f"{r['load1_at_timing']:>6.2f}")  # fmt: skip
    extrapolation = {}
    for kind in ("ivfpq", "opq"):
        for setting in ({"nprobe": 32, "rerank": 10},):
            points = [r for r in document["rows"] if r["kind"] == kind and all(
                r["params"].get(a) == b for a, b in setting.items())]  # fmt: skip
            points = sorted({r["n"]: r for r in points}.values(), key=lambda r: r["n"])
            if len(points) < 2:
                continue
            n = np.array([r["n"] for r in points], dtype=np.float64)
            fit = {}
            for key in ("ram_bytes", "build_s", "ms_per_query_1", "index_file_bytes"):
                slope, intercept = np.polyfit(n, [r[key] for r in points], 1)  # linear in n
                fit[key] = float(slope * 1e7 + intercept)
            fit["recall_at_10_trend"] = [r["recall_at_10"] for r in points]
            fit["from_n"] = n.tolist()
            extrapolation[kind] = fit
            print(f"10M extrapolation (linear fit through n={[int(v) for v in n]}), {kind} {setting}: "
                  f"RAM {fit['ram_bytes'] / 1e9:.2f} GB, index file {fit['index_file_bytes'] / 1e9:.2f} GB, "
                  f"build {fit['build_s'] / 60:.0f} min, {fit['ms_per_query_1']:.2f} ms/query; "
                  f"recall@10 at the measured n: {fit['recall_at_10_trend']}")  # fmt: skip
    document["extrapolation_10M"] = extrapolation
    RESULTS.write_text(json.dumps(document, indent=1))


def main() -> None:
    """Parse arguments and run one phase (or print the report)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=["compressed", "graph", "scale"], default="compressed")
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--hnsw-seconds", type=float, default=600, help="stop adding to HNSW after this long")
    parser.add_argument("--max-wait", type=float, default=600, help="longest wait for a quiet machine, s")
    parser.add_argument(
        "--kinds",
        nargs="+",
        choices=sorted({k for v in PHASES.values() for k in v}),
        help="only these of the phase's kinds (e.g. ivfpq alone for the 2M/4M points)",
    )
    parser.add_argument("--report", action="store_true", help="print the table and extrapolation from the file")
    args = parser.parse_args()
    if args.report:
        report()
        return
    print("defaults:", {kind: default_params(kind, args.n, DIM) for kind in ("ivfpq", "opq", "ivfsq8")})
    save(run_phase(args.phase, args.n, args.queries, args.k, args.hnsw_seconds, args.max_wait, args.kinds))


if __name__ == "__main__":
    main()
