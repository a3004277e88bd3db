"""The merged blocks of each planned tensor, made for the writer: BASE's rows read ahead on a thread, merged,
rounded once (or encoded in BASE's quantized format) into buffers reused block after block.

A maker per route (``Route.maker``): each format's CPU maker is in its folder (``numbers/floats/merge.FloatBlocks``,
``numbers/fp8/merge.Fp8Blocks``, ``numbers/mxfp4/merge.Mxfp4Blocks``); ``TorchBlocks`` here makes every other tensor,
and every tensor on a GPU. Each yields ``Block``s in row order, its buffers taken from a ``Ring`` and reused once
everything that reads them (the check, the write) is done. A maker is made with (device, block_bytes, reader) and
has ``blocks(entry)``, ``close()`` and the counts ``decided`` and ``exact``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import NonFiniteError
from .numbers.quantized import QuantizedTensor
from .reader import tensor_rows

if TYPE_CHECKING:
    from .plan import Entry


@dataclass
class Slot:
    """One block's buffers on their way: made on the device, copied to the host, checked and written. Reused once
    everything that reads them is done (``waits``: futures and CUDA events)."""

    device: object  # buffers where the block is made
    host: object  # buffers the writer reads (the same on the CPU)
    waits: list = field(default_factory=list)

    def release(self) -> None:
        waits, self.waits = self.waits, []
        for w in waits:
            w.result() if hasattr(w, "result") else w.synchronize()


class Ring:
    """A few slots used in turn: block k waits for block k - count to be done with its slot."""

    def __init__(self, count: int, make, make_host=None):
        self.slots = []
        for _ in range(count):
            device = make()
            self.slots.append(Slot(device, make_host() if make_host is not None else device))
        self.turn = 0

    def next(self) -> Slot:
        slot = self.slots[self.turn]
        self.turn = (self.turn + 1) % len(self.slots)
        slot.release()
        return slot

    def release(self) -> None:
        for slot in self.slots:
            slot.release()


@dataclass
class Block:
    """Rows [start, stop) of a merged tensor as written (the rounded rows, or a quantized format's parts):
    ``device`` to check, ``host`` to write once ``ready``."""

    start: int
    stop: int
    device: tuple
    host: tuple
    ready: object
    slot: Slot


@dataclass
class _Read:
    """BASE's rows for a block: ``values`` as stored (or decoded), in ``slot``'s buffer when one holds them,
    and a quantized format's ``stored`` parts when the block is encoded again."""

    values: object
    slot: Slot | None
    stored: tuple | None


class TorchBlocks:
    """Merges planned tensors with torch, on the CPU or a GPU, block by block, into reused buffers: every
    tensor ``FloatBlocks`` does not take (DoRA, replacements and trainable rows, experts, quantized formats, and
    all of them on a GPU)."""

    def __init__(self, device, block_bytes: int, reader: ThreadPoolExecutor):
        import torch

        from .buffers import Buffers

        self.device = device.torch
        self.cuda = device.type == "cuda"
        self.block_bytes = block_bytes
        self.reader = reader
        self.work = Buffers(self.device)
        self.raw = Ring(2, lambda: Buffers("cpu", self.cuda), None)  # this block, and the next one being read
        # blocks being checked and written: a few in flight on each side, one being made
        self.out = Ring(4, lambda: Buffers(self.device), lambda: Buffers("cpu", self.cuda))
        self.torch = torch
        self.decided = self.exact = 0  # torch decides every element itself: none is left to the exact step

    def blocks(self, entry: Entry):
        """Each row block of the tensor as it is written (a ``_Block``): rounded to the output dtype, or encoded
        in BASE's quantized format."""
        from . import mathops
        from .dtypes import torch_dtype

        n = entry.shape[0] if entry.shape else 1
        step = entry.rows_per_block(self.block_bytes)
        spans = [(start, min(n, start + step)) for start in range(0, n, step)]
        prepared = self._prepare(entry, spans) if entry.needs_prepass(step) else None
        for start, stop, v, read in self._merged(entry, spans):
            slot = self.out.next()
            if entry.written_quantized:
                made = self._encode(entry, v, read, start, stop, prepared)
            else:
                out_dtype = torch_dtype(entry.dtype)
                y = mathops.round_to(v, out_dtype, out=slot.device.take("out", tuple(v.shape), out_dtype),
                                     buffers=self.work)
                made = (y,)
            host, ready = self._to_host(made, slot)
            yield Block(start, stop, made, host, ready, slot)

    def _merged(self, entry: Entry, spans):
        """(start, stop, merged float64 rows, what was read) for each span, in order."""
        from . import kindmath, mathops
        from .dtypes import torch_dtype

        torch = self.torch
        ops = entry.ops
        cache: dict = {}
        norm = magnitude = None
        if ops is not None and ops.dora_magnitude is not None:
            magnitude = ops.dora_magnitude.load().reshape(-1).to(self.device, torch.float64)
            if ops.dora_transposed:  # norms run across row blocks: a first pass sums their squares
                sumsq = torch.zeros(magnitude.shape, dtype=torch.float64, device=self.device)
                for (start, stop), read in zip(spans, self._read_ahead(entry, spans)):
                    sumsq += mathops.column_sumsq(self._value(read, ops, start, stop, cache))
                norm = sumsq.sqrt()
        token_rows = ops.rows.load() if ops is not None and ops.rows is not None else None
        settle = kindmath.needs_settling(ops) and not entry.written_quantized
        for (start, stop), read in zip(spans, self._read_ahead(entry, spans)):
            v = self._value(read, ops, start, stop, cache)
            if settle:  # an adapter kind computed in float64: its elements near a rounding boundary decided exactly
                self.exact += kindmath.settle(v, read.values, ops, start, stop, torch_dtype(entry.dtype), cache)
            if magnitude is not None:
                if ops.dora_transposed:
                    mathops.apply_dora(v, magnitude, norm, True)
                else:
                    mathops.apply_dora(v, magnitude[start:stop], mathops.row_norms(v), False)
            if token_rows is not None:
                mathops.replace_rows(v, ops.row_indices, token_rows, start, stop)
            yield start, stop, v, read

    def _prepare(self, entry: Entry, spans):
        """For a quantized format whose scale blocks span several row blocks: each scale block's largest merged
        |value| and whether it changed, over all of its rows, before anything is encoded (a first pass)."""
        q = entry.base
        grid = None
        for start, stop, v, read in self._merged(entry, spans):
            largest, changed = q.prepare(v, self._decoded(entry, read, start, stop), start, stop)
            first, last = q.part_rows(1, start, stop)
            if grid is None:
                rows = q.part_rows(1, 0, q.shape[0])[1]
                grid = (largest.new_zeros((rows, *largest.shape[1:])), changed.new_zeros((rows, *changed.shape[1:])))
            grid[0][first:last] = self.torch.maximum(grid[0][first:last], largest)
            grid[1][first:last] |= changed
        return q.settle(grid)

    def _encode(self, entry: Entry, v, read: _Read, start: int, stop: int, prepared):
        from . import mathops

        q = entry.base
        if not mathops.all_finite(v):
            raise NonFiniteError(f"the merge gives NaN or Inf in {entry.name}, which {q.dtype} cannot store",
                                 "merge with --dtype to write a dequantized checkpoint, or repair the adapter")
        if prepared is None:  # the whole tensor, or whole blocks of scale
            prepared = q.settle(q.prepare(v, self._decoded(entry, read, start, stop), start, stop))
        else:
            first, last = q.part_rows(1, start, stop)
            prepared = (prepared[0][first:last], prepared[1][first:last], *prepared[2:])
        return q.encode(v, self._on_device(read.stored), start, stop, prepared)

    def _decoded(self, entry: Entry, read: _Read, start: int, stop: int):
        """BASE's values of the rows, where the merge computes: as read (on the CPU), or decoded there again."""
        if not self.cuda and (entry.ops is None or entry.ops.replace is None):
            return read.values
        return entry.base.decode(self._on_device(read.stored), start, stop)

    def _on_device(self, parts):
        return tuple(t.to(self.device) for t in parts)

    def _to_host(self, made, slot):
        """The block's tensors where the writer reads them, and the event that says they are there (None: now)."""
        if not self.cuda:
            return made, None
        host = []
        for i, t in enumerate(made):
            h = slot.host.take(f"out{i}", tuple(t.shape), t.dtype)
            h.copy_(t, non_blocking=True)
            host.append(h)
        ready = self._event()
        slot.waits.append(ready)
        return tuple(host), ready

    def _read_ahead(self, entry: Entry, spans):
        """The source rows of each span, the next one read on the reader thread meanwhile."""
        pending = self.reader.submit(self._read, entry, *spans[0]) if spans else None
        for i in range(len(spans)):
            raw = pending.result()
            pending = self.reader.submit(self._read, entry, *spans[i + 1]) if i + 1 < len(spans) else None
            yield raw

    def _read(self, entry: Entry, start: int, stop: int) -> _Read:
        ops, info = entry.ops, entry.base
        stored = info.read(start, stop) if entry.written_quantized else None  # kept where the values do not change
        if ops is not None and ops.replace is not None:  # an adapter tensor: small, read as it is
            source = ops.replace
            return _Read(source.rows(start, stop) if source.shape else source.load(), None, stored)
        if isinstance(info, QuantizedTensor):
            return _Read(info.decode(stored, start, stop) if stored else info.rows(start, stop), None, stored)
        slot = self.raw.next()
        return _Read(tensor_rows(info, start, stop, slot.device, "raw"), slot, None)

    def _value(self, read: _Read, ops, start: int, stop: int, cache: dict):
        from . import kindmath, mathops
        from .adapter import AddScaled, LowRank

        v = self.work.take("value", tuple(read.values.shape), self.torch.float64)
        v.copy_(read.values, non_blocking=self.cuda)
        if self.cuda and read.slot is not None:  # the pinned read may be reused once the copy has left it
            read.slot.waits.append(self._event())
        if ops is not None and ops.multiply is not None:  # IA3: W ⊙ l, exact in float64; OFT: W · Rᵀ
            kindmath.multiply(v, ops.multiply, start, stop, cache)
        for d in ops.deltas if ops is not None else ():
            if isinstance(d, (LowRank, AddScaled)):
                mathops.add_delta(v, d, start, stop, cache)
            else:  # another additive kind (kinds.py)
                kindmath.add_kind(v, d, start, stop, cache)
        return v

    def _event(self):
        """An event on the merge device's stream (a thread's current device may be another GPU)."""
        event = self.torch.cuda.Event()
        event.record(self.torch.cuda.current_stream(self.device))
        return event

    def close(self) -> None:
        self.out.release()
        self.raw.release()


