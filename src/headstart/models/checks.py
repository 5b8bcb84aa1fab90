"""Reading a saved model's files back, verified: checksums, then whether the files agree with each other.

A run folder's ``model.json`` describes the tensors in ``model.safetensors``; when the two disagree (a class list
edited or copied from another run, a preprocessing that is not the backbone's), loading would fail deep inside torch
or numpy ("shape mismatch", "could not be broadcast") or, worse, succeed with wrong answers. These checks turn each
case into an :class:`~headstart.errors.IntegrityError` naming the file, what is wrong and what to do.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load

from headstart.checksums import read_verified, verify
from headstart.data.transforms import Preprocessing
from headstart.errors import IntegrityError

RETRAIN = "train the model again (`headstart train`), or restore the run folder from a copy"
INFO_FILE, WEIGHTS_FILE = "model.json", "model.safetensors"
INTERPOLATIONS = ("bilinear", "bicubic")
HEAD_TENSORS = {"linear": ("head.weight", "head.bias"), "knn": ("head.bank", "head.labels")}
# What model.json must hold for a classifier to be rebuilt from it.
REQUIRED = ("kind", "classes", "backbone", "num_classes", "num_features", "head", "preprocessing")


def read_info(folder: Path, remedy: str = RETRAIN) -> dict[str, Any]:
    """A run folder's ``model.json``, verified against the folder's checksums.

    Raises:
        FileNotFoundError: there is no ``model.json`` (not a run folder).
        IntegrityError: it is truncated, modified, or not a JSON object.
    """
    path = folder / INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; is {folder} a headstart run folder (made by `headstart train`)?")
    data = read_verified(folder, INFO_FILE, remedy)
    try:
        info = json.loads(data)
    except ValueError as error:
        raise IntegrityError(f"{path} is not valid JSON ({error}); {remedy}") from error
    if not isinstance(info, dict):
        raise IntegrityError(f"{path} holds a {type(info).__name__}, not a model description; {remedy}")
    return info


def require(info: dict[str, Any], keys: tuple[str, ...], folder: Path, remedy: str = RETRAIN) -> None:
    """Check that ``model.json`` holds ``keys``.

    Raises:
        IntegrityError: naming the missing keys.
    """
    missing = [key for key in keys if key not in info]
    if missing:
        raise IntegrityError(f"{folder / INFO_FILE} lacks {', '.join(repr(k) for k in missing)}; {remedy}")


def read_weights(folder: Path, remedy: str = RETRAIN) -> dict[str, torch.Tensor]:
    """Every tensor of ``model.safetensors``, verified against the folder's checksums.

    Raises:
        IntegrityError: the file is missing, truncated, modified, or not a safetensors file.
    """
    path = folder / WEIGHTS_FILE
    try:
        data = read_verified(folder, WEIGHTS_FILE, remedy)
    except FileNotFoundError as error:
        raise IntegrityError(f"{path} is missing: the run folder has a model.json but no weights; {remedy}") from error
    try:
        return load(data)
    except SafetensorError as error:  # a folder without checksums, or a file written damaged
        raise IntegrityError(f"{path} cannot be read ({error}): it is truncated or damaged; {remedy}") from error


def weight_shapes(folder: Path, keys: tuple[str, ...], remedy: str = RETRAIN) -> dict[str, tuple[int, ...]]:
    """Shapes of some tensors of ``model.safetensors``, from its header alone (the tensors are not read).

    Raises:
        IntegrityError: the header cannot be read; when the folder has checksums, the message says how the file
            differs from the one written (truncated, modified).
    """
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise IntegrityError(f"{path} is missing: the run folder has a model.json but no weights; {remedy}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            names = set(handle.keys())
            return {key: tuple(handle.get_slice(key).get_shape()) for key in keys if key in names}
    except (OSError, SafetensorError) as error:
        verify(folder, WEIGHTS_FILE, path.read_bytes(), remedy)  # the precise reason, where checksums say it
        raise IntegrityError(f"{path} cannot be read ({error}): it is truncated or damaged; {remedy}") from error


def check_classifier(info: dict[str, Any], shapes: dict[str, tuple[int, ...]], folder: Path) -> None:
    """Check that ``model.json``'s class list and widths fit the head's tensors (``head.*`` shapes).

    Raises:
        IntegrityError: naming both files and the numbers that disagree.
    """
    path, weights = folder / INFO_FILE, folder / WEIGHTS_FILE
    classes = info.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise IntegrityError(f'{path} has no usable class list ("classes" must be a list of names); {RETRAIN}')
    if len(set(classes)) != len(classes):
        raise IntegrityError(f"{path} lists a class twice ({_names(classes)}); {RETRAIN}")
    knn = head_type(info) == "knn"
    for needed in HEAD_TENSORS[head_type(info)]:
        if needed not in shapes:
            raise IntegrityError(f"{weights} holds no {needed} tensor, which the head described in {path} needs; "
                                 f"{RETRAIN}")  # fmt: skip
    key = "head.bank" if knn else "head.weight"
    if not knn and shapes[key][0] != len(classes):
        raise IntegrityError(
            f"{path} lists {len(classes)} classes ({_names(classes)}) but the head in {weights} has "
            f"{shapes[key][0]} outputs: the two files come from different models; {RETRAIN}, or put back the "
            "model.json written with these weights"
        )
    if info.get("num_classes", len(classes)) != len(classes):
        raise IntegrityError(f"{path} lists {len(classes)} classes but says num_classes {info['num_classes']}; "
                             f"{RETRAIN}")  # fmt: skip
    if "num_features" in info and shapes[key][-1] != info["num_features"]:
        raise IntegrityError(f"{path} says the backbone gives {info['num_features']} features but the head in "
                             f"{weights} takes {shapes[key][-1]}; {RETRAIN}")  # fmt: skip
    if info.get("multi_label"):
        check_thresholds(info, path)


def check_thresholds(info: dict[str, Any], where: Path | str) -> None:
    """Check that a multi-label model's ``thresholds`` give each of its labels one number in [0, 1], and no other.

    Raises:
        IntegrityError: naming the labels without a usable threshold, or thresholds for labels the model lacks.
    """
    classes, thresholds = info["classes"], info.get("thresholds")
    if not isinstance(thresholds, dict):
        raise IntegrityError(f"{where} describes a multi-label model without per-label thresholds; {RETRAIN}")
    missing = [c for c in classes if not isinstance(thresholds.get(c), (int, float)) or not 0 <= thresholds[c] <= 1]
    extra = sorted(set(thresholds) - set(classes))
    if missing or extra:
        problem = f"no threshold in [0, 1] for label(s) {_names(missing)}" if missing else ""
        problem += ("; " if missing and extra else "") + (f"thresholds for label(s) {_names(extra)} that the model "
                                                          "does not predict" if extra else "")  # fmt: skip
        raise IntegrityError(f"{where}: {problem}; {RETRAIN}, or put back the model.json written with these weights")


def check_classifier_files(
    info: dict[str, Any], head_shapes: dict[str, tuple[int, ...]], folder: Path
) -> Preprocessing:
    """What every load of a classifier checks before building anything: ``model.json`` holds what a classifier
    needs, its class list and widths fit the head's tensors (``head.*`` shapes), and its preprocessing is usable.

    Returns:
        The stored preprocessing.

    Raises:
        IntegrityError: naming the file and what disagrees.
    """
    require(info, REQUIRED, folder)
    check_classifier(info, head_shapes, folder)
    return checked_preprocessing(info["preprocessing"], folder / INFO_FILE)


def head_type(info: dict[str, Any]) -> str:
    """``knn`` or ``linear``: the head ``model.json`` describes."""
    head = info.get("head")
    return "knn" if isinstance(head, dict) and head.get("type") == "knn" else "linear"


def check_knn_labels(info: dict[str, Any], labels: torch.Tensor, folder: Path) -> None:
    """Check that a kNN head's stored labels all name a class of ``model.json``."""
    classes = info["classes"]
    if len(labels) and int(labels.max()) >= len(classes):
        raise IntegrityError(
            f"{folder / INFO_FILE} lists {len(classes)} classes but the kNN head in {folder / WEIGHTS_FILE} votes for "
            f"class number {int(labels.max()) + 1}: the two files come from different models; {RETRAIN}"
        )


def checked_preprocessing(values: Any, where: Path, remedy: str = RETRAIN) -> Preprocessing:
    """The preprocessing stored in ``where`` (a ``model.json``), refusing values no image pipeline can use.

    Raises:
        IntegrityError: a missing field, a mean or standard deviation that is not three numbers (std above zero),
            a crop larger than the resize, an unknown interpolation.
    """
    try:
        prep = Preprocessing.from_dict(values)
    except (KeyError, TypeError, ValueError) as error:
        raise IntegrityError(f"{where} has an unusable preprocessing ({type(error).__name__}: {error}); "
                             f"{remedy}") from error  # fmt: skip
    problems = []
    if len(prep.mean) != 3 or len(prep.std) != 3:
        problems.append(f"mean {list(prep.mean)} and std {list(prep.std)} need three values, one per colour channel")
    elif not all(math.isfinite(v) for v in prep.mean) or not all(math.isfinite(v) and v > 0 for v in prep.std):
        problems.append(f"mean {list(prep.mean)} and std {list(prep.std)} must be finite, std above zero")
    if not 1 <= prep.input_size <= prep.resize_size:
        problems.append(f"input_size {prep.input_size} must be at least 1 and at most resize_size {prep.resize_size}")
    if prep.interpolation not in INTERPOLATIONS:
        problems.append(f"interpolation {prep.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
    if problems:
        raise IntegrityError(f"{where} has an unusable preprocessing: {'; '.join(problems)}; {remedy}")
    return prep


def check_normalisation(saved: Preprocessing, own: Preprocessing, backbone: str, where: Path) -> None:
    """Check a saved model's mean and std against its backbone's (training never changes them, only the sizes).

    Raises:
        IntegrityError: the image normalisation in ``where`` is not the one the backbone's weights were trained with.
    """
    close = all(
        math.isclose(a, b, abs_tol=1e-6) for a, b in zip(saved.mean + saved.std, own.mean + own.std, strict=True)
    )
    if not close:
        raise IntegrityError(
            f"{where}: preprocessing mean {list(saved.mean)} and std {list(saved.std)} are not those of backbone "
            f"{backbone} (mean {list(own.mean)}, std {list(own.std)}): the file was edited or belongs to another "
            f"model; {RETRAIN}, or put back its own model.json"
        )


def _names(classes: list[str], most: int = 8) -> str:
    """The class names for a message, the first ``most`` of a long list."""
    return ", ".join(classes[:most]) + (f", ... ({len(classes) - most} more)" if len(classes) > most else "")
