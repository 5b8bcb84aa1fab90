"""The package version, on the ground floor so that modules recording it need not import the package's public API."""

__version__ = "0.1.0"
