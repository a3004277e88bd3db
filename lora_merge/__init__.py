"""lora-merge: fold a LoRA adapter into its base model, streaming, exactly rounded.

The public names are listed here for readers and type checkers; the functions and result types are
imported from their modules on first use, so that importing lora_merge (and `lora-merge --help`) does not
import torch.
"""

from typing import TYPE_CHECKING

from .errors import LoraMergeError, ParityError
from .formats import AdapterOptions
from .options import (
    CheckOptions,
    MergeOptions,
    PushOptions,
    UnmergeOptions,
    VerifyOptions,
)
from .version import __version__

if TYPE_CHECKING:
    from .check.report import Report
    from .pipeline import MergeResult, merge, prepare, unmerge, verify

__all__ = [
    "AdapterOptions", "CheckOptions", "LoraMergeError", "MergeOptions", "MergeResult", "ParityError", "PushOptions",
    "Report", "UnmergeOptions", "VerifyOptions", "__version__", "merge", "prepare", "unmerge", "verify",
]

_LAZY = {"merge": "pipeline", "prepare": "pipeline", "unmerge": "pipeline", "verify": "pipeline",
         "MergeResult": "pipeline", "Report": "check.report"}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lora_merge' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{module}", __name__), name)


def __dir__():
    return sorted(set(globals()) | set(__all__))
