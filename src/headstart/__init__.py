"""headstart: reuse what a pretrained image network already knows."""

__version__ = "0.1.0"
