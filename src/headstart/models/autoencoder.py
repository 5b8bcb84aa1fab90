"""Autoencoders: features learnt without labels, an anomaly score, and a backbone like any other (``ae:RUN``).

Two kinds:

* ``encoder="conv"``: a small convolutional encoder and decoder trained from scratch on the images alone.
* ``encoder=<backbone name>``: a pretrained backbone's pooled features, projected linearly to the latent vector,
  with a learnt decoder. The backbone stays frozen by default (its features then come from the feature cache, so an
  epoch costs only the decoder); ``finetune_encoder`` trains it too at a tenth of the learning rate, BatchNorm
  layers kept frozen (statistics and affine parameters, as the classifiers' ``bn_policy=frozen``).

The decoder rebuilds a ``image_size`` square picture in the normalised space of the encoder's preprocessing; the
reconstruction error of an image (mean squared error per pixel and channel) is its anomaly score. A run folder holds
``config.yaml``, ``model.safetensors`` + ``model.json`` (kind ``autoencoder``), ``metrics.jsonl``,
``reconstructions_epoch{N}.png`` (and the latest as ``reconstructions.png``) and ``checkpoints/last.pt`` (written
atomically by the shared trainer; ``headstart autoencoder train --resume RUN`` continues from it).

``create_backbone("ae:RUN")`` returns the encoder as a :class:`~headstart.models.backbones.Backbone` whose features are
the latent vector, so embedding, extract training, indexing and search accept a trained autoencoder.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from headstart import config as cfg
from headstart.data.transforms import Preprocessing
from headstart.errors import IntegrityError
from headstart.models.backbones import Backbone, create_backbone, register_prefix
from headstart.models.checks import checked_preprocessing, read_info, read_weights, require
from headstart.models.freezing import keep_frozen_in_eval

FORMAT_VERSION = 1
AE_RETRAIN = "train the autoencoder again (`headstart autoencoder train`), or restore the run folder from a copy"
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
    checkpoint_every: int = 0  # also checkpoint every N optimiser steps (0: once per epoch), to resume mid-epoch

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

    Parts frozen by :func:`~headstart.models.freezing.freeze` stay in eval mode under ``.train()`` and get no
    gradients. ``frozen_encoder`` records that the backbone of a :class:`BackboneEncoder` is, ``frozen_bn`` that its
    BatchNorm layers alone are (fine-tuning with fixed statistics).
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
        keep_frozen_in_eval(self)
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


# -- loading, the ae: backbone prefix -----------------------------------------------------------------------


def load_autoencoder(run: str | Path) -> tuple[Autoencoder, dict[str, Any]]:
    """Rebuild a trained autoencoder from its run folder, without downloading anything.

    Raises:
        IntegrityError: a file is missing, truncated or modified, or the weights do not fit the described network.
    """
    folder = Path(run).expanduser()
    path = folder / "model.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; is {folder} a run folder made by `headstart autoencoder train`?")
    info = read_info(folder, AE_RETRAIN)
    if info.get("kind") != "autoencoder":
        raise ValueError(f"{folder} holds a {info.get('kind')!r} model, not an autoencoder; use run:{folder} instead")
    require(info, ("config", "preprocessing"), folder, AE_RETRAIN)
    config = cfg.from_dict(AutoencoderConfig, info["config"], where=str(path))
    prep = checked_preprocessing(info["preprocessing"], path, AE_RETRAIN)
    state = read_weights(folder, AE_RETRAIN)
    model, _, _ = build_autoencoder(config, pretrained=False)
    if isinstance(model.encoder, BackboneEncoder):
        model.encoder.backbone.preprocessing = prep
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:  # torch lists every missing, unexpected and misshapen tensor on several lines
        detail = " ".join(str(error).split())[:300]
        raise IntegrityError(f"{folder / 'model.safetensors'} does not fit the network described in {path} "
                             f"({detail}); {AE_RETRAIN}") from error  # fmt: skip
    model.eval()
    return model, info


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
