"""``headstart compare`` (strategies side by side over seeds) and ``headstart report`` (rebuild a run's report)."""

from __future__ import annotations

import argparse
import time


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the ``compare`` and ``report`` subcommands."""
    p = sub.add_parser("compare", help="train extract, finetune and scratch on the same split and compare them")
    p.add_argument("data", help="dataset folder (train/ and val/, or class folders) or CSV manifest")
    p.add_argument("--backbone", help="registry name shared by every strategy (default efficientnet_lite0)")
    p.add_argument("--weights", help="weights file for the pretrained strategies (scratch never loads it)")
    p.add_argument(
        "--strategies", default="extract,finetune,scratch", help="comma-separated, in display order (default: all)"
    )
    p.add_argument("--seeds", type=int, default=3, help="runs per strategy, for mean ± std (default 3)")
    p.add_argument("--epochs-finetune", type=int, help="finetune epochs (strategy default when omitted)")
    p.add_argument("--epochs-scratch", type=int, help="scratch epochs (strategy default when omitted)")
    p.add_argument("--batch-size", type=int, help="images per step (default 32)")
    p.add_argument("--out", help="comparison folder (default runs/compare-<time>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing comparison folder")
    p.add_argument(
        "--cache-dir", help="shared feature cache (default: a fresh one per run, so wall times include features)"
    )

    p = sub.add_parser("report", help="rebuild report.html and its figures from a run folder")
    p.add_argument("run", help="run folder of a trained model")
    p.add_argument("--data", help="dataset to report on (default: the one recorded in model.json)")


def parse_strategies(text: str) -> tuple[str, ...]:
    """``"extract, finetune"`` -> ``("extract", "finetune")``."""
    return tuple(s.strip() for s in text.split(",") if s.strip())


def _compare(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from headstart.training.compare import TABLE_HEADER, compare, table_rows

    epochs = {k: v for k, v in (("finetune", args.epochs_finetune), ("scratch", args.epochs_scratch)) if v}
    result = compare(
        args.data,
        **({"backbone": args.backbone} if args.backbone else {}),
        strategies=parse_strategies(args.strategies),
        seeds=args.seeds,
        out=args.out or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}",
        weights=args.weights,
        epochs=epochs or None,
        cache_dir=args.cache_dir,
        overwrite=args.overwrite,
        batch_size=args.batch_size,
    )
    if not result.runs:
        return 0  # a non-main process of a multi-process launch: rank 0 prints
    table = Table(
        *TABLE_HEADER, title=f"{result.n_val} validation images; one image = {100 / max(1, result.n_val):.2f} points"
    )
    for row in table_rows(result.table):
        table.add_row(*row)
    Console().print(table)
    print(f"report: {result.report}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from headstart.insight.report import build_report

    print(f"wrote {build_report(args.run, data=args.data)}")
    return 0


HANDLERS = {
    "compare": _compare,
    "report": _report,
}
