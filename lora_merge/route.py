"""How each planned tensor is made, checked and held in memory, decided once per tensor: ``route(entry, device)``.

A route names the way its tensor is merged (the writer's maker of that name, in its format's ``merge.py`` or
``blocks.TorchBlocks``), which check proves every element (the check's own code, in ``numbers/<format>/check.py`` or
``check/``), whether it needs torch, how OUT's copy of it is read back, and what it holds in memory at its largest.
The writer, the read-back (``check/readback.py``) and the memory estimate all iterate routes; none of them asks what
a tensor is. A route is also the unit of work a scheduler hands out: it holds nothing of a run, only what its entry
and the device decide.

``ROUTES`` is tried in order; the first whose ``takes`` says yes is the tensor's route. A new way of making a tensor
is one class here and its maker (``writer.maker_of``). The check's side imports this module: it names the merge's
makers, never imports them.
"""

from __future__ import annotations

import math
from typing import ClassVar

from .check.verdict import CHECK_BLOCK_BYTES
from .devices import CPU
from .dtypes import DTYPES
from .numbers.floats import spec as float_spec
from .numbers.fp8 import spec as fp8_spec
from .numbers.mxfp4 import spec as mxfp4_spec
from .numbers.quantized import QuantizedTensor
from .options import BLOCK_BYTES
from .plan import Entry

# thread stacks and the allocator's per-thread arenas beside the buffers (measured: 12-15 MB on Linux)
THREADS_ALLOWANCE = 16 * 1024 * 1024
READ_BACK_BYTES = 2 * 4 * 1024 * 1024  # the written range read back, and BASE's compared with it


def block_bytes_for(device, asked: int | None) -> int:
    return asked or BLOCK_BYTES.get(device.type, BLOCK_BYTES["cpu"])


class Route:
    """How one tensor is made (the maker of its ``name``), checked (``check``) and read back (``read_back``), what
    it needs (``torch``) and holds (``working_set``)."""

    name: ClassVar[str]
    torch: ClassVar[bool] = True  # made or checked with torch
    numpy_check: ClassVar[bool] = False  # its check takes numpy arrays, else torch tensors on the device
    parts: ClassVar[bool] = False  # written in a quantized format: its codes block by block, then its scales
    part_rows: ClassVar[bool] = False  # blocks count the stored parts' own rows (their last axis)

    def __init__(self, entry: Entry, device):
        self.entry, self.device = entry, device

    @staticmethod
    def takes(entry: Entry, device_type: str) -> bool:
        raise NotImplementedError

    def check(self, buffers=None):
        """The check of the tensor's elements: ``block(start, stop, stored)`` for each block, then ``result()``."""
        raise NotImplementedError

    def read_back(self, stored):
        """OUT's parts of a tensor written in a quantized format (``stored``: BASE's ``QuantizedTensor`` with OUT's
        parts), block by block as its check takes them: (start, stop, parts)."""
        raise NotImplementedError

    def check_spans(self):
        """The row blocks [start, stop) a written tensor is read back and checked in."""
        e = self.entry
        n = e.shape[0] if e.shape else 1
        step = e.rows_per_block(CHECK_BLOCK_BYTES)
        return [(start, min(n, start + step)) for start in range(0, n, step)]

    def working_set(self, block_bytes: int) -> tuple[int, int]:
        """What the writer holds for this tensor at its largest, in host memory and on a GPU: the rings of blocks
        read and made, each side's tile buffers and factors, the block read back."""
        e, cuda = self.entry, self.device.type == "cuda"
        n, base, out = _sizes(e, block_bytes)
        rings = 2 * base * n + 4 * out * n  # blocks read ahead, and blocks made (checked and written)
        factors = 2 * sum(8 * math.prod(t.shape) for t in e.ops.tensors()) if e.ops is not None else 0
        merge = 8 * n + 4 * n  # the float64 block and its float32 step
        check = 8 * n + 4 * n + out * n + 2 * n + base * n  # float64 block, float32 step, nearest, masks, own read
        scales = 0
        if e.written_quantized:  # encoding, and the check's decoding, steps and bounds: float64 temporaries each side
            merge, check = merge + 6 * 8 * n, check + 6 * 8 * n
            scales = sum(p.nbytes for p in e.base.parts[1:])  # held until the codes are written
        if cuda:  # on a GPU every element is rounded through round-to-odd: a few float64 temporaries more
            return (THREADS_ALLOWANCE + rings + out * n + READ_BACK_BYTES + scales,
                    merge + 3 * 8 * n + 4 * out * n + check + factors)
        return THREADS_ALLOWANCE + rings + merge + check + out * n + READ_BACK_BYTES + factors + scales, 0


def _sizes(e: Entry, block_bytes: int) -> tuple[int, int, int]:
    """Elements in a block, and bytes per element of BASE as read and of OUT as written."""
    n = min(math.prod(e.shape), e.rows_per_block(block_bytes) * e.width)
    if isinstance(e.base, QuantizedTensor):  # read decoded to float64, beside its stored bytes
        base = 8 + math.ceil(e.base.nbytes / max(e.base.numel, 1))
    else:
        base = DTYPES[e.base.dtype].size if e.base is not None else 8
    out = math.ceil(e.nbytes / max(math.prod(e.shape), 1)) if e.written_quantized else DTYPES[e.dtype].size
    return n, base, out


class CopyRoute(Route):
    """BASE's bytes as they are: copied between files, and compared byte for byte."""

    name, torch = "copy", False

    @staticmethod
    def takes(entry, device_type):
        return entry.is_copy

    def working_set(self, block_bytes):
        return 0, 0


class Fp8Route(Route):
    """FP8 with block scales, written back as FP8 on the CPU (``numbers/fp8``)."""

    name, torch, numpy_check, parts = "fp8", False, True, True

    @staticmethod
    def takes(entry, device_type):
        return fp8_spec.takes(entry, device_type)

    def check(self, buffers=None):
        from .numbers.fp8.check import Fp8Check

        return Fp8Check(self.entry, buffers)

    def read_back(self, stored):
        from .buffers import HostBuffers

        buffers = HostBuffers()
        for start, stop in self.check_spans():
            yield start, stop, fp8_spec.read_parts(stored, start, stop, buffers, "out ")


class Mxfp4Route(Route):
    """MXFP4 experts, written back as MXFP4 on the CPU a block of stored rows at a time (``numbers/mxfp4``)."""

    name, torch, numpy_check, parts, part_rows = "mxfp4", False, True, True, True

    @staticmethod
    def takes(entry, device_type):
        return mxfp4_spec.takes(entry, device_type)

    def check(self, buffers=None):
        from .numbers.mxfp4.check import Mxfp4Check

        return Mxfp4Check(self.entry, buffers)

    def read_back(self, stored):
        from .buffers import HostBuffers

        buffers = HostBuffers()
        for first, last in mxfp4_spec.spans(stored):
            yield first, last, mxfp4_spec.read_rows(stored, first, last, buffers, "out ")


class GridRoute(Route):
    """Any other quantized format written back in it (NVFP4, FP8 on a GPU, …): torch's codec and ``check/grid``."""

    name, parts = "grid", True

    @staticmethod
    def takes(entry, device_type):
        return entry.written_quantized

    def check(self, buffers=None):
        from .check.grid import GridCheck

        return GridCheck(self.entry, self.device.torch, buffers)

    def read_back(self, stored):
        for start, stop in self.check_spans():
            yield start, stop, stored.read(start, stop)


class FloatRoute(Route):
    """A float tensor changed by low-rank products (or converted), merged on the CPU in numpy and the C kernels
    (``numbers/floats``); torch is not imported for it."""

    name, torch, numpy_check = "float", False, True

    @staticmethod
    def takes(entry, device_type):
        return float_spec.takes(entry, device_type)

    def check(self, buffers=None):
        from .numbers.floats.check import FloatCheck

        return FloatCheck(self.entry, buffers)

    def working_set(self, block_bytes):
        e = self.entry
        n, base, out = _sizes(e, block_bytes)
        rings = 2 * base * n + 4 * out * n
        wide = 8 if e.dtype == "F32" else 4  # each side: its factors, the elements it leaves open, its own read
        factors = 2 * sum(wide * math.prod(t.shape) for t in e.ops.tensors()) if e.ops is not None else 0
        flags = 2 * 8 * (n // float_spec.OPEN_SHARE + 1)
        return THREADS_ALLOWANCE + rings + base * n + factors + flags + READ_BACK_BYTES, 0


class TorchRoute(Route):
    """Every other tensor, and every tensor on a GPU (DoRA, replaced and trainable rows, experts, a quantized BASE
    written as floats): merged with torch (``blocks.TorchBlocks``), checked by ``check/elements``."""

    name = "torch"

    @staticmethod
    def takes(entry, device_type):
        return True

    def check(self, buffers=None):
        from .check.elements import ElementCheck

        return ElementCheck(self.entry, self.device.torch, buffers=buffers)


ROUTES: list[type[Route]] = [CopyRoute, Fp8Route, Mxfp4Route, GridRoute, FloatRoute, TorchRoute]


CPU_ENGINE: list[type[Route]] = [Fp8Route, Mxfp4Route, FloatRoute]  # the paths with CPU kernels


def route(entry: Entry, device) -> Route:
    """The tensor's route on ``device``: the first of ``ROUTES`` that takes it. A GPU that ``--device auto`` chose
    takes only what the CPU engine has no kernels for: the CPU engine is the tested one, until both are measured
    on a GPU."""
    if device.type != "cpu" and device.auto and not entry.is_copy:
        cpu = next((r for r in CPU_ENGINE if r.takes(entry, "cpu")), None)
        if cpu is not None:
            return cpu(entry, CPU)
    return next(r for r in ROUTES if r.takes(entry, device.type))(entry, device)


def routes(plan, device) -> list[Route]:
    """Every planned tensor's route, in the plan's order."""
    return [route(e, device) for e in plan.entries]


def working_set(plan, device, block_bytes: int | None, jobs: int = 1) -> tuple[int, int]:
    # block_bytes: as asked (None: each route's device's default)
    """What the writer holds at its largest, in host memory and on a GPU: ``jobs`` lanes each merging the tensor
    that needs most (the write thread's read-back buffer is shared)."""
    host, gpu = THREADS_ALLOWANCE + READ_BACK_BYTES, 0
    for r in routes(plan, device):
        h, g = r.working_set(block_bytes_for(r.device, block_bytes))
        host, gpu = max(host, h), max(gpu, g)
    return READ_BACK_BYTES + jobs * (host - READ_BACK_BYTES), jobs * gpu
