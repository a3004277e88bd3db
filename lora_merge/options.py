"""How a merge runs, as one value: the CLI builds it once, the library passes it whole, the report records it.

A new setting is one field here, not a keyword threaded through every call. Each field that the command line
sets declares its flag and help beside its default (``flags.cli_flag``), and the CLI turns those fields into
its options: the default the help states is the default the code uses.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields, replace
from fractions import Fraction

import click

from .dtypes import OUTPUT_DTYPES, output_dtype
from .flags import cli_flag
from .formats import AdapterOptions

MIB = 1024 * 1024
# the float64 working block a tensor is merged in: small on a CPU (it stays in cache), large on a GPU (few launches)
BLOCK_BYTES = {"cpu": 6 * MIB, "cuda": 256 * MIB}


def block_help() -> str:
    cpu, gpu = BLOCK_BYTES["cpu"] // MIB, BLOCK_BYTES["cuda"] // MIB
    return (f"Size in MiB of the block a large tensor is merged and checked in, counted in float64 elements (default: "
            f"{cpu} on a CPU, {gpu} on a GPU); bounds peak memory.")


SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
              "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}  # a letter alone: powers of 1024, as split -b and du
LARGEST_SIZE = 2**62  # far past any disk; a larger number is a typo


def parse_size(text: str) -> int:
    """``5GB`` (10^9 bytes), ``500MiB`` or ``500M`` (2^20), ``1000000B`` (bytes) as a number of bytes; ValueError
    otherwise. Every size has a unit: a bare number (bytes? megabytes?) is refused, whatever it is."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m[2].lower() if m else None
    if m is not None and not unit:
        raise ValueError(f"{text!r} has no unit: give {m[1]}MB, {m[1]}GB, or {m[1]}B for bytes")
    if m is None or unit not in SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size: give a number with a unit, such as 5GB, 500MB or 2GiB")
    value = Fraction(m[1]) * SIZE_UNITS[unit]  # exact, however many digits
    if value < 1:
        raise ValueError(f"{text!r} is less than one byte: give a size such as 5GB, 500MB or 2GiB")
    if value > LARGEST_SIZE:
        raise ValueError(f"{text!r} is larger than any disk: give a size such as 5GB, 500MB or 2GiB")
    return int(value)


def _click_size(ctx, param, value):
    try:
        return parse_size(value) if value is not None else None
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _click_dtype(ctx, param, value):
    try:
        return output_dtype(value) if value is not None else None
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _mib(ctx, param, value):
    return value * MIB if value is not None else None


@dataclass(frozen=True)
class Acceptance:
    """What a user accepts of an output beyond its bytes being right: NaN or Inf (``--allow-nonfinite``), and how
    little of the adapter's change may survive (``--min-delta-kept``; None: any share, the figures only reported)."""

    allow_nonfinite: bool = False
    min_delta_kept: float | None = None


@dataclass(frozen=True)
class PushOptions:
    """Where and how OUT goes to the Hub after its checks pass."""

    repo_id: str = cli_flag("--push-to-hub", "After the merge and its parity checks pass, upload OUT to this Hub "
                            "repo (created if needed).", metavar="REPO_ID")
    private: bool = cli_flag("--private", "Create the Hub repo as private (when it does not exist yet).", False,
                             is_flag=True)
    revision: str | None = cli_flag("--revision", "Push to this branch (created if needed).", metavar="BRANCH")
    create_pr: bool = cli_flag("--create-pr", "Open a pull request instead of committing to the branch.", False,
                               is_flag=True)
    commit_message: str | None = cli_flag("--commit-message", "Message of the Hub commit.")


@dataclass(frozen=True)
class MergeOptions:
    dtype: str | None = cli_flag("--dtype", "Output dtype of floating-point tensors (bf16, fp16 and fp32 name them "
                                 "too). Default: the base's.", metavar="|".join(OUTPUT_DTYPES), callback=_click_dtype)
    device: str = cli_flag("--device", "Where the arithmetic runs. auto: CUDA when present, else CPU.", "auto",
                           metavar="auto|cpu|cuda|cuda:N|mps", show_default=True)
    overwrite: bool = cli_flag("--overwrite", "Replace OUT if it exists (only once the new output is complete and "
                               "has passed its checks).", False, is_flag=True)
    quantize: str | None = cli_flag(
        "--quantize", "Write BASE's float Linear weights in this format, each merged element rounded once: fp8 "
        "(e4m3 with a float32 scale per 128×128 block, as DeepSeek-V3 and Qwen3-FP8 releases store them).",
        type=click.Choice(["fp8"]))
    tokenizer_from: str | None = cli_flag(
        "--tokenizer-from", "Where the tokenizer and chat template come from. Default: the base's, the adapter's "
        "tokenizer when it resized the vocabulary, and the adapter's chat template when it differs from the base's.",
        type=click.Choice(["base", "adapter"]))
    block_bytes: int | None = cli_flag("--block-mb", block_help(), type=click.IntRange(1, 65536),
                                       callback=_mib)
    max_shard_bytes: int | None = cli_flag(
        "--max-shard-size", "Cut OUT's weights into files of at most SIZE (5GB, 500MB, 2GiB or 2G), in BASE's tensor "
        "order, with an index. Default: the same files as BASE.", metavar="SIZE", callback=_click_size)
    allow_nonfinite: bool = cli_flag("--allow-nonfinite", "Accept NaN or Inf in the adapter and where the exact merge "
                                     "holds them (refused otherwise; the report says so).", False, is_flag=True)
    min_delta_kept: float | None = cli_flag(
        "--min-delta-kept", "Fail the check when the stored model keeps less than this share (0 to 1) of the adapter's "
        "change, or when a tensor the adapter changes is stored unchanged (default: report the figures only).",
        metavar="F", type=click.FloatRange(0, 1))
    resume: bool = cli_flag("--resume", "Keep finished shards when the run is interrupted, and continue from them "
                            "on the next --resume run (only when their hashes and the plan still match).", False,
                            is_flag=True)
    adapter_options: AdapterOptions = field(default_factory=AdapterOptions)  # what the adapter's files do not say
    push: PushOptions | None = None  # upload OUT once checked (its repo id also names the model card)

    def __post_init__(self):
        if self.dtype is not None:
            object.__setattr__(self, "dtype", output_dtype(self.dtype))  # bf16 is bfloat16
        for name in ("block_bytes", "max_shard_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive number of bytes, not {value!r}")
        kept = self.min_delta_kept
        if kept is not None and (isinstance(kept, bool) or not isinstance(kept, int | float) or not 0 <= kept <= 1):
            raise ValueError(f"min_delta_kept must be a share between 0 and 1, not {kept!r}")

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def acceptance(self):
        """What the checks accept beyond right bytes."""
        return Acceptance(self.allow_nonfinite, self.min_delta_kept)

    @classmethod
    def make(cls, options: MergeOptions | None = None, **settings) -> MergeOptions:
        """``options`` (or the defaults) with some settings changed: ``MergeOptions.make(device="cpu")``."""
        if options is not None and not settings:
            return options
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise TypeError(f"unknown merge option(s): {', '.join(unknown)} (known: {', '.join(sorted(names))})")
        return replace(options or cls(), **settings)
