"""The PyTorch transfer-learning tutorial's training recipe, shared by the benchmarks that compare against it.

torchvision ImageFolder (the placeholder GIF left out), RandomResizedCrop(224) + flip for training, Resize(256) +
CenterCrop(224) for validation, batch 4, SGD lr 1e-3 momentum 0.9, StepLR(7, 0.1), cross-entropy, best validation
accuracy over the epochs as the tutorial reports it. Two variants, as in the tutorial: ``finetune`` trains every
layer of the network and a new head; otherwise the backbone is a frozen feature extractor in eval mode and only the
new linear layer trains, the backbone still running over every image in every epoch.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
import torchvision.transforms as T
from torch import nn
from torchvision.datasets import ImageFolder

from headstart.models.backbones import create_backbone


def tutorial_recipe(
    data: Path, epochs: int, *, finetune: bool, device: torch.device | None = None, workers: int = 1
) -> tuple[float, float, float]:
    """Run the recipe; returns (best val accuracy, seconds until it first reached 0.95 or nan, total seconds)."""
    device = device or torch.device("cpu")
    tic = time.perf_counter()
    torch.manual_seed(0)
    norm = T.Normalize([0.5] * 3, [0.5] * 3)
    train_tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    val_tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), norm])
    valid = lambda p: not p.endswith(".gif")  # noqa: E731 - the tutorial's set has a placeholder GIF
    loaders = {
        "train": torch.utils.data.DataLoader(ImageFolder(str(data / "train"), train_tf, is_valid_file=valid),
                                             batch_size=4, shuffle=True, num_workers=workers),
        "val": torch.utils.data.DataLoader(ImageFolder(str(data / "val"), val_tf, is_valid_file=valid),
                                           batch_size=4, num_workers=workers),
    }  # fmt: skip
    backbone = create_backbone()
    head = nn.Linear(backbone.num_features, 2)
    model = nn.Sequential(backbone, head).to(device)
    if not finetune:
        backbone.eval().requires_grad_(False)
    trained = model if finetune else head
    optimizer = torch.optim.SGD(trained.parameters(), lr=1e-3, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    best, reached, best_state = 0.0, float("nan"), None
    for _ in range(epochs):
        for phase in ("train", "val"):
            trained.train(phase == "train")
            correct = total = 0
            for x, y in loaders[phase]:
                x, y = x.to(device), y.to(device)
                with torch.set_grad_enabled(phase == "train"):
                    logits = model(x)
                    if phase == "train":
                        optimizer.zero_grad()
                        nn.functional.cross_entropy(logits, y).backward()
                        optimizer.step()
                correct += int((logits.argmax(1) == y).sum())
                total += len(y)
            if phase == "train":
                scheduler.step()
            elif correct / total > best:
                best, best_state = correct / total, copy.deepcopy(trained.state_dict())  # the tutorial keeps it
                if best >= 0.95 and reached != reached:
                    reached = time.perf_counter() - tic
    del best_state
    return best, reached, time.perf_counter() - tic
