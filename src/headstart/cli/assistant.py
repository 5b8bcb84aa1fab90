"""``headstart curve`` (would labelling more pay?) and ``headstart suggest`` (which images to label first)."""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the ``curve`` and ``suggest`` subcommands."""
    p = sub.add_parser("curve", help="learning curve: project accuracy with 2x, 5x and 10x the labelled images")
    p.add_argument("data", help="dataset folder (train/ and val/, or class folders) or CSV manifest")
    p.add_argument("--seeds", type=int, default=3, help="draws of the nested fractions (default 3)")
    p.add_argument("--strategy", choices=("auto", "extract"), help="frozen-feature recipe whose head is measured "
                   "(default auto, as train)")  # fmt: skip
    p.add_argument("--backbone", help="registry name(s) joined by '+' (default: the strategy's)")
    p.add_argument("--weights", help="weights file for the backbone")
    p.add_argument("--out", help="folder for curve.json, curve.png and report.html (default runs/curve-<time>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--run", help="a run folder: write the curve into RUN/curve/ and add it to RUN/report.html")
    p.add_argument("--cache-dir", help="feature cache folder")

    p = sub.add_parser("suggest", help="rank unlabelled images for labelling (uncertainty and diversity)")
    p.add_argument("run", help="run folder of a trained classifier")
    p.add_argument("unlabelled", help="folder of unlabelled images")
    p.add_argument("--budget", type=int, required=True, help="how many images to suggest")
    p.add_argument("--labelled", help="the labelled data (default: the data the run was trained on)")
    p.add_argument("--method", choices=["typical", "mix"], default="typical",
                   help="typical: typical images of uncovered, uncertain groups (default); mix: uncertainty and "
                   "novelty")  # fmt: skip
    p.add_argument("--diversity", type=float, default=0.5,
                   help="mix only: weight of novelty against uncertainty, 0 to 1 (default 0.5)")  # fmt: skip
    p.add_argument("--symlinks", action="store_true", help="also link the picks into by_class/<predicted class>/")
    p.add_argument("--out", help="folder for suggestions.csv and contact_sheet.png (default runs/suggest-<time>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--batch-size", type=int, default=32)


def _curve(args: argparse.Namespace) -> int:
    from headstart.training.curve import learning_curve

    overrides = {k: v for k, v in (("strategy", args.strategy), ("backbone", args.backbone),
                                   ("weights", args.weights), ("cache_dir", args.cache_dir)) if v}  # fmt: skip
    result = learning_curve(args.data, out=args.out, seeds=args.seeds, overwrite=args.overwrite, run=args.run,
                            **overrides)  # fmt: skip
    print(result.answer)
    gains = ", ".join(f"{g.name} {g.gain:+.3f}" for g in result.per_class[:3])
    print(f"classes that gain most at 2x (recall): {gains}")
    print(f"wrote {result.out} (curve.png, report.html, curve.json) in {result.seconds:.1f} s")
    return 0


def _suggest(args: argparse.Namespace) -> int:
    from headstart.insight.suggest import suggest

    result = suggest(args.run, args.unlabelled, args.budget, out=args.out, labelled=args.labelled,
                     method=args.method, diversity=args.diversity, symlinks=args.symlinks, overwrite=args.overwrite,
                     batch_size=args.batch_size)  # fmt: skip
    for note in result.notes:
        print(f"note: {note}")
    for s in result.suggestions[:10]:
        print(f"{s.rank:>4}  {s.score:.3f}  {s.predicted:<16} {s.path.name}  ({s.why})")
    if len(result.suggestions) > 10:
        print(f"  ... {len(result.suggestions) - 10} more in suggestions.csv")
    print(f"wrote {result.out} (suggestions.csv, contact_sheet.png" + (", by_class/" if args.symlinks else "") + ")")
    return 0


HANDLERS = {
    "curve": _curve,
    "suggest": _suggest,
}
