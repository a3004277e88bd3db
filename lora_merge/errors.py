"""Every exception lora-merge raises on purpose.

Each one refines a builtin so callers may catch either. The CLI prints ``str(error)`` as one line,
followed by ``hint`` when there is one; the text says what is wrong and what to do.
"""

from __future__ import annotations


def name_list(names: list[str], most: int = 5) -> str:
    """The first few names for a one-line message, with a count of the rest."""
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's text (its class name when it has none): what another
    library says, quoted in one of ours."""
    text = str(e).strip()
    return next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)


class LoraMergeError(Exception):
    """Base class of every error lora-merge reports to a user."""

    hint: str | None = None

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class SourceNotFoundError(LoraMergeError, FileNotFoundError):
    """BASE or ADAPTER is not a folder (or Hub repo) that holds what a merge needs."""


class InputFileError(LoraMergeError, OSError):
    """An input file lora-merge will not read: not a regular file (a named pipe, a device, a folder), a link that
    loops, or far larger than such a file can be."""


class WrongInputError(LoraMergeError, ValueError):
    """An input of the wrong kind: an adapter given as the model, or a model given as the adapter."""


class HeaderError(LoraMergeError, ValueError):
    """A safetensors file is damaged or is not a safetensors file."""


class AdapterConfigError(LoraMergeError, ValueError):
    """adapter_config.json is missing, unreadable, or describes something that cannot be merged."""


class UnsupportedAdapterError(LoraMergeError, NotImplementedError):
    """The adapter uses a method whose result cannot be folded into the base weights."""


class PlanError(LoraMergeError, ValueError):
    """The adapter does not fit the base: unmatched tensors, wrong shapes, leftovers.

    ``problems`` holds one line per offender; all of them are reported at once.
    """

    def __init__(self, message: str, problems: list[str], hint: str | None = None):
        super().__init__(message, hint)
        self.problems = problems

    def __str__(self) -> str:
        lines = [self.args[0]] + [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


class LayoutError(PlanError):
    """The adapter names tensors of the model in memory, and where they are in BASE's files cannot be known
    (transformers missing or too old, a model type it does not know, a conversion lora-merge cannot follow)."""


class LayoutNeeded(PlanError):
    """The files alone do not say where the adapter's targets are; the model's own layout is needed."""


class QuantizationError(PlanError):
    """BASE is quantized in a way lora-merge cannot read or write back (a method it does not know, files
    that do not hold what the method stores, a bitsandbytes base without --dtype)."""


class OutputError(LoraMergeError, OSError):
    """OUT cannot be written where it was asked for (exists, overlaps BASE or ADAPTER, no space)."""


class NonFiniteError(LoraMergeError, ValueError):
    """The adapter or a merged tensor holds NaN or Inf."""


class DeviceError(LoraMergeError, RuntimeError):
    """The requested compute device is not available."""


class ParityError(LoraMergeError, RuntimeError):
    """The merged folder failed its parity checks; ``report`` says which tensors and files, and ``result`` (a merge's
    MergeResult, where the failed output is kept) what was written. (Not an AssertionError: that is what a bug in
    lora-merge itself raises.)"""

    def __init__(self, message: str, report, hint: str | None = None, result=None):
        super().__init__(message, hint)
        self.report = report
        self.result = result


class LatencyError(LoraMergeError, RuntimeError):
    """The latency measurement cannot run (missing extra, a model that does not load)."""


class HubError(LoraMergeError, OSError):
    """A Hugging Face Hub request failed: not logged in, no access, not found, gated, offline, network."""


class RepoNotFoundError(HubError):
    """The Hub does not show the repo: not found (or private), offline and not cached, or out of reach."""
