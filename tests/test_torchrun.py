"""The README's scale-out commands, run as written: ``torchrun --standalone --nproc_per_node 2 -m headstart ...``.

On the bundled backbone and a slice of the real ants/bees set, each command must finish on every rank (bounded by a
timeout: a rank that hangs or leaves early fails the test) with the model a single process writes. A rank that fails
on purpose (an exception, a SIGKILL) must take the whole job down quickly, with a message naming the rank and cause.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TORCHRUN = Path(sys.executable).parent / "torchrun"
LAUNCH = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "headstart"]
SINGLE = [sys.executable, "-m", "headstart"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HEADSTART_QUIET": "1"}

# Planted in rank 1 through sitecustomize: the first feature pass of that rank fails, the other rank goes on.
FAIL_RANK_ONE = """
import os
if os.environ.get("RANK") == "1":
    import importlib, signal
    for name in ("headstart.features.embeddings", "headstart.embeddings"):
        try:
            module = importlib.import_module(name)
            break
        except ImportError:
            continue
    def fail(*args, **kwargs):
        if os.environ["HEADSTART_PLANT"] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError("planted failure in the feature pass")
    module.run_model = fail
"""


def run_bounded(command: list[str], timeout: float, env: dict[str, str] | None = None) -> tuple[int, str, float]:
    """Run ``command`` in its own process group; (exit code, stdout+stderr, seconds). A hang past ``timeout`` kills
    the whole group (torchrun and every rank) and fails the test."""
    tic = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env or ENV, start_new_session=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(command[:8])} ... did not finish within {timeout} s (a rank hangs):\n{out[-3000:]}")
    return proc.returncode, out, time.perf_counter() - tic


@pytest.fixture(scope="module")
def ants_bees_slice(hymenoptera: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CSV manifest over a slice of the real set: 24 train and 16 val images per class, plus the placeholder."""
    rows = []
    for split, count in (("train", 24), ("val", 16)):
        for label in ("ants", "bees"):
            files = sorted(p for p in (hymenoptera / split / label).iterdir() if p.suffix.lower() == ".jpg")
            rows += [(str(p), label, split) for p in files[:count]]
    rows.append((str(hymenoptera / "train" / "ants" / "imageNotFound.gif"), "ants", "train"))
    manifest = tmp_path_factory.mktemp("slice") / "ants_bees.csv"
    with manifest.open("w", newline="") as handle:
        csv.writer(handle).writerows([("path", "label", "split"), *rows])
    return manifest


def _model(run: Path) -> dict[str, object]:
    return json.loads((run / "model.json").read_text())


@pytest.mark.parametrize("strategy", ["extract", "finetune"])
def test_readme_torchrun_train_matches_one_process(strategy: str, ants_bees_slice: Path, tmp_path: Path) -> None:
    args = ["train", str(ants_bees_slice), "--strategy", strategy, "--no-report", "--epochs", "1"]
    one, two = tmp_path / "one", tmp_path / "two"
    code, out, _ = run_bounded([*SINGLE, *args, "--out", str(one), "--cache-dir", str(tmp_path / "c1")], 600)
    assert code == 0, out[-3000:]
    code, out, _ = run_bounded([*LAUNCH, *args, "--out", str(two), "--cache-dir", str(tmp_path / "c2")], 600)
    assert code == 0, out[-3000:]
    assert out.count("val accuracy") >= 1 and "model in" in out  # rank 0 printed its result
    a, b = _model(one), _model(two)
    assert a["classes"] == b["classes"] == ["ants", "bees"]
    n_val = 32
    accuracy_one = a["val_metrics"]["accuracy"]  # type: ignore[index]
    accuracy_two = b["val_metrics"]["accuracy"]  # type: ignore[index]
    assert abs(accuracy_one - accuracy_two) <= 1 / n_val + 1e-9, (accuracy_one, accuracy_two)
    assert accuracy_two >= 0.75  # the real pretrained features, not a broken model
    assert "imageNotFound.gif" in (two / "skipped_files.txt").read_text()
    # both ranks took part in the feature pass: together they cached every readable image once
    assert len(list((tmp_path / "c2").rglob("*.f32"))) == 80


def test_readme_torchrun_compare_and_embed(ants_bees_slice: Path, tmp_path: Path) -> None:
    compare = ["compare", str(ants_bees_slice), "--strategies", "extract", "--seeds", "1", "--out",
               str(tmp_path / "cmp")]  # fmt: skip
    code, out, _ = run_bounded([*LAUNCH, *compare], 600)
    assert code == 0, out[-3000:]
    assert (tmp_path / "cmp" / "report.html").is_file()
    assert (tmp_path / "cmp" / "extract-seed0" / "model.json").is_file()
    embed = ["embed", str(ants_bees_slice), "--out", str(tmp_path / "emb"), "--cache-dir", str(tmp_path / "c3")]
    code, out, _ = run_bounded([*LAUNCH, *embed], 600)
    assert code == 0, out[-3000:]
    assert out.count("wrote 80 x 1280 embeddings") == 1


@pytest.mark.parametrize("plant", ["exception", "kill"])
def test_a_failing_rank_stops_the_job_naming_rank_and_cause(plant: str, ants_bees_slice: Path,
                                                             tmp_path: Path) -> None:  # fmt: skip
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAIL_RANK_ONE)
    env = {**ENV, "HEADSTART_PLANT": plant, "PYTHONPATH": os.pathsep.join([str(hook), ENV.get("PYTHONPATH", "")])}
    args = ["train", str(ants_bees_slice), "--strategy", "extract", "--no-report", "--out", str(tmp_path / "run"),
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    code, out, seconds = run_bounded([*LAUNCH, *args], 300, env=env)
    assert code != 0, out[-3000:]
    assert seconds < 180, f"the job took {seconds:.0f} s to stop after rank 1 failed"
    # torchrun's summary names the first rank that failed and how
    cause = "exitcode  : 1" if plant == "exception" else "SIGKILL"
    assert re.search(rf"Root Cause.*?rank\s*: 1 \(local_rank: 1\).*?{cause}", out, re.DOTALL), out[-3000:]
    if plant == "exception":  # and headstart's own line, before the traceback, says why
        assert "headstart train (rank 1 of 2): failed: RuntimeError: planted failure in the feature pass" in out
    assert not (tmp_path / "run" / "model.safetensors").exists()  # nothing half-written passes for a model


EXIT_SCRIPT = """
import atexit, os, sys
from headstart.hardware import exit_process

class Finalised:
    def __del__(self, write=os.write):
        write(2, b"finalised")

KEEP = Finalised()  # a module global: only the interpreter's finalisation deletes it
atexit.register(lambda: open(sys.argv[1], "w").write("exit handlers ran"))
sys.stdout.write("buffered, not yet flushed")
exit_process(3)
"""


@pytest.mark.parametrize("world", ["1", "2"])
def test_exit_process_skips_finalisation_only_under_a_launch(world: str, tmp_path: Path) -> None:
    # A rank of a launch must not reach finalisation, where gloo's threads (kept alive by DDP) abort the process;
    # the exit handlers, the buffered output and the exit status must survive that shortcut.
    marker = tmp_path / "handlers.txt"
    env = {**ENV, "WORLD_SIZE": world, "RANK": "0"}
    proc = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(marker)], capture_output=True, text=True,
                          env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert marker.read_text() == "exit handlers ran"
    assert proc.stdout == "buffered, not yet flushed"
    assert ("finalised" in proc.stderr) is (world == "1"), proc.stderr[-2000:]
