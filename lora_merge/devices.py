"""Where the arithmetic runs, decided once per call: ``--device auto`` is CUDA when present, else the CPU; and with
CUDA, ``auto`` still merges on the CPU every tensor whose path has CPU kernels (``route.route``: the tested engine),
the GPU taking the rest.

A merge on the CPU runs in numpy and never imports torch (its import alone costs seconds and hundreds of MB), so
``auto`` asks torch about CUDA only where CUDA can be there: a torch build for CUDA (or ROCm) on a machine whose
GPU driver is loaded.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from .errors import DeviceError

log = logging.getLogger("lora_merge")


@dataclass(frozen=True)
class Device:
    type: str  # "cpu" or "cuda"
    index: int | None = None
    auto: bool = False  # chosen by --device auto: the CPU engine keeps the tensors it has kernels for

    def __str__(self) -> str:
        return self.type if self.index is None else f"{self.type}:{self.index}"

    @property
    def torch(self):
        """The torch device (torch is imported here, when a computation needs it)."""
        import torch

        return torch.device(str(self))


CPU = Device("cpu")


def _gpu_possible() -> bool:
    """Whether torch could find a GPU here, without importing it: a CUDA or ROCm build, and a loaded driver."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        build = version("torch")
    except PackageNotFoundError:
        return False
    if "+cpu" in build:
        return False
    return any(os.path.exists(p) for p in ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/kfd")) or \
        bool(os.environ.get("CUDA_VISIBLE_DEVICES"))


def resolve(spec: str) -> Device:
    """The device ``spec`` names (auto, cpu, cuda, cuda:N, mps), or a DeviceError saying why it cannot be used."""
    spec = str(spec).strip().lower()
    if spec == "cpu":
        return CPU
    if spec == "auto":
        if not _gpu_possible():
            return CPU
        import torch

        return Device("cuda", torch.cuda.current_device(), auto=True) if torch.cuda.is_available() else CPU
    if spec == "cuda" or spec.startswith("cuda:"):
        import torch

        if not torch.cuda.is_available():
            raise DeviceError(f"--device {spec}: CUDA is not available here", "use --device cpu (or auto)")
        index = spec.partition(":")[2]
        if index and not index.isdigit():
            raise DeviceError(f"--device {spec!r} is not one of auto, cpu, cuda, cuda:N, mps")
        n = int(index) if index else torch.cuda.current_device()
        if n >= torch.cuda.device_count():
            raise DeviceError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present",
                              "pick an index below that")
        return Device("cuda", n)
    if spec == "mps":
        import torch

        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise DeviceError("--device mps: Apple's Metal backend is not available here", "use --device cpu")
        # Metal has no float64, and the exact rounding needs it: the arithmetic stays on the CPU.
        log.warning("MPS has no float64; computing on the CPU to keep the rounding exact")
        return CPU
    raise DeviceError(f"--device {spec!r} is not one of auto, cpu, cuda, cuda:N, mps")
