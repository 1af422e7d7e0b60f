"""The package version (one place; the config and the server read it)."""

__version__ = "0.1.0"
