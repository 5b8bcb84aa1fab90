"""An exported ONNX classifier (fp32 or int8, ``headstart export``) as a PyTorch module, so that the code that runs a
model (batched inference, ``predict``, ``evaluate``, the service) runs the exported file the same way.

The file's own metadata says what it is (classes, preprocessing, backbone, precision); besides it only the folder's
``checksums.json`` is read, to check the file as every export is checked. Each process makes its own onnxruntime
session, on first use, and keeps it: a session made before a fork would reach the DataLoader's worker processes
without its thread pool.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from headstart.checksums import verify
from headstart.data.transforms import Preprocessing
from headstart.hardware import int8_saturates


class ExportedClassifier(nn.Module):
    """Normalised float32 NCHW batch -> class logits [B, C], computed by onnxruntime on the CPU from an ONNX export.

    Attributes:
        path: the ONNX file.
        meta: its headstart metadata, JSON values decoded.
    """

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)
        session = _open(self.path)
        self.meta = _metadata(self.path, session)
        if self.meta.get("what") != "classifier":
            raise ValueError(
                f"{self.path} is an exported {self.meta.get('what')}, not a classifier; load the classifier export "
                "(headstart export RUN --what classifier) or the run folder"
            )
        if self.meta["input"].get("dtype") != "float32":
            raise ValueError(
                f"{self.path} takes {self.meta['input'].get('dtype')} pixels; headstart feeds normalised float32, so "
                "load an export made with --input float (the default)"
            )
        self._sessions: dict[int, Any] = {os.getpid(): session}  # process id -> its session (see the module doc)
        _warn_if_saturating(self.path, self.meta)

    @property
    def classes(self) -> list[str]:
        """Class names, in output order."""
        return list(self.meta["classes"])

    @property
    def preprocessing(self) -> Preprocessing:
        """The preprocessing the exported model expects."""
        return Preprocessing.from_dict(self.meta["preprocessing"])

    def session(self) -> Any:
        """This process's onnxruntime session (made on first use, with as many threads as torch uses here)."""
        pid = os.getpid()
        if pid not in self._sessions:
            self._sessions[pid] = _open(self.path)
        return self._sessions[pid]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a normalised batch (on any device; the result is on the same one)."""
        batch = np.ascontiguousarray(x.detach().float().cpu().numpy())  # channels-last input arrives strided
        out = self.session().run(None, {"images": batch})[0]
        return torch.from_numpy(out).to(x.device)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (for worker processes started by spawn) without sessions, which cannot be pickled."""
        state = self.__dict__.copy()
        state["_sessions"] = {}
        return state


def _open(path: Path) -> Any:
    """An onnxruntime CPU session of ``path`` (checked against its folder's checksums) with as many threads as torch
    uses in this process."""
    import onnxruntime as ort

    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; export a model first with `headstart export RUN`")
    data = path.read_bytes()
    verify(path.parent, path.name, data, "export the model again with `headstart export RUN`")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    try:
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime's exception types have no stable importable names
        raise ValueError(f"{path} is not a readable ONNX file ({type(error).__name__}: {error})") from error


def _warn_if_saturating(path: Path, meta: dict[str, Any]) -> None:
    """Warn when an int8 file with 8-bit weights (quantized on a CPU with VNNI) runs where its kernels saturate."""
    record = meta.get("quantization") or {}
    if record.get("weight_bits", 8) == 8 and meta.get("precision") == "int8" and int8_saturates():
        warnings.warn(
            f"{path} was quantized with 8-bit weights on a CPU with an int8 dot-product instruction; this CPU has "
            "none (AVX2 without VNNI), and onnxruntime's kernels can saturate here, moving predictions (97.4% "
            "top-1 agreement with fp32 instead of 99.3% for EfficientNet-Lite0). Export it again on this machine "
            "(`headstart export RUN --quantize int8`, which uses 7-bit weights here) or serve the fp32 file.",
            stacklevel=3,
        )


def _metadata(path: Path, session: Any) -> dict[str, Any]:
    """The headstart metadata of an ONNX file, JSON values decoded."""
    return decode_metadata(path, dict(session.get_modelmeta().custom_metadata_map))


def decode_metadata(path: Path, raw: dict[str, str]) -> dict[str, Any]:
    """An export's headstart metadata (string values, as ONNX and TorchScript store them) with its JSON values
    decoded; a file without it is refused."""
    if "headstart_version" not in raw:
        raise ValueError(f"{path} carries no headstart metadata; was it written by `headstart export`?")
    decoded: dict[str, Any] = dict(raw)
    keys = ("classes", "preprocessing", "input", "output", "val_metrics", "quantization", "multi_label", "thresholds")
    for key in keys:
        if key in raw:
            decoded[key] = json.loads(raw[key])
    return decoded
