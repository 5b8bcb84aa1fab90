"""Load test of ``headstart serve``: latency percentiles and throughput of POST /predict, against the in-process
``Model.predict`` latency for one image measured in the same run.

    python benchmarks/serve.py                      # efficientnet_lite0 with a fresh head, ants/bees images
    python benchmarks/serve.py --run runs/x --requests 500 --concurrency 8

The server runs on uvicorn in a background thread on a loopback port; clients are httpx async clients. The run is
bounded by ``--requests`` and ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from headstart.insight.predictor import load
from headstart.models.backbones import create_backbone
from headstart.models.classifier import Classifier, save_classifier
from headstart.serving.serve import create_app, serve_in_thread

HYMENOPTERA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hymenoptera_data"


def images(n: int) -> list[tuple[str, bytes]]:
    """Real ants/bees photos when present, else synthetic noise pictures of a similar size."""
    files = sorted((HYMENOPTERA / "val").glob("*/*.jpg"))[:n]
    if files:
        return [(f.name, f.read_bytes()) for f in files]
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
        out.append((f"noise{i}.jpg", buffer.getvalue()))
    return out


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


async def load_test(url: str, payloads: list[tuple[str, bytes]], requests: int, concurrency: int,
                    max_seconds: float) -> tuple[list[float], int, float]:  # fmt: skip
    """Send ``requests`` POST /predict with ``concurrency`` in flight; returns latencies (s), failures, wall time."""
    latencies: list[float] = []
    failures = 0
    counter = iter(range(requests))
    deadline = time.perf_counter() + max_seconds

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal failures
        for i in counter:
            if time.perf_counter() > deadline:
                return
            name, data = payloads[i % len(payloads)]
            tic = time.perf_counter()
            response = await client.post("/predict", files={"files": (name, data, "image/jpeg")})
            latencies.append(time.perf_counter() - tic)
            failures += response.status_code != 200

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        tic = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return latencies, failures, time.perf_counter() - tic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="run folder (default: efficientnet_lite0 with a random 2-class head)")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=240.0, help="stop sending after this long")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else Path(tmp) / "run"
        if not args.run:
            torch.manual_seed(0)
            model = Classifier(create_backbone("efficientnet_lite0"), 2)
            save_classifier(model.eval(), run, {"classes": ["ants", "bees"]})
        payloads = images(16)
        paths = []
        for name, data in payloads[:8]:
            path = Path(tmp) / name
            path.write_bytes(data)
            paths.append(path)

        # Baseline: the Python API on one image at a time, in this process, after a warm-up.
        model_api = load(run)
        model_api.predict(paths[0])
        direct = []
        for i in range(20):
            tic = time.perf_counter()
            model_api.predict(paths[i % len(paths)])
            direct.append(time.perf_counter() - tic)
        baseline = statistics.median(direct)
        del model_api

        app = create_app(run)
        with serve_in_thread(app) as url:
            asyncio.run(load_test(url, payloads, 2 * args.concurrency, args.concurrency, 60))  # warm-up
            latencies, failures, wall = asyncio.run(
                load_test(url, payloads, args.requests, args.concurrency, args.max_seconds)
            )

    p50, p90, p99 = (percentile(latencies, q) for q in (50, 90, 99))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device: {device}, torch threads {torch.get_num_threads()}, {len(latencies)} requests, "
          f"{args.concurrency} concurrent, {failures} failed")  # fmt: skip
    print(f"baseline  Model.predict, 1 image, in process: median {baseline * 1000:.1f} ms")
    print(f"server    POST /predict latency: p50 {p50 * 1000:.1f} ms, p90 {p90 * 1000:.1f} ms, "
          f"p99 {p99 * 1000:.1f} ms; {len(latencies) / wall:.1f} requests/s")  # fmt: skip
    print(f"ratio     server p50 / baseline = {p50 / baseline:.2f}x (includes queueing behind "
          f"{args.concurrency - 1} other requests); throughput x baseline latency = "
          f"{len(latencies) / wall * baseline:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
