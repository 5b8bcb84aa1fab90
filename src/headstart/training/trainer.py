"""The training loop, written once through HF Accelerate: one process, several GPUs or several machines.

The trainer knows optimisers, schedules, loaders, processes and checkpoints; it never looks inside the model, and an
:class:`Objective` says what a batch's loss is and how the model is judged (see :mod:`headstart.training.objectives`:
classification, reconstruction). A run's strategy decides what trains by handing over parameter groups (see
:mod:`headstart.training.strategies`).
"""

from __future__ import annotations

import io
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from headstart import progress
from headstart.checksums import read_verified, write_files
from headstart.errors import IntegrityError, StorageError
from headstart.files import atomic_write_bytes
from headstart.hardware import autocast, launch_world_size, leave_group_at_exit, tune_allocator
from headstart.training.strategies import warmup_cosine

CHECKPOINT = "checkpoints/last.pt"  # relative to the run folder, whose checksums.json lists it
RESTART = "the run cannot continue from it; start it again without --resume"
Batch = tuple[torch.Tensor, ...]
# The prepared model applied to a network input, in the run's precision and memory format.
Forward = Callable[[torch.Tensor], torch.Tensor]


class StepResult(NamedTuple):
    """What an objective returns for one training batch."""

    loss: torch.Tensor  # the batch's mean loss: backpropagated, and averaged over the epoch as ``train_loss``
    size: int  # images in the batch, the weight of its loss in the epoch's mean
    sums: tuple[torch.Tensor, ...] = ()  # one total per name in ``Objective.running``, e.g. correct predictions


class Objective(Protocol):
    """The task half of training: what a batch's loss is and how the model is judged. The trainer does the rest."""

    running: tuple[str, ...]  # metrics.jsonl keys of the per-image epoch means of ``StepResult.sums``
    unlogged: tuple[str, ...]  # keys of ``evaluate``'s result kept out of metrics.jsonl (bulky; on_best gets them)

    def step(self, forward: Forward, batch: Batch) -> StepResult:
        """The loss of one training batch (on its device, as the loader yields it)."""
        ...

    def outputs(self, forward: Forward, batch: Batch) -> tuple[torch.Tensor, ...]:
        """Per-image tensors of one validation batch, gathered across processes for :meth:`evaluate`."""
        ...

    def evaluate(self, outputs: tuple[torch.Tensor, ...]) -> dict[str, Any]:
        """Validation metrics (including ``LoopSettings.metric``) from every batch's outputs, concatenated on CPU."""
        ...

    def describe(self, epoch: int, row: dict[str, Any]) -> str:
        """The log line of a finished epoch; ``row`` holds the training means and the validation metrics."""
        ...


@dataclass(frozen=True)
class LoopSettings:
    """What the loop needs beyond the model, objective, optimiser groups and loaders."""

    epochs: int  # passes over the training loader
    warmup_epochs: float  # linear warm-up length before cosine decay
    metric: str  # key of the validation metrics that selects the best epoch
    early_stopping: int  # epochs without improvement before stopping; 0 disables
    precision: str  # "bf16" or "fp32" (already resolved)
    channels_last: bool  # NHWC inputs
    checkpoint_every: int = 0  # optimiser steps between mid-epoch checkpoints; 0: end of epoch only
    compile: bool = False  # torch.compile the prepared (possibly DDP-wrapped) model; checkpoints stay plain
    maximize: bool = True  # a larger metric is better (accuracy); False for a loss


@dataclass
class FitResult:
    """Outcome of :meth:`Trainer.fit`."""

    best_metric: float
    best_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False
    seconds: float = 0.0


class Trainer:
    """Runs epochs, evaluates, keeps the best weights, writes ``metrics.jsonl`` and resumable checkpoints.

    Args:
        model: any module the objective's batches go through.
        groups: optimiser parameter groups (each with ``lr`` and ``base_lr``).
        train_loader: training batches, as the objective's ``step`` takes them.
        val_loader: validation batches, as its ``outputs`` takes them.
        settings: loop settings.
        objective: the loss of a batch and the evaluation of the model.
        on_best: called by the main process with the unwrapped model and the epoch's metrics (and ``epoch``)
            whenever the metric improves.
        run_dir: where ``metrics.jsonl`` and ``checkpoints/`` go (written by the main process only).
        accelerator: an Accelerator (one is made when omitted).
        baseline: metrics of the starting model (epoch 0), e.g. the head trained on frozen features.
        on_epoch: called by the main process with the unwrapped model and the metrics.jsonl row after each epoch.
    """

    def __init__(
        self,
        model: nn.Module,
        groups: list[dict[str, Any]],
        train_loader: DataLoader[Any],
        val_loader: DataLoader[Any],
        settings: LoopSettings,
        objective: Objective,
        on_best: Callable[[nn.Module, dict[str, Any]], None],
        run_dir: Path,
        accelerator: Accelerator | None = None,
        baseline: dict[str, Any] | None = None,
        on_epoch: Callable[[nn.Module, dict[str, Any]], None] | None = None,
    ):
        self.accelerator = accelerator or Accelerator()
        self.settings = settings
        self.objective = objective
        self.on_best = on_best
        self.on_epoch = on_epoch
        self.run_dir = run_dir
        self.baseline = baseline
        optimizer = torch.optim.AdamW(groups)
        # Learning rates stay per group: the schedule multiplies each group's base_lr (discriminative rates).
        self.model, self.optimizer, self.train_loader, self.val_loader = self.accelerator.prepare(
            model, optimizer, train_loader, val_loader
        )
        if settings.compile:
            # Here rather than through Accelerate's dynamo_backend: Accelerate keeps its state per process, so the
            # first Accelerator's choice would silently apply to every later run in the same process.
            self.model = torch.compile(self.model)
        self.steps_per_epoch = max(1, len(self.train_loader))
        self.total_steps = self.steps_per_epoch * settings.epochs
        self.warmup_steps = round(settings.warmup_epochs * self.steps_per_epoch)
        self.step = 0
        self.epoch = 0
        self.best = -math.inf if settings.maximize else math.inf
        self.best_epoch = -1
        self.history: list[dict[str, Any]] = []
        self.stale = 0
        # The running totals of an interrupted epoch: loss, each of the objective's sums, images.
        self._resume_totals: tuple[float, ...] = ()

    def _plain_model(self) -> nn.Module:
        """The model without DDP or torch.compile wrappers: its state_dict keys match the saved model's."""
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    # -- checkpoints -------------------------------------------------------------------------------------------------

    def _checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT

    def save_checkpoint(self, batches_done: int, totals: tuple[float, ...] = ()) -> None:
        """Atomically save everything needed to continue: weights, optimiser, RNG states, position in the epoch
        (batches done and the running totals: loss, the objective's sums, images), best metric and history.

        The file is listed with its checksum in the run folder's ``checksums.json``; a failed write (disk full)
        leaves the previous checkpoint as it was."""
        if not self.accelerator.is_main_process:
            return
        state = {
            "model": self._plain_model().state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batches_done": batches_done,
            "epoch_totals": torch.tensor(totals or self._zero_totals(), dtype=torch.float64),
            "best": self.best,
            "best_epoch": self.best_epoch,
            "stale": self.stale,
            "history": json.dumps(self.history),
            "rng_torch": torch.get_rng_state(),
            "rng_numpy": torch.from_numpy(np.frombuffer(json.dumps(_numpy_state()).encode(), dtype=np.uint8).copy()),
            "rng_python": json.dumps(random.getstate()),
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_files(self.run_dir, {CHECKPOINT: buffer.getvalue()})

    def load_checkpoint(self) -> int:
        """Restore from ``checkpoints/last.pt``; returns the number of batches already done in the current epoch.

        Raises:
            IntegrityError: the checkpoint is truncated, modified, or does not fit this run's model.
        """
        path = self._checkpoint_path()
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the run stopped before its first checkpoint; start it again")
        data = read_verified(self.run_dir, CHECKPOINT, RESTART)
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            self._plain_model().load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except Exception as error:  # torch's zip reader, unpickler and loaders raise several unrelated types
            detail = " ".join(str(error).split())[:200]
            raise IntegrityError(f"{path} cannot be used ({type(error).__name__}: {detail}); {RESTART}") from error
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.best, self.best_epoch, self.stale = float(state["best"]), int(state["best_epoch"]), int(state["stale"])
        self.history = json.loads(state["history"])
        torch.set_rng_state(state["rng_torch"])
        _set_numpy_state(json.loads(bytes(state["rng_numpy"].numpy()).decode()))
        random.setstate(_tuplify(json.loads(state["rng_python"])))
        totals = state["epoch_totals"].tolist()
        self._resume_totals = (*totals[:-1], int(totals[-1]))
        if self.accelerator.is_main_process:
            self._write_history()  # rows written after this checkpoint belong to work that will be redone
        return int(state["batches_done"])

    def _write_history(self) -> None:
        """Write ``metrics.jsonl``, one row per finished epoch (rewritten whole: a full disk never tears it)."""
        rows = "".join(json.dumps(entry) + "\n" for entry in self.history)
        atomic_write_bytes(self.run_dir / "metrics.jsonl", rows.encode(), sync=False)

    def _resumable(self, error: StorageError) -> StorageError:
        """``error`` (a failed write in the run folder), saying how to carry on once the disk has room."""
        if self._checkpoint_path().is_file():
            hint = f"the last checkpoint is intact: free some space, then continue with --resume {self.run_dir}"
        else:
            hint = "no checkpoint was written yet: free some space, then start the run again"
        failure = StorageError(f"{error.reason or error}; {hint}")
        failure.errno, failure.reason = error.errno, error.reason
        return failure

    def _zero_totals(self) -> tuple[float, ...]:
        return (0.0, *(0.0 for _ in self.objective.running), 0)

    # -- loop --------------------------------------------------------------------------------------------------------

    def _set_lr(self) -> None:
        scale = warmup_cosine(self.step, self.total_steps, self.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * scale

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """The prepared model on a network input, in the run's precision and memory format."""
        if self.settings.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.accelerator.device, self.settings.precision):
            return self.model(x)

    def validate(self) -> dict[str, Any]:
        """Validation metrics, from the objective's outputs gathered across processes."""
        self.model.eval()
        parts: list[tuple[torch.Tensor, ...]] = []
        with torch.inference_mode():
            for batch in self.val_loader:
                outputs = self.accelerator.gather_for_metrics(self.objective.outputs(self._forward, batch))
                parts.append(tuple(t.cpu() for t in outputs))
        return self.objective.evaluate(tuple(torch.cat(column) for column in zip(*parts, strict=True)))

    def fit(self, resume: bool = False) -> FitResult:
        """Train for ``settings.epochs`` epochs (or until early stopping), keeping the best epoch's weights."""
        start = time.perf_counter()
        tune_allocator()
        skip = self.load_checkpoint() if resume else 0
        stopped = False
        try:
            if not resume and self.baseline is not None:
                self._record(0, {"phase": "head", **self.baseline}, self.baseline)
            with progress.bar(self.accelerator.is_main_process) as bars:
                while self.epoch < self.settings.epochs and not stopped:
                    stopped = self._run_epoch(bars, skip)
                    skip = 0
        except StorageError as error:
            raise self._resumable(error) from error
        self.accelerator.wait_for_everyone()
        return FitResult(self.best, self.best_epoch, self.history, stopped, time.perf_counter() - start)

    def _run_epoch(self, bars: Any, skip: int) -> bool:
        epoch = self.epoch + 1
        self.model.train()
        task = bars.add_task(f"epoch {epoch}/{self.settings.epochs}", total=self.steps_per_epoch, info="")
        tic = time.perf_counter()
        start = self._resume_totals if skip else self._zero_totals()
        # [loss, *the objective's sums], accumulated on device: reading .item() every step would force a CPU-GPU sync.
        sums = [torch.tensor(value, device=self.accelerator.device) for value in start[:-1]]
        seen = int(start[-1])
        _set_epoch(self.train_loader, epoch)
        loader = self.accelerator.skip_first_batches(self.train_loader, skip) if skip else self.train_loader
        _set_epoch(loader, epoch)  # a skipping loader starts its own epoch counter at 0; keep the permutation
        for batch_index, batch in enumerate(loader, start=skip):
            self._set_lr()
            result = self.objective.step(self._forward, batch)
            self.optimizer.zero_grad(set_to_none=True)
            self.accelerator.backward(result.loss)
            self.optimizer.step()
            self.step += 1
            sums[0] += result.loss.detach() * result.size
            for total, value in zip(sums[1:], result.sums, strict=True):
                total += value
            seen += result.size
            bars.update(task, advance=1, info=f"loss {result.loss.item():.3f}" if batch_index % 5 == 0 else None)
            if self.settings.checkpoint_every and self.step % self.settings.checkpoint_every == 0:
                self.save_checkpoint(batch_index + 1, (*(float(total) for total in sums), seen))
        totals = self.accelerator.reduce(torch.stack([*sums, torch.tensor(float(seen), device=sums[0].device)]))
        train_seconds = time.perf_counter() - tic
        metrics = self.validate()
        self.epoch = epoch
        images = totals[-1].clamp_min(1)
        row = {
            "phase": "train",
            "train_loss": float(totals[0] / images),
            **{name: float(total / images) for name, total in zip(self.objective.running, totals[1:-1], strict=True)},
            "lr": max(g["lr"] for g in self.optimizer.param_groups),
            "train_seconds": round(train_seconds, 3),
            "train_images_per_s": round(float(totals[-1]) / train_seconds, 2),
            "epoch_seconds": round(time.perf_counter() - tic, 3),
            **metrics,
        }
        improved = self._record(epoch, row, metrics)
        bars.remove_task(task)
        if self.accelerator.is_main_process:
            progress.log(self.objective.describe(epoch, row) + (" *" if improved else ""))
            if self.on_epoch is not None:
                self.on_epoch(self._plain_model(), self.history[-1])
        self.save_checkpoint(0)
        return bool(self.settings.early_stopping and self.stale >= self.settings.early_stopping)

    def _record(self, epoch: int, row: dict[str, Any], metrics: dict[str, Any]) -> bool:
        value = float(metrics[self.settings.metric])
        improved = value > self.best if self.settings.maximize else value < self.best
        if improved:
            self.best, self.best_epoch, self.stale = value, epoch, 0
            if self.accelerator.is_main_process:
                self.on_best(self._plain_model(), {"epoch": epoch, **metrics})
        else:
            self.stale += 1
        compact = {k: v for k, v in row.items() if k not in self.objective.unlogged}
        entry = {"epoch": epoch, **compact}
        self.history.append(entry)
        if self.accelerator.is_main_process:
            self._write_history()
        return improved


def make_accelerator(log_with: str | None = None) -> Accelerator:
    """An Accelerator for this launch: CUDA (one or several GPUs), or CPU processes talking over gloo.

    ``split_batches`` makes ``data.batch_size`` the global batch whatever the number of processes, so results and
    learning rates do not depend on it. Without CUDA, Accelerate only recognises a multi-process launch (torchrun,
    ``accelerate launch``) when asked for the CPU explicitly. ``log_with``: an Accelerate tracker name, whose
    folder is set once the run folder is known (``project_configuration.set_directories``).
    """
    from accelerate.utils import DataLoaderConfiguration

    several = launch_world_size() > 1
    accelerator = Accelerator(
        cpu=several and not torch.cuda.is_available(),
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        log_with=log_with,
    )
    if several:
        leave_group_at_exit()
    return accelerator


class EpochSampler(torch.utils.data.Sampler[int]):
    """Shuffles with a permutation that depends only on (seed, epoch), so a resumed run replays the same order and
    every process of a distributed run agrees on it. Yields ``epoch * size + index``: the datasets take the index
    modulo their length and use the whole key to seed that image's augmentation."""

    def __init__(self, size: int, seed: int):
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch``."""
        self.epoch = epoch

    def __iter__(self) -> Any:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        offset = self.epoch * self.size
        return iter((torch.randperm(self.size, generator=generator) + offset).tolist())

    def __len__(self) -> int:
        return self.size


def _set_epoch(loader: Any, epoch: int) -> None:
    """Tell an :class:`EpochSampler` inside a (possibly Accelerate-wrapped) loader which epoch starts."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    for candidate in (
        getattr(loader, "sampler", None),
        getattr(getattr(loader, "batch_sampler", None), "sampler", None),
        getattr(getattr(getattr(loader, "batch_sampler", None), "batch_sampler", None), "sampler", None),
    ):
        if isinstance(candidate, EpochSampler):
            candidate.set_epoch(epoch)


def _numpy_state() -> list[Any]:
    state: Any = np.random.get_state()
    name, keys, pos, has_gauss, gauss = state
    return [name, keys.tolist(), pos, has_gauss, gauss]


def _set_numpy_state(state: list[Any]) -> None:
    np.random.set_state((state[0], np.array(state[1], dtype=np.uint32), state[2], state[3], state[4]))


def _tuplify(value: Any) -> Any:
    return tuple(_tuplify(v) for v in value) if isinstance(value, list) else value
