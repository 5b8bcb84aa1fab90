"""Failures at the CLI boundary: a bad config, a folder that cannot be written, a disk that fills during training.

Each ends in one line, ``headstart CMD: error: ...``, and exit code 2, never a traceback (``--debug`` shows it). A full
disk during training leaves the last checkpoint intact, and ``--resume`` finishes the run once there is space: tested
with a real small disk (a tmpfs, where mounting one is permitted) and with a file size limit (``RLIMIT_FSIZE``, which
needs no privilege: a write past it fails with EFBIG, as a write to a full disk fails with ENOSPC).
"""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from headstart.checksums import read_verified
from headstart.cli import main
from headstart.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "tiny_cnn", "--batch-size", "8", "--no-report"]


def cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI, expecting a user error: exit 2, one ``error:`` line, no traceback; returns that line."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    return lines[0]


# -- configs ---------------------------------------------------------------------------------------------------------

PYTHON_TAG = "strategy: extract\nrun: !!python/object/apply:os.system ['echo pwned']\n"


def test_yaml_with_a_python_tag_is_refused_by_the_real_command(tmp_path: Path) -> None:
    config = tmp_path / "evil.yaml"
    config.write_text(PYTHON_TAG)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HEADSTART_QUIET": "1"}
    env.pop("HEADSTART_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "headstart", "train", str(tmp_path), "--config", str(config)],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "pwned" not in done.stdout
    assert done.stderr.strip().splitlines()[-1] == (
        f"headstart train: error: {config}, line 2: the tag !!python/object/apply:os.system is refused: a config "
        "holds plain values (numbers, strings, lists, mappings), never Python objects; remove the tag"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("strategy: extract\nrun: {out: [1, 2\n", "line 3: not valid YAML"),
        ("strategy: extract\nrun: {outt: x}\n", "unknown key(s) ['outt']"),
        ("optim: {lr: fast}\n", "optim.lr must be float"),
        ("strategy: sideways\n", "unknown strategy 'sideways'"),
    ],
)
def test_config_problems_are_one_line(text: str, expected: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    config = tmp_path / "config.yaml"
    config.write_text(text)
    line = cli_error(["train", str(tmp_path), "--config", str(config)], capsys)
    assert line.startswith("headstart train: error: ") and str(config) in line and expected in line


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = cli_error(["train", str(tmp_path), "--config", str(tmp_path / "nope.yaml")], capsys)
    assert (
        line == f"headstart train: error: cannot read config file {tmp_path / 'nope.yaml'}: No such file or directory"
    )


def test_debug_shows_the_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "evil.yaml"
    config.write_text(PYTHON_TAG)
    argv = ["train", str(tmp_path), "--config", str(config)]
    with pytest.raises(ConfigError, match="refused"):
        main(["--debug", *argv])
    with pytest.raises(ConfigError):
        main([*argv, "--debug"])  # after the subcommand too
    monkeypatch.setenv("HEADSTART_DEBUG", "1")
    with pytest.raises(ConfigError):
        main(argv)
    monkeypatch.setenv("HEADSTART_DEBUG", "0")
    assert main(argv) == 2


def test_ctrl_c_is_one_line_and_exit_130(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from headstart.cli import app

    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setitem(app.COMMANDS, "train", interrupted)
    assert main(["train", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert "headstart train: interrupted" in err and "--resume RUN" in err and "Traceback" not in err
    with pytest.raises(KeyboardInterrupt):
        main(["train", str(tmp_path), "--debug"])


def test_debug_is_accepted_by_nested_subcommands(tmp_path: Path) -> None:
    with pytest.raises(Exception, match=r"meta\.json not found"):
        main(["index", "evaluate", str(tmp_path), "--debug"])


# -- folders that cannot be written ----------------------------------------------------------------------------------


def _mount_tmpfs(folder: Path, options: str) -> bool:
    """Mount a tmpfs on ``folder``; False where that is not permitted (no root, a container without the capability)."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


def _umount(folder: Path) -> None:
    subprocess.run(["umount", "-l", str(folder)], capture_output=True, check=False)


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder nobody here may write to: permissions for a normal user, a read-only tmpfs for root."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
    elif _mount_tmpfs(folder, "ro,size=1m"):
        try:
            yield folder
        finally:
            _umount(folder)
    else:
        pytest.skip("running as root where a read-only tmpfs cannot be mounted: permissions do not bind root")


def test_read_only_output_folder(read_only_folder: Path, image_folder: Path, tiny_weights: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = read_only_folder / "run"
    line = cli_error(["train", str(image_folder), "--strategy", "extract", *TINY, "--weights", str(tiny_weights),
                      "--out", str(out), "--cache-dir", str(tmp_path / "cache")], capsys)  # fmt: skip
    assert line.startswith(f"headstart train: error: cannot write {out}: ")
    assert "read-only" in line or "permission denied" in line


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (errno.EACCES, "permission denied; choose a folder you may write to"),
        (errno.EROFS, "the file system is read-only"),
    ],
)
def test_unwritable_output_anywhere(
    code: int, expected: str, image_folder: Path, tiny_weights: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The same failures without privileges: every file write goes through one function, made to fail here."""
    run = tmp_path / "run"
    assert main(["train", str(image_folder), "--strategy", "extract", *TINY, "--weights", str(tiny_weights),
                 "--out", str(run), "--cache-dir", str(tmp_path / "cache")]) == 0  # fmt: skip
    from headstart import files

    def refuse(*args: object, **kwargs: object) -> tuple[int, str]:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(files.tempfile, "mkstemp", refuse)
    predictions = tmp_path / "out" / "predictions.csv"
    line = cli_error(["predict", str(run), str(image_folder / "val"), "--output", str(predictions)], capsys)
    assert line.startswith(f"headstart predict: error: cannot write {predictions}: {expected}")
    assert not predictions.exists()


# -- a disk that fills during training -------------------------------------------------------------------------------


def _train_args(data: Path, weights: Path, run: Path, cache: Path) -> list[str]:
    return ["train", str(data), "--strategy", "finetune", *TINY, "--weights", str(weights), "--epochs", "3",
            "--out", str(run), "--cache-dir", str(cache)]  # fmt: skip


def _assert_resumable(run: Path, line: str, capsys: pytest.CaptureFixture[str]) -> None:
    """After a write failed: the message says how to go on, the checkpoint is the first epoch's and intact, no
    temporary file is left; then ``--resume`` finishes the run."""
    assert line.endswith(f"; the last checkpoint is intact: free some space, then continue with --resume {run}")
    data = read_verified(run, "checkpoints/last.pt", "")
    state = torch.load(io.BytesIO(data), weights_only=True)
    assert int(state["epoch"]) == 1
    assert not [p for p in run.rglob(".*") if p.is_file()], "temporary files left behind"
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    assert "Traceback" not in capsys.readouterr().err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [0, 1, 2, 3]
    read_verified(run, "model.safetensors", "")


def _fill(path: Path) -> None:
    """Write ``path`` until the disk has no room left."""
    with path.open("wb", buffering=0) as handle:
        for chunk in (1 << 20, 1 << 16, 1 << 12, 1):
            try:
                while True:
                    handle.write(b"\0" * chunk)
            except OSError as error:
                assert error.errno == errno.ENOSPC


def test_disk_full_on_a_small_real_disk(
    image_folder: Path, tiny_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from headstart.training.trainer import Trainer

    disk = tmp_path / "disk"
    disk.mkdir()
    if not _mount_tmpfs(disk, "size=16m"):
        pytest.skip("mounting a tmpfs is not permitted here; test_disk_full_by_a_file_size_limit covers the case")
    try:
        run, filler = disk / "run", disk / "filler"
        real = Trainer.save_checkpoint

        def save_then_fill(self: Trainer, *args: object, **kwargs: object) -> None:
            real(self, *args, **kwargs)  # type: ignore[arg-type]
            if not filler.exists():
                _fill(filler)  # the disk fills up after the first checkpoint

        monkeypatch.setattr(Trainer, "save_checkpoint", save_then_fill)
        line = cli_error(_train_args(image_folder, tiny_weights, run, tmp_path / "cache"), capsys)
        assert line.startswith("headstart train: error: cannot write ") and "the disk is full" in line
        monkeypatch.undo()
        filler.unlink()  # space is freed
        _assert_resumable(run, line, capsys)
    finally:
        _umount(disk)


# Runs headstart's CLI with a file size limit that starts after the first checkpoint: the next checkpoint is larger
# than the limit (a model file, a third of its size, and the small files still fit).
LIMITED = """
import resource, signal, sys
from headstart.cli.app import main
from headstart.training.trainer import Trainer

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead of killing us
real = Trainer.save_checkpoint

def save_then_limit(self, *args, **kwargs):
    real(self, *args, **kwargs)
    size = self._checkpoint_path().stat().st_size
    resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

Trainer.save_checkpoint = save_then_limit
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_disk_full_by_a_file_size_limit(image_folder: Path, tiny_weights: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HEADSTART_QUIET": "1"}
    env.pop("HEADSTART_DEBUG", None)
    argv = _train_args(image_folder, tiny_weights, run, tmp_path / "cache")
    done = subprocess.run([sys.executable, "-c", LIMITED, *argv], capture_output=True, text=True, env=env,
                          timeout=600)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("headstart train: error: cannot write ") and "exceed the file size limit" in line
    _assert_resumable(run, line, capsys)
