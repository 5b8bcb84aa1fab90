"""Files: atomic writes, safetensors files, the library versions recorded with every saved file, the cache root, new
run folders."""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file


def default_cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir``, else ``$HEADSTART_CACHE``, else ``~/.cache/headstart``."""
    root = cache_dir or os.environ.get("HEADSTART_CACHE") or Path.home() / ".cache" / "headstart"
    return Path(root).expanduser()


def installed_version(package: str, missing: str = "not installed") -> str:
    """The installed version of ``package``, read from its metadata (no import), or ``missing`` when it is absent."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return missing


def new_run_dir(out: str | os.PathLike[str] | None, name: str, overwrite: bool, create: bool = True) -> Path:
    """The folder a new run writes into: ``out``, else ``runs/<name>-<date>-<time>``.

    Args:
        out: the folder asked for, if any.
        name: start of the default folder's name, e.g. ``finetune-resnet50``; ``/`` and ``:`` become ``_``.
        overwrite: empty a folder that already holds files instead of refusing it.
        create: check, empty and make the folder. Under a multi-process launch only the first process does; the
            others just need the path.
    """
    if out:
        path = Path(out)
    else:
        safe = name.replace("/", "_").replace(":", "_")
        path = Path("runs") / f"{safe}-{time.strftime('%Y%m%d-%H%M%S')}"
    if create:
        if path.exists() and any(path.iterdir()):
            if not overwrite:
                raise FileExistsError(f"run folder {path} already exists; pass --overwrite or choose another --out")
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
    return path


def versions() -> dict[str, str]:
    """Library versions recorded with every model (read from the installed metadata: importing timm and torchvision
    to ask them would cost seconds)."""
    from headstart._version import __version__

    return {
        "headstart": __version__,
        "torch": torch.__version__,
        "torchvision": installed_version("torchvision"),
        "timm": installed_version("timm"),
        "python": platform.python_version(),
    }


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that a crash leaves either the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Atomically write tensors as safetensors."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
