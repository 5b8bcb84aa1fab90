"""int8 quantization of an exported ONNX classifier with onnxruntime, calibrated on training images, checked on
held-out ones against the fp32 file it came from.

The recipe is onnxruntime's for CPU inference: ``quant_pre_process`` (shape inference and graph clean-up), then
``quantize_static`` in the QDQ format, weights int8 per output channel, activations uint8 with MinMax ranges from the
calibration images, and the first convolution and the head left in fp32 (:func:`edge_nodes`).

Measured on EfficientNet-Lite0 with a logistic head (``--strategy extract --backbone efficientnet_lite0`` on
ants/bees, 224 px, 153 val images, onnxruntime 1.32 on a 2-core Xeon with AVX512-VNNI), top-1 agreement with fp32:
dynamic quantization 96.1%, static per-tensor 96.1%, static per-channel 98.7%, with the head in fp32 99.3%, with the
head and the first convolution in fp32 100% (128 calibration images; 99.3% with 64, 100% with all 244). Percentile
and entropy calibration did no better than MinMax in three times the time; keeping the depthwise convolutions in fp32
made it worse (largest logit change 1.2 instead of 0.4). The images that flip are the set's closest calls, whose fp32
logits differ by 0.12 to 0.30 while int8 moves a logit by up to about 0.4: agreement is measured, never assumed. The
default extract ensemble (Lite0 + Lite2 at 260 px) kept 100% with plain per-channel quantization.

Calibration images are preprocessed exactly as the model's stored preprocessing says (the decode, resize and crop of
:func:`headstart.data.transforms.eval_tensor`, then :func:`~headstart.data.transforms.normalize` for a float-input
export), so the activation ranges are those the model meets in use. The int8 file is written only when its top-1
agreement with the fp32 file reaches ``min_agreement``; what it was calibrated and checked on, and how well it
agreed, travels in its metadata (key ``quantization``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from onnxruntime.quantization import CalibrationDataReader

from headstart.checksums import write_files
from headstart.data.scan import collect_files, load_dataset
from headstart.data.transforms import Preprocessing, eval_tensor, normalize
from headstart.errors import DataError, HeadstartError
from headstart.files import default_cache_root, installed_version, storage_error
from headstart.hardware import int8_saturates

MIN_AGREEMENT = 0.99  # top-1 agreement with fp32 below which the int8 file is refused
CALIBRATION_IMAGES = 128  # Lite0 on ants/bees: 64 training images gave 99.3% agreement on val, 128 and 244 100%
# onnxruntime's calibration session returns every intermediate tensor of a batch: for the Lite0 + Lite2 ensemble at
# 260 px the process peaked at 6.0 GB with batches of 16 and 2.2 GB with batches of 4, in the same time.
CALIBRATION_BATCH = 4
METHOD = "static QDQ: int8 weights per channel, uint8 activations, MinMax calibration"


class QuantizationError(HeadstartError, ValueError):
    """The model could not be quantized, or its int8 version disagrees with fp32 too often (the message says what to
    do instead)."""


@dataclass
class Images:
    """Decoded images for quantization: those to calibrate on and those to check agreement on, with their origins."""

    calibration: list[Path]
    check: list[Path]
    check_labels: list[int] | None  # index in the model's classes, when the check images are labelled
    calibration_source: str  # e.g. "training split of /data/x"
    check_source: str


@dataclass
class Check:
    """How the int8 file compares with the fp32 one on the check images."""

    agreement: float  # share of images with the same top-1 class
    images: int
    max_abs_logit_diff: float
    accuracy_fp32: float | None = None  # when the check images are labelled
    accuracy_int8: float | None = None


def find_images(info: dict[str, Any], run_dir: Path, calibration: str | Path | None, count: int) -> Images:
    """The images to calibrate on and to check with.

    By default the run's own data, split as its training run split it: up to ``count`` training images calibrate, the
    validation split checks (the training images when there is none). ``calibration``, a folder or files of images
    like the training ones, replaces that: up to ``count`` of them calibrate and the rest check (all, if none is left).

    Raises:
        QuantizationError: the run's data is not where ``model.json`` says and no ``calibration`` is given.
    """
    if calibration is not None:
        files = collect_files([calibration])
        chosen = sample(files, count)
        rest = sorted(set(files) - set(chosen))
        where = f"{len(files)} images in {calibration}"
        return Images(chosen, rest or chosen, None, where, f"the {'other ' if rest else ''}images in {calibration}")
    data = info.get("data_path")
    if not data or not Path(data).exists():
        raise QuantizationError(
            f"int8 calibration needs images like the training ones, and {run_dir / 'model.json'} names "
            f"{'no training data' if not data else f'training data at {data}, which is not there'}; pass "
            "--calibration DIR (a folder of such images, e.g. the training folder). Nothing was written."
        )
    settings = info.get("config", {}).get("data", {})
    dataset = load_dataset(
        data, float(settings.get("val_fraction", 0.2)), int(settings.get("split_seed", 0)), default_cache_root()
    )
    position = {name: j for j, name in enumerate(info["classes"])}
    check = dataset.val or dataset.train
    labels = [position.get(dataset.classes[r.label], -1) for r in check]
    return Images(
        [r.path for r in sample(dataset.train, count)], [r.path for r in check], labels,
        f"training split of {dataset.root}", f"{'validation' if dataset.val else 'training'} split of {dataset.root}",
    )  # fmt: skip


def sample(items: Sequence[Any], count: int) -> list[Any]:
    """``count`` items spread evenly over ``items`` (deterministic: class-ordered lists give every class its share)."""
    if len(items) <= count:
        return list(items)
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, count).round()]


def decode(files: Sequence[Path], prep: Preprocessing) -> tuple[torch.Tensor, list[Path]]:
    """uint8 [N, 3, S, S] of the files that decode, and those files; others are left out."""
    tensors, kept = [], []
    for path in files:
        try:
            tensors.append(eval_tensor(path, prep))
        except (DataError, OSError):
            continue
        kept.append(path)
    if not tensors:
        return torch.zeros(0, 3, prep.input_size, prep.input_size, dtype=torch.uint8), kept
    return torch.stack(tensors), kept


def network_input(pixels: torch.Tensor, prep: Preprocessing, dtype: str) -> np.ndarray:
    """What the exported graph takes: the uint8 crops themselves, or normalised float32."""
    return pixels.numpy() if dtype == "uint8" else normalize(pixels, prep).numpy()


class _Batches(CalibrationDataReader):
    """The calibration images, batch by batch, as the graph takes them (normalised only when read: the uint8 crops
    take a quarter of the memory)."""

    def __init__(self, pixels: torch.Tensor, prep: Preprocessing, dtype: str):
        self.batches = iter(pixels.split(CALIBRATION_BATCH))
        self.prep = prep
        self.dtype = dtype

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next batch, or None after the last."""
        batch = next(self.batches, None)
        return None if batch is None else {"images": network_input(batch, self.prep, self.dtype)}


def quantize_onnx(
    fp32: Path, out: Path, images: Images, prep: Preprocessing, metadata: dict[str, str],
    min_agreement: float = MIN_AGREEMENT,
) -> Check:  # fmt: skip
    """Write the int8 version of the ONNX classifier ``fp32`` to ``out`` if it agrees with it well enough.

    Args:
        fp32: the fp32 export (``headstart export``), left as it is whatever happens.
        out: the int8 file; replaced atomically, and only once the check has passed.
        images: calibration and check images.
        prep: the model's preprocessing.
        metadata: the fp32 file's headstart metadata; the int8 file carries it, with ``precision`` and
            ``quantization`` added.
        min_agreement: least top-1 agreement with fp32 on the check images.

    Returns:
        The agreement check.

    Raises:
        QuantizationError: no calibration image decodes, onnxruntime fails on the graph, or the agreement is too low.
    """
    dtype = json.loads(metadata["input"])["dtype"]
    calibration, used = decode(images.calibration, prep)
    if not used:
        raise QuantizationError(
            f"none of the {len(images.calibration)} calibration images ({images.calibration_source}) could be "
            f"decoded; pass --calibration DIR with images like the training ones. The fp32 export {fp32} is intact."
        )
    check_pixels, checked = decode(images.check, prep)
    labels = _labels_of(images, checked)
    try:
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    except OSError as error:
        raise storage_error(error, out) from error
    try:
        staged = tmp / out.name
        reduce_range = int8_saturates()
        kept = _quantize(fp32, tmp, staged, _Batches(calibration, prep, dtype), reduce_range)
        check = compare(fp32, staged, network_input(check_pixels, prep, dtype), labels)
        if check.agreement < min_agreement:
            raise QuantizationError(_refusal(fp32, out, check, images, len(used), min_agreement))
        # Written like every export: atomically, its checksum recorded in the folder's checksums.json.
        record = _with_metadata(staged, metadata, images, len(used), check, kept, reduce_range)
        write_files(out.parent, {out.name: record})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return check


def _labels_of(images: Images, kept: list[Path]) -> list[int] | None:
    if images.check_labels is None:
        return None
    label = dict(zip(images.check, images.check_labels, strict=True))
    return [label[path] for path in kept]


def _quantize(fp32: Path, tmp: Path, out: Path, reader: _Batches, reduce_range: bool) -> list[str]:
    """``quant_pre_process`` then ``quantize_static`` (see the module docstring for the settings and why); returns
    the nodes left in fp32. ``reduce_range``: 7-bit weights (:func:`headstart.hardware.int8_saturates`)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = tmp / "prepared.onnx"
    try:
        quant_pre_process(str(fp32), str(prepared))
        kept = edge_nodes(onnx.load(str(prepared)))
        quantize_static(
            str(prepared), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=kept, reduce_range=reduce_range,
        )  # fmt: skip
    except OSError as error:  # a full disk or a read-only folder, not the graph's fault
        raise storage_error(error, out) from error
    except Exception as error:  # onnxruntime raises bare exceptions of many kinds for graphs it cannot handle
        first = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
        raise QuantizationError(
            f"onnxruntime {installed_version('onnxruntime')} could not quantize {fp32} ({type(error).__name__}: "
            f"{first}); use the fp32 export {fp32}, which is intact, or export with --exporter legacy and try again"
        ) from error
    finally:
        prepared.unlink(missing_ok=True)
    return kept


def edge_nodes(model: Any) -> list[str]:
    """Names of the nodes kept in fp32: the first convolutions (those with no convolution before them, one per member
    of an ensemble) and the last matrix product (the head).

    They cost little (3 of 32 input channels, a 1280 x C head) and carry the widest-ranged tensors: the normalised
    image and the features that decide the class. See the module docstring for what keeping them bought.
    """
    after_conv: set[str] = set()  # tensors computed from some convolution's output
    first: list[str] = []
    products = [node.name for node in model.graph.node if node.op_type in ("Gemm", "MatMul")]
    for node in model.graph.node:  # ONNX graphs are topologically sorted
        fed = any(name in after_conv for name in node.input)
        if node.op_type == "Conv" and not fed:
            first.append(node.name)
        if fed or node.op_type == "Conv":
            after_conv.update(node.output)
    return first + products[-1:]


def compare(fp32: Path, int8: Path, x: np.ndarray, labels: list[int] | None, batch: int = 32) -> Check:
    """Top-1 agreement (and accuracy, given labels) of two ONNX classifiers on the same inputs."""
    if not len(x):
        raise QuantizationError("no check image could be decoded, so the int8 model cannot be compared with fp32")
    ref, got = logits(fp32, x, batch), logits(int8, x, batch)
    same = ref.argmax(1) == got.argmax(1)
    check = Check(float(same.mean()), len(x), float(np.abs(ref - got).max()))
    if labels is not None:
        truth = np.asarray(labels)
        check.accuracy_fp32 = float((ref.argmax(1) == truth).mean())
        check.accuracy_int8 = float((got.argmax(1) == truth).mean())
    return check


def logits(path: Path, x: np.ndarray, batch: int = 32) -> np.ndarray:
    """Outputs of an ONNX file on ``x``, in batches, on the CPU."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"images": x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def _refusal(fp32: Path, out: Path, check: Check, images: Images, calibrated: int, least: float) -> str:
    return (
        f"int8 quantization refused: its top-1 agreement with fp32 is {check.agreement:.3f} on {check.images} "
        f"images ({images.check_source}), below the required {least:.2f}; {out} was not written. "
        f"Use the fp32 export {fp32}, which is intact, or calibrate on more or more typical images "
        f"(--calibration DIR, --calibration-images N; this try used {calibrated} from {images.calibration_source}), "
        "or accept the loss with --min-agreement. int8 gives each tensor 256 levels: a few outsized activations, or "
        "classes that score almost alike, leave too few for the differences that decide the class."
    )


def _with_metadata(
    path: Path, metadata: dict[str, str], images: Images, calibrated: int, check: Check, kept: list[str], bits7: bool
) -> bytes:
    """The int8 file's bytes, with the fp32 file's metadata and the record of its quantization."""
    import onnx

    model = onnx.load(str(path))
    record = {
        "type": "int8",
        "method": METHOD,
        "fp32_nodes": kept,
        "weight_bits": 7 if bits7 else 8,  # 7: made where onnxruntime's int8 kernels saturate (reduce_range)
        "onnxruntime": installed_version("onnxruntime"),
        "calibration_images": calibrated,
        "calibration_source": images.calibration_source,
        "check_source": images.check_source,
        **asdict(check),
    }
    values = {**metadata, "precision": "int8", "quantization": json.dumps(record)}
    del model.metadata_props[:]
    model.metadata_props.extend([onnx.StringStringEntryProto(key=k, value=v) for k, v in values.items()])
    data: bytes = model.SerializeToString()
    return data
