"""Export a trained classifier (or its embedding model) to ONNX or TorchScript, self-described.

The exported network's input is a **normalised float32 NCHW batch** at the model's input size: decode the image to
RGB, resize the shorter side to ``preprocessing.resize_size``, centre-crop ``input_size`` x ``input_size``, scale to
[0, 1], subtract ``mean`` and divide by ``std`` per channel (exactly :func:`headstart.data.transforms.eval_tensor`
followed by :func:`headstart.data.transforms.normalize`). With ``input="uint8"`` the scaling and normalisation are
built into the graph, so callers feed the cropped uint8 pixels instead. The batch axis is dynamic.

Outputs are class logits ``[B, C]`` (softmax gives the probabilities ``predict`` reports; for a multi-label model a
sigmoid per label, compared with the per-label ``thresholds`` in the metadata) for ``what="classifier"``,
or backbone features ``[B, D]`` for ``what="embedder"``. Everything needed to use the file travels inside it: the
class names, the preprocessing, the backbone name and the headstart version, as ONNX ``metadata_props`` or as the
TorchScript archive's ``headstart.json`` extra file (read it with :func:`read_metadata`, which checks the file against
the ``checksums.json`` written beside it).

``quantize="int8"`` (ONNX classifiers) also writes an int8 version beside the fp32 file, ``<name>.int8.onnx``, with
the same inputs, outputs and metadata: static quantization by onnxruntime, calibrated on the run's training images and
kept only if its top-1 predictions agree with fp32's on the validation images (see :mod:`headstart.serving.quantize`).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from headstart import progress
from headstart.checksums import verify, write_files
from headstart.data.transforms import Preprocessing
from headstart.errors import HeadstartError
from headstart.files import make_folder, storage_error, versions
from headstart.models.classifier import load_classifier
from headstart.models.exported import decode_metadata

if TYPE_CHECKING:
    from headstart.serving.quantize import Images

FORMATS = ("onnx", "torchscript")
WHATS = ("classifier", "embedder")
INPUTS = ("float", "uint8")
EXPORTERS = ("auto", "dynamo", "legacy")
QUANTIZE = ("int8",)
METADATA_FILE = "headstart.json"  # name of the TorchScript extra file holding the metadata
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}


class ExportError(HeadstartError, ValueError):
    """The model could not be exported (the message says by which exporter and why)."""


class _Embedder(nn.Module):
    """The classifier's backbone as its own model: normalised images -> features [B, D]."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features."""
        return self.backbone(x)


class _Uint8Input(nn.Module):
    """Scale and normalise a uint8 NCHW batch inside the graph, as :func:`headstart.data.transforms.normalize` does."""

    def __init__(self, inner: nn.Module, prep: Preprocessing):
        super().__init__()
        self.inner = inner
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(prep.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(prep.std).view(1, 3, 1, 1) * 255.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Model output for raw cropped pixels."""
        return self.inner((x.float() - self.mean) / self.std)


def export(
    run_dir: str | Path,
    format: str = "onnx",
    out: str | Path | None = None,
    what: str = "classifier",
    *,
    input: str = "float",
    exporter: str = "auto",
    opset: int = 18,
    quantize: str | None = None,
    calibration: str | Path | None = None,
    calibration_images: int = 128,
    min_agreement: float = 0.99,
) -> Path:
    """Export a trained model from its run folder.

    Args:
        run_dir: run folder made by ``headstart train``.
        format: ``onnx`` or ``torchscript``.
        out: output file (default: ``RUN/<what>.onnx`` or ``RUN/<what>.torchscript.pt``).
        what: ``classifier`` (logits) or ``embedder`` (backbone features).
        input: ``float`` (normalised float32 NCHW, the default) or ``uint8`` (cropped pixels, normalised in-graph).
        exporter: ONNX only: ``dynamo`` (``torch.export``-based, the default since torch 2.9), ``legacy``
            (TorchScript-based), or ``auto``: dynamo, falling back to legacy when dynamo cannot capture the model.
        opset: ONNX opset version.
        quantize: ``int8``: also write ``<out stem>.int8.onnx``, quantized by onnxruntime (ONNX classifiers only).
        calibration: folder of images to calibrate (and check) the int8 model on, instead of the run's training
            (and validation) images.
        calibration_images: most images to calibrate on, spread evenly over the set.
        min_agreement: least share of check images on which the int8 model's top-1 class must match fp32's, or
            no int8 file is written.

    Returns:
        The written file: the int8 one when quantizing (the fp32 one is beside it).

    Raises:
        ExportError: the exporter failed.
        headstart.serving.quantize.QuantizationError: the int8 model could not be made or disagrees with fp32 too
            often; the fp32 file is written and the run folder untouched either way.
    """
    _check_options(format, what, input, exporter, quantize)
    if quantize and not (calibration_images >= 1 and 0.0 <= min_agreement <= 1.0):
        raise ValueError(
            f"--calibration-images {calibration_images} and --min-agreement {min_agreement}: give at least one image "
            "and an agreement between 0 and 1"
        )
    run_dir = Path(run_dir)
    classifier, info = load_classifier(run_dir)
    if quantize and info.get("multi_label"):
        raise ValueError(
            f"--quantize {quantize}: {run_dir} is a multi-label model, and the int8 check compares top-1 classes, "
            "which say nothing about label sets; export it without --quantize (the fp32 file keeps its thresholds). "
            "Nothing was written."
        )
    images = None
    if quantize:  # onnxruntime.quantization is only needed (and only installed, with the export extra) here
        from headstart.serving.quantize import find_images

        # Before any work: a run whose data has moved fails now, not after the fp32 export.
        images = find_images(info, run_dir, calibration, calibration_images)
    prep = classifier.backbone.preprocessing
    # Export in fp32 on the CPU whatever the model was trained with: the file must not depend on this machine.
    module: nn.Module = classifier if what == "classifier" else _Embedder(classifier.backbone)
    if input == "uint8":
        module = _Uint8Input(module, prep)
    module = module.float().cpu().eval()
    path = Path(out) if out else run_dir / f"{what}{SUFFIX[format]}"
    make_folder(path.parent)
    metadata = export_metadata(info, what, input, format)
    example = _example(prep, input)
    if format == "onnx":
        _export_onnx(module, example, path, metadata, exporter, opset)
    else:
        _export_torchscript(module, example, path, metadata)
    progress.log(f"exported {what} ({format}, {input} input {list(example.shape[1:])}) to {path}")
    return path if images is None else _quantized(path, images, prep, min_agreement)


def _check_options(format: str, what: str, input: str, exporter: str, quantize: str | None) -> None:
    choices = (
        (format, FORMATS, "format"), (what, WHATS, "what"), (input, INPUTS, "input"),
        (exporter, EXPORTERS, "exporter"), (quantize or QUANTIZE[0], QUANTIZE, "quantize"),
    )  # fmt: skip
    for value, allowed, name in choices:
        if value not in allowed:
            raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
    if quantize and (format, what) != ("onnx", "classifier"):
        raise ValueError(
            f"--quantize {quantize} is for ONNX classifiers (onnxruntime calibrates it and its class predictions are "
            f"checked against fp32): export with --format onnx --what classifier, or drop --quantize for a {format} "
            f"{what}. Nothing was written."
        )


def _quantized(fp32: Path, images: Images, prep: Preprocessing, min_agreement: float) -> Path:
    """Write ``<fp32 stem>.int8.onnx`` beside the fp32 export; returns its path."""
    from headstart.serving.quantize import quantize_onnx

    int8 = fp32.with_name(fp32.name.removesuffix(".onnx") + ".int8.onnx")
    check = quantize_onnx(fp32, int8, images, prep, read_metadata_props(fp32), min_agreement)
    progress.log(
        f"int8 model {int8}: top-1 agreement with fp32 {check.agreement:.3f} on {check.images} images "
        f"({images.check_source}); {fp32.stat().st_size / 2**20:.1f} MiB -> {int8.stat().st_size / 2**20:.1f} MiB"
    )
    return int8


def export_metadata(info: dict[str, Any], what: str, input: str, format: str) -> dict[str, str]:
    """String metadata stored in an exported file (JSON values for the structured ones)."""
    prep = info["preprocessing"]
    side = int(prep["input_size"])
    dtype = "uint8" if input == "uint8" else "float32"
    normalised = input == "float"
    inputs = {"name": "images", "dtype": dtype, "shape": ["batch", 3, side, side], "layout": "NCHW, RGB",
              "normalised": normalised}  # fmt: skip
    width = len(info["classes"]) if what == "classifier" else int(info["num_features"])
    outputs = {"name": "logits" if what == "classifier" else "features", "shape": ["batch", width]}
    multi_label = {}
    if what == "classifier" and info.get("multi_label"):  # one sigmoid per label, then each label's threshold
        outputs["activation"] = "sigmoid"
        multi_label = {"multi_label": "true", "thresholds": json.dumps(info["thresholds"])}
    return {
        **multi_label,
        "headstart_version": versions()["headstart"],
        "format": format,
        "what": what,
        "backbone": str(info["backbone"]),
        "classes": json.dumps(list(info["classes"])),
        "preprocessing": json.dumps(prep),
        "input": json.dumps(inputs),
        "output": json.dumps(outputs),
        "strategy": str(info.get("strategy", "")),
        "val_metrics": json.dumps(info.get("val_metrics") or {}),
    }


def read_metadata_props(path: Path) -> dict[str, str]:
    """The raw ``metadata_props`` of an ONNX file, as strings."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The headstart metadata of an exported ONNX or TorchScript file, JSON values decoded."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; export a model first with `headstart export RUN`")
    verify(path.parent, path.name, path.read_bytes(), "export the model again with `headstart export RUN`")
    raw: dict[str, str]
    if not zipfile.is_zipfile(path):  # TorchScript archives are zip files, ONNX files are protobuf
        raw = read_metadata_props(path)
    else:
        extra = {METADATA_FILE: ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated but is the TorchScript format
            torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        raw = json.loads(extra[METADATA_FILE])
    return decode_metadata(path, raw)


def _example(prep: Preprocessing, input: str) -> torch.Tensor:
    """A batch of two at the model's input size: two, so no exporter mistakes the batch axis for a constant 1."""
    shape = (2, 3, prep.input_size, prep.input_size)
    if input == "uint8":
        return torch.randint(0, 256, shape, dtype=torch.uint8)
    return torch.randn(shape)


def _tmp_beside(path: Path) -> Path:
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    except OSError as error:
        raise storage_error(error, path) from error
    os.close(fd)
    return Path(tmp)


def _export_onnx(
    module: nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, str], exporter: str, opset: int
) -> None:
    import onnx

    output = json.loads(metadata["output"])["name"]
    tmp = _tmp_beside(path)
    try:
        errors = []
        for kind in ("dynamo", "legacy") if exporter == "auto" else (exporter,):
            try:
                _onnx_once(module, example, tmp, output, kind, opset)
                break
            except OSError as error:  # a full disk or a read-only folder, not an exporter's failure
                raise storage_error(error, path) from error
            except Exception as error:  # any capture failure: try the next exporter, report all if none works
                errors.append(f"{kind}: {type(error).__name__}: {str(error).strip().splitlines()[0][:300]}")
        else:
            raise ExportError("ONNX export failed (" + "; ".join(errors) + "); try --format torchscript")
        model = onnx.load(str(tmp))
        model.metadata_props.extend(
            [onnx.StringStringEntryProto(key=k, value=v) for k, v in {**metadata, "exporter": kind}.items()]
        )
        onnx.checker.check_model(model)
        write_files(path.parent, {path.name: model.SerializeToString()})
    finally:
        tmp.unlink(missing_ok=True)


def _onnx_once(module: nn.Module, example: torch.Tensor, path: Path, output: str, kind: str, opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice and tracer chatter
        if kind == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=65536)
            torch.onnx.export(
                module, (example,), str(path), dynamo=True, input_names=["images"], output_names=[output],
                dynamic_shapes=({0: batch},), opset_version=opset, external_data=False, verbose=False,
            )  # fmt: skip
        else:
            torch.onnx.export(
                module, (example,), str(path), dynamo=False, input_names=["images"], output_names=[output],
                dynamic_axes={"images": {0: "batch"}, output: {0: "batch"}}, opset_version=opset,
            )  # fmt: skip


def _export_torchscript(module: nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, str]) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice; the format is still what users load
        # Tracing records the batch axis symbolically for these networks; the parity test checks batch 1 and 5.
        traced = torch.jit.trace(module, (example,), check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files={METADATA_FILE: json.dumps(metadata)})
    write_files(path.parent, {path.name: buffer.getvalue()})
