"""Writing the planned output: shards front to back, ``--jobs`` tensors at a time, every merged block checked before
it is written and every written range read back.

Untouched tensors are copied as bytes between files. A merged tensor is made on a lane in row blocks by its route's
maker, each block checked element by element against its exact value by the check's own code on the lane's check
thread, while the shard's write thread writes it at its place, reads it back, compares it with what was checked,
and hashes the file (``shardfile``: pieces may come in any order). BASE's next rows are read ahead meanwhile.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .check.readback import Compared, copy_verdict
from .check.verdict import TensorVerdict
from .dtypes import DTYPES
from .kernels import blas
from .options import jobs_for
from .output import no_room
from .paths import open_read, write_new
from .plan import Entry, Plan
from .reader import kept_open
from .route import Route, block_bytes_for, routes
from .safetensors_file import encode_header
from .shardfile import ShardFile, as_bytes


@dataclass
class WriteStats:
    merged: int = 0
    copied: int = 0
    converted: int = 0
    reused: int = 0  # shards kept from an interrupted run (--resume)
    files: list[str] = field(default_factory=list)
    # what the checks found as the output was written: per tensor, and each written shard's sha256
    tensors: dict[str, TensorVerdict] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)
    decided: int = 0  # merged elements the kernels left to be decided in float64 or exactly
    exact: int = 0  # of those, the ones decided from their exact value (lora_merge.exact)

    def count(self, entry: Entry) -> None:
        if entry.is_copy:
            self.copied += 1
        elif entry.is_merge:
            self.merged += 1
        else:
            self.converted += 1


def maker_of(route: Route) -> type:
    """The class that makes the blocks of a route's tensors (one per lane, shared by the tensors of its route that
    the lane merges): each format's CPU maker in its folder, torch's for the rest."""
    from .blocks import TorchBlocks
    from .numbers.floats.merge import FloatBlocks
    from .numbers.fp8.merge import Fp8Blocks
    from .numbers.mxfp4.merge import Mxfp4Blocks

    return {"float": FloatBlocks, "fp8": Fp8Blocks, "mxfp4": Mxfp4Blocks}.get(route.name, TorchBlocks)


def write_shards(plan: Plan, folder: Path, device, options, progress, *, reuse: frozenset[str] | set[str] = frozenset(),
                 on_shard=None) -> WriteStats:
    """Write every shard of the plan (and the index) into ``folder``, checking every merged block before it is
    written and every written range after; ``WriteStats.tensors`` holds what the checks found.

    Shards named in ``reuse`` are already there (a resumed run) and are skipped; ``on_shard(name, sha256)`` is
    called as each written shard is complete. Whether NaN or Inf in a merged tensor is acceptable is not judged
    here: each tensor's verdict says whether it holds any, and the report's finite check judges.
    """
    chosen = {r.entry.name: r for r in routes(plan, device)}
    torch_needed = any(r.torch for r in chosen.values())
    jobs = jobs_for(options.jobs)
    with _torch_threads(device if torch_needed else None), blas.one_thread(), kept_open(), \
            ThreadPoolExecutor(jobs, "lora-merge-read") as reader:
        lanes = [_Lane(options.block_bytes, reader) for _ in range(jobs)]
        job = _Writing(folder, lanes, progress, chosen)
        try:
            for shard in plan.shards:
                if shard.name in reuse:
                    job.reused(shard)
            job.write([s for s in plan.shards if s.name not in reuse], on_shard)
        finally:
            job.close()
    stats = job.stats
    stats.files = [s.name for s in plan.shards]
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


class _torch_threads:
    """Where torch computes on the CPU: one intra-op thread while the writer runs. Merging and checking take a core
    each, side by side; torch's own threads would spin on a core the other one needs (measured on 2 cores: as fast,
    for twice the CPU time). ``None``: torch is not used, and not imported."""

    def __init__(self, device):
        self.cpu = device is not None and device.type == "cpu"

    def __enter__(self):
        if self.cpu:
            import torch

            self.threads = torch.get_num_threads()
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        if self.cpu:
            import torch

            torch.set_num_threads(self.threads)


class _Lane:
    """Where one tensor at a time is merged: its own makers (each route's, made on first use), its own check thread
    and the check's buffers. A run has ``--jobs`` lanes, each taking the next tensor when it is done with one."""

    def __init__(self, block_bytes: int | None, reader: ThreadPoolExecutor):
        self.block_bytes, self.reader = block_bytes, reader  # as asked (None: the device's default)
        self.makers: dict[tuple, object] = {}  # by class and device, made on first use (torch's imports torch)
        self.checker = ThreadPoolExecutor(1, "lora-merge-check")
        self.check_buffers: dict[tuple, object] = {}  # shared by the tensors the lane checks in turn

    def maker(self, route: Route):
        key = (maker_of(route), route.device)
        if key not in self.makers:
            self.makers[key] = key[0](route.device, block_bytes_for(route.device, self.block_bytes), self.reader)
        return self.makers[key]

    def buffers(self, route: Route):
        """The check thread's buffers: numpy's for the numpy checks, torch's on the route's device for the others."""
        key = (route.numpy_check, None if route.numpy_check else route.device)
        if key not in self.check_buffers:
            from .buffers import Buffers, HostBuffers

            self.check_buffers[key] = HostBuffers() if route.numpy_check else Buffers(route.device.torch)
        return self.check_buffers[key]

    def close(self) -> None:
        self.checker.shutdown()
        for maker in self.makers.values():
            maker.close()


class _Stopped(Exception):
    """Another lane failed: this one stops between blocks (the other lane's error is the one raised)."""


class _Writing:
    """One run of the writer: the shards written so far, and what their checks found. Up to ``--jobs`` shards are
    written at once, each by a write thread of its own; copies are handed to it as they come, merged tensors go to
    the lanes (one at a time on the shard's thread when there is one lane), each block landing at its planned place
    in the file whatever the order."""

    def __init__(self, folder: Path, lanes: list[_Lane], progress, chosen: dict[str, Route]):
        self.folder, self.lanes, self.progress, self.routes = folder, lanes, progress, chosen
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        for lane in lanes:
            self.free.put(lane)
        self.pool = ThreadPoolExecutor(len(lanes), "lora-merge-merge") if len(lanes) > 1 else None
        self.stopped = threading.Event()
        self.lock = threading.Lock()  # the stats, counted from the shards' threads
        self.stats = WriteStats()
        self.src_fds: dict[Path, int] = {}

    def reused(self, shard) -> None:
        self.stats.reused += 1
        for entry in shard.entries:
            self.stats.count(entry)
        self.progress.update(sum(e.nbytes for e in shard.entries))

    def write(self, shards: list, on_shard) -> None:
        """Write the shards, ``on_shard(name, sha256)`` called (on this thread) as each is complete; a failure stops
        the others between blocks and the first failure is raised."""
        if self.pool is None or len(shards) < 2:
            for shard in shards:
                digest = self.shard(shard)
                if on_shard is not None:
                    on_shard(shard.name, digest)
            return
        failures: list[BaseException] = []
        with ThreadPoolExecutor(min(len(self.lanes), len(shards)), "lora-merge-shard") as pool:
            try:
                futures = {pool.submit(self.shard, s): s for s in shards}
                for future in as_completed(futures):
                    try:
                        digest = future.result()
                    except BaseException as e:
                        self.stopped.set()
                        failures.append(e)
                        continue
                    if on_shard is not None:  # complete and checked, whatever another shard did
                        on_shard(futures[future].name, digest)
            except BaseException:  # interrupted here: the shards stop between blocks
                self.stopped.set()
                raise
        if failures:
            raise next((e for e in failures if not isinstance(e, _Stopped)), failures[0])

    def shard(self, shard) -> str:
        """Write, check and read back one shard; its sha256."""
        prefix, offsets = encode_header(shard.stored, shard.metadata)
        writer = ThreadPoolExecutor(1, "lora-merge-write")
        try:
            out = ShardFile(writer, self.folder / shard.name, len(prefix) + shard.nbytes, depth=2 * len(self.lanes))
        except OSError as e:
            writer.shutdown()
            no_room(e, shard.name)
            raise
        running: list = []  # the lanes' futures of (entry, bytes written, future of the tensor's verdict)
        checked: list = []
        try:
            out.header(prefix)
            for entry in shard.entries:
                if self.stopped.is_set():
                    raise _Stopped
                if entry.is_copy:
                    self._done(entry, self._copy(entry, out, offsets))
                elif self.pool is None:
                    written, verdict = self._merge(entry, out, offsets, self.lanes[0])
                    checked.append(verdict)
                    self._done(entry, written)
                else:
                    lane = self.free.get()  # a lane free: the one that finished last (or a failure to raise)
                    self._harvest(running, checked, wait=False)
                    running.append(self.pool.submit(self._in_lane, entry, out, offsets, lane))
            self._harvest(running, checked, wait=True)
            digest = out.finish()
            for future in checked:
                name, verdict = future.result()
                self.stats.tensors[name] = verdict.on_disk(out.differs.get(name))
        except BaseException as e:
            self.stopped.set()
            for future in running:  # the lanes stop between blocks; then nothing more is handed to the file
                future.exception()
            out.abandon()
            for future in checked:
                future.exception()
            if isinstance(e, OSError):
                no_room(e, shard.name)
            raise
        finally:
            out.close()
            writer.shutdown()
        for entry in shard.entries:
            if entry.is_copy:
                self.stats.tensors[entry.name] = copy_verdict(
                    Compared(out.differs.get(entry.name), entry.name not in out.nonfinite))
        self.stats.digests[shard.name] = digest
        return digest

    def _done(self, entry: Entry, written: int) -> None:
        with self.lock:
            self.stats.count(entry)
            self.progress.update(written)

    def _harvest(self, running: list, checked: list, wait: bool) -> None:
        """Count the lanes' finished tensors (all of them with ``wait``); a lane's failure is raised here."""
        for future in list(running):
            if wait or future.done():
                entry, written, verdict = future.result()
                running.remove(future)
                checked.append(verdict)
                self._done(entry, written)

    def _in_lane(self, entry: Entry, out: ShardFile, offsets: dict[str, int], lane: _Lane):
        try:
            return (entry, *self._merge(entry, out, offsets, lane))
        finally:
            self.free.put(lane)

    def _copy(self, entry: Entry, out: ShardFile, offsets: dict[str, int]) -> int:
        path = entry.base.path
        with self.lock:
            if path not in self.src_fds:
                self.src_fds[path] = open_read(path)
            fd = self.src_fds[path]
        out.copy(entry.name, offsets[entry.name], fd, entry.base.start, entry.nbytes, entry.dtype)
        return entry.nbytes

    def _merge(self, entry: Entry, out: ShardFile, offsets: dict[str, int], lane: _Lane):
        """Each block is checked on the lane's check thread while the write thread writes it and reads it back: the
        file is then known to hold the bytes that were checked. A quantized format's scales follow its codes.
        The bytes written, and the future of (the tensor's name, its verdict)."""
        written = 0
        route = self.routes[entry.name]
        check = route.check(lane.buffers(route))
        scales = _Scales(entry, route.part_rows) if route.parts else None
        first = entry.stored[0][0]
        for b in lane.maker(route).blocks(entry):
            if self.stopped.is_set():
                raise _Stopped
            stored = b.device if scales is not None else b.device[0]
            b.slot.waits.append(lane.checker.submit(check.block, b.start, b.stop, stored))
            b.slot.waits.append(out.block(entry.name, offsets[first] + written, written, b.host[0], b.ready))
            written += _nbytes(b.host[0])
            if scales is not None:
                b.slot.waits.append(out.later(scales.fill, b.start, b.stop, b.host[1:], b.ready))
        for (name, _, _), data in zip(entry.stored[1:], scales.buffers if scales is not None else (), strict=True):
            out.block(entry.name, offsets[name], written, data, None)
            written += data.nbytes
        if written != entry.nbytes:  # a planning bug, never a user error
            raise AssertionError(f"{entry.name}: wrote {written} bytes, planned {entry.nbytes}")
        return written, lane.checker.submit(lambda: (entry.name, check.result()))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        for lane in self.lanes:
            lane.close()
        makers = [m for lane in self.lanes for m in lane.makers.values()]
        self.stats.decided = sum(m.decided for m in makers)
        self.stats.exact = sum(m.exact for m in makers)
        for f in self.src_fds.values():
            os.close(f)


def _nbytes(data) -> int:
    return data.numel() * data.element_size() if hasattr(data, "element_size") else data.nbytes


class _Scales:
    """The scale parts of a tensor written in a quantized format: filled block by block on the write thread, written
    after the codes."""

    def __init__(self, entry: Entry, part_rows: bool = False):
        self.tensor = entry.base
        self.buffers = [np.empty(p.nbytes, np.uint8) for p in self.tensor.parts[1:]]
        self.part_rows = part_rows  # blocks count the parts' own rows (their last axis), not the dense tensor's

    def fill(self, start: int, stop: int, pieces, ready) -> None:
        if ready is not None:
            ready.synchronize()
        for i, (buffer, piece) in enumerate(zip(self.buffers, pieces, strict=True), start=1):
            part = self.tensor.parts[i]
            if self.part_rows:
                first, last, row = start, stop, part.shape[-1] * DTYPES[part.dtype].size
            else:
                first, last = self.tensor.part_rows(i, start, stop)
                row = part.row_bytes
            buffer[first * row:last * row] = as_bytes(piece)
