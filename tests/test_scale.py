"""Never lose work, and scale out: SIGKILL mid-epoch then resume, atomic checkpoints, 2-process CPU (gloo) DDP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import headstart

# Deterministic CPU mode: fp32, seeded, with augmentation and dropout on, so that RNG restoration is exercised.
SETTINGS = dict(strategy="scratch", backbone="tiny_cnn", epochs=3, batch_size=4, num_workers=0, precision="fp32",
                deterministic=True, **{"run.checkpoint_every": 1, "run.audit": False, "run.report": False})  # fmt: skip

TRAIN = """
import os, signal, sys
os.environ["HEADSTART_QUIET"] = "1"
import torch
torch.set_num_threads(1)
import headstart
from headstart.training import trainer
kill_at = int(sys.argv[3])
mode = sys.argv[4]
if kill_at:
    original = trainer.Trainer.save_checkpoint
    def save_then_die(self, batches_done, totals=(0.0, 0.0, 0)):
        if mode == "during-write" and self.step == kill_at:
            real_replace = os.replace
            def die(*args):  # the new checkpoint is fully written to a temporary file but not yet renamed
                os.kill(os.getpid(), signal.SIGKILL)
            os.replace = die
        original(self, batches_done, totals)
        if mode == "after-write" and self.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    trainer.Trainer.save_checkpoint = save_then_die
settings = {settings}
if sys.argv[1] == "resume":
    headstart.resume(sys.argv[2])
else:
    headstart.train(sys.argv[1], out=sys.argv[2], **settings)
"""


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    code = TRAIN.replace("{settings}", repr(SETTINGS))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]


def _rows(run: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One uninterrupted run, shared by the kill tests: (data, run folder)."""
    from conftest import make_folder

    root = tmp_path_factory.mktemp("reference")
    data = make_folder(root / "data", {"train": 10, "val": 5})
    proc = _run(str(data), str(root / "run"), "0", "none")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return data, root / "run"


@pytest.mark.parametrize("mode", ["after-write", "during-write"])
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(
    mode: str, reference_run: tuple[Path, Path], tmp_path: Path
) -> None:
    image_folder, reference = reference_run
    killed = tmp_path / "killed"
    # 20 training images at batch 4: 5 steps per epoch; step 8 is the third batch of epoch 2.
    proc = _run(str(image_folder), str(killed), "8", mode)
    assert proc.returncode == -9, proc.stderr[-2000:]
    state = torch.load(killed / "checkpoints" / "last.pt", weights_only=True)
    expected_step = 8 if mode == "after-write" else 7  # a write cut short leaves the previous checkpoint intact
    assert state["step"] == expected_step and state["epoch"] == 1 and state["batches_done"] == expected_step - 5
    assert not any(p.name.startswith(".last.pt") for p in (killed / "checkpoints").iterdir()) or mode == "during-write"
    resumed = _run("resume", str(killed), "0", "none")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final_ref, final_res = _final_weights(reference), _final_weights(killed)
    assert final_ref.keys() == final_res.keys()
    for key in final_ref:
        torch.testing.assert_close(final_res[key], final_ref[key], rtol=0, atol=1e-6, msg=key)
    ref_rows, res_rows = _rows(reference), _rows(killed)
    assert [r["epoch"] for r in res_rows] == [1, 2, 3]
    for a, b in zip(ref_rows, res_rows, strict=True):
        for key in ("train_loss", "train_accuracy", "accuracy", "loss"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key


def test_resume_without_checkpoint_is_a_clear_error(image_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.yaml"):
        headstart.resume(tmp_path / "nothing")


DDP = """
import os, sys
os.environ["HEADSTART_QUIET"] = "1"
import torch
torch.set_num_threads(1)
from safetensors.torch import save_file
import headstart
result = headstart.train(sys.argv[1], out=sys.argv[2], **{settings})
rank = os.environ.get("RANK", "0")
save_file({k: v.contiguous() for k, v in result.model.state_dict().items()}, sys.argv[3] + f"/rank{rank}.safetensors")
"""


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")  # fmt: skip
def test_two_process_gloo_matches_one_process(image_folder: Path, tiny_weights: Path, tmp_path: Path) -> None:
    # no augmentation or dropout: each process draws its own random numbers, the single process only one stream
    quiet = {"optim.augment": "none", "model.drop_rate": 0.0, "run.audit": False, "run.report": False}
    settings = {
        "strategy": "finetune", "backbone": "tiny_cnn", "weights": str(tiny_weights), "epochs": 2, "batch_size": 8,
        "num_workers": 0, "precision": "fp32", "deterministic": True, "cache_dir": str(tmp_path / "cache"), **quiet,
    }  # fmt: skip
    code = DDP.replace("{settings}", repr(settings))
    script = tmp_path / "ddp_train.py"
    script.write_text(code)
    single, multi = tmp_path / "single", tmp_path / "multi"
    for folder in (single, multi):
        folder.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(script), str(image_folder), str(single / "run"), str(single)],
                         capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = str(Path(sys.executable).parent / "torchrun")
    command = [torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(image_folder), str(multi / "run")]
    two = subprocess.run([*command, str(multi)], capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    rank0, rank1 = load_file(str(multi / "rank0.safetensors")), load_file(str(multi / "rank1.safetensors"))
    reference = load_file(str(single / "rank0.safetensors"))
    for key in reference:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0, msg=f"ranks disagree on {key}")
        torch.testing.assert_close(rank0[key], reference[key], rtol=1e-4, atol=1e-5, msg=f"1 vs 2 processes: {key}")
    # only rank 0 wrote the run folder, and it is complete
    assert (multi / "run" / "model.safetensors").is_file() and (multi / "run" / "metrics.jsonl").is_file()
    rows = [json.loads(line) for line in (multi / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]


def one_and_two_processes(command: list[str], tmp_path: Path) -> str:
    """Run a headstart command as one process (``--out one``, cache ``c1``) and under torchrun with two (``two``,
    ``c2``); returns the two-process run's stdout."""
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HEADSTART_QUIET": "1"}
    single = subprocess.run([sys.executable, "-m", "headstart", *command, "--out", str(tmp_path / "one"),
                             "--cache-dir", str(tmp_path / "c1")], capture_output=True, text=True, env=env)  # fmt: skip
    assert single.returncode == 0, single.stderr[-2000:]
    # In its own process group: a hang past the timeout kills torchrun and every rank, and fails the test.
    multi = subprocess.Popen([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "headstart", *command, "--out",
                              str(tmp_path / "two"), "--cache-dir", str(tmp_path / "c2")], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = multi.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(multi.pid, 9)
        stdout, stderr = multi.communicate()
        pytest.fail(f"torchrun {' '.join(command[:2])} did not finish within 300 s (a rank hangs):\n{stderr[-3000:]}")
    assert multi.returncode == 0, stderr[-3000:]
    return stdout


def test_embed_shards_across_two_processes_and_merges_in_order(image_folder: Path, tiny_weights: Path,
                                                                tmp_path: Path) -> None:  # fmt: skip
    import numpy as np

    from headstart.features.embeddings import load_embeddings

    out = one_and_two_processes(["embed", str(image_folder), "--backbone", "tiny_cnn", "--weights", str(tiny_weights),
                                 "--precision", "fp32", "--shard-size", "8"], tmp_path)  # fmt: skip
    assert out.count("wrote 30 x 64 embeddings") == 1  # rank 0 reports
    (one, rows_one, _), (two, rows_two, meta) = load_embeddings(tmp_path / "one"), load_embeddings(tmp_path / "two")
    assert one.shape == two.shape == (30, 64)
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-5)
    assert rows_one == rows_two  # the shards, read in order, are the input order
    # each rank wrote its own shards (shard k on rank k % 2), nothing was gathered into one process
    ranks = [json.loads((tmp_path / "two" / "shards" / s["name"] / "shard.json").read_text())["rank"]
             for s in meta["shards"]]  # fmt: skip
    assert ranks == [0, 1, 0, 1]
    # each rank computed and cached its own share: together, every image once
    assert len(list((tmp_path / "c2").rglob("*.f32"))) == 30


def test_index_build_shards_across_two_processes(image_folder: Path, tiny_weights: Path, tmp_path: Path) -> None:
    import numpy as np

    from headstart.features.retrieval import ImageIndex

    out = one_and_two_processes(["index", "build", str(image_folder), "--backbone", "tiny_cnn", "--weights",
                                 str(tiny_weights), "--precision", "fp32", "--shard-size", "8"], tmp_path)  # fmt: skip
    assert out.count("indexed 30 images") == 1  # one rank reports (and writes)
    one, two = ImageIndex.load(tmp_path / "one"), ImageIndex.load(tmp_path / "two")
    assert len(one) == len(two) == 30
    ids = np.arange(30)
    np.testing.assert_allclose(two.vectors(ids), one.vectors(ids), rtol=0, atol=1e-5)
    assert one.items == two.items  # same (path, label, digest) under the same ids: merged in input order
    assert len(list((tmp_path / "c2").rglob("*.f32"))) == 30  # each rank embedded its share, every image once
    shards = sorted((tmp_path / "two" / "embeddings" / "shards").iterdir())
    assert [json.loads((s / "shard.json").read_text())["rank"] for s in shards] == [0, 1, 0, 1]
