"""Subcommands ``autoencoder train|score``, ``index build|add|remove|evaluate`` and ``search``.

Hooked into :mod:`headstart.cli.app` by calling :func:`add_parsers` on its sub-parsers; each handler parses, calls one
library function of :mod:`headstart.training.autoencoder` or :mod:`headstart.features.retrieval`, and prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the autoencoder, index and search sub-parsers."""
    _add_autoencoder_parser(sub)
    _add_index_parser(sub)
    _add_search_parser(sub)


def _add_autoencoder_parser(sub: argparse._SubParsersAction) -> None:
    """``autoencoder train`` and ``autoencoder score``."""
    p = sub.add_parser("autoencoder", help="train an autoencoder on unlabelled images, or score images by it")
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser("train", help="train a (conv or pretrained-encoder) autoencoder; labels are ignored")
    a.add_argument("data", nargs="?", help="folder of images (class sub-folders are fine)")
    a.add_argument("--resume", metavar="RUN", help="continue an interrupted run from its last checkpoint")
    a.add_argument("--encoder", help="conv (default, trained from scratch) or a backbone name (pretrained encoder)")
    a.add_argument("--encoder-weights", help="weights file for a backbone encoder")
    a.add_argument("--finetune-encoder", action="store_true", default=None, help="also train a backbone encoder")
    a.add_argument("--latent-dim", type=int, help="latent vector width (default 128)")
    a.add_argument("--image-size", type=int, help="side of the reconstructed picture, a power of two (default 64)")
    a.add_argument("--width", type=int, help="channels of the first conv layer (default 32)")
    a.add_argument("--epochs", type=int, help="passes over the images (default 20)")
    a.add_argument("--lr", type=float, help="AdamW learning rate (default 2e-3)")
    a.add_argument("--loss", choices=["mse", "l1"], help="reconstruction loss (default mse)")
    a.add_argument("--augment", choices=["none", "light", "strong"], help="augmentation (default light)")
    a.add_argument("--batch-size", type=int, help="images per step (default 32)")
    a.add_argument("--val-fraction", type=float, help="held-out share of images (default 0.1)")
    a.add_argument("--precision", choices=["auto", "bf16", "fp32"])
    a.add_argument("--seed", type=int)
    a.add_argument("--cache-dir", help="feature cache folder (frozen backbone encoders)")
    a.add_argument("--out", help="run folder (default runs/autoencoder-<encoder>-<time>)")
    a.add_argument("--overwrite", action="store_true", default=None, help="replace an existing run folder")
    a = actions.add_parser("score", help="anomaly score (reconstruction error) of images; higher is more unusual")
    a.add_argument("run", help="autoencoder run folder")
    a.add_argument("images", nargs="+", help="image files or folders")
    a.add_argument("--batch-size", type=int, default=32)
    a.add_argument("--output", help="also write path,score rows to this CSV file")


def _add_index_parser(sub: argparse._SubParsersAction) -> None:
    """``index build``, ``add``, ``remove`` and ``evaluate``."""
    p = sub.add_parser("index", help="build, grow, shrink or evaluate an image retrieval index")
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser("build", help="embed images (through the cache) into a FAISS index")
    a.add_argument("data", nargs="*", help="a dataset folder/CSV (labels kept), or image files and folders")
    a.add_argument("--out", required=True, help="index folder to write")
    a.add_argument("--embeddings", help="build from this `headstart embed` folder (its backbone), embedding nothing")
    a.add_argument("--shard-size", type=int, default=100_000, help="images per embedding shard in OUT/embeddings "
                   "(default 100000); run the same command again to finish an interrupted build")  # fmt: skip
    a.add_argument("--backbone", default="efficientnet_lite0", help="registry name, ae:RUN or run:RUN")
    a.add_argument("--weights", help="weights file for the backbone")
    a.add_argument("--index", dest="kind", default="flat",
                   choices=["auto", "flat", "ivf", "hnsw", "sq8", "ivfsq8", "ivfpq", "opq"],
                   help="flat: exact (default); ivf or hnsw: approximate, full vectors; sq8/ivfsq8 (1 byte per "
                   "dimension), ivfpq/opq (PQ codes of up to 128 bytes): compressed, for collections past memory; "
                   "auto: chosen from the collection's size and --memory-budget")  # fmt: skip
    a.add_argument(
        "--memory-budget",
        help="memory the loaded index may take, e.g. 1GB or 500MB: picks the kind "
        "(with --index auto) and sizes the PQ codes; a budget no index fits is refused with the least one",
    )
    a.add_argument(
        "--rerank",
        type=int,
        help="keep the exact vectors on disk (vectors.npy) and re-score RERANK x k "
        "candidates per query (default 10 for ivfpq/opq, 0 otherwise; 0 keeps no vectors, except for ivfpq/opq, "
        "whose 4-bit codes cannot be decoded)",
    )
    a.add_argument("--pq-m", type=int, help="PQ code bytes per vector for ivfpq/opq, as 2 x PQ_M 4-bit parts "
                   "(2 x PQ_M must divide the dimension; default the largest up to 128 the budget allows)")  # fmt: skip
    a.add_argument("--nlist", type=int, help="IVF lists (default about 2 sqrt(N))")
    a.add_argument("--nprobe", type=int, help="IVF lists searched per query (default 16)")
    a.add_argument("--hnsw-m", type=int, help="HNSW links per node (default 16)")
    a.add_argument("--ef-search", type=int, help="HNSW search breadth (default 64)")
    a.add_argument("--batch-size", type=int, default=32)
    a.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    a.add_argument("--cache-dir", help="feature cache folder")
    a.add_argument("--overwrite", action="store_true", help="replace an existing index folder")
    a = actions.add_parser("add", help="add images to an index in place (new ids, no rebuild)")
    a.add_argument("index", help="index folder")
    a.add_argument("files", nargs="+", help="image files or folders")
    a.add_argument("--label", default="", help="class name to record for these images")
    a.add_argument("--cache-dir", help="feature cache folder")
    a = actions.add_parser("remove", help="remove images from an index by id or path")
    a.add_argument("index", help="index folder")
    a.add_argument("items", nargs="+", help="ids, or paths of indexed images (a folder removes all below it)")
    a = actions.add_parser("evaluate", help="leave-one-out precision@k, recall@k, mAP@k of a labelled index")
    a.add_argument("index", help="index folder")
    a.add_argument("-k", type=int, nargs="+", default=[1, 5, 10], help="cut-offs (default 1 5 10)")
    a.add_argument("--json", dest="json_out", help="also write the metrics to this JSON file")


def _add_search_parser(sub: argparse._SubParsersAction) -> None:
    """``search``: the nearest indexed images of each query."""
    p = sub.add_parser("search", help="find the indexed images most like each query image")
    p.add_argument("index", help="index folder")
    p.add_argument("queries", nargs="+", help="query image files or folders")
    p.add_argument("-k", type=int, default=10, help="results per query (default 10)")
    p.add_argument("--backbone", help="check the query network against the index's (default: use the index's)")
    p.add_argument("--weights", help="weights file for --backbone")
    p.add_argument("--json", dest="json_out", help="write results as JSON to this file ('-' for stdout)")
    p.add_argument("--sheet", help="write a contact sheet (PNG) of each query beside its results")
    p.add_argument(
        "--rerank",
        type=int,
        help="re-score RERANK x k candidates with the exact vectors (default: the "
        "index's own setting; needs an index built with vectors on disk)",
    )
    p.add_argument("--cache-dir", help="feature cache folder")


def _autoencoder(args: argparse.Namespace) -> int:
    return _ae_train(args) if args.action == "train" else _ae_score(args)


def _ae_train(args: argparse.Namespace) -> int:
    from headstart.hardware import launch_rank
    from headstart.training.autoencoder import resume_autoencoder, train_autoencoder

    if args.resume:
        result = resume_autoencoder(args.resume)
    elif not args.data:
        raise ValueError("give a folder of images (or --resume RUN)")
    else:
        result = train_autoencoder(
            args.data, encoder=args.encoder, encoder_weights=args.encoder_weights,
            finetune_encoder=args.finetune_encoder, latent_dim=args.latent_dim, image_size=args.image_size,
            width=args.width, epochs=args.epochs, lr=args.lr, loss=args.loss, augment=args.augment,
            batch_size=args.batch_size, val_fraction=args.val_fraction, precision=args.precision, seed=args.seed,
            cache_dir=args.cache_dir, out=args.out, overwrite=args.overwrite,
        )  # fmt: skip
    if launch_rank() != 0:
        return 0  # under torchrun, rank 0 reports
    last = result.history[-1]
    print(f"autoencoder ({result.config.encoder}, latent {result.config.latent_dim}): best val reconstruction error "
          f"{result.val_loss:.4f}, last train loss {last['train_loss']:.4f}, {result.seconds:.1f} s; "
          f"run folder {result.run_dir} (use it as --backbone ae:{result.run_dir})")  # fmt: skip
    return 0


def _ae_score(args: argparse.Namespace) -> int:
    from headstart.training.autoencoder import score

    scores = score(args.run, args.images, batch_size=args.batch_size)
    order = scores.errors.argsort()[::-1]
    for i in order:
        print(f"{scores.errors[i]:.5f}\t{scores.paths[i]}")
    if args.output:
        import csv

        with Path(args.output).open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "score"])
            writer.writerows([str(scores.paths[i]), f"{scores.errors[i]:.6f}"] for i in order)
    for path, reason in scores.failed:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    return 0


def _index(args: argparse.Namespace) -> int:
    handlers = {"build": _index_build, "add": _index_add, "remove": _index_remove, "evaluate": _index_evaluate}
    return handlers[args.action](args)


def _index_build(args: argparse.Namespace) -> int:
    from headstart.features.retrieval import build_index

    given = {"nlist": args.nlist, "nprobe": args.nprobe, "m": args.pq_m or args.hnsw_m, "ef_search": args.ef_search}
    if bool(args.data) == bool(args.embeddings):
        raise ValueError("give images to index, or --embeddings DIR (a `headstart embed` folder), not both")
    index, failed = build_index(
        (args.data if len(args.data) > 1 else args.data[0]) if args.data else None, args.out, backbone=args.backbone,
        weights=args.weights, kind=args.kind, params={k: v for k, v in given.items() if v is not None},
        batch_size=args.batch_size, precision=args.precision, cache_dir=args.cache_dir, overwrite=args.overwrite,
        shard_size=args.shard_size, embeddings=args.embeddings, memory_budget=args.memory_budget, rerank=args.rerank,
    )  # fmt: skip
    from headstart.hardware import distributed

    if distributed()[1] != 0:
        return 0  # rank 0 reports
    params = ", ".join(f"{k}={v}" for k, v in index.params.items())
    print(f"indexed {len(index)} images ({index.dim}-d, {index.kind}{f' {params}' if params else ''}) "
          f"with {index.meta['backbone']} into {args.out}")  # fmt: skip
    for path, reason in failed:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    return 0


def _index_add(args: argparse.Namespace) -> int:
    from headstart.features.retrieval import add_images

    ids, failed = add_images(args.index, args.files, label=args.label, cache_dir=args.cache_dir)
    span = f" (ids {ids.min()}-{ids.max()})" if len(ids) else ""
    print(f"added {len(ids)} images to {args.index}{span}")
    for path, reason in failed:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    return 0


def _index_remove(args: argparse.Namespace) -> int:
    from headstart.features.retrieval import remove_images

    print(f"removed {remove_images(args.index, args.items)} items from {args.index}")
    return 0


def _index_evaluate(args: argparse.Namespace) -> int:
    from headstart.features.retrieval import evaluate_index

    metrics = evaluate_index(args.index, args.k)
    print(f"leave-one-out retrieval over {metrics['queries']} labelled images")
    print(f"{'k':>4}{'precision':>11}{'recall':>9}{'mAP':>8}")
    for k in args.k:
        print(f"{k:>4}{metrics[f'precision@{k}']:>11.4f}{metrics[f'recall@{k}']:>9.4f}{metrics[f'map@{k}']:>8.4f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(metrics, indent=2))
    return 0


def _search(args: argparse.Namespace) -> int:
    from headstart.features.retrieval import contact_sheet, search_images

    results, failed = search_images(args.index, args.queries, k=args.k, backbone=args.backbone,
                                    weights=args.weights, cache_dir=args.cache_dir, rerank=args.rerank)  # fmt: skip
    if args.json_out:
        rows = [{"query": str(r.query), "results": [{"id": item.id, "path": item.path, "label": item.label,
                 "score": score} for item, score in r.hits]} for r in results]  # fmt: skip
        text = json.dumps(rows, indent=2)
        if args.json_out == "-":
            print(text)
        else:
            Path(args.json_out).write_text(text)
    if args.json_out != "-":
        for r in results:
            print(f"{r.query}")
            for rank, (item, score) in enumerate(r.hits, start=1):
                print(f"  {rank:>3}  {score:.4f}  {item.label or '-':<12} {item.path}  (id {item.id})")
    if args.sheet:
        print(f"contact sheet: {contact_sheet(results, args.sheet)}", file=sys.stderr if args.json_out == "-" else None)
    for path, reason in failed:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    return 0


HANDLERS = {
    "autoencoder": _autoencoder,
    "index": _index,
    "search": _search,
}
