"""How a merge runs, as one value: the CLI builds it once, the library passes it whole, the report records it.

A new setting is one field here, not a keyword threaded through every call.
"""

from __future__ import annotations

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
    allow_nonfinite: bool = False  # merge even with NaN or Inf in the adapter or the result
    resume: bool = False  # keep finished shards when interrupted, and continue from them
    adapter_options: AdapterOptions = field(default_factory=AdapterOptions)  # what the adapter's files do not say
    push: PushOptions | None = None  # upload OUT once checked (its repo id also names the model card)

    def __post_init__(self):
        if self.dtype is not None and self.dtype not in OUTPUT_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(OUTPUT_DTYPES)}")
        if self.block_bytes is not None and (not isinstance(self.block_bytes, int) or self.block_bytes < 1):
            raise ValueError(f"block_bytes must be a positive number of bytes, not {self.block_bytes!r}")

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
