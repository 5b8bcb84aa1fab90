"""Peak memory of `headstart embed` over 10,000 images (generated from the ants/bees photos by random crops and
re-encoding, so every file is distinct), with the baseline of the same process embedding 100 images.

    python benchmarks/embed_memory.py [--count 10000]

Memory of the whole process tree (the main process plus its worker processes), sampled every 0.1 s from /proc, two
ways: the sum of resident sets (RSS), which counts every page shared between the forked workers and the main process
(the torch libraries, the model weights) once per process, and the sum of proportional set sizes (PSS), which
splits each shared page between its sharers: the memory the tree really occupies.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from PIL import Image


def tree_memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) bytes of ``pid`` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    rss = pss = 0
    todo = [pid]
    while todo:
        current = todo.pop()
        try:
            for line in Path(f"/proc/{current}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
        except OSError:
            pass
        todo += children.get(current, [])
    return rss, pss


def peak_of(command: list[str]) -> tuple[float, float, float]:
    """(peak tree RSS in MiB, peak tree PSS in MiB, seconds) of a command."""
    tic = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak_rss = peak_pss = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_rss, peak_pss
        while not done.is_set():
            rss, pss = tree_memory(proc.pid)
            peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    proc.wait()
    done.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"{command} failed with {proc.returncode}")
    return peak_rss / 2**20, peak_pss / 2**20, time.perf_counter() - tic


def generate(source: Path, out: Path, count: int) -> None:
    photos = sorted(source.rglob("*.jpg"))
    rng = random.Random(0)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        with Image.open(photos[i % len(photos)]) as image:
            w, h = image.size
            side = rng.uniform(0.5, 1.0)
            box = (int(rng.uniform(0, w * (1 - side))), int(rng.uniform(0, h * (1 - side))))
            crop = image.convert("RGB").crop((box[0], box[1], box[0] + int(w * side), box[1] + int(h * side)))
            crop.save(out / f"img_{i:05d}.jpg", quality=rng.randint(80, 95))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10_000)
    args = parser.parse_args()
    from headstart.data.demo import hymenoptera

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tic = time.perf_counter()
        generate(hymenoptera(), root / "many", args.count)
        generate(hymenoptera(), root / "few", 100)
        print(f"generated {args.count} images in {time.perf_counter() - tic:.0f} s")
        env_cmd = [sys.executable, "-m", "headstart", "embed", "--cache-dir", str(root / "cache"), "--out"]
        os.environ["HEADSTART_QUIET"] = "1"
        few_rss, few_pss, few_s = peak_of([*env_cmd, str(root / "e100"), str(root / "few")])
        many_rss, many_pss, many_s = peak_of([*env_cmd, str(root / "e10k"), str(root / "many")])
    print(f"100 images:    peak PSS {few_pss:6.0f} MiB (RSS sum {few_rss:6.0f} MiB), {few_s:6.1f} s")
    print(f"{args.count} images: peak PSS {many_pss:6.0f} MiB (RSS sum {many_rss:6.0f} MiB), {many_s:6.1f} s "
          f"({args.count / many_s:.1f} images/s)")  # fmt: skip
    print(f"growth from 100 to {args.count} images: PSS {many_pss - few_pss:.0f} MiB")


if __name__ == "__main__":
    main()
