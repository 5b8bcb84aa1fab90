"""How often a two-process gloo DDP run aborts at exit, and what headstart's way out does about it.

A DDP model keeps the gloo process group, and its worker threads, alive past ``destroy_process_group``. A worker
that has just finished a collective may still hold its tensors; dropping them takes the GIL, and a thread that asks
for the GIL while the interpreter is finalising is ended mid-destructor: the rank aborts with "terminate called
without an active exception" (SIGABRT), and torchrun fails the whole job. It is rare on an idle machine and common on
a busy one, so this script keeps every core busy with spinning processes while it runs.

Each run is ``torchrun --standalone --nproc_per_node 2`` of a small DDP script that trains 20 steps, does one
all-reduce on a temporary tensor and ends (rank 0 half a second later than rank 1). Modes, as the script ends:

- ``plain``: nothing (what a script without headstart does).
- ``leave``: ``headstart.hardware.leave_group_at_exit()`` (what ``headstart.train`` in a user's script gets).
- ``exit``: ``headstart.hardware.exit_process(0)`` (what the ``headstart`` command line does).

    python benchmarks/torchrun_exit.py [--runs 30] [--modes plain,leave,exit] [--busy 2]

Prints runs, aborts and other failures per mode; results go to ``benchmarks/results/torchrun_exit_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPT = """
import os, sys, time, torch, torch.distributed as dist
torch.set_num_threads(1)
mode = sys.argv[1]
if mode == "leave":
    from headstart.hardware import leave_group_at_exit
dist.init_process_group("gloo")
rank = dist.get_rank()
if mode == "leave":
    leave_group_at_exit()
model = torch.nn.parallel.DistributedDataParallel(
    torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 2)))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(20):
    model(torch.randn(32, 64)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
dist.all_reduce(torch.ones(1))  # its tensor is a temporary: only the gloo worker still holds it
if rank == 0:
    time.sleep(0.5)
if mode == "exit":
    from headstart.hardware import exit_process
    exit_process(0)
"""

RESULTS = Path(__file__).parent / "results" / "torchrun_exit_cpu.json"


def run_mode(mode: str, runs: int, script: Path) -> dict[str, object]:
    """``runs`` launches of ``script`` in ``mode``: how many aborted, how many failed otherwise, seconds per run."""
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    aborted = failed = 0
    tic = time.perf_counter()
    for _ in range(runs):
        proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(script), mode],
                              capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
        if "terminate called" in proc.stderr or "exitcode: -6" in proc.stderr:
            aborted += 1
        elif proc.returncode != 0:
            failed += 1
            print(proc.stderr[-1500:], file=sys.stderr)
    seconds = (time.perf_counter() - tic) / runs
    return {"mode": mode, "runs": runs, "aborted": aborted, "other_failures": failed, "seconds_per_run": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--modes", default="plain,leave,exit")
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 1, help="spinning processes beside the runs")
    args = parser.parse_args()
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    rows = []
    try:
        with tempfile.TemporaryDirectory() as work:
            script = Path(work) / "ddp_exit.py"
            script.write_text(SCRIPT)
            for mode in args.modes.split(","):
                row = run_mode(mode, args.runs, script)
                rows.append(row)
                counts = f"runs {row['runs']:3d}  aborted {row['aborted']:3d}  other failures {row['other_failures']}"
                print(f"{mode:6s} {counts}  {row['seconds_per_run']:.1f} s/run", flush=True)
    finally:
        for spinner in spinners:
            spinner.kill()
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "busy": args.busy}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
