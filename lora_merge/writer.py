"""Writing the planned output: shards front to back, one tensor (or row block) at a time.

Untouched tensors are copied as bytes between files. A merged tensor is read in row blocks, moved to
the compute device, merged in float64, rounded once and written. Three stages overlap, one block in
each: a thread reads the next block (into pinned memory for a GPU) while this one is merged, and
another thread writes the last one.
"""

from __future__ import annotations

import errno
import json
import math
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import mathops
from .adapter import FileTensor
from .dtypes import torch_dtype
from .errors import NonFiniteError, OutputError, name_list
from .plan import Entry, Plan
from .safetensors_file import copy_range, encode_header, write_all

# a full disk, a file size limit, a quota
NO_ROOM = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


@dataclass
class WriteStats:
    merged: int = 0
    copied: int = 0
    converted: int = 0
    reused: int = 0  # shards kept from an interrupted run (--resume)
    bytes_written: int = 0
    nonfinite: list[str] = field(default_factory=list)  # merged tensors holding NaN or Inf (when allowed)

    def count(self, entry: Entry) -> None:
        if entry.is_copy:
            self.copied += 1
        elif entry.is_merge:
            self.merged += 1
        else:
            self.converted += 1
    files: list[str] = field(default_factory=list)


def rows_per_block(entry: Entry, block_bytes: int) -> int:
    """How many rows of ``entry`` make a float64 block of at most ``block_bytes`` (at least one)."""
    return max(1, block_bytes // (8 * max(math.prod(entry.shape[1:]), 1)))


class _Computer:
    """Merges one planned tensor on one device, block by block."""

    def __init__(self, device, block_bytes: int, reader: ThreadPoolExecutor):
        self.device = device
        self.nonfinite: list[str] = []
        self.block_bytes = block_bytes
        self.reader = reader
        self.pinned = getattr(device, "type", str(device)) == "cuda"

    def blocks(self, entry: Entry):
        """Yield each row block of the merged tensor, rounded to the output dtype, on the CPU."""
        import torch

        ops = entry.ops
        source = ops.replace if ops is not None and ops.replace is not None else FileTensor(entry.base)
        out_dtype = torch_dtype(entry.dtype)
        n = entry.shape[0] if entry.shape else 1
        step = rows_per_block(entry, self.block_bytes)
        spans = [(start, min(n, start + step)) for start in range(0, n, step)]
        cache: dict = {}
        norm = None
        if ops is not None and ops.dora_magnitude is not None:
            magnitude = ops.dora_magnitude.load().reshape(-1).to(self.device, torch.float64)
            if ops.dora_transposed:  # norms run across row blocks: a first pass sums their squares
                sumsq = torch.zeros(magnitude.shape, dtype=torch.float64, device=self.device)
                for (start, stop), raw in zip(spans, self._read_ahead(source, spans)):
                    sumsq += mathops.column_sumsq(self._value(raw, ops, start, stop, cache))
                norm = sumsq.sqrt()
        token_rows = ops.rows.load() if ops is not None and ops.rows is not None else None
        for (start, stop), raw in zip(spans, self._read_ahead(source, spans)):
            v = self._value(raw, ops, start, stop, cache)
            if ops is not None and ops.dora_magnitude is not None:
                if ops.dora_transposed:
                    mathops.apply_dora(v, magnitude, norm, True)
                else:
                    mathops.apply_dora(v, magnitude[start:stop], mathops.row_norms(v), False)
            if token_rows is not None:
                mathops.replace_rows(v, ops.row_indices, token_rows, start, stop)
            out = mathops.round_to(v, out_dtype)
            if out.is_floating_point() and not mathops.all_finite(out) and entry.name not in self.nonfinite:
                self.nonfinite.append(entry.name)
            yield out.cpu()

    def _read_ahead(self, source, spans):
        """The source rows of each span, the next one read on the reader thread meanwhile."""
        pending = self.reader.submit(self._read, source, *spans[0]) if spans else None
        for i in range(len(spans)):
            raw = pending.result()
            pending = self.reader.submit(self._read, source, *spans[i + 1]) if i + 1 < len(spans) else None
            yield raw

    def _read(self, source, start: int, stop: int):
        raw = source.rows(start, stop) if source.shape else source.load()
        return raw.pin_memory() if self.pinned else raw

    def _value(self, raw, ops, start: int, stop: int, cache: dict):
        import torch

        v = raw.to(self.device, non_blocking=self.pinned).to(torch.float64)
        for d in ops.deltas if ops is not None else ():
            mathops.add_delta(v, d, start, stop, cache)
        return v


class _Appender:
    """Appends to one file on a thread, in order, with at most ``depth`` pieces waiting."""

    def __init__(self, pool: ThreadPoolExecutor, fd: int, depth: int = 2):
        self.pool, self.fd, self.depth = pool, fd, depth
        self.pending: deque = deque()

    def write(self, data) -> None:
        self._submit(write_all, self.fd, data)

    def copy(self, src_fd: int, offset: int, count: int) -> None:
        self._submit(copy_range, src_fd, self.fd, offset, count)

    def _submit(self, fn, *args) -> None:
        while len(self.pending) >= self.depth:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(fn, *args))

    def drain(self) -> None:
        """Wait for every piece; the first failure is raised."""
        while self.pending:
            self.pending.popleft().result()

    def abandon(self) -> None:
        """Wait for the pieces already handed over, their failures hidden by the one being raised."""
        while self.pending:
            self.pending.popleft().exception()


def write_shards(
    plan: Plan,
    folder: Path,
    device,
    block_bytes: int,
    progress=None,
    *,
    reuse: frozenset[str] | set[str] = frozenset(),
    on_shard=None,
    allow_nonfinite: bool = False,
) -> WriteStats:
    """Write every shard of the plan (and the index) into ``folder``.

    Shards named in ``reuse`` are already there (a resumed run) and are skipped; ``on_shard(name)``
    is called as each written shard is complete. A merged tensor holding NaN or Inf is an error
    (naming every such tensor, after all are written) unless ``allow_nonfinite``.
    """
    stats = WriteStats()
    src_fds: dict[Path, int] = {}
    with ThreadPoolExecutor(1, "lora-merge-read") as reader, ThreadPoolExecutor(1, "lora-merge-write") as writer:
        computer = _Computer(device, block_bytes, reader)
        try:
            for shard in plan.shards:
                if shard.name in reuse:
                    _count_reused(shard, stats, progress)
                    continue
                _write_shard(shard, folder, computer, writer, src_fds, stats, progress)
                if on_shard is not None:
                    on_shard(shard.name)
        finally:
            for f in src_fds.values():
                os.close(f)
    stats.nonfinite = computer.nonfinite
    if computer.nonfinite and not allow_nonfinite:
        raise NonFiniteError(
            f"the merge gives NaN or Inf in {len(computer.nonfinite)} tensor(s): {name_list(computer.nonfinite)}",
            "the adapter's scale overflows the output dtype (try --dtype float32), or the adapter is broken; "
            "--allow-nonfinite writes it anyway",
        )
    if plan.sharded:
        index = {
            "metadata": {**plan.base.index_metadata, "total_size": plan.total_bytes},
            "weight_map": {e.name: s.name for s in plan.shards for e in s.entries},
        }
        (folder / plan.base.index_name).write_text(json.dumps(index, indent=2) + "\n")
        stats.files.append(plan.base.index_name)
    return stats


def _count_reused(shard, stats: WriteStats, progress) -> None:
    stats.reused += 1
    for entry in shard.entries:
        stats.count(entry)
    if progress is not None:
        progress.update(sum(e.nbytes for e in shard.entries))
    stats.files.append(shard.name)


def _write_shard(shard, folder: Path, computer: _Computer, writer, src_fds: dict, stats: WriteStats, progress) -> None:
    prefix, _ = encode_header([(e.name, e.dtype, e.shape) for e in shard.entries], shard.metadata)
    fd = os.open(folder / shard.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    out = _Appender(writer, fd)
    try:
        preallocate(fd, len(prefix) + shard.nbytes)
        out.write(prefix)
        for entry in shard.entries:
            if entry.is_copy:
                path = entry.base.path
                if path not in src_fds:
                    src_fds[path] = os.open(path, os.O_RDONLY)
                out.copy(src_fds[path], entry.base.start, entry.nbytes)
                written = entry.nbytes
            else:
                written = 0
                for block in computer.blocks(entry):
                    data = block.contiguous().reshape(-1).view(_uint8()).numpy()
                    out.write(data)
                    written += len(data)
                if written != entry.nbytes:  # a planning bug, never a user error
                    raise AssertionError(f"{entry.name}: wrote {written} bytes, planned {entry.nbytes}")
            stats.count(entry)
            stats.bytes_written += written
            if progress is not None:
                progress.update(written)
        out.drain()
    except BaseException as e:
        out.abandon()
        if isinstance(e, OSError) and e.errno in NO_ROOM:
            raise OutputError(
                f"no room left on the disk while writing {shard.name} ({e.strerror})",
                "free some disk space (or raise the file size limit) and run again; OUT was not changed",
            ) from e
        raise
    finally:
        os.close(fd)  # flushed to disk when the output is committed, after its checks
    stats.files.append(shard.name)


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
