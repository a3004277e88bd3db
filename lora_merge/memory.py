"""Memory: what the process holds before a merge (measured, not assumed: torch's CPU and CUDA builds
differ by hundreds of MB), what the merge adds above it (measured during the run, or estimated from the
plan for ``--dry-run``), and the GPU's peak."""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path

STATUS = Path("/proc/self/status")


def megabytes(n: int) -> str:
    """A byte count as people read memory and file sizes here: 1,192.1 MB."""
    return f"{n / 1e6:,.1f} MB"


def resident_bytes() -> int:
    """The process's resident memory now (Linux), or its peak so far elsewhere."""
    found = _status("VmRSS")
    return found if found is not None else _max_rss()


def _status(key: str) -> int | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


@dataclass
class Usage:
    """Measured around a run: the resident memory at its start, its peak, and the GPU's peak."""

    baseline_bytes: int
    peak_bytes: int = 0
    gpu_peak_bytes: int | None = None

    @property
    def added_bytes(self) -> int:
        return max(0, self.peak_bytes - self.baseline_bytes)

    def to_json(self) -> dict:
        return {"baseline_bytes": self.baseline_bytes, "peak_bytes": self.peak_bytes, "added_bytes": self.added_bytes,
                "gpu_peak_bytes": self.gpu_peak_bytes}


class measure:
    """``with measure(device) as usage:`` — the peak counts from here (Linux resets its high-water mark; elsewhere
    the peak since the process started is all there is)."""

    def __init__(self, device=None):
        self.cuda = getattr(device, "type", None) == "cuda"
        self.device = device.torch if self.cuda else None

    def __enter__(self) -> Usage:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        except OSError:
            pass
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
        self.usage = Usage(resident_bytes())
        return self.usage

    def __exit__(self, *exc) -> None:
        hwm = _status("VmHWM")
        self.usage.peak_bytes = max(hwm if hwm is not None else _max_rss(), resident_bytes())
        if self.cuda:
            import torch

            self.usage.gpu_peak_bytes = torch.cuda.max_memory_allocated(self.device)
