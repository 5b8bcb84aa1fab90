"""100,000 real-image crops through `headstart embed` in shards, then `index build --embeddings` from those shards and
a `search`: images/s per shard window and the memory of the process tree early and late, which should both stay flat.

    python benchmarks/embed_scale.py --data /work/scale/gen100k --out /work/scale/emb100k

The images are benchmarks/embed_memory.py's crops of the ants/bees photos (made in ``--data`` on the first run, in
one process per core; an existing folder with its ``.complete`` marker is reused as it is). Memory is the PSS of the
whole process tree (embed_memory.py's ``tree_memory``), sampled every 0.5 s; throughput comes from the ``began`` /
``finished`` times each shard records in its ``shard.json``. A run interrupted and started again keeps its complete
shards (the figures then describe only the shards computed in the last run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from embed_memory import generate_parallel, tree_memory


def sampled(command: list[str], log: Path) -> tuple[list[tuple[float, float]], float, float]:
    """Run ``command``; ((unix time, tree PSS MiB) every 0.5 s, start, end). Output goes to ``log``, the samples also
    to ``log`` with the suffix ``.pss.tsv`` as they are taken (a run cut short can still be reported)."""
    samples: list[tuple[float, float]] = []
    with log.open("w") as sink, log.with_suffix(".pss.tsv").open("a") as trace:
        start = time.time()
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                samples.append((time.time(), tree_memory(proc.pid)[1] / 2**20))
                trace.write(f"{samples[-1][0]:.1f}\t{samples[-1][1]:.0f}\n")
                trace.flush()
                time.sleep(0.5)

        sampler = threading.Thread(target=sample)
        sampler.start()
        proc.wait()
        done.set()
        sampler.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(command)} failed with {proc.returncode}; see {log}")
    return samples, start, time.time()


def peak(samples: list[tuple[float, float]], lo: float, hi: float) -> float:
    return max((m for t, m in samples if lo <= t <= hi), default=0.0)


def shard_windows(out: Path, samples: list[tuple[float, float]]) -> tuple[list[dict[str, object]], float]:
    """Images/s and peak tree PSS of every finished shard in ``out`` (from its ``shard.json``), and when the first
    one began."""
    windows: list[dict[str, object]] = []
    began = []
    for shard in sorted((out / "shards").iterdir()):
        try:
            info = json.loads((shard / "shard.json").read_text())
        except (OSError, ValueError):
            continue  # the shard being written
        images = info["stop"] - info["start"]
        began.append(info["began"])
        windows.append({
            "shard": shard.name, "images": f"{info['start']:,}-{info['stop']:,}",
            "images_per_s": round(images / info["seconds"], 1), "seconds": round(info["seconds"], 1),
            "computed": info["computed"], "cache_hits": info["hits"],
            "peak_pss_mib": round(peak(samples, info["began"], info["finished"])),
        })  # fmt: skip
    return windows, min(began, default=0.0)


def report_so_far(args: argparse.Namespace) -> None:
    """--report-only: the figures of the shards finished so far, from their shard.json and the PSS trace."""
    trace = args.out.with_name(args.out.name + ".embed.pss.tsv")
    samples = [(float(t), float(m)) for t, m in (line.split("\t") for line in trace.read_text().splitlines())]
    windows, first = shard_windows(args.out, samples)
    done = sum(int(str(w["computed"])) + int(str(w["cache_hits"])) for w in windows)
    result = {
        "complete": False,
        "note": "the run was still going when this was written; re-run without --report-only (or the same "
                "`headstart embed` command) to finish: complete shards are kept",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "loadavg_now": Path("/proc/loadavg").read_text().split()[:3],
        "backbone": args.backbone, "images": args.count, "shard_size": args.shard_size,
        "embed": {"images_done": done, "trace_start_to_first_shard_s": round(first - samples[0][0], 1),
                  "images_per_s_so_far": round(done / sum(float(str(w["seconds"])) for w in windows), 1)
                  if windows else None,
                  "peak_pss_mib_so_far": round(max(m for _, m in samples)), "per_shard": windows},
    }  # fmt: skip
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=100, help="class folders when the images are generated")
    parser.add_argument("--data", type=Path, default=Path("/work/scale/gen100k"))
    parser.add_argument("--out", type=Path, default=Path("/work/scale/emb100k"))
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--index", default="ivf", choices=["flat", "ivf", "hnsw"])
    parser.add_argument("--cache-dir", type=Path, default=Path("/work/scale/cache"))
    parser.add_argument("--result", type=Path, default=Path(__file__).parent / "results" / "embed_scale_cpu.json")
    parser.add_argument("--report-only", action="store_true", help="report the shards finished so far and stop")
    args = parser.parse_args()
    if args.report_only:
        report_so_far(args)
        return
    from headstart.data.demo import hymenoptera

    marker = args.data.with_name(args.data.name + ".complete")
    if not marker.exists():
        generate_parallel(hymenoptera(), args.data, args.count, args.classes)
        marker.write_text(f"{args.count} images, {args.classes} classes\n")
    load = {"before": Path("/proc/loadavg").read_text().split()[:3]}
    hs = [sys.executable, "-m", "headstart"]
    env_note = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "HEADSTART_QUIET")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    embed_cmd = [*hs, "embed", str(args.data), "--backbone", args.backbone, "--shard-size", str(args.shard_size),
                 "--out", str(args.out), "--cache-dir", str(args.cache_dir)]  # fmt: skip
    samples, start, end = sampled(embed_cmd, args.out.with_name(args.out.name + ".embed.log"))
    load["after_embed"] = Path("/proc/loadavg").read_text().split()[:3]
    meta = json.loads((args.out / "meta.json").read_text())
    windows, first_shard = shard_windows(args.out, samples)
    index_dir = args.out.with_name(args.out.name + f"-{args.index}")
    index_cmd = [*hs, "index", "build", "--embeddings", str(args.out), "--out", str(index_dir), "--index", args.index,
                 "--overwrite"]  # fmt: skip
    index_samples, i_start, i_end = sampled(index_cmd, args.out.with_name(args.out.name + ".index.log"))
    queries = sorted((args.data / "class_000").iterdir())[:3] if (args.data / "class_000").is_dir() else []
    answer = args.out.with_name(args.out.name + ".search.json")
    tic = time.perf_counter()
    subprocess.run([*hs, "search", str(index_dir), *map(str, queries), "-k", "5", "--json", str(answer),
                    "--cache-dir", str(args.cache_dir)], check=True, capture_output=True)  # fmt: skip
    search_s = time.perf_counter() - tic
    found = json.loads(answer.read_text())
    load["after_all"] = Path("/proc/loadavg").read_text().split()[:3]
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "loadavg": load,
        "env": env_note,
        "backbone": args.backbone,
        "images": args.count,
        "rows": meta["shape"][0],
        "dim": meta["shape"][1],
        "shard_size": args.shard_size,
        "embed": {
            "seconds": round(end - start, 1),
            "scan_and_start_s": round(first_shard - start, 1),
            "images_per_s_overall": round(
                sum(int(w["computed"]) + int(w["cache_hits"]) for w in windows) / (end - first_shard), 1
            ),
            "peak_pss_mib": round(max(m for _, m in samples)),
            "per_shard": windows,
        },
        "index_build": {
            "kind": args.index,
            "seconds": round(i_end - i_start, 1),
            "peak_pss_mib": round(max(m for _, m in index_samples)),
        },
        "search": {
            "queries": len(queries),
            "seconds_incl_startup": round(search_s, 1),
            "self_found_first": sum(r["results"][0]["path"] == r["query"] for r in found if r["results"]),
            "top": [
                [r["query"], r["results"][0]["path"], round(r["results"][0]["score"], 4)] for r in found if r["results"]
            ],
        },
        "output": {"embeddings": str(args.out), "index": str(index_dir)},
    }
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
