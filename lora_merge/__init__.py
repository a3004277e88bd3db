"""lora-merge: fold a LoRA adapter into its base model, streaming, exactly rounded."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lora-merge")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "merge", "prepare", "unmerge", "verify"]


def __getattr__(name):
    # torch is imported only when a merge is asked for, so that `lora-merge --help` stays fast
    if name in ("merge", "prepare", "unmerge", "verify"):
        from . import pipeline as _pipeline

        return getattr(_pipeline, name)
    raise AttributeError(name)
