"""Subcommands ``push`` (a trained model and its card to the Hugging Face Hub) and ``pull`` (one back, as a run)."""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the push and pull sub-parsers."""
    p = sub.add_parser("push", help="upload a trained model, its card and config to the Hugging Face Hub")
    p.add_argument("run", help="run folder of a trained classifier")
    p.add_argument("--repo", required=True, help="hub repository ORG/NAME (created when missing)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--dataset", help="hub dataset id for the card's metadata (default: the data folder's name)")
    p.add_argument("--message", help="commit message (default: the strategy and backbone)")
    p.add_argument("--token", help="hub token (default: HF_TOKEN or `hf auth login`'s)")
    p.add_argument("--dry-run", action="store_true", help="write RUN/README.md and list the files; upload nothing")

    p = sub.add_parser("pull", help="download a model pushed with `headstart push`; predict/export read it as a run")
    p.add_argument("repo", help="hub repository ORG/NAME[@REVISION] (or hf-hub:ORG/NAME)")
    p.add_argument("--out", help="copy it into this folder (default: keep it in the hub cache and print the path)")
    p.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty --out folder")


def _push(args: argparse.Namespace) -> int:
    from headstart.serving.hub import push

    result = push(args.run, args.repo, private=args.private, token=args.token, commit_message=args.message,
                  dataset=args.dataset, dry_run=args.dry_run)  # fmt: skip
    if args.dry_run:
        print(f"would upload {result} from {args.run} to {args.repo} (the card is {args.run}/README.md)")
    else:
        print(f"pushed {args.run} to {args.repo}: {result}")
    return 0


def _pull(args: argparse.Namespace) -> int:
    from headstart.models.hub import pull

    folder = pull(args.repo, out=args.out, overwrite=args.overwrite)
    print(f"model in {folder}; try: headstart predict {folder} IMAGES")
    return 0


HANDLERS = {
    "push": _push,
    "pull": _pull,
}
