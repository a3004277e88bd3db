"""Writing the planned output: shards front to back, one tensor (or row block) at a time, every merged
block checked before it is written and every written range read back.

Untouched tensors are copied as bytes between files. A merged tensor is read in row blocks, moved to
the compute device, merged in float64 and rounded once (``mathops``), checked element by element
against its exact value computed by the check's own code (``exact``), and written. Three threads
overlap: one reads the next block while this one is merged and checked; one writes the last one, reads
it back, compares it with what was checked, and hashes the file as it grows. Work buffers are reused
from block to block, and each shard's file is given its final size before it is written.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import mathops
from .buffers import Buffers
from .dtypes import DTYPES, torch_dtype
from .errors import NonFiniteError, name_list
from .exact import ElementCheck, needs_prepass, read_stored_rows, rows_per_block
from .options import BLOCK_BYTES
from .output import NO_ROOM, no_room
from .paths import create, open_read, write_new
from .plan import Entry, Plan
from .quant import QuantizedTensor
from .quant.check import GridCheck
from .safetensors_file import (
    copy_range,
    encode_header,
    pread_exact,
    write_at,
)

COMPARE_BYTES = 4 * 1024 * 1024  # copied tensors are read back and compared in pieces of this size
# thread stacks and the allocator's per-thread arenas beside the buffers (measured: 12-15 MB on Linux)
THREADS_ALLOWANCE = 16 * 1024 * 1024


@dataclass
class WriteStats:
    merged: int = 0
    copied: int = 0
    converted: int = 0
    reused: int = 0  # shards kept from an interrupted run (--resume)
    nonfinite: list[str] = field(default_factory=list)  # merged tensors holding NaN or Inf (when allowed)
    files: list[str] = field(default_factory=list)
    # what the checks found as the output was written: per tensor, and each written shard's sha256
    tensors: dict[str, dict] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)

    def count(self, entry: Entry) -> None:
        if entry.is_copy:
            self.copied += 1
        elif entry.is_merge:
            self.merged += 1
        else:
            self.converted += 1


def block_bytes_for(device, asked: int | None) -> int:
    return asked or BLOCK_BYTES.get(getattr(device, "type", str(device)), BLOCK_BYTES["cpu"])


def working_set(plan: Plan, device, block_bytes: int | None) -> tuple[int, int]:
    """What the writer holds at its largest, in host memory and on a GPU: the buffers below added up for
    the tensor that needs most (the rings of blocks read and made, the merge's float64 block and its
    rounding, the check's own float64 block and masks, the block read back, the copies compared, and
    both sides' factors in float64)."""
    block_bytes = block_bytes_for(device, block_bytes)
    cuda = getattr(device, "type", str(device)) == "cuda"
    host, gpu = THREADS_ALLOWANCE + 2 * COMPARE_BYTES, 0
    for e in plan.entries:
        if e.is_copy:
            continue
        n = min(math.prod(e.shape), rows_per_block(e, block_bytes) * math.prod(e.shape[1:]))
        if isinstance(e.base, QuantizedTensor):  # read decoded to float64, beside its stored bytes
            base = 8 + math.ceil(e.base.nbytes / max(e.base.numel, 1))
        else:
            base = DTYPES[e.base.dtype].size if e.base is not None else 8
        out = math.ceil(e.nbytes / max(math.prod(e.shape), 1)) if e.requantized else DTYPES[e.dtype].size
        factors = 2 * sum(8 * math.prod(t.shape) for t in e.ops.tensors()) if e.ops is not None else 0
        rings = 2 * base * n + 4 * out * n  # blocks read ahead, and blocks made (checked and written)
        merge = 8 * n + 4 * n  # the float64 block and its float32 step
        check = 8 * n + 4 * n + out * n + 2 * n + base * n  # float64 block, float32 step, nearest, masks, own read
        scales = 0
        if e.requantized:  # encoding, and the check's decoding, steps and bounds: float64 temporaries on each side
            merge, check = merge + 6 * 8 * n, check + 6 * 8 * n
            scales = sum(p.nbytes for p in e.base.parts[1:])  # held until the codes are written
        if cuda:  # on a GPU every element is rounded through round-to-odd: a few float64 temporaries more
            host = max(host, THREADS_ALLOWANCE + rings + out * n + 2 * COMPARE_BYTES + scales)
            gpu = max(gpu, merge + 3 * 8 * n + 4 * out * n + check + factors)
        else:
            host = max(host, THREADS_ALLOWANCE + rings + merge + check + out * n + 2 * COMPARE_BYTES + factors + scales)
    return host, gpu


@dataclass
class _Slot:
    """One block's buffers on their way: made on the device, copied to the host, checked and written.
    Reused once everything that reads them is done (``waits``: futures and CUDA events)."""

    device: Buffers
    host: Buffers
    waits: list = field(default_factory=list)

    def release(self) -> None:
        waits, self.waits = self.waits, []
        for w in waits:
            w.result() if hasattr(w, "result") else w.synchronize()


class _Ring:
    """A few slots used in turn: block k waits for block k - count to be done with its slot."""

    def __init__(self, count: int, device, pinned: bool = False):
        self.slots = [_Slot(Buffers(device), Buffers("cpu", pinned)) for _ in range(count)]
        self.turn = 0

    def next(self) -> _Slot:
        slot = self.slots[self.turn]
        self.turn = (self.turn + 1) % len(self.slots)
        slot.release()
        return slot

    def release(self) -> None:
        for slot in self.slots:
            slot.release()


@dataclass
class _Block:
    """Rows [start, stop) of a merged tensor as written (the rounded rows, or a quantized format's parts):
    ``device`` to check, ``host`` to write once ``ready``."""

    start: int
    stop: int
    device: tuple
    host: tuple
    ready: object
    slot: _Slot


@dataclass
class _Read:
    """BASE's rows for a block: ``values`` as stored (or decoded), in ``slot``'s buffer when one holds them,
    and a quantized format's ``stored`` parts when the block is encoded again."""

    values: object
    slot: _Slot | None
    stored: tuple | None


class _Computer:
    """Merges one planned tensor on one device, block by block, into reused buffers."""

    def __init__(self, device, block_bytes: int, reader: ThreadPoolExecutor):
        import torch

        self.device = device
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self.block_bytes = block_bytes
        self.reader = reader
        self.work = Buffers(device)
        self.raw = _Ring(2, "cpu", pinned=self.cuda)  # this block, and the next one being read
        # blocks being checked and written: a few in flight on each side, one being made
        self.out = _Ring(4, device, pinned=self.cuda)
        self.torch = torch
        self.nonfinite: list[str] = []

    def blocks(self, entry: Entry):
        """Each row block of the tensor as it is written (a ``_Block``): rounded to the output dtype, or encoded
        in BASE's quantized format."""
        n = entry.shape[0] if entry.shape else 1
        step = rows_per_block(entry, self.block_bytes)
        spans = [(start, min(n, start + step)) for start in range(0, n, step)]
        prepared = self._prepare(entry, spans) if needs_prepass(entry, step) else None
        for start, stop, v, read in self._merged(entry, spans):
            slot = self.out.next()
            if entry.requantized:
                made = self._encode(entry, v, read, start, stop, prepared)
            else:
                out_dtype = torch_dtype(entry.dtype)
                y = mathops.round_to(v, out_dtype, out=slot.device.take("out", tuple(v.shape), out_dtype),
                                     buffers=self.work)
                if y.is_floating_point() and not mathops.all_finite(y) and entry.name not in self.nonfinite:
                    self.nonfinite.append(entry.name)
                made = (y,)
            host, ready = self._to_host(made, slot)
            yield _Block(start, stop, made, host, ready, slot)

    def _merged(self, entry: Entry, spans):
        """(start, stop, merged float64 rows, what was read) for each span, in order."""
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
        for (start, stop), read in zip(spans, self._read_ahead(entry, spans)):
            v = self._value(read, ops, start, stop, cache)
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
        return grid

    def _encode(self, entry: Entry, v, read: _Read, start: int, stop: int, prepared):
        q = entry.base
        if not mathops.all_finite(v):
            raise NonFiniteError(f"the merge gives NaN or Inf in {entry.name}, which {q.dtype} cannot store",
                                 "merge with --dtype to write a dequantized checkpoint, or repair the adapter")
        if prepared is None:
            prepared = q.prepare(v, self._decoded(entry, read, start, stop), start, stop)
        else:
            first, last = q.part_rows(1, start, stop)
            prepared = (prepared[0][first:last], prepared[1][first:last])
        return q.encode(v, self._on_device(read.stored), start, stop, prepared)

    def _decoded(self, entry: Entry, read: _Read, start: int, stop: int):
        """BASE's values of the rows, where the merge computes: as read (on the CPU), or decoded there again."""
        if not self.cuda and entry.ops.replace is None:
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
        stored = info.read(start, stop) if entry.requantized else None  # kept where the values do not change
        if ops is not None and ops.replace is not None:  # an adapter tensor: small, read as it is
            source = ops.replace
            return _Read(source.rows(start, stop) if source.shape else source.load(), None, stored)
        if isinstance(info, QuantizedTensor):
            return _Read(info.decode(stored, start, stop) if stored else info.rows(start, stop), None, stored)
        slot = self.raw.next()
        return _Read(read_stored_rows(info, start, stop, slot.host, "raw"), slot, None)

    def _value(self, read: _Read, ops, start: int, stop: int, cache: dict):
        v = self.work.take("value", tuple(read.values.shape), self.torch.float64)
        v.copy_(read.values, non_blocking=self.cuda)
        if self.cuda and read.slot is not None:  # the pinned read may be reused once the copy has left it
            read.slot.waits.append(self._event())
        for d in ops.deltas if ops is not None else ():
            mathops.add_delta(v, d, start, stop, cache)
        return v

    def _event(self):
        """An event on the merge device's stream (a thread's current device may be another GPU)."""
        event = self.torch.cuda.Event()
        event.record(self.torch.cuda.current_stream(self.device))
        return event

    def close(self) -> None:
        self.out.release()
        self.raw.release()


class _ShardFile:
    """One output shard, written on a thread, each piece at its place in the file: each piece is read back as
    soon as it is written and compared with the bytes that were checked (or, for a copy, with BASE's), and the
    file's sha256 is taken from what was read back, in file order. At most ``depth`` pieces wait."""

    def __init__(self, pool: ThreadPoolExecutor, path: Path, size: int, depth: int = 2):
        self.pool, self.path, self.size, self.depth = pool, path, size, depth
        self.fd = create(path)
        self.pending: deque = deque()
        self.digest = hashlib.sha256()
        self.hashed = 0  # the file is hashed up to here
        self.ahead: dict[int, int] = {}  # pieces written past that point: start -> end
        self.differs: dict[str, int] = {}  # tensor -> first byte (of the tensor) where the file is not as written
        self.nonfinite: set[str] = set()  # copied floating-point tensors holding NaN or Inf
        preallocate(self.fd, size)

    def header(self, data: bytes) -> None:
        self._submit(self._write_checked, None, 0, 0, data)

    def block(self, name: str, offset: int, at: int, data, ready):
        """``data`` (the bytes of a block being checked, ``at`` bytes into tensor ``name``) at ``offset`` in the
        file, once ``ready``; the future of its writing."""
        return self._submit(self._write_checked, name, offset, at, data, ready)

    def later(self, fn, *args):
        """Run ``fn(*args)`` on the write thread, after the pieces handed over before it; its future."""
        return self._submit(fn, *args)

    def copy(self, name: str, offset: int, src_fd: int, src_offset: int, count: int, dtype: str) -> None:
        self._submit(self._copy_checked, name, offset, src_fd, src_offset, count, dtype)

    def _write_checked(self, name, offset: int, at: int, data, ready=None) -> None:
        if ready is not None:
            ready.synchronize()
        view = data.reshape(-1).view(_uint8()).numpy() if hasattr(data, "numpy") else data
        write_at(self.fd, view, offset)
        back = os.pread(self.fd, len(view), offset)
        if name is not None and not _equal(back, view):
            self.differs.setdefault(name, at + _first_difference(back, bytes(view)))
        self._hash(offset, back)

    def _copy_checked(self, name: str, start: int, src_fd: int, offset: int, count: int, dtype: str) -> None:
        import torch

        copy_range(src_fd, self.fd, offset, count, start)
        d = DTYPES[dtype]
        # whole elements per piece, so that a piece can be viewed as numbers
        piece = max(d.size, COMPARE_BYTES // d.size * d.size)
        for at in range(0, count, piece):
            n = min(piece, count - at)
            ours, theirs = pread_exact(self.fd, n, start + at), os.pread(src_fd, n, offset + at)
            self._hash(start + at, ours)
            if ours != theirs and name not in self.differs:
                self.differs[name] = at + _first_difference(ours, theirs)
            if d.computed and name not in self.nonfinite and not mathops.all_finite(
                    torch.frombuffer(ours, dtype=torch_dtype(dtype))):
                self.nonfinite.add(name)

    def _hash(self, offset: int, back: bytes) -> None:
        """Hash the piece just read back when the file is hashed up to it, and then the pieces written ahead of
        it, read again (only where BASE's order puts a tensor's parts apart)."""
        if offset != self.hashed:
            self.ahead[offset] = offset + len(back)
            return
        self.digest.update(back)
        self.hashed += len(back)
        while self.hashed in self.ahead:
            end = self.ahead.pop(self.hashed)
            for at in range(self.hashed, end, COMPARE_BYTES):
                self.digest.update(pread_exact(self.fd, min(COMPARE_BYTES, end - at), at))
            self.hashed = end

    def _submit(self, fn, *args):
        while len(self.pending) >= self.depth:
            self.pending.popleft().result()
        future = self.pool.submit(fn, *args)
        self.pending.append(future)
        return future

    def finish(self) -> str:
        """Wait for every piece (the first failure is raised); the file's sha256."""
        while self.pending:
            self.pending.popleft().result()
        if self.hashed != self.size or self.ahead:  # a planning bug, never a user error
            raise AssertionError(f"{self.path.name}: {self.hashed} of {self.size} bytes written in one piece")
        return self.digest.hexdigest()

    def abandon(self) -> None:
        """Wait for the pieces already handed over, their failures hidden by the one being raised."""
        while self.pending:
            self.pending.popleft().exception()

    def close(self) -> None:
        os.close(self.fd)  # flushed to disk when the output is committed, after its checks


def _equal(back: bytes, view) -> bool:
    import numpy as np

    return len(back) == len(view) and np.array_equal(np.frombuffer(back, np.uint8), view)


def _first_difference(a: bytes, b: bytes) -> int:
    return next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))


def write_shards(plan: Plan, folder: Path, device, block_bytes: int | None, progress, *,
                 reuse: frozenset[str] | set[str] = frozenset(), on_shard=None, allow_nonfinite: bool = False
                 ) -> WriteStats:
    """Write every shard of the plan (and the index) into ``folder``, checking every merged block before it
    is written and every written range after; ``WriteStats.tensors`` holds what the checks found.

    Shards named in ``reuse`` are already there (a resumed run) and are skipped; ``on_shard(name, sha256)``
    is called as each written shard is complete. A merged tensor holding NaN or Inf is an error (naming
    every such tensor, after all are written) unless ``allow_nonfinite``.
    """
    import torch

    # Merging and checking take a core each, side by side; torch's own threads would spin on a core that
    # the other one needs (measured on 2 cores: as fast, for twice the CPU time).
    threads = torch.get_num_threads()
    cpu = getattr(device, "type", str(device)) == "cpu"
    if cpu:
        torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(1, "lora-merge-read") as reader, ThreadPoolExecutor(1, "lora-merge-check") as checker, \
                ThreadPoolExecutor(1, "lora-merge-write") as writer:
            job = _Writing(folder, _Computer(device, block_bytes_for(device, block_bytes), reader), checker, writer,
                           device, allow_nonfinite, progress)
            try:
                for shard in plan.shards:
                    if shard.name in reuse:
                        job.reused(shard)
                        continue
                    digest = job.shard(shard)
                    if on_shard is not None:
                        on_shard(shard.name, digest)
            finally:
                job.close()
    finally:
        if cpu:
            torch.set_num_threads(threads)
    stats = job.stats
    stats.nonfinite = job.computer.nonfinite
    if stats.nonfinite and not allow_nonfinite:
        raise NonFiniteError(
            f"the merge gives NaN or Inf in {len(stats.nonfinite)} tensor(s): {name_list(stats.nonfinite)}",
            "the adapter's scale overflows the output dtype (try --dtype float32), or the adapter is broken; "
            "--allow-nonfinite writes it anyway",
        )
    if plan.sharded:
        index = {
            "metadata": {**plan.base.index_metadata, "total_size": plan.total_bytes},
            "weight_map": {name: s.name for s in plan.shards for e in s.entries for name, _, _ in e.stored},
        }
        try:
            write_new(folder / plan.index_name, json.dumps(index, indent=2) + "\n")
        except OSError as e:
            no_room(e, plan.index_name)
            raise
        stats.files.append(plan.index_name)
    return stats


class _Writing:
    """One run of the writer: the shards written so far, and what their checks found."""

    def __init__(self, folder: Path, computer: _Computer, checker: ThreadPoolExecutor, writer: ThreadPoolExecutor,
                 device, allow_nonfinite: bool, progress):
        self.folder, self.computer, self.checker, self.writer = folder, computer, checker, writer
        self.device, self.allow_nonfinite, self.progress = device, allow_nonfinite, progress
        self.stats = WriteStats()
        self.src_fds: dict[Path, int] = {}
        self.checked: list = []  # futures of (tensor, what its element check found)
        self.check_buffers = Buffers(device)  # the check thread's, shared by the tensors it checks in turn
        self.offsets: dict[str, int] = {}  # where each stored tensor of the shard being written starts

    def reused(self, shard) -> None:
        self.stats.reused += 1
        for entry in shard.entries:
            self.stats.count(entry)
        self._progress(sum(e.nbytes for e in shard.entries))
        self.stats.files.append(shard.name)

    def shard(self, shard) -> str:
        """Write, check and read back one shard; its sha256."""
        prefix, self.offsets = encode_header(shard.stored, shard.metadata)
        try:
            out = _ShardFile(self.writer, self.folder / shard.name, len(prefix) + shard.nbytes)
        except OSError as e:
            no_room(e, shard.name)
            raise
        try:
            out.header(prefix)
            for entry in shard.entries:
                written = self._copy(entry, out) if entry.is_copy else self._merge(entry, out)
                self.stats.count(entry)
                self._progress(written)
            digest = out.finish()
            checked, self.checked = self.checked, []
            for future in checked:
                name, result = future.result()
                self.stats.tensors[name] = result
        except BaseException as e:
            out.abandon()
            for future in self.checked:
                future.exception()
            self.checked = []
            if isinstance(e, OSError):
                no_room(e, shard.name)
            raise
        finally:
            out.close()
        tensors = self.stats.tensors
        for entry in shard.entries:
            if entry.is_copy:
                at = out.differs.get(entry.name)
                tensors[entry.name] = {"check": "identical", "ok": at is None, "differs_at": at,
                                       "finite": entry.name not in out.nonfinite}
            elif entry.name in out.differs:  # the file does not hold the bytes that were checked
                tensors[entry.name].update(ok=False, on_disk_differs_at=out.differs[entry.name])
        self.stats.digests[shard.name] = digest
        self.stats.files.append(shard.name)
        return digest

    def _copy(self, entry: Entry, out: _ShardFile) -> int:
        path = entry.base.path
        if path not in self.src_fds:
            self.src_fds[path] = open_read(path)
        out.copy(entry.name, self.offsets[entry.name], self.src_fds[path], entry.base.start, entry.nbytes, entry.dtype)
        return entry.nbytes

    def _merge(self, entry: Entry, out: _ShardFile) -> int:
        """Each block is checked on the check thread while the write thread writes it and reads it back: the
        file is then known to hold the bytes that were checked. A quantized format's scales follow its codes."""
        written = 0
        if entry.requantized:
            check = GridCheck(entry, self.device, self.check_buffers)
            scales = _Scales(entry)
        else:
            check = ElementCheck(entry, self.device, self.allow_nonfinite, buffers=self.check_buffers)
            scales = None
        first = entry.stored[0][0]
        for b in self.computer.blocks(entry):
            stored = b.device if scales is not None else b.device[0]
            b.slot.waits.append(self.checker.submit(check.block, b.start, b.stop, stored))
            b.slot.waits.append(out.block(entry.name, self.offsets[first] + written, written, b.host[0], b.ready))
            written += b.host[0].numel() * b.host[0].element_size()
            if scales is not None:
                b.slot.waits.append(out.later(scales.fill, b.start, b.stop, b.host[1:], b.ready))
        for (name, _, _), data in zip(entry.stored[1:], scales.buffers if scales is not None else ()):
            out.block(entry.name, self.offsets[name], written, data, None)
            written += data.numel()
        if written != entry.nbytes:  # a planning bug, never a user error
            raise AssertionError(f"{entry.name}: wrote {written} bytes, planned {entry.nbytes}")
        self.checked.append(self.checker.submit(lambda: (entry.name, check.result())))
        return written

    def _progress(self, count: int) -> None:
        self.progress.update(count)

    def close(self) -> None:
        self.computer.close()
        for f in self.src_fds.values():
            os.close(f)


class _Scales:
    """The scale parts of a tensor written in a quantized format: filled block by block on the write thread,
    written after the codes."""

    def __init__(self, entry: Entry):
        import torch

        self.tensor = entry.base
        self.buffers = [torch.empty(p.nbytes, dtype=torch.uint8) for p in self.tensor.parts[1:]]

    def fill(self, start: int, stop: int, pieces, ready) -> None:
        if ready is not None:
            ready.synchronize()
        for i, (buffer, piece) in enumerate(zip(self.buffers, pieces), start=1):
            first, last = self.tensor.part_rows(i, start, stop)
            row = self.tensor.parts[i].row_bytes
            buffer[first * row:last * row] = piece.reshape(-1).view(_uint8())


def preallocate(fd: int, size: int) -> None:
    """Reserve the file's final size before writing it: appending to a file that is being extended costs
    several times more per byte on common filesystems, and a full disk shows up now, not halfway."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in NO_ROOM:
            raise
        # a filesystem without preallocation: the writes extend the file as they go


def _uint8():
    import torch

    return torch.uint8
