"""Files: atomic writes, safetensors files, the library versions recorded with every saved file, the cache root, new
run folders.

Every file headstart writes goes through :func:`atomic_write_bytes` (or :func:`stage` and :func:`commit`, for several
files at once): a write either replaces the file whole or leaves the previous one untouched, and a failure the user
can fix (disk full, permission denied, read-only folder, file size limit) becomes a :class:`StorageError` naming the
file and what to do.
"""

from __future__ import annotations

import errno
import functools
import os
import platform
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from headstart.errors import StorageError


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
            try:
                shutil.rmtree(path)
            except OSError as error:
                raise storage_error(error, path) from error
        make_folder(path)
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


def make_folder(path: Path) -> None:
    """``mkdir -p``, with a :class:`StorageError` naming the folder when it cannot be made."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise storage_error(error, path) from error


def atomic_write_bytes(path: Path, data: bytes, sync: bool = True) -> None:
    """Write a file so that a crash or a failed write leaves either the old file or the new one, never a torn one.

    Args:
        path: the file.
        data: its new contents.
        sync: flush the file to the disk before it replaces the old one, so that it also survives a power cut; logs
            that are rewritten whole (``metrics.jsonl``) can skip the wait.

    Raises:
        StorageError: the file cannot be written (disk full, permission denied, read-only folder, size limit); the
            previous file, if any, is untouched and no temporary file is left behind.
    """
    commit([stage(path, data, sync)])


# A file's contents: its bytes, or a function that writes the file at the path it is given (safetensors streams
# tensors to a file; building the same bytes in memory first costs twice the time).
Content = bytes | Callable[[str], None]


def stage(path: Path, content: Content, sync: bool = True) -> tuple[Path, Path]:
    """Write ``content`` to a temporary file beside ``path`` (and flush it to the disk unless ``sync`` is False: then
    call :func:`flush`); :func:`commit` puts it in place.

    Writing every file of a group first means that a full disk stops the group before any file has changed.

    Returns:
        (temporary file, destination).

    Raises:
        StorageError: as for :func:`atomic_write_bytes`; the temporary file is removed.
    """
    make_folder(path.parent)
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        if isinstance(content, bytes):
            with os.fdopen(fd, "wb") as handle:
                handle.write(content)
        else:
            os.close(fd)
            content(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes private files; a saved model is as readable as any other
        if sync:
            _fsync(Path(tmp))
    except BaseException as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        failure = _os_error(error)
        if failure is not None:
            raise storage_error(failure, path) from error
        raise
    return Path(tmp), path


def flush(staged: list[tuple[Path, Path]]) -> None:
    """Flush staged files to the disk (where a full disk may still show: file systems allocate late).

    Raises:
        StorageError: as for :func:`atomic_write_bytes`; every staged file is removed.
    """
    for tmp, path in staged:
        try:
            _fsync(tmp)
        except OSError as error:
            discard(staged)
            raise storage_error(error, path) from error


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _os_error(error: BaseException) -> OSError | None:
    """The operating-system error behind ``error``: itself, or one a library reports in its message the way Rust's
    ``std::io::Error`` prints (safetensors: "I/O error: No space left on device (os error 28)")."""
    if isinstance(error, OSError):
        return error
    match = re.search(r"\(os error (\d+)\)", str(error))
    return OSError(int(match[1]), os.strerror(int(match[1]))) if match else None


def commit(staged: list[tuple[Path, Path]]) -> None:
    """Move staged files into place, in order (renames: they need no space); on failure, remove what is left."""
    try:
        for tmp, path in staged:
            try:
                os.replace(tmp, path)
            except OSError as error:
                raise storage_error(error, path) from error
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)


def discard(staged: list[tuple[Path, Path]]) -> None:
    """Remove staged files that will not be committed."""
    for tmp, _ in staged:
        tmp.unlink(missing_ok=True)


def tensor_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Callable[[str], None]:
    """What writes tensors as a safetensors file (on the CPU, contiguous), for :func:`stage`."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return functools.partial(save_file, flat, metadata=metadata)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Atomically write tensors as safetensors."""
    commit([stage(path, tensor_file(tensors, metadata))])


def storage_error(error: OSError, path: Path) -> StorageError:
    """A :class:`StorageError` naming ``path``, saying what went wrong and what to do, for an ``OSError`` of a write.

    It keeps the ``errno`` of ``error``, so callers can still tell a full disk from a read-only one.
    """
    if isinstance(error, StorageError):
        return error
    what, todo = _WRITE_FAILURES.get(error.errno or 0, (error.strerror or str(error), "check the folder and try again"))
    failure = StorageError(f"cannot write {path}: {what}; {todo}")
    failure.errno = error.errno  # (not filename: OSError's text would then be built from errno and filename)
    failure.reason = f"cannot write {path}: {what}"
    return failure


# errno -> (what went wrong, what to do): the failures of a write that are the user's to fix.
_WRITE_FAILURES = {
    errno.ENOSPC: ("no space left on the device (the disk is full)", "free some space and run the command again"),
    errno.EDQUOT: ("the disk quota is exceeded", "free some space and run the command again"),
    errno.EFBIG: ("the file would exceed the file size limit", "write to another disk, or raise the limit (ulimit -f)"),
    errno.EACCES: ("permission denied", "choose a folder you may write to, or change this one's permissions"),
    errno.EPERM: ("operation not permitted", "choose a folder you may write to, or change this one's permissions"),
    errno.EROFS: ("the file system is read-only", "choose a folder on a writable disk"),
}


# The errors above that only a write can cause (permission errors can also come from reading).
WRITE_ONLY_FAILURES = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


@functools.cache
def _umask() -> int:
    """The process's umask, read once (reading it means setting it and setting it back, which is not thread-safe)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
