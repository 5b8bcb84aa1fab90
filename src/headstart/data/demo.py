"""The demo dataset (the PyTorch tutorial's ants and bees): found locally, or downloaded once into a cache."""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from headstart import progress

HYMENOPTERA_URL = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"
HYMENOPTERA_DIR = "hymenoptera_data"
# Places a copy may already be: an explicit variable, a shared folder beside the checkout, the working directory.
LOCAL_CANDIDATES = ("../shared/datasets", "shared/datasets", "data", ".")


def _valid(folder: Path) -> bool:
    return (folder / "train").is_dir() and (folder / "val").is_dir()


def find_local(name: str = HYMENOPTERA_DIR) -> Path | None:
    """A local copy: ``$HEADSTART_DATA/<name>``, then the candidate folders relative to the working directory."""
    roots = [os.environ["HEADSTART_DATA"]] if os.environ.get("HEADSTART_DATA") else []
    for root in [*roots, *LOCAL_CANDIDATES]:
        folder = Path(root).expanduser() / name
        if _valid(folder):
            return folder.resolve()
    return None


def download_and_extract(url: str, dest_root: Path, name: str = HYMENOPTERA_DIR, timeout: float = 60.0) -> Path:
    """Download a zip archive and extract it into ``dest_root`` (atomically; refuses paths escaping the folder).

    Returns:
        ``dest_root / name``.
    """
    dest_root.mkdir(parents=True, exist_ok=True)
    target = dest_root / name
    if _valid(target):
        return target
    with tempfile.TemporaryDirectory(dir=dest_root, prefix=".download-") as tmp:
        archive = Path(tmp) / "archive.zip"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, archive.open("wb") as handle:
                total = int(response.headers.get("Content-Length") or 0)
                with progress.bar() as bars:
                    task = bars.add_task(f"downloading {url.rsplit('/', 1)[-1]}", total=total or None, info="")
                    while block := response.read(1 << 16):
                        handle.write(block)
                        bars.update(task, advance=len(block))
        except OSError as error:
            raise ConnectionError(
                f"could not download {url} ({error}); download it by hand and unzip it into {dest_root}, "
                "or set HEADSTART_DATA to a folder that contains it"
            ) from error
        try:
            with zipfile.ZipFile(archive) as zf:
                staging = Path(tmp) / "x"
                inside = staging.resolve()
                for member in zf.namelist():
                    # Path containment, not a string prefix: "../x-evil" would pass a startswith check on ".../x".
                    if not (staging / member).resolve().is_relative_to(inside):
                        raise ValueError(f"{url}: archive member {member!r} escapes the extraction folder")
                zf.extractall(staging)
        except zipfile.BadZipFile as error:
            raise ValueError(f"{url} is not a valid zip archive ({error})") from error
        found = staging / name
        if not _valid(found):
            raise ValueError(f"{url}: archive has no {name}/train and {name}/val folders")
        shutil.move(str(found), str(target))
    return target


def hymenoptera(cache_dir: Path | None = None, url: str = HYMENOPTERA_URL) -> Path:
    """The ants/bees folder: a local copy when there is one, else downloaded into ``<cache>/datasets``."""
    local = find_local()
    if local is not None:
        return local
    from headstart.files import default_cache_root

    return download_and_extract(url, (cache_dir or default_cache_root()) / "datasets")
