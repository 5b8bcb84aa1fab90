"""Experiment tracking through Accelerate's trackers: TensorBoard or MLflow (``--log-with``, ``run.log_with``).

A run logs its resolved configuration as hyperparameters when it starts, each epoch's metrics.jsonl row (network
strategies; an extract run has one row, its head's), the saved model's final metrics, and the report's figures as
images. The tracker packages are optional (``pip install 'headstart[track]'``); a missing one is reported before
anything trains. Tracking is best effort once training has started: a failing tracker is logged, and the run folder,
which holds everything trained, is complete either way.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator

from headstart import progress
from headstart.errors import ConfigError

# Tracker name -> the module it needs and the pip package that provides it.
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}


def check_tracker(name: str | None) -> None:
    """Fail now, before training, when ``name`` is unknown or its package is not installed.

    Raises:
        ConfigError: naming the tracker, the missing package and how to install it (or to drop ``--log-with``).
    """
    if name is None:
        return
    if name not in TRACKERS:
        raise ConfigError(f"unknown tracker {name!r} (--log-with / run.log_with); choose one of {', '.join(TRACKERS)}")
    module, package = TRACKERS[name]
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"--log-with {name} needs the package {package!r}, which is not installed; install it with "
            f"pip install 'headstart[track]' (or pip install {package}), or train without --log-with"
        )


def tracking_accelerator(name: str, folder: Path) -> Accelerator:
    """An Accelerator that logs to tracker ``name`` under ``folder`` (for runs that train no network)."""
    return Accelerator(log_with=name, project_dir=str(folder))


def flat_params(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dict -> ``{"optim.lr": 0.001, ...}``; empty values become ``"none"`` (trackers take scalars)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = (
                "none" if value is None else value if isinstance(value, (int, float, str)) else str(value)
            )
    return out


def scalars(row: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric entries of a metrics row (booleans and texts left out)."""
    return {f"{prefix}{k}": float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class Tracking:
    """One run's connection to its tracker, through ``accelerator.init_trackers``/``log``/``end_training``."""

    def __init__(self, accelerator: Accelerator, name: str, folder: Path):
        self.accelerator = accelerator
        self.name = name
        self.folder = folder

    def start(self, run_name: str, params: dict[str, Any]) -> None:
        """Open the tracker's run and log the hyperparameters."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.name == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI"):
            import mlflow

            # A SQLite store inside the tracking folder (MLflow 3 refuses its old file store unless told otherwise),
            # unless the user points MLflow elsewhere; artifacts go beside it (the experiment's artifact location).
            mlflow.set_tracking_uri(f"sqlite:///{self.folder.resolve() / 'mlflow.db'}")
        # MLflow's tracker takes no folder from Accelerate: without one, artifacts would land in ./mlruns.
        kwargs = {"mlflow": {"logging_dir": str(self.folder / "artifacts")}} if self.name == "mlflow" else {}
        self.accelerator.init_trackers(run_name, config=flat_params(params), init_kwargs=kwargs)

    def log(self, row: dict[str, Any], step: int, prefix: str = "") -> None:
        """Log the numeric entries of a metrics row at ``step``."""
        values = scalars(row, prefix)
        if values:
            self.accelerator.log(values, step=step)

    def figures(self, folder: Path, step: int) -> None:
        """Log every PNG of ``folder`` (the report's figures) as an image."""
        from PIL import Image

        for path in sorted(folder.glob("*.png")):
            if self.name == "tensorboard":
                writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
                with Image.open(path) as image:
                    pixels = np.asarray(image.convert("RGB"))
                writer.add_image(f"figures/{path.stem}", pixels, global_step=step, dataformats="HWC")
            else:
                import mlflow

                mlflow.log_artifact(str(path), artifact_path="figures")

    def end(self) -> None:
        """Close the tracker's run (flushes TensorBoard's event file)."""
        self.accelerator.end_training()


def guarded(action: str, fn: Any, *args: Any) -> None:
    """Run one tracking call; a failure is logged, never raised: what was trained is saved already."""
    try:
        fn(*args)
    except Exception as error:  # any tracker backend error: the run folder is complete without it
        progress.log(f"[yellow]tracking: {action} failed ({type(error).__name__}: {error}); the run folder is complete")
