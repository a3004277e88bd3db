"""One output shard, written on a thread: each piece at its place in the (preallocated) file, read back at once and
compared with the bytes that were checked (a copy: with BASE's), the file's sha256 taken from what was read back,
in file order."""

from __future__ import annotations

import hashlib
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .check.readback import READ_BYTES, compare_copy, first_difference
from .output import NO_ROOM
from .paths import create
from .safetensors_file import copy_range, pread_into, write_at


class ShardFile:
    """A shard being written: pieces are handed over in any order of offsets (``block``, ``copy``), from any thread;
    at most ``depth`` wait. ``differs`` and ``nonfinite`` say what reading back found."""

    def __init__(self, pool: ThreadPoolExecutor, path: Path, size: int, depth: int = 2):
        self.pool, self.path, self.size, self.depth = pool, path, size, depth
        self.fd = create(path)
        self.pending: deque = deque()
        self.lock = threading.Lock()
        self.digest = hashlib.sha256()
        self.hashed = 0  # the file is hashed up to here
        self.ahead: dict[int, int] = {}  # pieces written past that point: start -> end
        self.back = np.empty(READ_BYTES, np.uint8)  # the write thread's read-back buffer
        self.differs: dict[str, int] = {}  # tensor -> first byte (of the tensor) where the file is not as written
        self.nonfinite: set[str] = set()  # copied floating-point tensors holding NaN or Inf
        preallocate(self.fd, size)

    def header(self, data: bytes) -> None:
        self._submit(self._write_checked, None, 0, 0, data)

    def block(self, name: str, offset: int, at: int, data, ready):
        """``data`` (the bytes of a block being checked, ``at`` bytes into tensor ``name``) at ``offset`` in the file,
        once ``ready``; the future of its writing."""
        return self._submit(self._write_checked, name, offset, at, data, ready)

    def later(self, fn, *args):
        """Run ``fn(*args)`` on the write thread, after the pieces handed over before it; its future."""
        return self._submit(fn, *args)

    def copy(self, name: str, offset: int, src_fd: int, src_offset: int, count: int, dtype: str) -> None:
        self._submit(self._copy_checked, name, offset, src_fd, src_offset, count, dtype)

    def _write_checked(self, name, offset: int, at: int, data, ready=None) -> None:
        if ready is not None:
            ready.synchronize()
        view = as_bytes(data)
        write_at(self.fd, view, offset)
        for piece in range(0, len(view), READ_BYTES):
            n = min(READ_BYTES, len(view) - piece)
            back = self.back[:n]
            pread_into(self.fd, memoryview(back), offset + piece)
            if name is not None and name not in self.differs:
                first = first_difference(back, view[piece:piece + n])
                if first >= 0:
                    self.differs[name] = at + piece + first
            self._hash(offset + piece, back)

    def _copy_checked(self, name: str, start: int, src_fd: int, offset: int, count: int, dtype: str) -> None:
        copy_range(src_fd, self.fd, offset, count, start)
        found = compare_copy(self.fd, start, src_fd, offset, count, dtype, self.back,
                             lambda at, piece: self._hash(start + at, piece))
        if found.differs_at is not None:
            self.differs[name] = found.differs_at
        if not found.finite:
            self.nonfinite.add(name)

    def _hash(self, offset: int, back) -> None:
        """Hash the piece just read back when the file is hashed up to it, and then the pieces written ahead of it,
        read again (only where BASE's order puts a tensor's parts apart)."""
        if offset != self.hashed:
            self.ahead[offset] = offset + len(back)
            return
        self.digest.update(back)
        self.hashed += len(back)
        while self.hashed in self.ahead:
            end = self.ahead.pop(self.hashed)
            for at in range(self.hashed, end, READ_BYTES):
                again = self.back[:min(READ_BYTES, end - at)]
                pread_into(self.fd, memoryview(again), at)
                self.digest.update(again)
            self.hashed = end

    def _submit(self, fn, *args):
        with self.lock:  # several lanes hand pieces over
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


def as_bytes(data) -> np.ndarray:
    """A block's bytes as a flat uint8 array, without a copy (a torch tensor on the host, or a numpy array)."""
    if hasattr(data, "numpy"):  # torch: viewed as bytes by torch itself (numpy has no bfloat16)
        import torch

        data = data.reshape(-1).view(torch.uint8).numpy()
    return np.asarray(data).reshape(-1).view(np.uint8)


def preallocate(fd: int, size: int) -> None:
    """Reserve the file's final size before writing it: appending to a file that is being extended costs several
    times more per byte on common filesystems, and a full disk shows up now, not halfway."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in NO_ROOM:
            raise
        # a filesystem without preallocation: the writes extend the file as they go
