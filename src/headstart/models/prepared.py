"""Built backbones kept on disk, so that a run whose features are all cached never builds a network.

Building a pretrained backbone means importing timm (about 1.5 s on a small CPU), constructing the architecture and
reading and converting its weight file. The first build of a (name, weights) pair stores the result in the cache
folder: every tensor as safetensors, with what the feature cache needs to know (feature width, preprocessing, weights
fingerprint) in the file's metadata. :class:`PreparedBackbone` stands in for the backbone from that description:
feature-cache lookups need nothing else, a model file is written from the stored tensors, and the network is built
(by the ordinary :func:`~headstart.models.backbones.create_backbone`) only when some image has to go through it.

An entry is keyed by what decides the weights: the backbone name, the timm/torchvision version that defines the
architecture, and the weights' identity (the bundled package's checksum, a weight file's path, size and modification
time, or the hub name). Its tensors are checked against the stored fingerprint whenever they are read; a corrupt or
stale entry is deleted and rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from headstart import progress
from headstart.data.transforms import Preprocessing
from headstart.errors import StorageError
from headstart.files import installed_version, save_tensors
from headstart.hardware import launch_rank
from headstart.models.backbones import (
    TORCHVISION_PREFIX,
    Backbone,
    create_backbone,
    ensemble_members,
    fingerprint_tensors,
)
from headstart.models.weights import BUNDLED

FORMAT = "2"  # bump when the stored layout or the key changes (2: torchvision Inception scaling, timm widths)


def source_key(name: str, weights: str | None) -> str | None:
    """Identity of the pretrained backbone ``create_backbone(name, weights=weights)`` builds; None when not storable.

    Prefixed names (``ae:``, ``run:``) are left out: they are run folders, with caches of their own.
    """
    if ":" in name or (name == "tiny_cnn" and weights is None):
        return None
    library = "torchvision" if name.startswith(TORCHVISION_PREFIX) else "timm"
    parts = [FORMAT, name, f"{library}={installed_version(library, missing='none')}"]  # "none": the key's old text
    if weights is not None:
        path = Path(weights).expanduser().resolve()
        try:
            stat = path.stat()
        except OSError:
            return None  # create_backbone will report the missing file
        parts.append(f"file={path}:{stat.st_size}:{stat.st_mtime_ns}")
    elif all(member in BUNDLED for member in ensemble_members(name)):
        parts += [f"bundled={BUNDLED[member].sha256}" for member in ensemble_members(name)]
    else:
        parts.append("hub")
    return "|".join(parts)


def _entry_path(root: Path, name: str, key: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:40]
    return root / "backbones" / f"{safe}-{hashlib.blake2b(key.encode(), digest_size=8).hexdigest()}.safetensors"


class PreparedBackbone:
    """A pretrained backbone known by its stored description and tensors; the network is built on first need.

    It answers what :func:`~headstart.features.embeddings.embed` and a model file need (``name``, ``num_features``,
    ``preprocessing``, ``weights_source``, ``fingerprint()``, ``state_dict()``) without timm; :meth:`network`
    builds the real :class:`~headstart.models.backbones.Backbone`.
    """

    def __init__(self, path: Path, name: str, weights: str | None, meta: dict[str, str]):
        self.path = path
        self.name = name
        self.weights = weights
        self.num_features = int(meta["num_features"])
        self.preprocessing = Preprocessing.from_dict(json.loads(meta["preprocessing"]))
        self.weights_source = meta["weights_source"]
        self._fingerprint = meta["fingerprint"]
        self.built: Backbone | None = None

    def fingerprint(self) -> str:
        """The weights fingerprint (the built network's, once built)."""
        return self.built.fingerprint() if self.built is not None else self._fingerprint

    def network(self) -> Backbone:
        """The real backbone, built once with this object's preprocessing.

        Should the build's weights differ from the stored ones (a weight file replaced with the same size and
        time), or the entry be gone (deleted as corrupt), the entry is written again from the build, which wins.
        """
        if self.built is None:
            built = create_backbone(self.name, pretrained=True, weights=self.weights)
            if built.fingerprint() != self._fingerprint or not self.path.is_file():
                store(built, self.path)
            built.preprocessing = self.preprocessing
            self.built = built
        return self.built

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor of the backbone, keyed as in ``Backbone.state_dict()``; verified against the fingerprint."""
        if self.built is not None:
            return self.built.state_dict()
        try:
            tensors = load_file(str(self.path))
        except (OSError, SafetensorError):
            tensors = {}
        if fingerprint_tensors(self.name, tensors) != self._fingerprint:
            _discard(self.path)  # corrupt: rebuild, never use
            return self.network().state_dict()
        return tensors


def _discard(path: Path) -> None:
    """Delete a damaged entry, saying so (it is rebuilt: nothing is lost but the time)."""
    if path.is_file():
        progress.log(f"[yellow]prepared-backbone cache: {path} is damaged; discarded, and rebuilt from the weights")
        path.unlink(missing_ok=True)


def store(backbone: Backbone, path: Path) -> None:
    """Write a built backbone's tensors and description to ``path`` atomically; the cache only saves time, so a
    failed write (disk full, read-only) is a note, not an error."""
    meta = {
        "format": FORMAT,
        "name": backbone.name,
        "num_features": str(backbone.num_features),
        "preprocessing": json.dumps(backbone.preprocessing.to_dict()),
        "weights_source": backbone.weights_source,
        "fingerprint": backbone.fingerprint(),
    }
    try:
        save_tensors(backbone.state_dict(), path, metadata=meta)
    except StorageError as error:
        progress.log(f"[yellow]prepared-backbone cache not written ({error}); the backbone will be built again next "
                     "time (or make room with `headstart cache clear`)")  # fmt: skip


def load_backbone(name: str, weights: str | None, cache_root: Path) -> Backbone | PreparedBackbone:
    """The stored description of a pretrained backbone when there is one, else the built backbone (then stored).

    Args:
        name: registry name.
        weights: explicit weight file, as for :func:`~headstart.models.backbones.create_backbone`.
        cache_root: the cache folder (``backbones/`` inside it holds the entries).
    """
    key = source_key(name, weights)
    if key is None:
        return create_backbone(name, pretrained=True, weights=weights)
    path = _entry_path(cache_root, name, key)
    meta: dict[str, str] | None = None
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata()
    except (OSError, SafetensorError):
        meta = None
    if meta and meta.get("format") == FORMAT and meta.get("name") == name:
        try:
            return PreparedBackbone(path, name, weights, meta)
        except (KeyError, ValueError, TypeError):
            _discard(path)  # an unreadable description: built and stored again below
    elif path.is_file() and meta is None:
        _discard(path)  # a torn or damaged file (another format or name is a key clash, replaced without a word)
    built = create_backbone(name, pretrained=True, weights=weights)
    if launch_rank() == 0:  # one writer under a multi-process launch
        store(built, path)
    return built
