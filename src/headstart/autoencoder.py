"""Autoencoders: features learnt without labels, an anomaly score, and a backbone like any other (``ae:RUN``).

Two kinds:

* ``encoder="conv"``: a small convolutional encoder and decoder trained from scratch on the images alone.
* ``encoder=<backbone name>``: a pretrained backbone's pooled features, projected linearly to the latent vector,
  with a learnt decoder. The backbone stays frozen by default (its features then come from the feature cache, so an
  epoch costs only the decoder); ``finetune_encoder`` trains it too at a tenth of the learning rate, BatchNorm
  statistics kept frozen.

The decoder rebuilds a ``image_size`` square picture in the normalised space of the encoder's preprocessing; the
reconstruction error of an image (mean squared error per pixel and channel) is its anomaly score. A run folder holds
``config.yaml``, ``model.safetensors`` + ``model.json`` (kind ``autoencoder``), ``metrics.jsonl``,
``reconstructions_epoch{N}.png`` (and the latest as ``reconstructions.png``) and ``checkpoints/last.pt``.

``create_backbone("ae:RUN")`` returns the encoder as a :class:`~headstart.backbones.Backbone` whose features are the
latent vector, so embedding, extract training, indexing and search accept a trained autoencoder.
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
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from headstart import config as cfg
from headstart import progress
from headstart.backbones import Backbone, Preprocessing, create_backbone, register_prefix
from headstart.data import (
    DataError,
    ImageRecord,
    MemoryDataset,
    collect_files,
    decode_all,
    normalize,
    scan_files,
    train_augment,
)
from headstart.embeddings import default_cache_root, embed
from headstart.hardware import autocast, pick_device, resolve_precision
from headstart.inference import run_model
from headstart.models import atomic_write_bytes, save_tensors, versions

FORMAT_VERSION = 1
LOSSES = ("mse", "l1")


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    """Everything one ``headstart autoencoder train`` needs; saved as ``config.yaml`` in its run folder."""

    data: str = ""  # folder of images (sub-folders and class folders are fine: labels are ignored)
    encoder: str = "conv"  # "conv" trains an encoder from scratch; a backbone name starts from its pretrained weights
    encoder_weights: str | None = None  # weights file for a backbone encoder (as --weights elsewhere)
    finetune_encoder: bool = False  # also train a backbone encoder (at lr / 10, BatchNorm frozen); slower
    latent_dim: int = 128  # width of the latent vector, i.e. of the features the autoencoder gives as a backbone
    image_size: int = 64  # side of the reconstructed picture (and of the conv encoder's input); small trains fast
    width: int = (
        32  # channels of the first conv layer (doubling per stage); 32 gives a 64 px model of about 1.8 M weights
    )
    epochs: int = 20  # passes over the images; a 64 px conv model does one in seconds on 2 CPU cores
    lr: float = 2e-3  # AdamW peak learning rate (cosine decay to zero); the decoder is trained from scratch
    weight_decay: float = 1e-4  # mild: reconstruction rarely overfits at these sizes
    loss: str = "mse"  # "mse" or "l1" reconstruction loss on normalised pixels; MSE is also the anomaly score
    augment: str = "light"  # "none", "light" or "strong" (see data.train_augment); ignored by a frozen encoder
    batch_size: int = 32  # images per step
    val_fraction: float = 0.1  # share of images held out to measure reconstruction error on unseen images
    seed: int = 0  # seeds the split, weight init, shuffling and augmentation
    precision: str = "auto"  # "auto" (bf16 autocast where native), "bf16" or "fp32"
    cache_dir: str | None = None  # feature cache root used by a frozen backbone encoder
    out: str | None = None  # run folder; None makes runs/autoencoder-<encoder>-<timestamp>
    overwrite: bool = False  # refuse to replace an existing run folder unless asked

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.image_size < 8 or self.image_size & (self.image_size - 1):
            raise ValueError(
                f"image_size must be a power of two of at least 8 (e.g. 32, 64, 128), got {self.image_size}"
            )
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim must be positive, got {self.latent_dim}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {self.val_fraction}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"unknown precision {self.precision!r}; choose auto, bf16 or fp32")


# -- networks --------------------------------------------------------------------------------------------------------


def _stages(image_size: int) -> int:
    """Stride-2 stages between ``image_size`` and the 4x4 bottleneck grid."""
    return int(math.log2(image_size)) - 2


class ConvEncoder(nn.Module):
    """Stride-2 convolutions down to a 4x4 grid, then a linear map to the latent vector.

    The adaptive pooling makes any input size give a 4x4 grid, so the encoder also runs at the slightly larger
    resolution the extract strategy reads frozen features at.
    """

    def __init__(self, latent_dim: int, image_size: int, width: int):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for stage in range(_stages(image_size)):
            out = width * 2 ** min(stage, 3)
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.project = nn.Linear(channels * 16, latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Latent vectors [B, latent_dim] of a normalised batch."""
        return self.project(self.pool(self.features(x)).flatten(1))


class BackboneEncoder(nn.Module):
    """A pretrained backbone's pooled features, linearly projected to the latent vector."""

    def __init__(self, backbone: Backbone, latent_dim: int):
        super().__init__()
        self.backbone = backbone
        self.project = nn.Linear(backbone.num_features, latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Latent vectors [B, latent_dim] of a normalised batch."""
        return self.project(self.backbone(x).float())


class ConvDecoder(nn.Module):
    """Latent vector -> 4x4 grid -> (nearest upsampling + 3x3 convolution) stages -> ``image_size`` picture.

    Upsampling followed by a convolution avoids the checkerboard artefacts of transposed convolutions
    (Odena et al., "Deconvolution and Checkerboard Artifacts", 2016).
    """

    def __init__(self, latent_dim: int, image_size: int, width: int):
        super().__init__()
        n = _stages(image_size)
        channels = width * 2 ** min(n - 1, 3)
        self.start = nn.Linear(latent_dim, channels * 16)
        self.start_channels = channels
        layers: list[nn.Module] = []
        for stage in reversed(range(n)):
            out = width * 2 ** min(max(stage - 1, 0), 3)
            layers += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(channels, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(),
            ]
            channels = out
        layers.append(nn.Conv2d(channels, 3, 3, padding=1))  # no activation: targets are normalised pixels
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised pictures [B, 3, image_size, image_size]."""
        return self.body(self.start(z).view(z.shape[0], self.start_channels, 4, 4))


class Autoencoder(nn.Module):
    """Encoder + decoder. ``embed(x)`` gives the latent vector, ``forward(x)`` the reconstruction.

    With ``frozen_encoder`` the backbone of a :class:`BackboneEncoder` stays in eval mode under ``.train()`` and has
    no gradients; with ``frozen_bn`` only its BatchNorm layers stay in eval mode (fine-tuning with fixed statistics).
    """

    def __init__(self, encoder: nn.Module, decoder: ConvDecoder, image_size: int):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.image_size = image_size
        self.frozen_encoder = False
        self.frozen_bn = False

    def train(self, mode: bool = True) -> Autoencoder:
        """Switch modes, keeping frozen backbone parts in eval mode."""
        super().train(mode)
        if isinstance(self.encoder, BackboneEncoder):
            if self.frozen_encoder:
                self.encoder.backbone.eval()
            elif self.frozen_bn:
                for module in self.encoder.backbone.modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.eval()
        return self

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """What the decoder should rebuild from input ``x``: ``x`` itself, area-downsampled to ``image_size``."""
        if x.shape[-1] == self.image_size and x.shape[-2] == self.image_size:
            return x.float()
        return F.interpolate(x.float(), size=(self.image_size, self.image_size), mode="area")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Latent vectors [B, latent_dim]."""
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstructions [B, 3, image_size, image_size]."""
        return self.decoder(self.encoder(x))


class _ErrorPerImage(nn.Module):
    """Maps a normalised batch to each image's mean squared reconstruction error, [B, 1] (for ``run_model``)."""

    def __init__(self, model: Autoencoder):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        recon = self.model(x).float()
        return (recon - self.model.target(x)).pow(2).mean(dim=(1, 2, 3)).unsqueeze(1)


def conv_preprocessing(image_size: int) -> Preprocessing:
    """Preprocessing of a conv autoencoder: centre crop of ``image_size`` px, pixels scaled to [-1, 1]."""
    return Preprocessing(image_size, round(image_size / 0.875), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")


def build_autoencoder(config: AutoencoderConfig, pretrained: bool = True) -> tuple[Autoencoder, Preprocessing, str]:
    """The untrained network a config describes: (autoencoder, encoder preprocessing, encoder weight source).

    Args:
        config: the run configuration.
        pretrained: load a backbone encoder's weights (False when a saved state dict is loaded afterwards).
    """
    decoder = ConvDecoder(config.latent_dim, config.image_size, config.width)
    if config.encoder == "conv":
        encoder: nn.Module = ConvEncoder(config.latent_dim, config.image_size, config.width)
        return Autoencoder(encoder, decoder, config.image_size), conv_preprocessing(config.image_size), "random"
    backbone = create_backbone(config.encoder, pretrained=pretrained, weights=config.encoder_weights)
    model = Autoencoder(BackboneEncoder(backbone, config.latent_dim), decoder, config.image_size)
    return model, backbone.preprocessing, backbone.weights_source


# -- training --------------------------------------------------------------------------------------------------------


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


# -- loading, scoring, the ae: backbone prefix -----------------------------------------------------------------------


def load_autoencoder(run: str | Path) -> tuple[Autoencoder, dict[str, Any]]:
    """Rebuild a trained autoencoder from its run folder, without downloading anything."""
    folder = Path(run).expanduser()
    path = folder / "model.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; is {folder} a run folder made by `headstart autoencoder train`?")
    info: dict[str, Any] = json.loads(path.read_text())
    if info.get("kind") != "autoencoder":
        raise ValueError(f"{folder} holds a {info.get('kind')!r} model, not an autoencoder; use run:{folder} instead")
    config = cfg.from_dict(AutoencoderConfig, info["config"], where=str(path))
    model, _, _ = build_autoencoder(config, pretrained=False)
    if isinstance(model.encoder, BackboneEncoder):
        model.encoder.backbone.preprocessing = Preprocessing.from_dict(info["preprocessing"])
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    model.eval()
    return model, info


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
    # The precision the model was validated with, where this machine runs it natively (as api.Model does).
    precision = str(info.get("precision", "fp32")) if resolve_precision("auto", device) == "bf16" else "fp32"
    prep = Preprocessing.from_dict(info["preprocessing"])
    out = run_model(_ErrorPerImage(model), files, prep, 1, batch_size=batch_size, precision=precision,
                    device=device, description="scoring")  # fmt: skip
    return Scores([files[i] for i in np.flatnonzero(out.ok)], out.values[out.ok, 0], out.failed)


def autoencoder_backbone(run: str) -> Backbone:
    """``ae:RUN``: a trained autoencoder's encoder as a backbone whose features are the latent vector.

    The name records the absolute run path, so a classifier or index built on it reloads from any directory.
    """
    folder = Path(run).expanduser().resolve()
    model, info = load_autoencoder(folder)
    prep = Preprocessing.from_dict(info["preprocessing"])
    return Backbone(
        model.encoder, int(info["latent_dim"]), f"ae:{folder}", prep, f"file:{folder / 'model.safetensors'}"
    )


register_prefix("ae:", autoencoder_backbone)
