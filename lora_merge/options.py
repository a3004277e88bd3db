"""How each command runs, as one value per command: the CLI builds it once, the library passes it whole, the
report records it.

A new setting is one field of its command's options, not a keyword threaded through every call; what the checks
accept is ``CheckOptions``, shared by the commands that check. These are plain values: the command line's flags
for their fields are in ``flags.py``.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, fields, replace
from fractions import Fraction

from .dtypes import output_dtype
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


@dataclass(frozen=True)
class CheckOptions:
    """What a user accepts of an output beyond its bytes being right, shared by the commands that check: NaN or Inf
    (``allow_nonfinite``), and how little of the adapter's change may survive (``min_delta_kept``; None: any share,
    the figures only reported)."""

    allow_nonfinite: bool = False
    min_delta_kept: float | None = None

    def __post_init__(self):
        kept = self.min_delta_kept
        if kept is not None and (isinstance(kept, bool) or not isinstance(kept, int | float) or not 0 <= kept <= 1):
            raise ValueError(f"min_delta_kept must be a share between 0 and 1, not {kept!r}")


@dataclass(frozen=True)
class PushOptions:
    """Where and how OUT goes to the Hub after its checks pass."""

    repo_id: str | None = None
    private: bool = False
    revision: str | None = None
    create_pr: bool = False
    commit_message: str | None = None


class _Settings:
    """``make``: an options value (or the defaults) with some fields changed, the check's fields among them."""

    @classmethod
    def make(cls, options=None, **settings):
        """``options`` (or the defaults) with some settings changed: ``MergeOptions.make(device="cpu")``; the
        check's settings (``allow_nonfinite``, ``min_delta_kept``) are taken by its ``check``."""
        if options is not None and not isinstance(options, cls):
            options = cls._from(options)
        if options is not None and not settings:
            return options
        names = {f.name for f in fields(cls)}
        checks = {f.name for f in fields(CheckOptions)} if "check" in names else set()
        unknown = sorted(set(settings) - names - checks)
        if unknown:
            raise TypeError(f"unknown {cls.__name__} field(s): {', '.join(unknown)} (known: "
                            f"{', '.join(sorted(names | checks))})")
        base = options or cls()
        check = {k: settings.pop(k) for k in list(settings) if k in checks}
        if check:
            settings["check"] = replace(settings.get("check", base.check), **check)
        return replace(base, **settings)

    @classmethod
    def _from(cls, other):
        """The fields ``other`` (the options of another command) shares with this command's."""
        names = {f.name for f in fields(cls)}
        return cls(**{f.name: getattr(other, f.name) for f in fields(other) if f.name in names})

    def to_json(self) -> dict:
        """As the report records it: every field, the check's flattened beside the others."""
        data = asdict(self)
        return {**{k: v for k, v in data.items() if k != "check"}, **data.get("check", {})}


@dataclass(frozen=True)
class MergeOptions(_Settings):
    """How a merge runs (``merge``, ``prepare``)."""

    dtype: str | None = None  # the output dtype of floating-point tensors (default: BASE's)
    quantize: str | None = None  # "fp8": BASE's float Linear weights written as FP8
    device: str = "auto"
    jobs: int | None = None  # tensors merged at once (default: ``jobs_for``, one for every two CPUs)
    overwrite: bool = False
    tokenizer_from: str | None = None  # "base", "adapter" (default: chosen, see tokenizer.py)
    block_bytes: int | None = None  # the float64 working block (default: BLOCK_BYTES for the device)
    max_shard_bytes: int | None = None  # cut OUT's weights into files of at most this (default: BASE's files)
    resume: bool = False
    check: CheckOptions = field(default_factory=CheckOptions)
    adapter_options: AdapterOptions = field(default_factory=AdapterOptions)  # what the adapter's files do not say
    push: PushOptions | None = None  # upload OUT once checked (its repo id also names the model card)

    def __post_init__(self):
        if self.dtype is not None:
            object.__setattr__(self, "dtype", output_dtype(self.dtype))  # bf16 is bfloat16
        _positive_bytes(self, "block_bytes", "max_shard_bytes")
        _positive_jobs(self)


@dataclass(frozen=True)
class UnmergeOptions(_Settings):
    """How an unmerge runs: it writes MERGED's dtypes and files, all at once, with finite values only."""

    device: str = "auto"
    jobs: int | None = None
    overwrite: bool = False
    tokenizer_from: str | None = None
    block_bytes: int | None = None
    max_shard_bytes: int | None = None
    adapter_options: AdapterOptions = field(default_factory=AdapterOptions)

    def __post_init__(self):
        _positive_bytes(self, "block_bytes", "max_shard_bytes")
        _positive_jobs(self)

    def as_run(self) -> MergeOptions:
        """The run's options: a merge's, with nothing an unmerge does not do."""
        return MergeOptions._from(self)


@dataclass(frozen=True)
class VerifyOptions(_Settings):
    """How ``verify`` checks a folder."""

    device: str = "auto"
    jobs: int | None = None  # weights files read back and checked at once (default: ``jobs_for``)
    check: CheckOptions = field(default_factory=CheckOptions)
    adapter_options: AdapterOptions = field(default_factory=AdapterOptions)

    def __post_init__(self):
        _positive_jobs(self)


def _positive_bytes(options, *names: str) -> None:
    for name in names:
        value = getattr(options, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be a positive number of bytes, not {value!r}")


def _positive_jobs(options) -> None:
    jobs = options.jobs
    if jobs is not None and (not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1):
        raise ValueError(f"jobs must be a positive number, not {jobs!r}")


def jobs_for(asked: int | None) -> int:
    """How many tensors (or files) a run works on at once: ``asked``, or one for every two CPUs this process may
    use. One job keeps about 1.5 cores busy (its merge, its check, its reads ahead and its share of the write
    thread: 14.6 s of CPU in 9 s on the Qwen3-1.7B shape, 2 cores), and two jobs on 2 cores were no faster than
    one (8.8-9.1 s against 8.9-9.6 s) for 27% more memory."""
    if asked:
        return asked
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity on this system
        cpus = os.cpu_count() or 1
    return max(1, cpus // 2)
