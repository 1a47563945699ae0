"""The package version (one place: the package, the results schema and patches read it here)."""

__version__ = "0.1.0"
