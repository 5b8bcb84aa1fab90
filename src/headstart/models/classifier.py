"""Classifier = backbone + new head, and its self-describing file format (safetensors + JSON).

A saved model is two files: ``model.safetensors`` (every tensor) and ``model.json`` (classes, backbone name,
preprocessing, strategy, metrics, versions, data fingerprint), written together with their checksums (see
:mod:`headstart.checksums`). Loading reads no pickle and runs no code, and checks the files (see
:mod:`headstart.models.checks`) before building anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from headstart.checksums import write_files
from headstart.errors import IntegrityError
from headstart.files import tensor_file, versions
from headstart.models.backbones import Backbone, create_backbone, register_prefix
from headstart.models.checks import (
    INFO_FILE,
    RETRAIN,
    WEIGHTS_FILE,
    check_classifier_files,
    check_knn_labels,
    check_normalisation,
    read_info,
    read_weights,
)
from headstart.models.freezing import freeze, keep_frozen_in_eval

if TYPE_CHECKING:
    from headstart.models.prepared import PreparedBackbone

FORMAT_VERSION = 1


class KNNHead(nn.Module):
    """k-nearest-neighbour vote over stored, L2-normalised training features (cosine similarity).

    Its output is the log of the similarity-weighted vote share per class, so it plugs in where a linear head's
    logits go (softmax of it gives the vote shares).
    """

    def __init__(self, bank: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int = 10):
        super().__init__()
        self.register_buffer("bank", F.normalize(bank.float(), dim=1))
        self.register_buffer("labels", labels.long())
        self.num_classes = num_classes
        self.k = k

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Log vote shares [B, C]."""
        sims = F.normalize(features.float(), dim=1) @ self.bank.T  # type: ignore[operator]
        k = min(self.k, sims.shape[1])
        top, idx = sims.topk(k, dim=1)
        weights = (top / 0.07).exp()  # temperature-weighted votes, as in instance-discrimination kNN evaluation
        votes = torch.zeros(features.shape[0], self.num_classes, device=features.device)
        votes.scatter_add_(1, self.labels[idx], weights)  # type: ignore[index]
        return (votes / votes.sum(1, keepdim=True)).clamp_min(1e-8).log()


class Classifier(nn.Module):
    """A backbone with a new head. ``embed(x)`` gives the backbone's features, ``forward(x)`` the class logits.

    Parts frozen by :func:`~headstart.models.freezing.freeze` stay in eval mode even under ``.train()``, so their
    BatchNorm running statistics never move, and get no gradients. ``frozen_backbone`` records that the whole backbone
    is (the feature-extraction contract), ``frozen_bn`` that its BatchNorm layers alone are.
    """

    def __init__(self, backbone: Backbone, num_classes: int, drop_rate: float = 0.0, head: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(drop_rate)
        self.head = head if head is not None else nn.Linear(backbone.num_features, num_classes)
        self.num_classes = num_classes
        self.frozen_backbone = False
        self.frozen_bn = False  # BatchNorm layers of the backbone stay in eval mode (see strategies.apply_bn_policy)

    def freeze_backbone(self) -> None:
        """Freeze every backbone parameter and BatchNorm statistic."""
        self.frozen_backbone = True
        freeze(self.backbone, train_bn=False)

    def train(self, mode: bool = True) -> Classifier:
        """Switch modes, keeping frozen parts in eval mode."""
        super().train(mode)
        keep_frozen_in_eval(self)
        return self

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features [B, D] of a normalised batch."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits [B, C]. The head runs in fp32 even under autocast: it is tiny, and this way it gives the
        same answer as a head trained and evaluated on cached fp32 features."""
        features = self.dropout(self.backbone(x))
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.head(features.float())


def head_kind(head: nn.Module) -> dict[str, Any]:
    """Description of a classifier head for ``model.json``."""
    if isinstance(head, KNNHead):
        return {"type": "knn", "k": head.k, "bank_size": int(head.bank.shape[0])}  # type: ignore[index]
    return {"type": "linear"}


def save_classifier(model: Classifier, folder: Path, meta: dict[str, Any]) -> None:
    """Write ``model.safetensors`` and ``model.json`` into ``folder``.

    Args:
        model: the classifier (unwrapped from any DDP wrapper).
        folder: run folder.
        meta: at least ``classes``; strategy, metrics, data fingerprint and config are recommended.
    """
    write_classifier(
        folder, model.backbone, model.state_dict(), model.head, model.num_classes, float(model.dropout.p), meta
    )


def write_classifier(
    folder: Path, backbone: Backbone | PreparedBackbone, tensors: dict[str, torch.Tensor], head: nn.Module,
    num_classes: int, drop_rate: float, meta: dict[str, Any],
) -> None:  # fmt: skip
    """Write a classifier's files from its parts: what :func:`load_classifier` reads back.

    Args:
        folder: run folder.
        backbone: the backbone, or its stored description (an extract run served from the caches builds no network).
        tensors: every tensor of the classifier, keyed as in ``Classifier.state_dict()`` (``backbone.*``, ``head.*``).
        head: the head module.
        num_classes: output width.
        drop_rate: dropout before the head.
        meta: at least ``classes``.
    """
    info = {
        "format": FORMAT_VERSION,
        "kind": "classifier",
        "backbone": backbone.name,
        "weights_source": backbone.weights_source,
        "num_features": backbone.num_features,
        "num_classes": num_classes,
        "drop_rate": drop_rate,
        "head": head_kind(head),
        "preprocessing": backbone.preprocessing.to_dict(),
        "versions": versions(),
        **meta,
    }
    write_files(folder, {WEIGHTS_FILE: tensor_file(tensors, {"format": "headstart"}), INFO_FILE: info_bytes(info)})


def info_bytes(info: dict[str, Any]) -> bytes:
    """``model.json``'s contents."""
    return json.dumps(info, indent=2, default=str).encode()


def write_model_info(folder: Path, info: dict[str, Any]) -> None:
    """Replace a run folder's ``model.json`` (with its checksum), e.g. to add the final metrics."""
    write_files(folder, {INFO_FILE: info_bytes(info)})


def classifier_tensors(backbone_tensors: dict[str, torch.Tensor], head: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict a :class:`Classifier` of this backbone and head would have."""
    tensors = {f"backbone.{k}": v for k, v in backbone_tensors.items()}
    return tensors | {f"head.{k}": v for k, v in head.state_dict().items()}


def read_model_info(folder: Path) -> dict[str, Any]:
    """The ``model.json`` of a run folder, verified; a clear error when it is missing, damaged or edited."""
    return read_info(Path(folder))


def load_classifier(folder: Path) -> tuple[Classifier, dict[str, Any]]:
    """Rebuild a saved classifier from its run folder, without downloading anything.

    Raises:
        IntegrityError: a file is missing, truncated or modified, or the files disagree (class list and head,
            preprocessing and backbone, weights and architecture); the message names the file and what to do.
    """
    folder = Path(folder)
    info = read_info(folder)
    if info.get("kind") != "classifier":
        raise ValueError(f"{folder} holds a {info.get('kind')!r} model, not a classifier")
    state = read_weights(folder)
    prep = check_classifier_files(info, {k: tuple(v.shape) for k, v in state.items() if k.startswith("head.")}, folder)
    backbone = create_backbone(info["backbone"], pretrained=False)
    check_normalisation(prep, backbone.preprocessing, info["backbone"], folder / INFO_FILE)
    backbone.preprocessing = prep
    head = head_from_tensors(info, state, folder)
    model = Classifier(backbone, info["num_classes"], info.get("drop_rate", 0.0), head=head)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:  # torch lists every missing, unexpected and misshapen tensor on several lines
        detail = " ".join(str(error).split())[:300]
        raise IntegrityError(
            f"{folder / WEIGHTS_FILE} does not fit backbone {info['backbone']} named in {folder / INFO_FILE} "
            f"({detail}); {RETRAIN}"
        ) from error
    model.eval()
    return model, info


def head_from_tensors(info: dict[str, Any], state: dict[str, torch.Tensor], folder: Path) -> nn.Module:
    """A saved classifier's head, rebuilt from its ``head.*`` tensors and ``model.json`` (already checked against each
    other by :func:`~headstart.models.checks.check_classifier`)."""
    if info["head"]["type"] == "knn":
        check_knn_labels(info, state["head.labels"], folder)
        return KNNHead(state["head.bank"], state["head.labels"], info["num_classes"], k=int(info["head"]["k"]))
    weight = state["head.weight"]
    head = nn.Linear(weight.shape[1], weight.shape[0])
    head.load_state_dict({"weight": weight, "bias": state["head.bias"]})
    return head.eval()


def _run_backbone(folder: str) -> Backbone:
    """``run:PATH``: the (fine-tuned) backbone of a trained headstart classifier, for embedding and retrieval."""
    return load_classifier(Path(folder))[0].backbone


register_prefix("run:", _run_backbone)
