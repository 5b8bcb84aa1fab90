"""The public API re-exported by the package resolves, lazily, to the library's own objects."""

from __future__ import annotations

import subprocess
import sys

import headstart
from headstart.training.run import train


def test_every_public_name_resolves() -> None:
    for name in headstart.__all__:
        assert getattr(headstart, name) is not None, name
    assert headstart.train is train


def test_import_is_light() -> None:
    code = "import sys, headstart; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_all_lists_exactly_the_exports() -> None:
    assert set(headstart.__all__) == {"__version__", *headstart._EXPORTS}
