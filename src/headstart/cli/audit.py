"""``headstart audit`` and ``headstart rank``: check a dataset and choose a backbone before training."""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the ``audit`` and ``rank`` subcommands."""
    p = sub.add_parser("audit", help="find unreadable files, duplicates, leakage, label conflicts and label errors")
    p.add_argument("data", help="dataset folder (train/ and val/, or class folders) or CSV manifest")
    p.add_argument(
        "--backbone",
        default="efficientnet_lite0",
        help="features for near duplicates and label errors; 'none' runs the checks without embeddings",
    )
    p.add_argument("--weights", help="weights file for the backbone")
    p.add_argument("--near-threshold", type=float, help="cosine from which images are near copies (default 0.60)")
    p.add_argument("--no-label-errors", action="store_true", help="skip the confident-learning label check")
    p.add_argument("--out", default="audit", help="report folder: audit.csv, audit.json, audit.html (default audit)")
    p.add_argument("--fix", metavar="OUT.csv", help="write a cleaned manifest (path,label,split); files are untouched")
    p.add_argument("--drop", default="unreadable,duplicates,conflicts,label_issues",
                   help="what --fix leaves out (comma-separated; default all four)")  # fmt: skip
    p.add_argument("--cache-dir", help="feature cache folder")
    p.add_argument("--batch-size", type=int, default=32)

    p = sub.add_parser("rank", help="score pretrained backbones on a dataset's frozen features, best first")
    p.add_argument("data", help="dataset folder or CSV manifest")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--backbones", help="comma-separated registry names")
    which.add_argument("--all-offline", action="store_true", help="every listed backbone with local weights")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    p.add_argument("--out", help="folder for rank.csv and rank.json")
    p.add_argument("--cache-dir", help="feature cache folder")
    p.add_argument("--batch-size", type=int, default=32)


def _audit(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from headstart.insight.audit import NEAR_THRESHOLD, audit, write_clean_manifest

    result = audit(
        args.data,
        backbone=None if args.backbone == "none" else args.backbone,
        weights=args.weights,
        near_threshold=args.near_threshold or NEAR_THRESHOLD,
        cache_dir=args.cache_dir,
        out=args.out,
        find_label_errors=not args.no_label_errors,
        batch_size=args.batch_size,
    )
    table = Table("kind", "group", "files (split/label/name)", "detail", title=f"audit of {result.root}")
    lines = [
        (row["kind"], "", escape(row["path"]), escape(row["detail"]))
        for row in result.rows()
        if row["kind"] in ("unreadable", "placeholder")
    ]
    for g in result.groups:
        files = "\n".join(escape(f"{m.split}/{m.label}/{m.path.name}") for m in g.members)
        lines.append((g.name, str(g.id), files, "identical bytes" if g.exact else f"cosine >= {g.similarity:.2f}"))
    for i in result.label_issues:
        lines.append(("label_issue", "", escape(f"{i.split}/{i.label}/{i.path.name}"),
                      f"looks like {escape(i.suggested)} (p={i.suggested_probability:.2f})"))  # fmt: skip
    for line in lines[:40]:
        table.add_row(*line)
    if lines:
        Console(width=max(120, Console().width)).print(table)
    if len(lines) > 40:
        print(f"... and {len(lines) - 40} more in {args.out}/audit.csv")
    counts = ", ".join(f"{k} {v}" for k, v in sorted(result.counts().items())) or "nothing flagged"
    stats = result.stats
    print(f"flagged files: {counts}")
    print(
        f"images {stats['images']}, train class counts {stats['class_counts']['train']} (imbalance "
        f"{stats['imbalance_ratio']}x), width {stats['width']}, height {stats['height']}, modes {stats['modes']}"
    )
    print(f"report: {', '.join(str(p) for p in result.files)} ({result.seconds:.1f} s)")
    if args.fix:
        kept = write_clean_manifest(result, args.fix, drop=[d.strip() for d in args.drop.split(",") if d.strip()])
        print(f"cleaned manifest with {kept} images: {args.fix} (train on it with `headstart train {args.fix}`)")
    return 0


def _rank(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from headstart.insight.rank import offline_candidates, rank

    names = offline_candidates() if args.all_offline else [n.strip() for n in args.backbones.split(",") if n.strip()]
    rows = rank(args.data, names, cache_dir=args.cache_dir, folds=args.folds, batch_size=args.batch_size, out=args.out)
    table = Table(
        "#", "backbone", "LogME", "CV acc", "kNN acc", "embed s", "params", "input", "dim",
        title="backbones by LogME transferability (CV acc: what a logistic head on frozen features reaches)",
    )  # fmt: skip
    for i, r in enumerate(rows, start=1):
        table.add_row(
            str(i), r.backbone, f"{r.logme:.4f}", f"{r.cv_accuracy:.4f}", f"{r.knn_accuracy:.4f}",
            f"{r.embed_seconds:.1f}" + (" (cached)" if r.cached == r.images else ""), f"{r.parameters / 1e6:.1f}M",
            str(r.input_size), str(r.num_features),
        )  # fmt: skip
    Console(width=max(120, Console().width)).print(table)
    print(f"recommended: {rows[0].backbone} (train with `headstart train {args.data} --backbone {rows[0].backbone}`)")
    if args.out:
        print(f"report: {args.out}/rank.csv, {args.out}/rank.json")
    return 0


HANDLERS = {
    "audit": _audit,
    "rank": _rank,
}
