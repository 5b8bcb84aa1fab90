"""Errors that are the user's to fix: the CLI prints their message (naming the file and what to do) without a
traceback. Pass ``--debug`` (or set ``HEADSTART_DEBUG=1``) to see the traceback anyway.

The error classes live here, on the ground floor, so that every layer can raise them and the CLI can catch them
without importing the layers that raise them. Every class derives from :class:`HeadstartError`; each also keeps the
built-in base it had before the hierarchy (``ValueError``, ``RuntimeError``, ``OSError``), so code that caught those
still works.
"""

from __future__ import annotations

import os


class HeadstartError(Exception):
    """A failure that is the user's to fix; the message names the file or value, what is wrong and what to do."""


class DataError(HeadstartError, ValueError):
    """The data cannot be used as given; the message says which file or folder and what to do."""


class BackboneError(HeadstartError, ValueError):
    """An unknown backbone name, or no way to get its weights."""


class WeightsError(HeadstartError, RuntimeError):
    """A weight file is missing, corrupt, or does not fit the architecture."""


class ConfigError(HeadstartError, ValueError):
    """A config file or option cannot be used: unreadable YAML, an unknown key, a value out of range, an unsafe
    combination of options."""


class IntegrityError(HeadstartError, ValueError):
    """A file headstart wrote earlier is truncated, edited or does not match the files beside it (checksums, class
    list against weights, preprocessing against backbone)."""


class StorageError(HeadstartError, OSError):
    """A file cannot be written: the disk is full, permission is denied, the folder is read-only. What was written
    before is intact."""

    reason = ""  # the message without its advice ("cannot write FILE: the disk is full"), for callers who know better


def debug() -> bool:
    """Whether tracebacks are wanted (``HEADSTART_DEBUG`` set to anything but empty or ``0``)."""
    return os.environ.get("HEADSTART_DEBUG", "") not in ("", "0")


# What the CLI reports as a message: headstart's own errors, any failure to read or write a file (OSError: missing,
# unreadable, disk full, permission denied, read-only), and bad values (ValueError, which the hierarchy's classes
# mostly are, and which the libraries raise for unusable input). Everything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (HeadstartError, OSError, ValueError)
