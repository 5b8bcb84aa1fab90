"""Does the pipeline feed the accelerator? Training and embedding images/s against the raw model limit measured in the
same run, and time to 0.95 val accuracy on ants/bees against the tutorial's fine-tuning recipe.

    python benchmarks/gpu.py                      # one GPU, EfficientNet-Lite0 at 224 px, about 3-5 minutes
    python benchmarks/gpu.py --device cpu --batch-size 32 --repeat 2 --tutorial-epochs 1   # the code path on a CPU

1. Raw limit: the model alone on uint8 batches already on the device (normalise, channels-last, bf16 autocast):
   training steps (forward, backward, AdamW) and inference forwards, in images/s; training also in fp32.
2. headstart training: `headstart.train --strategy finetune` over the ants/bees training photos listed ``--repeat``
   times (decoded once into memory, augmented in worker processes), images/s of the training epochs
   (``train_images_per_s`` in metrics.jsonl), and its ratio to the raw bf16 training limit.
3. headstart embedding: `embed` over the ants/bees photos listed ``--repeat`` times (JPEG files in, no feature cache)
   against the raw inference limit.
4. Time to 0.95: the default finetune on ants/bees (seconds of training until the first epoch at >= 0.95 val
   accuracy, and the whole run's wall time), then the PyTorch tutorial's fine-tuning recipe on the same backbone (all
   layers trained, SGD lr 1e-3 momentum 0.9, batch 4, StepLR(7, 0.1), ``--tutorial-epochs`` epochs, torchvision
   ImageFolder + RandomResizedCrop, 4 workers as in the tutorial): its best val accuracy and seconds until it first
   reaches 0.95.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HEADSTART_QUIET", "1")

import torch
from torch import nn

import headstart
from headstart.data.demo import hymenoptera
from headstart.data.scan import load_dataset
from headstart.data.transforms import normalize
from headstart.features.embeddings import embed
from headstart.hardware import autocast, tune_allocator
from headstart.models.backbones import create_backbone
from tutorial import tutorial_recipe  # benchmarks/tutorial.py, beside this script


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def raw_limits(device: torch.device, batch: int, steps: int) -> dict[str, float]:
    """Images/s of the bare model: bf16 and fp32 training steps, bf16 inference."""
    out = {}
    backbone = create_backbone()
    model = nn.Sequential(backbone, nn.Linear(backbone.num_features, 2)).to(device, memory_format=torch.channels_last)
    prep = backbone.preprocessing
    images = torch.randint(0, 256, (batch, 3, prep.input_size, prep.input_size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 2, (batch,), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for precision in ("bf16", "fp32"):
        for i in range(steps + 3):  # three warm-up steps
            if i == 3:
                sync(device)
                tic = time.perf_counter()
            x = normalize(images, prep).contiguous(memory_format=torch.channels_last)
            with autocast(device, precision):
                loss = nn.functional.cross_entropy(model(x).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        sync(device)
        out[f"train_{precision}"] = batch * steps / (time.perf_counter() - tic)
    model.eval()
    with torch.inference_mode():
        for i in range(steps + 3):
            if i == 3:
                sync(device)
                tic = time.perf_counter()
            x = normalize(images, prep).contiguous(memory_format=torch.channels_last)
            with autocast(device, "bf16"):
                backbone(x)
        sync(device)
    out["infer_bf16"] = batch * steps / (time.perf_counter() - tic)
    return out


def repeated_manifest(data: Path, repeat: int, path: Path) -> Path:
    """CSV listing every training photo ``repeat`` times and the val photos once."""
    dataset = load_dataset(data)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split"])
        for _ in range(repeat):
            writer.writerows([str(r.path), dataset.classes[r.label], "train"] for r in dataset.train)
        writer.writerows([str(r.path), dataset.classes[r.label], "val"] for r in dataset.val)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="ants/bees folder (default: found or downloaded)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="timed steps of the raw limits")
    parser.add_argument("--repeat", type=int, default=20, help="times the photos are listed for throughput")
    parser.add_argument("--tutorial-epochs", type=int, default=25, help="0 skips the tutorial recipe")
    args = parser.parse_args()
    tune_allocator()
    device = torch.device(args.device)
    data = (args.data or hymenoptera()).resolve()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"device: {name}; batch {args.batch_size}; torch {torch.__version__}")

    raw = raw_limits(device, args.batch_size, args.steps)
    for key, value in raw.items():
        print(f"raw limit {key:<12} {value:9.1f} images/s")

    with tempfile.TemporaryDirectory() as tmp:
        manifest = repeated_manifest(data, args.repeat, Path(tmp) / "repeated.csv")
        run = headstart.train(manifest, strategy="finetune", epochs=2, batch_size=args.batch_size,
                              out=f"{tmp}/throughput", cache_dir=f"{tmp}/cache",
                              **{"run.report": False, "run.audit": False})  # fmt: skip
        rates = [r["train_images_per_s"] for r in run.history if r.get("phase") == "train"]
        print(f"headstart finetune training: {max(rates):9.1f} images/s (epochs: {rates}); "
              f"ratio to the raw bf16 limit {max(rates) / raw['train_bf16']:.2f}")  # fmt: skip

        dataset = load_dataset(data)
        files = [r.path for r in dataset.train + dataset.val] * args.repeat
        backbone = create_backbone()
        tic = time.perf_counter()
        embed(backbone, files, batch_size=args.batch_size, device=device, use_cache=False)
        rate = len(files) / (time.perf_counter() - tic)
        print(f"headstart embed (JPEG in): {rate:9.1f} images/s; ratio to the raw inference limit "
              f"{rate / raw['infer_bf16']:.2f}")  # fmt: skip

        tic = time.perf_counter()
        result = headstart.train(data, out=f"{tmp}/finetune", cache_dir=f"{tmp}/cache", **{"run.report": False})
        wall = time.perf_counter() - tic
        elapsed, reached = 0.0, float("nan")
        for row in result.history:
            elapsed += row.get("epoch_seconds", 0.0)
            if row["accuracy"] >= 0.95:
                reached = elapsed
                break
        print(f"headstart finetune (defaults): best val {result.metrics['accuracy']:.4f}; "
              f"training seconds to >= 0.95: {reached:.1f} (epoch 0 is the head on frozen features); "
              f"whole run {wall:.1f} s")  # fmt: skip
    if args.tutorial_epochs:
        workers = min(4, os.cpu_count() or 1)  # the tutorial's 4 loader workers, where the cores exist
        best, to95, total = tutorial_recipe(data, args.tutorial_epochs, finetune=True, device=device, workers=workers)
        print(f"tutorial fine-tuning recipe: best val {best:.4f}; seconds to >= 0.95: {to95:.1f}; "
              f"{args.tutorial_epochs} epochs {total:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
