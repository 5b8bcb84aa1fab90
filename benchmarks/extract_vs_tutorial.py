"""Feature extraction three ways on the same backbone (EfficientNet-Lite0, bundled weights) and data (ants/bees):

1. headstart: `headstart train DATA --strategy extract`, as a fresh process with an empty cache (cold), then again
   with the cache filled (warm, 3 runs, the median; beside them, the time of a process that only imports torch, the
   floor of any torch program on this machine);
2. a hand-written probe: frozen features from a plain torch loop + scikit-learn logistic regression, as a fresh
   process;
3. the PyTorch tutorial's "fixed feature extractor" recipe: frozen backbone and a new linear layer trained by SGD
   (lr 1e-3, momentum 0.9, batch 4, StepLR(7, 0.1), 25 epochs, random-resized crops), the backbone run over every
   image in every epoch; in-process, best validation accuracy over the epochs as the tutorial reports it.

    python benchmarks/extract_vs_tutorial.py [--data DIR] [--tutorial-epochs 25]

Prints accuracy and wall time of each and the speed-ups.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

os.environ.setdefault("HEADSTART_QUIET", "1")

from tutorial import tutorial_recipe  # benchmarks/tutorial.py, beside this script

PROBE = textwrap.dedent(
    """
    import sys, time
    import numpy as np, torch, torchvision.transforms as T
    from torchvision.datasets import ImageFolder
    from sklearn.linear_model import LogisticRegression
    from headstart.models.backbones import create_backbone
    model = create_backbone().eval()
    tf = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                    T.Normalize([0.5] * 3, [0.5] * 3)])
    def features(folder):
        ds = ImageFolder(folder, tf, is_valid_file=lambda p: not p.endswith(".gif"))
        loader = torch.utils.data.DataLoader(ds, batch_size=32, num_workers=1)
        out, labels = [], []
        with torch.no_grad():
            for x, y in loader:
                out.append(model(x)); labels.append(y)
        return torch.cat(out).numpy(), torch.cat(labels).numpy()
    xtr, ytr = features(sys.argv[1] + "/train")
    xva, yva = features(sys.argv[1] + "/val")
    clf = LogisticRegression(max_iter=2000).fit(xtr, ytr)
    print("ACCURACY", (clf.predict(xva) == yva).mean())
    """
)


def timed(command: list[str]) -> tuple[float, str]:
    tic = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, check=True)
    return time.perf_counter() - tic, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="ants/bees folder (default: found or downloaded)")
    parser.add_argument("--tutorial-epochs", type=int, default=25, help="0 skips the tutorial recipe")
    parser.add_argument("--warm-repeats", type=int, default=3, help="warm runs (the median is reported)")
    args = parser.parse_args()
    from headstart.data.demo import hymenoptera

    data = (args.data or hymenoptera()).resolve()
    python = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        # --no-report: the strategy's own cost; report.html adds about 6 s here (`headstart report` builds it later)
        # the same single backbone as the probe and the tutorial (extract's default is Lite0 + Lite2 side by side)
        run = [python, "-m", "headstart", "train", str(data), "--strategy", "extract", "--backbone",
               "efficientnet_lite0", "--cache-dir", f"{tmp}/cache", "--no-report"]  # fmt: skip
        cold_s, out = timed([*run, "--out", f"{tmp}/cold"])
        cold_acc = float(out.split("val accuracy ")[1].split()[0])
        warm = [timed([*run, "--out", f"{tmp}/warm{i}"]) for i in range(args.warm_repeats)]
        warm_acc = float(warm[0][1].split("val accuracy ")[1].split()[0])
        warm_times = sorted(seconds for seconds, _ in warm)
        warm_s = warm_times[len(warm_times) // 2]
        # The floor of any torch program: a process that imports torch and exits, measured beside the warm runs.
        torch_times = sorted(timed([python, "-c", "import torch"])[0] for _ in range(args.warm_repeats))
        probe_s, out = timed([python, "-c", PROBE, str(data)])
        probe_acc = float(out.split("ACCURACY")[1])
    tut_acc, tut_s = float("nan"), float("nan")
    if args.tutorial_epochs:
        tut_acc, _, tut_s = tutorial_recipe(data, args.tutorial_epochs, finetune=False)
    print(f"{'method':<64}{'val acc':>9}{'wall s':>9}")
    rows = [
        ("headstart extract, cold (process start, empty cache)", cold_acc, cold_s),
        (f"headstart extract, warm (process start, cached; median of {len(warm_times)})", warm_acc, warm_s),
        ("hand-written probe (torch loop + sklearn), process", probe_acc, probe_s),
        (f"tutorial fixed-feature recipe, {args.tutorial_epochs} epochs, in-process", tut_acc, tut_s),
    ]
    for name, acc, secs in rows:
        print(f"{name:<64}{acc:>9.4f}{secs:>9.1f}")
    print(f"speed-up cold vs tutorial: {tut_s / cold_s:.1f}x; cold vs probe: {probe_s / cold_s:.2f}x; "
          f"warm vs tutorial: {tut_s / warm_s:.1f}x")  # fmt: skip
    torch_s = torch_times[len(torch_times) // 2]
    print(f"warm runs {', '.join(f'{t:.2f}' for t in warm_times)} s; a process that only imports torch "
          f"{', '.join(f'{t:.2f}' for t in torch_times)} s (warm / torch import: {warm_s / torch_s:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
