"""Training an autoencoder on unlabelled images, and scoring images by its reconstruction error.

The networks, loading and the ``ae:`` backbone prefix are in :mod:`headstart.models.autoencoder`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from headstart import config as cfg
from headstart import progress
from headstart.checksums import write_files
from headstart.data.scan import ImageRecord, collect_files, scan_files
from headstart.data.transforms import MemoryDataset, Preprocessing, decode_all, normalize, train_augment
from headstart.errors import DataError
from headstart.features.embeddings import embed
from headstart.features.inference import run_model
from headstart.files import default_cache_root, new_run_dir, tensor_file, versions
from headstart.hardware import autocast, pick_device, resolve_precision
from headstart.models.autoencoder import (
    AE_RETRAIN,
    FORMAT_VERSION,
    Autoencoder,
    AutoencoderConfig,
    BackboneEncoder,
    ConvEncoder,
    _ErrorPerImage,
    build_autoencoder,
    load_autoencoder,
)
from headstart.models.checks import read_info
from headstart.models.freezing import batch_norms, freeze, keep_frozen_in_eval
from headstart.training.objectives import Reconstruction
from headstart.training.trainer import EpochSampler, LoopSettings, Trainer, make_accelerator


def _images(data: str | Path, val_fraction: float, seed: int) -> tuple[list[ImageRecord], list[ImageRecord], int]:
    """Every usable image below ``data``, split at random into train and val; also how many files were skipped."""
    root = Path(data).expanduser()
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; give a folder of images (sub-folders are searched)")
    records, skipped = scan_files(collect_files([root]))
    if len(records) < 2:
        raise DataError(f"{root} has {len(records)} usable image(s); an autoencoder needs at least two")
    order = np.random.default_rng(seed).permutation(len(records))
    n_val = min(len(records) - 1, max(1, round(len(records) * val_fraction)))
    return [records[i] for i in order[n_val:]], [records[i] for i in order[:n_val]], len(skipped)


def _denormalize(x: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    mean = torch.tensor(prep.mean).view(1, 3, 1, 1)
    std = torch.tensor(prep.std).view(1, 3, 1, 1)
    return (x.float().cpu() * std + mean).clamp(0, 1)


def save_reconstructions(inputs: torch.Tensor, recon: torch.Tensor, prep: Preprocessing, path: Path) -> None:
    """A picture of inputs (top row) above their reconstructions (bottom row)."""
    from torchvision.utils import save_image

    rows = torch.cat([_denormalize(inputs, prep), _denormalize(recon, prep)])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(rows, str(path), nrow=inputs.shape[0], padding=2, pad_value=1.0)


@dataclasses.dataclass
class AutoencoderResult:
    """What :func:`train_autoencoder` returns."""

    run_dir: Path
    val_loss: float  # mean squared reconstruction error per pixel on held-out images, best epoch
    seconds: float  # wall time of the whole job
    history: list[dict[str, Any]]  # one row per epoch, as in metrics.jsonl
    config: AutoencoderConfig


def train_autoencoder(
    data: str | Path | None = None, *, config: AutoencoderConfig | None = None, _resume: bool = False,
    **overrides: Any,
) -> AutoencoderResult:  # fmt: skip
    """Train an autoencoder on a folder of images and write a run folder.

    Under ``torchrun`` every process trains on its share of each batch (DDP); the first one writes the run folder.

    Args:
        data: folder of images (labels, if any, are ignored).
        config: a full configuration; keyword overrides apply on top.
        _resume: continue from the run folder's last checkpoint (use :func:`resume_autoencoder`).
        **overrides: fields of :class:`AutoencoderConfig`, e.g. ``latent_dim=64``, ``encoder="efficientnet_lite0"``.
    """
    tic = time.perf_counter()
    config = _build_config(data, config, overrides)
    accelerator = make_accelerator()
    is_main, device = accelerator.is_main_process, accelerator.device
    precision = resolve_precision(config.precision, device)
    torch.manual_seed(config.seed)
    train_records, val_records, n_skipped = _images(config.data, config.val_fraction, config.seed)
    model, prep, source = build_autoencoder(config)
    name = f"autoencoder-{config.encoder}"  # of the default run folder
    run_dir = Path(str(config.out)) if _resume else new_run_dir(config.out, name, config.overwrite, is_main)
    if is_main and not _resume:
        cfg.save_yaml(config, run_dir / "config.yaml")
    if is_main:
        progress.log(f"data: {len(train_records)} train, {len(val_records)} val images ({n_skipped} skipped)")
    frozen = _freeze_encoder(model, config)
    model.to(device)
    train_loader, val_loader, sample = _loaders(model, prep, train_records, val_records, config, frozen, precision)
    info = _model_info(config, prep, source, precision, len(train_records), len(val_records))
    writer = _RunWriter(run_dir, model, prep, info, sample, precision)
    trained = _Reconstruct(model)
    if accelerator.num_processes > 1 and device.type == "cuda":
        # As for classifiers: synchronised statistics behave like the single-process batch. Only the parts that
        # train: a frozen backbone's BatchNorm layers stay as they are. (SyncBatchNorm runs on GPUs only.)
        model.decoder = trained.decoder = nn.SyncBatchNorm.convert_sync_batchnorm(model.decoder)
        if isinstance(model.encoder, ConvEncoder):
            model.encoder = trained.encoder = nn.SyncBatchNorm.convert_sync_batchnorm(model.encoder)
    settings = LoopSettings(epochs=config.epochs, warmup_epochs=0.0, metric="val_loss", early_stopping=0,
                            precision=precision, channels_last=False, checkpoint_every=config.checkpoint_every,
                            maximize=False)  # fmt: skip
    trainer = Trainer(trained, _param_groups(model, config, frozen), train_loader, val_loader, settings,
                      Reconstruction(model, prep, config.loss), on_best=writer.best, run_dir=run_dir,
                      accelerator=accelerator, on_epoch=writer.epoch)  # fmt: skip
    fit = trainer.fit(resume=_resume)
    if is_main:  # the best epoch's model.json, perhaps written before a resume, gains the run's time
        written = run_dir / "model.json"  # absent only when no epoch had a finite val loss
        info = read_info(run_dir, AE_RETRAIN) if written.is_file() else info
        info["train_seconds"] = round(time.perf_counter() - tic, 2)
        write_files(run_dir, {"model.json": json.dumps(info, indent=2).encode()})
    return AutoencoderResult(run_dir, fit.best_metric, time.perf_counter() - tic, fit.history, config)


def resume_autoencoder(run: str | Path) -> AutoencoderResult:
    """Continue a killed or interrupted autoencoder run from ``RUN/checkpoints/last.pt`` with its ``config.yaml``."""
    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(
            f"{run / 'config.yaml'} not found; is {run} a run folder made by `headstart autoencoder train`?"
        )
    config = cfg.load_yaml(AutoencoderConfig, run / "config.yaml")
    return train_autoencoder(config=dataclasses.replace(config, out=str(run)), _resume=True)


def _build_config(
    data: str | Path | None, config: AutoencoderConfig | None, overrides: dict[str, Any]
) -> AutoencoderConfig:
    """``config`` (default: ``AutoencoderConfig()``) with the data folder and keyword overrides applied."""
    config = config or AutoencoderConfig()
    changes = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(AutoencoderConfig)})
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; valid: {', '.join(f.name for f in dataclasses.fields(config))}")
    if data is not None:
        changes["data"] = str(data)
    config = dataclasses.replace(config, **changes)
    if not config.data:
        raise ValueError("no data given: pass a folder of images")
    return config


def _freeze_encoder(model: Autoencoder, config: AutoencoderConfig) -> bool:
    """Freeze a backbone encoder as the config asks: all of it (returns True), or its BatchNorm layers alone when it
    is fine-tuned. A conv encoder trains from scratch, BatchNorm included."""
    if not isinstance(model.encoder, BackboneEncoder):
        return False
    backbone = model.encoder.backbone
    if config.finetune_encoder:
        model.frozen_bn = True
        freeze(batch_norms(backbone), train_bn=False)
        return False
    model.frozen_encoder = True
    freeze(backbone, train_bn=False)
    return True


def _loaders(
    model: Autoencoder, prep: Preprocessing, train_records: list[ImageRecord], val_records: list[ImageRecord],
    config: AutoencoderConfig, frozen: bool, precision: str,
) -> tuple[DataLoader[Any], DataLoader[Any], torch.Tensor]:  # fmt: skip
    """Training and validation loaders, and the first eight validation images (for the per-epoch picture)."""
    # Validation inputs are centre crops, decoded once; the fixed first eight make the per-epoch picture comparable.
    val_crops = decode_all(val_records, prep, crop=True)
    if frozen:
        # The frozen backbone sees each image once (through the feature cache); epochs then train projection+decoder.
        assert isinstance(model.encoder, BackboneEncoder)
        feats = embed(model.encoder.backbone, train_records, batch_size=config.batch_size, precision=precision,
                      device=next(model.parameters()).device, cache_root=default_cache_root(config.cache_dir),
                      workers=0 if len(train_records) < 256 else -1)  # fmt: skip
        if feats.failed:
            raise DataError(f"cannot decode {feats.failed[0][0]}: {feats.failed[0][1]}")
        crops = torch.stack(decode_all(train_records, prep, crop=True))
        targets = model.target(normalize(crops, prep))
        train_set: _Cached | MemoryDataset = _Cached(torch.from_numpy(feats.features), targets)
    else:
        train_set = MemoryDataset(decode_all(train_records, prep), [-1] * len(train_records),
                                  train_augment(prep, config.augment), seed=config.seed)  # fmt: skip
    train_loader = DataLoader(
        train_set,
        batch_size=config.batch_size,
        sampler=EpochSampler(len(train_set), config.seed),  # order depends on (seed, epoch) only: resumable
        drop_last=len(train_records) > config.batch_size,  # a last batch of one would break BatchNorm
        # Iterators draw worker seeds from this generator rather than the global RNG: a resumed run creates an extra
        # iterator, and must not shift the global random stream by doing so.
        generator=torch.Generator().manual_seed(config.seed),
    )
    val_set = MemoryDataset(val_crops, [-1] * len(val_crops), None)
    return train_loader, DataLoader(val_set, batch_size=config.batch_size), torch.stack(val_crops[:8])


def _param_groups(model: Autoencoder, config: AutoencoderConfig, frozen: bool) -> list[dict[str, Any]]:
    """The decoder and projection at ``lr``; a fine-tuned backbone encoder at a tenth of it."""
    rest = [p for n, p in model.named_parameters() if not n.startswith("encoder.backbone.")]
    rates = [(rest, config.lr)]
    if isinstance(model.encoder, BackboneEncoder) and not frozen:
        rates.append(([p for p in model.encoder.backbone.parameters() if p.requires_grad], config.lr * 0.1))
    return [{"params": params, "lr": lr, "base_lr": lr, "weight_decay": config.weight_decay} for params, lr in rates]


def _model_info(
    config: AutoencoderConfig, prep: Preprocessing, source: str, precision: str, n_train: int, n_val: int
) -> dict[str, Any]:
    """The run's ``model.json``, less the best epoch's figures and the training time."""
    return {
        "format": FORMAT_VERSION,
        "kind": "autoencoder",
        "encoder": config.encoder,
        "encoder_weights_source": source,
        "finetune_encoder": config.finetune_encoder,
        "latent_dim": config.latent_dim,
        "image_size": config.image_size,
        "width": config.width,
        "preprocessing": prep.to_dict(),
        "precision": precision,
        "data_path": str(Path(config.data).expanduser().resolve()),
        "train_count": n_train,
        "val_count": n_val,
        "config": cfg.to_dict(config),
        "versions": versions(),
    }


class _Reconstruct(nn.Module):
    """What the trainer trains: an autoencoder's reconstruction of normalised images or, for a frozen backbone
    encoder, of that backbone's cached features [B, D], which skip the backbone.

    It holds the autoencoder's encoder and decoder themselves, so its state dict (the checkpoint's ``model``) has the
    keys of ``model.safetensors``.
    """

    def __init__(self, model: Autoencoder):
        super().__init__()
        self.encoder = model.encoder
        self.decoder = model.decoder

    def train(self, mode: bool = True) -> _Reconstruct:
        """Switch modes, keeping frozen backbone parts in eval mode (as :meth:`Autoencoder.train` does)."""
        super().train(mode)
        keep_frozen_in_eval(self)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstructions [B, 3, image_size, image_size]."""
        latent = self.encoder.get_submodule("project")(x) if x.ndim == 2 else self.encoder(x)
        return self.decoder(latent)


class _Cached(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A frozen encoder's cached features with their reconstruction targets. Keys wrap around the length, as
    :class:`~headstart.training.trainer.EpochSampler` expects."""

    def __init__(self, features: torch.Tensor, targets: torch.Tensor):
        self.features = features
        self.targets = targets

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = key % len(self.features)
        return self.features[index], self.targets[index]


class _RunWriter:
    """What the main process writes into the run folder as training goes: the best model, a picture per epoch."""

    def __init__(self, run_dir: Path, model: Autoencoder, prep: Preprocessing, info: dict[str, Any],
                 sample: torch.Tensor, precision: str):  # fmt: skip
        self.run_dir, self.model, self.prep, self.info = run_dir, model, prep, info
        self.sample, self.precision = sample, precision

    def best(self, _: nn.Module, metrics: dict[str, Any]) -> None:
        """Save the model of a better epoch, with its figures in ``model.json``."""
        self.info.update(best_epoch=metrics["epoch"], val_loss=metrics["val_loss"])
        weights = tensor_file(self.model.state_dict(), {"format": "headstart"})
        write_files(
            self.run_dir, {"model.safetensors": weights, "model.json": json.dumps(self.info, indent=2).encode()}
        )

    @torch.inference_mode()
    def epoch(self, _: nn.Module, row: dict[str, Any]) -> None:
        """Draw the sample images above their reconstructions: ``reconstructions_epoch{N}.png``, and the latest."""
        self.model.eval()
        x = normalize(self.sample.to(next(self.model.parameters()).device), self.prep)
        with autocast(x.device, self.precision):
            recon = self.model(x)
        picture = self.run_dir / f"reconstructions_epoch{row['epoch']}.png"
        save_reconstructions(self.model.target(x), recon, self.prep, picture)
        shutil.copyfile(picture, self.run_dir / "reconstructions.png")


@dataclasses.dataclass
class Scores:
    """Reconstruction errors (anomaly scores: higher is more unusual) of the images that decoded."""

    paths: list[Path]
    errors: np.ndarray  # [N_ok] mean squared error per pixel and channel, in normalised units
    failed: list[tuple[Path, str]]


def score(run: str | Path, images: Sequence[str | Path], batch_size: int = 32) -> Scores:
    """Anomaly score of each image: its reconstruction error under a trained autoencoder.

    Args:
        run: autoencoder run folder.
        images: image files and folders.
        batch_size: images per forward pass.
    """
    model, info = load_autoencoder(run)
    files = collect_files(images)
    if not files:
        raise DataError(f"no files found in {list(images)}")
    device = pick_device()
    # The precision the model was validated with, where this machine runs it natively (as insight.predictor.Model does).
    precision = str(info.get("precision", "fp32")) if resolve_precision("auto", device) == "bf16" else "fp32"
    prep = Preprocessing.from_dict(info["preprocessing"])
    out = run_model(_ErrorPerImage(model), files, prep, 1, batch_size=batch_size, precision=precision,
                    device=device, description="scoring")  # fmt: skip
    return Scores([files[i] for i in np.flatnonzero(out.ok)], out.values[out.ok, 0], out.failed)
