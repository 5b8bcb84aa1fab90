"""Errors that are the user's to fix: the CLI prints their message (naming the file and what to do) without a
traceback. Set ``HEADSTART_DEBUG=1`` to see the traceback anyway."""

from __future__ import annotations

import os

from headstart.backbones import BackboneError
from headstart.data import DataError
from headstart.weights import WeightsError

USER_ERRORS: tuple[type[BaseException], ...] = (
    () if os.environ.get("HEADSTART_DEBUG") else (DataError, BackboneError, WeightsError, FileExistsError,
                                                   FileNotFoundError, ValueError)
)  # fmt: skip
