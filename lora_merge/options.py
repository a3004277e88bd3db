"""How a merge runs, as one value: the CLI builds it once, the library passes it whole, the report records it.

A new setting is one field here, not a keyword threaded through every call.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields, replace

from .dtypes import OUTPUT_DTYPES
from .formats import AdapterOptions


@dataclass(frozen=True)
class PushOptions:
    """Where and how OUT goes to the Hub after its checks pass."""

    repo_id: str
    private: bool = False
    revision: str | None = None
    create_pr: bool = False
    commit_message: str | None = None


@dataclass(frozen=True)
class MergeOptions:
    dtype: str | None = None  # output dtype of floating-point tensors (bfloat16, float16, float32); None: BASE's
    device: str = "auto"  # where the arithmetic runs: auto, cpu, cuda, cuda:N, mps
    overwrite: bool = False  # replace a non-empty OUT (only once the new one is complete)
    tokenizer_from: str | None = None  # base or adapter; None: the base, or the adapter after a resize
    block_bytes: int | None = None  # the float64 working block; None: 8 MiB on a CPU, 256 MiB on a GPU
    max_shard_bytes: int | None = None  # cut OUT's weights into files of at most this; None: BASE's files
    allow_nonfinite: bool = False  # merge even with NaN or Inf in the adapter or the result
    resume: bool = False  # keep finished shards when interrupted, and continue from them
    adapter_options: AdapterOptions = field(default_factory=AdapterOptions)  # what the adapter's files do not say
    push: PushOptions | None = None  # upload OUT once checked (its repo id also names the model card)

    def __post_init__(self):
        if self.dtype is not None and self.dtype not in OUTPUT_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(OUTPUT_DTYPES)}")
        for name in ("block_bytes", "max_shard_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive number of bytes, not {value!r}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def make(cls, options: MergeOptions | None = None, **settings) -> MergeOptions:
        """``options`` (or the defaults) with some settings changed: ``MergeOptions.make(device="cpu")``."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise TypeError(f"unknown merge option(s): {', '.join(unknown)} (known: {', '.join(sorted(names))})")
        return replace(options or cls(), **settings)


SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """``5GB`` (10^9 bytes), ``500MiB`` (2^20), ``1000000`` (bytes) as a number of bytes; ValueError otherwise."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m[2].lower() if m else None
    if m is None or unit not in SIZE_UNITS or float(m[1]) * SIZE_UNITS[unit] < 1:
        raise ValueError(f"{text!r} is not a size: give a number with a unit, such as 5GB, 500MB or 2GiB")
    return int(float(m[1]) * SIZE_UNITS[unit])
