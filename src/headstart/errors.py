"""Errors that are the user's to fix: the CLI prints their message (naming the file and what to do) without a
traceback. Set ``HEADSTART_DEBUG=1`` to see the traceback anyway.

The error classes live here, on the ground floor, so that every layer can raise them and the CLI can catch them
without importing the layers that raise them.
"""

from __future__ import annotations

import os


class DataError(ValueError):
    """The data cannot be used as given; the message says which file or folder and what to do."""


class BackboneError(ValueError):
    """An unknown backbone name, or no way to get its weights."""


class WeightsError(RuntimeError):
    """A weight file is missing, corrupt, or does not fit the architecture."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    () if os.environ.get("HEADSTART_DEBUG") else (DataError, BackboneError, WeightsError, FileExistsError,
                                                   FileNotFoundError, ValueError)
)  # fmt: skip
