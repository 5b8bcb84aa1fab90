"""Subcommands ``train``, ``evaluate``, ``predict``, ``backbones``, ``embed``, ``cache`` and ``demo``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the train, evaluate, predict, backbones, embed, cache and demo sub-parsers."""
    _add_train_parser(sub)
    _add_other_parsers(sub)


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a classifier on a folder of labelled images")
    p.add_argument(
        "data", nargs="?", help="dataset folder (train/ and val/, or class folders) or CSV manifest (path,label)"
    )
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--checkpoint-every", type=int, help="also checkpoint every N steps (default: each epoch)")
    p.add_argument(
        "--strategy",
        choices=["auto", "extract", "finetune", "scratch"],
        help="default auto: frozen features of the three bundled backbones side by side, head chosen by CV",
    )
    p.add_argument(
        "--backbone",
        help="registry name, or a+b for several side by side (default: the strategy's; see `headstart backbones`)",
    )
    p.add_argument("--weights", help="weights file (.safetensors or .pth) for the backbone")
    p.add_argument("--epochs", type=int, help="training epochs (strategy default when omitted)")
    p.add_argument("--lr", type=float, help="peak learning rate of the head (strategy default when omitted)")
    p.add_argument("--batch-size", type=int, help="images per step (default 32)")
    p.add_argument("--input-size", type=int, help="crop side in pixels (default: the strategy's choice)")
    p.add_argument(
        "--mirror",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="average each image's frozen features with its mirror image's (twice the cost; default off)",
    )
    p.add_argument(
        "--crops",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train the head on features averaged over the centre and four corner crops, and predict with them by "
        "default (TTA crops; five times the cost; default off)",
    )
    p.add_argument(
        "--multi-label", action="store_true", default=None,
        help="read the manifest's label column as '|'-separated label sets (a 'labels' column does so by itself)",
    )  # fmt: skip
    p.add_argument("--val-fraction", type=float, help="held-out share when the data has no val/ folder (0.2)")
    p.add_argument("--class-weights", choices=["none", "auto"], help="auto: weight the loss by inverse frequency")
    p.add_argument("--head", choices=["logistic", "knn"], help="extract head (default logistic)")
    p.add_argument("--augment-views", type=int, help="augmented feature views per image for the extract head")
    p.add_argument(
        "--head-scaling",
        choices=["feature", "global", "auto"],
        help="feature scaling of the logistic head (default auto for frozen strategies: chosen by CV)",
    )
    p.add_argument("--bn-policy", choices=["train", "frozen"], help="BatchNorm policy when fine-tuning")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], help="default auto (bf16 where native)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--deterministic", action="store_true", default=None, help="deterministic kernels (slower)")
    p.add_argument("--early-stopping", type=int, help="stop after N epochs without improvement")
    p.add_argument("--cache-dir", help="feature cache folder (default $HEADSTART_CACHE or ~/.cache/headstart)")
    p.add_argument("--config", help="YAML config file (see a run folder's config.yaml); flags override it")
    p.add_argument("--out", help="run folder (default runs/<strategy>-<backbone>-<time>)")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing run folder")
    p.add_argument("--no-report", action="store_true", help="skip report.html (rebuild later: headstart report RUN)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the network (GPU speed)")
    p.add_argument("--log-with", choices=["tensorboard", "mlflow"],
                   help="log hyperparameters, metrics and figures to a tracker (needs headstart[track])")  # fmt: skip
    p.add_argument("--tracking-dir", help="where the tracker writes (default RUN/tracking)")


def _add_other_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="metrics of a trained model on a labelled split")
    p.add_argument("run", help="run folder of a trained model")
    p.add_argument("data", help="dataset folder or CSV manifest")
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    p.add_argument("--json", dest="json_out", help="also write the metrics to this JSON file")
    _add_tta(p)

    p = sub.add_parser("predict", help="classify images")
    p.add_argument("run", help="run folder of a trained model")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--top-k", type=int, default=1, help="classes to report per image")
    p.add_argument("--output", help="write predictions to a .csv or .json file")
    p.add_argument("--batch-size", type=int, default=32)
    _add_tta(p)

    p = sub.add_parser("backbones", help="list backbones and whether their weights are available offline")
    p.add_argument("--all", action="store_true", help="list every timm and torchvision model")

    p = sub.add_parser("embed", help="write an embedding matrix for images (cached)")
    p.add_argument("inputs", nargs="+", help="a dataset (folder/CSV), or image files and folders")
    p.add_argument("--backbone", default="efficientnet_lite0", help="registry name, or a run folder's model")
    p.add_argument("--weights", help="weights file for the backbone")
    p.add_argument("--out", default="embeddings", help="output folder (meta.json + shards/NNNNN/: vectors.npy, "
                   "rows.csv); run the same command again to finish an interrupted run")  # fmt: skip
    p.add_argument("--normalize", action="store_true", help="L2-normalise rows")
    p.add_argument("--shard-size", type=int, default=100_000, help="images per shard, each written whole as soon "
                   "as it is computed (default 100000)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--no-cache", action="store_true", help="neither read nor fill the feature cache")
    p.add_argument("--cache-dir", help="cache folder (default $HEADSTART_CACHE or ~/.cache/headstart)")

    p = sub.add_parser("cache", help="inspect or clear the caches (features, prepared backbones, dataset scans)")
    p.add_argument("action", choices=["info", "clear"])
    p.add_argument("--cache-dir", help="cache folder (default $HEADSTART_CACHE or ~/.cache/headstart)")

    p = sub.add_parser("demo", help="ants vs bees: compare extract, finetune and scratch, with reports")
    p.add_argument("--out", default="runs/demo", help="comparison folder (default runs/demo)")
    p.add_argument("--seeds", type=int, default=3, help="runs per strategy (default 3)")


def _add_tta(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tta", default=None, choices=["none", "flip", "crops"],
        help="test-time augmentation: flip averages each image's features with its mirror image's (2x the cost), "
        "crops the logits of the centre and four corner crops (5x); default the model's own (crops for a model "
        "trained with --crops, else none)",
    )  # fmt: skip


def _train(args: argparse.Namespace) -> int:
    from headstart import config
    from headstart.training.run import resume, train

    if args.resume:
        result = resume(args.resume)
        return _print_result(result)
    if not args.data:
        raise ValueError("give a dataset folder or CSV manifest (or --resume RUN)")
    base = config.load_yaml(config.TrainConfig, Path(args.config)) if args.config else None
    result = train(
        args.data,
        config=base,
        strategy=args.strategy,
        backbone=args.backbone,
        weights=args.weights,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        input_size=args.input_size,
        mirror=args.mirror,
        crops=args.crops,
        val_fraction=args.val_fraction,
        class_weights=args.class_weights,
        head=args.head,
        augment_views=args.augment_views,
        head_scaling=args.head_scaling,
        bn_policy=args.bn_policy,
        precision=args.precision,
        seed=args.seed,
        deterministic=args.deterministic,
        early_stopping=args.early_stopping,
        cache_dir=args.cache_dir,
        out=args.out,
        overwrite=args.overwrite,
        **{
            "run.checkpoint_every": args.checkpoint_every,
            "run.report": False if args.no_report else None,
            "run.compile": args.compile,
            "run.log_with": args.log_with,
            "run.tracking_dir": args.tracking_dir,
            "data.multi_label": args.multi_label,
        },
    )
    return _print_result(result)


def _print_result(result: Any) -> int:
    if not result.metrics:
        return 0  # a non-main process of a multi-process launch
    from headstart.insight.metrics import format_metrics

    print(format_metrics(result.metrics))
    metrics = result.metrics
    if metrics.get("multi_label"):
        score = f"val macro mAP {metrics['mAP']:.4f}, exact match {metrics['exact_match']:.4f}"
    else:
        score = f"val accuracy {metrics['accuracy']:.4f}"
    print(
        f"\nstrategy {result.config.strategy}, backbone {result.config.model.backbone}: {score} in "
        f"{result.seconds:.1f} s; model in {result.run_dir}"
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from headstart.files import atomic_write_bytes
    from headstart.insight.metrics import format_metrics
    from headstart.insight.predictor import load

    metrics = load(args.run).evaluate(args.data, split=args.split, tta=args.tta)
    print(format_metrics(metrics))
    if metrics.get("skipped"):
        print(f"\nskipped {len(metrics['skipped'])} unreadable file(s)")
    if args.json_out:
        atomic_write_bytes(Path(args.json_out), json.dumps(metrics, indent=2).encode())
    return 0


def _predict(args: argparse.Namespace) -> int:
    from headstart.insight.predictor import load, write_predictions

    rows, failed = load(args.run).predict(args.inputs, top_k=args.top_k, batch_size=args.batch_size, tta=args.tta)
    if args.output:
        write_predictions(rows, Path(args.output))
        print(f"wrote {len(rows)} predictions to {args.output}")
    else:
        for r in rows:  # multi-label: the predicted label set ('|'-separated, empty for none) first
            labels = "" if r.labels is None else f"{r.label}\t"
            print(f"{r.path}\t{labels}" + "\t".join(f"{name}\t{p:.4f}" for name, p in r.top))
    for path, reason in failed:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    return 0


def _backbones(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from headstart.models.backbones import list_backbones, weights_hint

    table = Table("backbone", "offline weights", "weights: where, or how to get them", "notes")
    for name, offline, note in list_backbones(all_models=args.all):
        table.add_row(escape(name), "yes" if offline else "-", escape(weights_hint(name, offline)), escape(note))
    Console().print(table)
    print(
        "Any timm model name, hf-hub:ORG/NAME and torchvision/<name> work; without offline weights they download when "
        "online. --weights FILE (.safetensors or .pth, in timm's or torchvision's names) works offline for any."
    )
    return 0


def _embed(args: argparse.Namespace) -> int:
    from headstart.features.embeddings import write_embeddings
    from headstart.hardware import launch_rank

    run = write_embeddings(
        args.inputs,
        Path(args.out),
        backbone=args.backbone,
        weights=args.weights,
        l2_normalize=args.normalize,
        batch_size=args.batch_size,
        precision=args.precision,
        use_cache=not args.no_cache,
        cache_dir=args.cache_dir,
        shard_size=args.shard_size,
    )
    if launch_rank() != 0:
        return 0  # every rank of a multi-process launch wrote its shards; rank 0 wrote meta.json and reports
    kept = f", {run.kept} complete shard{'s' if run.kept != 1 else ''} kept from an earlier run" if run.kept else ""
    print(
        f"wrote {run.rows} x {run.dim} embeddings to {args.out} in {run.shards} shard{'s' if run.shards != 1 else ''}"
        f" ({run.hits} from cache, {run.computed} computed, {len(run.failed)} unreadable{kept})"
    )
    for path, reason in run.failed:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from headstart.training.compare import demo

    demo(out=args.out, seeds=args.seeds)
    return 0


def _cache(args: argparse.Namespace) -> int:
    from headstart.features.embeddings import cache_clear, cache_info
    from headstart.files import default_cache_root

    root = Path(args.cache_dir) if args.cache_dir else None
    if args.action == "clear":
        print(f"removed {cache_clear(root)} cache entries from {default_cache_root(root)}")
        return 0
    rows = cache_info(root)
    print(f"cache at {default_cache_root(root)}")
    for name, entries, size in rows:
        kind = "vectors" if not name.endswith("/") else "files"
        print(f"  {name}: {entries} {kind}, {size / 2**20:.1f} MiB")
    if not rows:
        print("  (empty)")
    return 0


HANDLERS = {
    "train": _train,
    "evaluate": _evaluate,
    "predict": _predict,
    "backbones": _backbones,
    "embed": _embed,
    "demo": _demo,
    "cache": _cache,
}
