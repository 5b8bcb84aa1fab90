"""Training an autoencoder on unlabelled images, and scoring images by its reconstruction error.

The networks, loading and the ``ae:`` backbone prefix are in :mod:`headstart.models.autoencoder`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from headstart import config as cfg
from headstart import progress
from headstart.data.scan import ImageRecord, collect_files, scan_files
from headstart.data.transforms import MemoryDataset, Preprocessing, decode_all, normalize, train_augment
from headstart.errors import DataError
from headstart.features.embeddings import embed
from headstart.features.inference import run_model
from headstart.files import atomic_write_bytes, default_cache_root, save_tensors, versions
from headstart.hardware import autocast, pick_device, resolve_precision
from headstart.models.autoencoder import (
    FORMAT_VERSION,
    Autoencoder,
    AutoencoderConfig,
    BackboneEncoder,
    _ErrorPerImage,
    build_autoencoder,
    load_autoencoder,
)


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


def _run_dir(config: AutoencoderConfig) -> Path:
    if config.out:
        path = Path(config.out)
    else:
        safe = config.encoder.replace("/", "_").replace(":", "_")
        path = Path("runs") / f"autoencoder-{safe}-{time.strftime('%Y%m%d-%H%M%S')}"
    if path.exists() and any(path.iterdir()):
        if not config.overwrite:
            raise FileExistsError(f"run folder {path} already exists; pass --overwrite or choose another --out")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


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
    data: str | Path | None = None, *, config: AutoencoderConfig | None = None, **overrides: Any
) -> AutoencoderResult:
    """Train an autoencoder on a folder of images and write a run folder.

    Args:
        data: folder of images (labels, if any, are ignored).
        config: a full configuration; keyword overrides apply on top.
        **overrides: fields of :class:`AutoencoderConfig`, e.g. ``latent_dim=64``, ``encoder="efficientnet_lite0"``.
    """
    tic = time.perf_counter()
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
    torch.manual_seed(config.seed)
    device = pick_device()
    precision = resolve_precision(config.precision, device)
    train_records, val_records, n_skipped = _images(config.data, config.val_fraction, config.seed)
    model, prep, source = build_autoencoder(config)
    run_dir = _run_dir(config)
    cfg.save_yaml(config, run_dir / "config.yaml")
    progress.log(f"data: {len(train_records)} train, {len(val_records)} val images ({n_skipped} skipped)")

    frozen = config.encoder != "conv" and not config.finetune_encoder
    if isinstance(model.encoder, BackboneEncoder):
        if frozen:
            model.frozen_encoder = True
            model.encoder.backbone.requires_grad_(False)
        else:
            model.frozen_bn = True
    model.to(device)

    # Validation inputs are centre crops, decoded once; the fixed first eight make the per-epoch picture comparable.
    val_images = torch.stack(decode_all(val_records, prep, crop=True))
    if frozen:
        # The frozen backbone sees each image once (through the feature cache); epochs then train projection+decoder.
        cache = default_cache_root(config.cache_dir)
        assert isinstance(model.encoder, BackboneEncoder)
        feats = embed(model.encoder.backbone, train_records, batch_size=config.batch_size, precision=precision,
                      device=device, cache_root=cache, workers=0 if len(train_records) < 256 else -1)  # fmt: skip
        if feats.failed:
            raise DataError(f"cannot decode {feats.failed[0][0]}: {feats.failed[0][1]}")
        crops = torch.stack(decode_all(train_records, prep, crop=True))
        targets = model.target(normalize(crops, prep))
        train_set: torch.utils.data.Dataset[Any] = TensorDataset(torch.from_numpy(feats.features), targets)
    else:
        train_set = MemoryDataset(decode_all(train_records, prep), [-1] * len(train_records),
                                  train_augment(prep, config.augment))  # fmt: skip
    generator = torch.Generator().manual_seed(config.seed)
    # A last batch of one would break BatchNorm, so incomplete batches are dropped when there is a full one.
    loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=True, generator=generator,
                        drop_last=len(train_records) > config.batch_size)  # fmt: skip

    groups: list[dict[str, Any]] = [
        {"params": [p for n, p in model.named_parameters() if not n.startswith("encoder.backbone.")], "lr": config.lr}
    ]
    if isinstance(model.encoder, BackboneEncoder) and not frozen:
        groups.append({"params": list(model.encoder.backbone.parameters()), "lr": config.lr * 0.1})
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, config.epochs * len(loader)))
    loss_fn = F.mse_loss if config.loss == "mse" else F.l1_loss

    info = {
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
        "train_count": len(train_records),
        "val_count": len(val_records),
        "config": cfg.to_dict(config),
        "versions": versions(),
    }
    project = model.encoder.get_submodule("project")  # the trained part of a frozen backbone encoder
    history: list[dict[str, Any]] = []
    best = math.inf
    metrics_path = run_dir / "metrics.jsonl"
    metrics_path.write_text("")
    with progress.bar() as bars:
        task = bars.add_task("autoencoder", total=config.epochs * len(loader), info="")
        for epoch in range(1, config.epochs + 1):
            started = time.perf_counter()
            model.train()
            total, seen = 0.0, 0
            for batch in loader:
                with autocast(device, precision):
                    if frozen:
                        features, target = batch[0].to(device), batch[1].to(device)
                        recon = model.decoder(project(features))
                    else:
                        x = normalize(batch[0].to(device), prep)
                        target = model.target(x)
                        recon = model(x)
                loss = loss_fn(recon.float(), target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total += loss.item() * len(target)  # CPU-GPU sync point, once per step, for the running mean
                seen += len(target)
                bars.update(task, advance=1, info=f"epoch {epoch} loss {total / seen:.4f}")
            seconds = time.perf_counter() - started
            val_loss, recon_sample = _validate(model, val_images, prep, device, precision, config.batch_size)
            row = {"epoch": epoch, "train_loss": total / max(1, seen), "val_loss": val_loss,
                   "lr": optimizer.param_groups[0]["lr"], "epoch_seconds": round(seconds, 3),
                   "train_images_per_s": round(seen / max(seconds, 1e-9), 1)}  # fmt: skip
            history.append(row)
            with metrics_path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            sample = val_images[:8]
            picture = run_dir / f"reconstructions_epoch{epoch}.png"
            save_reconstructions(model.target(normalize(sample, prep)), recon_sample, prep, picture)
            shutil.copyfile(picture, run_dir / "reconstructions.png")
            if val_loss < best:
                best = val_loss
                save_tensors(model.state_dict(), run_dir / "model.safetensors", metadata={"format": "headstart"})
                info.update(best_epoch=epoch, val_loss=val_loss)
                atomic_write_bytes(run_dir / "model.json", json.dumps(info, indent=2).encode())
            checkpoint = {"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "scheduler": scheduler.state_dict(), "config": cfg.to_dict(config)}  # fmt: skip
            (run_dir / "checkpoints").mkdir(exist_ok=True)
            torch.save(checkpoint, run_dir / "checkpoints" / "last.pt")
            progress.log(f"epoch {epoch}: train loss {row['train_loss']:.4f}, val loss {val_loss:.4f}")
    info["train_seconds"] = round(time.perf_counter() - tic, 2)
    atomic_write_bytes(run_dir / "model.json", json.dumps(info, indent=2).encode())
    return AutoencoderResult(run_dir, best, time.perf_counter() - tic, history, config)


@torch.inference_mode()
def _validate(
    model: Autoencoder, images: torch.Tensor, prep: Preprocessing, device: torch.device, precision: str, batch: int
) -> tuple[float, torch.Tensor]:
    """Mean squared reconstruction error of centre-cropped validation images, and the first batch's reconstructions.

    This is the quantity :func:`score` reports per image, so the recorded val loss is the mean anomaly score of
    held-out images.
    """
    model.eval()
    errors: list[torch.Tensor] = []
    first = torch.empty(0)
    for start in range(0, len(images), batch):
        x = normalize(images[start : start + batch].to(device), prep)
        with autocast(device, precision):
            recon = model(x)
        errors.append((recon.float() - model.target(x)).pow(2).mean(dim=(1, 2, 3)).cpu())
        if start == 0:
            first = recon[:8].float().cpu()
    return float(torch.cat(errors).mean()), first


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
