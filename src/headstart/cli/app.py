"""Command line: each subcommand parses its arguments, calls one library function, and prints the result."""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from headstart.cli import assistant, audit, core, hub, report, retrieval, serve
from headstart.hardware import exit_process, launch_rank, launch_world_size

# Command groups in help order; each adds its sub-parsers and names its handlers, and imports nothing from here.
GROUPS = (core, report, retrieval, audit, assistant, serve, hub)
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    name: handler for group in GROUPS for name, handler in group.HANDLERS.items()
}


DEBUG_HELP = "show the traceback of a failure instead of a one-line message (or set HEADSTART_DEBUG=1)"


def get_args_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="headstart", description="Give an image model a head start.")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    for group in GROUPS:
        group.add_parsers(sub)
    _accept_debug_anywhere(parser)
    return parser


def _accept_debug_anywhere(parser: argparse.ArgumentParser) -> None:
    """Let ``--debug`` follow any subcommand too (``headstart predict RUN x.jpg --debug``), as users type it.

    SUPPRESS as the sub-parsers' default keeps a flag given before the subcommand: a sub-parser writes its defaults
    over the main parser's.
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                if not any("--debug" in a.option_strings for a in child._actions):
                    child.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
                _accept_debug_anywhere(child)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments and run one subcommand; returns the exit code (2 for a user error).

    A user error (see :data:`headstart.errors.USER_ERRORS`) ends in one line, ``headstart CMD: error: ...``, unless
    ``--debug`` or ``HEADSTART_DEBUG=1`` asks for the traceback.
    """
    args = get_args_parser().parse_args(argv)
    from headstart.errors import USER_ERRORS, debug

    who = f"headstart {args.command}" + _rank_label()
    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as error:
        if args.debug or debug():
            raise
        print(f"{who}: error: {describe(error)}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        if error.name and error.name.split(".")[0] == "headstart":
            raise
        print(
            f"{who}: error: this command needs the package {error.name!r}, which is not installed; "
            "install the extras with: pip install 'headstart[retrieval,serve,export,audit]'",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        if args.debug or debug():
            raise
        hint = "; continue a training run with `headstart train --resume RUN`" if args.command == "train" else ""
        print(f"\n{who}: interrupted{hint}", file=sys.stderr)
        return 130  # the shell's code for a process ended by SIGINT
    except Exception as error:
        if _rank_label():  # torchrun then stops the other ranks; this line says which one failed, and why
            print(f"{who}: failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        raise


def describe(error: BaseException) -> str:
    """One line for a user error: headstart's own message, or what and where for an operating-system error."""
    from headstart.errors import HeadstartError
    from headstart.files import WRITE_ONLY_FAILURES, storage_error

    if isinstance(error, OSError) and not isinstance(error, HeadstartError) and error.errno and error.strerror:
        if error.filename is None:
            return error.strerror
        if error.errno in WRITE_ONLY_FAILURES:  # only a write fails so: say what to do about it
            return str(storage_error(error, Path(error.filename)))
        return f"{error.filename}: {error.strerror}"
    text = str(error) or type(error).__name__
    return " ".join(text.split()) if "\n" in text else text


def _rank_label() -> str:
    """`` (rank R of N)`` under a multi-process launch, where every rank prints to the same terminal; else empty."""
    world = launch_world_size()
    return f" (rank {launch_rank()} of {world})" if world > 1 else ""


def run(argv: Sequence[str] | None = None) -> Any:
    """Entry point of the ``headstart`` console script and of ``python -m headstart``: :func:`main`, then exit."""
    code = main(argv)
    # The interpreter's exit runs a last garbage collection over every object torch created; frozen objects are
    # skipped (they are still finalised by reference counting). It saves 0.2 s of a 2.5 s cached extract run.
    gc.freeze()
    exit_process(code)
