"""headstart: reuse what a pretrained image network already knows.

The public API, loaded on first use so that ``import headstart`` (and the CLI) stay fast::

    import headstart
    result = headstart.train("data/", strategy="extract")
    model = headstart.load(result.run_dir)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module that defines it
_EXPORTS = {
    "train": "headstart.api",
    "resume": "headstart.api",
    "load": "headstart.api",
    "Model": "headstart.api",
    "TrainResult": "headstart.api",
    "TrainConfig": "headstart.config",
    "compare": "headstart.compare",
    "build_report": "headstart.report",
    "create_backbone": "headstart.backbones",
    "list_backbones": "headstart.backbones",
    "load_dataset": "headstart.data",
    "embed": "headstart.embeddings",
    "ImageIndex": "headstart.retrieval",
    "train_autoencoder": "headstart.autoencoder",
    "audit": "headstart.audit",
    "rank": "headstart.rank",
    "export": "headstart.export",
}
__all__ = [
    "ImageIndex",
    "Model",
    "TrainConfig",
    "TrainResult",
    "__version__",
    "audit",
    "build_report",
    "compare",
    "create_backbone",
    "embed",
    "export",
    "list_backbones",
    "load",
    "load_dataset",
    "rank",
    "resume",
    "train",
    "train_autoencoder",
]

if TYPE_CHECKING:
    from headstart.api import Model, TrainResult, load, resume, train
    from headstart.audit import audit
    from headstart.autoencoder import train_autoencoder
    from headstart.backbones import create_backbone, list_backbones
    from headstart.compare import compare
    from headstart.config import TrainConfig
    from headstart.data import load_dataset
    from headstart.embeddings import embed
    from headstart.export import export
    from headstart.rank import rank
    from headstart.report import build_report
    from headstart.retrieval import ImageIndex


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'headstart' has no attribute {name!r}")
