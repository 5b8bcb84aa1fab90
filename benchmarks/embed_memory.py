"""Peak memory of `headstart embed` (or `headstart train`) over 10,000 images (generated from the ants/bees photos by
random crops and re-encoding, so every file is distinct), with the baseline of the same process on 100 images.

    python benchmarks/embed_memory.py [--count 10000]
    python benchmarks/embed_memory.py --command train --classes 100   # the default recipe on 100 classes
    python benchmarks/embed_memory.py --command train --count 100000 --classes 100 --data /tmp/gen100k --cache /tmp/c

``--data DIR`` keeps the generated images in DIR (made there on the first run, reused after), so a long run's images
serve later benchmarks too (benchmarks/retrieval_scale.py's real-image run reads the same folder).

With ``--command train`` the images are dealt round-robin into ``--classes`` class folders (the labels carry no
signal: the figure is memory and time, not accuracy) and each run is ``headstart train`` with the default strategy.

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


def peak_of(command: list[str], log: Path | None = None) -> tuple[float, float, float]:
    """(peak tree RSS in MiB, peak tree PSS in MiB, seconds) of a command; its output goes to ``log`` if given."""
    tic = time.perf_counter()
    sink = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT if log else subprocess.DEVNULL)
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
    if log:
        sink.close()  # type: ignore[union-attr]
    if proc.returncode:
        raise SystemExit(f"{command} failed with {proc.returncode}")
    return peak_rss / 2**20, peak_pss / 2**20, time.perf_counter() - tic


def generate(source: Path, out: Path, count: int, classes: int = 0, start: int = 0, step: int = 1) -> None:
    """``count`` distinct crops of the ants/bees photos in ``out``, or in ``classes`` class folders under it.

    ``start``/``step`` make one of several processes write every ``step``-th image (image i's crop depends on i alone).
    """
    photos = sorted(source.rglob("*.jpg"))
    for k in range(max(classes, 1)):
        (out / f"class_{k:03d}" if classes else out).mkdir(parents=True, exist_ok=True)
    for i in range(start, count, step):
        rng = random.Random(i)
        with Image.open(photos[i % len(photos)]) as image:
            w, h = image.size
            side = rng.uniform(0.5, 1.0)
            box = (int(rng.uniform(0, w * (1 - side))), int(rng.uniform(0, h * (1 - side))))
            crop = image.convert("RGB").crop((box[0], box[1], box[0] + int(w * side), box[1] + int(h * side)))
            folder = out / f"class_{i % classes:03d}" if classes else out
            crop.save(folder / f"img_{i:06d}.jpg", quality=rng.randint(80, 95))


def generate_parallel(source: Path, out: Path, count: int, classes: int = 0) -> None:
    """:func:`generate` over every core, in one process per core."""
    from concurrent.futures import ProcessPoolExecutor

    step = os.cpu_count() or 1
    with ProcessPoolExecutor(step) as pool:
        for done in [pool.submit(generate, source, out, count, classes, k, step) for k in range(step)]:
            done.result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--command", choices=("embed", "train"), default="embed")
    parser.add_argument("--classes", type=int, default=2, help="class folders for --command train")
    parser.add_argument("--data", type=Path, help="keep the generated images here (made on the first run, reused)")
    parser.add_argument("--log", type=Path, help="write the large run's output to this file")
    parser.add_argument("--out", type=Path, help="keep the large run's output folder here")
    parser.add_argument("--cache", type=Path, help="keep the large run's feature cache here (a killed run resumes)")
    args = parser.parse_args()
    classes = args.classes if args.command == "train" else 0
    from headstart.data.demo import hymenoptera

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        many = args.data or root / "many"
        tic = time.perf_counter()
        marker = many.with_name(many.name + ".complete")  # beside the folder: the scan sees only images
        if not marker.exists():
            generate_parallel(hymenoptera(), many, args.count, classes)
            if args.data:
                marker.write_text(f"{args.count} images, {classes} classes\n")
        generate(hymenoptera(), root / "few", max(100, 3 * classes), classes)
        print(f"generated {args.count} images in {time.perf_counter() - tic:.0f} s", flush=True)
        base = [sys.executable, "-m", "headstart", args.command] + (["--no-report"] if args.command == "train" else [])
        os.environ["HEADSTART_QUIET"] = "1"
        few_rss, few_pss, few_s = peak_of(
            [*base, "--cache-dir", str(root / "cache_few"), "--out", str(root / "e100"), str(root / "few")]
        )
        if args.log:
            os.environ.pop("HEADSTART_QUIET")  # the large run's progress goes to its log
        out = args.out or root / "e10k"
        many_rss, many_pss, many_s = peak_of(
            [*base, "--cache-dir", str(args.cache or root / "cache"), "--out", str(out), str(many)], args.log
        )
    few = max(100, 3 * classes)
    print(f"{few} images:    peak PSS {few_pss:6.0f} MiB (RSS sum {few_rss:6.0f} MiB), {few_s:6.1f} s")
    print(f"{args.count} images: peak PSS {many_pss:6.0f} MiB (RSS sum {many_rss:6.0f} MiB), {many_s:6.1f} s "
          f"({args.count / many_s:.1f} images/s)")  # fmt: skip
    print(f"growth from {few} to {args.count} images: PSS {many_pss - few_pss:.0f} MiB")


if __name__ == "__main__":
    main()
