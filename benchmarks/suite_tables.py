"""Print the README's dev-suite tables (Markdown) from the JSON that ``benchmarks/suite.py`` wrote, so the two agree.

    python benchmarks/suite_tables.py benchmarks/results/suite_cpu.json [more.json ...]

Several files are read as one: the first file's probe is the reference; a later file's variants keep their accuracy
and have their time compared with the probe timed in their own run.

The first table has one row per set and the main variants; the second, the ablation: every variant's mean gap to the
probe over the five dev-suite sets (ants/bees apart, where one val image is 0.65 points) and its time.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

MAIN = ("default", "extract", "finetune")
DEV_SUITE = ("beans", "brain_tumor_mri", "dtd10", "eurosat", "food101_10")


def _runs(data: dict[str, Any]) -> dict[tuple[str, str], dict[str, float]]:
    """(set, variant) -> mean accuracy, balanced accuracy and seconds over the seeds that ran."""
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in data["runs"]:
        if run.get("ok"):
            grouped.setdefault((run["set"], run["variant"]), []).append(run)
    return {
        key: {m: statistics.mean(r[m] for r in runs) for m in ("accuracy", "balanced_accuracy", "seconds")}
        for key, runs in grouped.items()
    }


def per_set_table(data: dict[str, Any]) -> str:
    """Accuracy, balanced accuracy and time of the main variants against the probe, one row per set."""
    runs = _runs(data)
    sets = list(dict.fromkeys(s for s, _ in runs))
    variants = [v for v in MAIN if any((s, v) in runs for s in sets)]
    header = ["set", "probe acc / bal / s"] + [f"{v} acc / bal / s (vs probe: points, time)" for v in variants]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name in sets:
        probe = runs.get((name, "probe"))
        if probe is None:
            continue
        cells = [name, f"{probe['accuracy']:.3f} / {probe['balanced_accuracy']:.3f} / {probe['seconds']:.0f}"]
        for variant in variants:
            run = runs.get((name, variant))
            if run is None:
                cells.append("-")
                continue
            gap = 100 * (run["accuracy"] - probe["accuracy"])
            ratio = run["seconds"] / probe["seconds"]
            scores = f"{run['accuracy']:.3f} / {run['balanced_accuracy']:.3f} / {run['seconds']:.0f}"
            cells.append(f"{scores} ({gap:+.1f}, {ratio:.2f}x)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablation_table(data: dict[str, Any], sets: tuple[str, ...] = DEV_SUITE) -> str:
    """Each variant's mean and worst gap to the probe (accuracy, balanced accuracy) and time ratio over ``sets``."""
    runs = _runs(data)
    variants = [v for v in dict.fromkeys(v for _, v in runs) if v != "probe"]
    header = ["variant", "acc gap mean", "acc gap worst", "bal gap mean", "bal gap worst", "time mean", "time max"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for variant in variants:
        pairs = [
            (runs[(s, variant)], runs[(s, "probe")]) for s in sets if (s, variant) in runs and (s, "probe") in runs
        ]
        if not pairs:
            continue
        acc = [100 * (r["accuracy"] - p["accuracy"]) for r, p in pairs]
        bal = [100 * (r["balanced_accuracy"] - p["balanced_accuracy"]) for r, p in pairs]
        ratio = [r["seconds"] / p["seconds"] for r, p in pairs]
        lines.append(
            f"| {variant} ({len(pairs)} sets) | {statistics.mean(acc):+.1f} | {min(acc):+.1f} | "
            f"{statistics.mean(bal):+.1f} | {min(bal):+.1f} | {statistics.mean(ratio):.2f}x | {max(ratio):.2f}x |"
        )
    return "\n".join(lines)


def merge(files: list[dict[str, Any]]) -> dict[str, Any]:
    """One result set from several: the first file's runs, then each later file's variants other than the probe.
    Accuracy is absolute, so theirs compares with the first file's probe as it is; time is compared with the probe
    timed in the same file (the ratio is carried over onto the first file's probe)."""
    base = [dict(r) for r in files[0]["runs"]]
    probes = {r["set"]: r for r in base if r["variant"] == "probe" and r.get("ok")}
    for other in files[1:]:
        own = {r["set"]: r for r in other["runs"] if r["variant"] == "probe" and r.get("ok")}
        for run in other["runs"]:
            if run["variant"] == "probe" or not run.get("ok") or run["set"] not in own or run["set"] not in probes:
                continue
            mine, first = own[run["set"]], probes[run["set"]]
            moved = dict(run)
            moved["seconds"] = first["seconds"] * run["seconds"] / mine["seconds"]
            base.append(moved)
    return {"runs": base}


def main() -> None:
    """Print both tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, nargs="+", help="suite.py's --out files")
    data = merge([json.loads(path.read_text()) for path in parser.parse_args().json])
    print(per_set_table(data), end="\n\n")
    print(ablation_table(data))
    print()
    print(ablation_table(data, (*DEV_SUITE, "hymenoptera")).replace(" sets)", " sets incl. ants/bees)"))


if __name__ == "__main__":
    main()
