"""The package's version, from its installed metadata: one source of the number (pyproject.toml)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lora-merge")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
