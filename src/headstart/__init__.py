"""headstart: reuse what a pretrained image network already knows.

The public API, loaded on first use so that ``import headstart`` (and the CLI) stay fast::

    import headstart
    result = headstart.train("data/", strategy="extract")
    model = headstart.load(result.run_dir)
    headstart.push(result.run_dir, "my-org/my-model")  # later, anywhere: headstart.load("hf-hub:my-org/my-model")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from headstart._version import __version__

# name -> module that defines it
_EXPORTS = {
    "train": "headstart.training.run",
    "resume": "headstart.training.run",
    "load": "headstart.insight.predictor",
    "Model": "headstart.insight.predictor",
    "TrainResult": "headstart.training.run",
    "TrainConfig": "headstart.config",
    "compare": "headstart.training.compare",
    "build_report": "headstart.insight.report",
    "create_backbone": "headstart.models.backbones",
    "list_backbones": "headstart.models.backbones",
    "load_dataset": "headstart.data.scan",
    "embed": "headstart.features.embeddings",
    "ImageIndex": "headstart.features.retrieval",
    "train_autoencoder": "headstart.training.autoencoder",
    "audit": "headstart.insight.audit",
    "rank": "headstart.insight.rank",
    "export": "headstart.serving.export",
    "push": "headstart.serving.hub",
    "pull": "headstart.models.hub",
    "learning_curve": "headstart.training.curve",
    "CurveResult": "headstart.training.curve",
    "suggest": "headstart.insight.suggest",
    "SuggestResult": "headstart.insight.suggest",
}
__all__ = [
    "CurveResult",
    "ImageIndex",
    "Model",
    "SuggestResult",
    "TrainConfig",
    "TrainResult",
    "__version__",
    "audit",
    "build_report",
    "compare",
    "create_backbone",
    "embed",
    "export",
    "learning_curve",
    "list_backbones",
    "load",
    "load_dataset",
    "pull",
    "push",
    "rank",
    "resume",
    "suggest",
    "train",
    "train_autoencoder",
]

if TYPE_CHECKING:
    from headstart.config import TrainConfig
    from headstart.data.scan import load_dataset
    from headstart.features.embeddings import embed
    from headstart.features.retrieval import ImageIndex
    from headstart.insight.audit import audit
    from headstart.insight.predictor import Model, load
    from headstart.insight.rank import rank
    from headstart.insight.report import build_report
    from headstart.insight.suggest import SuggestResult, suggest
    from headstart.models.backbones import create_backbone, list_backbones
    from headstart.models.hub import pull
    from headstart.serving.export import export
    from headstart.serving.hub import push
    from headstart.training.autoencoder import train_autoencoder
    from headstart.training.compare import compare
    from headstart.training.curve import CurveResult, learning_curve
    from headstart.training.run import TrainResult, resume, train


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'headstart' has no attribute {name!r}")
