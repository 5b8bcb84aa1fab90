"""Rich progress bars and console output shared by every long job (bars go to stderr, results to stdout)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def enabled() -> bool:
    """Progress bars are shown unless ``HEADSTART_QUIET=1``; on a non-terminal Rich prints them sparsely."""
    return os.environ.get("HEADSTART_QUIET", "") not in ("1", "true")


@contextmanager
def bar(show: bool = True) -> Iterator[Progress]:
    """A Rich ``Progress`` with count, elapsed and remaining time; hidden when disabled."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not (show and enabled()),
        transient=not sys.stderr.isatty(),
    )
    with progress:
        yield progress


def log(message: str) -> None:
    """A status line on stderr (hidden with ``HEADSTART_QUIET=1``)."""
    if enabled():
        console.print(message, highlight=False)
