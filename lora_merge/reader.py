"""The one reader of stored tensors' bytes: every row, part or whole tensor the merge and the check read from a
safetensors file (BASE's, the adapter's, OUT's) comes through here, opened under ``paths.open_read``'s rules (a
regular file, links followed, a pipe or a device refused by name).

Within ``kept_open()`` (a run's writing or reading back) each file is opened once and its descriptor kept until the
run is done; outside it, each read opens and closes the file. Reads are ``pread``s: threads share descriptors.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from . import kernels
from .paths import open_read
from .safetensors_file import pread_into

_lock = threading.Lock()
_kept: dict[str, int] | None = None  # path -> descriptor, while a run keeps its files open
_depth = 0


@contextmanager
def kept_open():
    """Keep every file read meanwhile open until the outermost ``kept_open`` ends."""
    global _kept, _depth
    with _lock:
        _depth += 1
        if _kept is None:
            _kept = {}
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                kept, _kept = _kept, None
                for fd in kept.values():
                    os.close(fd)


def read_into(path: Path | str, offset: int, view) -> None:
    """Fill ``view`` (a writable buffer) with the file's bytes from ``offset``."""
    view = memoryview(view).cast("B")
    if len(view) == 0:
        return
    key = str(path)
    with _lock:
        fd = _kept.get(key) if _kept is not None else None
    if fd is not None:
        pread_into(fd, view, offset)
        return
    fd = open_read(path)
    with _lock:
        kept = _kept.setdefault(key, fd) if _kept is not None else None
    if kept is None:
        try:
            pread_into(fd, view, offset)
        finally:
            os.close(fd)
        return
    if kept != fd:  # another thread opened it meanwhile
        os.close(fd)
    pread_into(kept, view, offset)


def rows_nbytes(info, start: int, stop: int) -> int:
    """Bytes of rows [start, stop) of a stored tensor (all of a scalar)."""
    return info.row_bytes * (stop - start) if info.shape else info.nbytes


def read_rows(info, start: int, stop: int, into: np.ndarray | None = None) -> np.ndarray:
    """Rows [start, stop) of a stored tensor (all of a scalar) as bytes: into ``into`` (uint8, ``rows_nbytes``), or
    a fresh array."""
    raw = np.empty(rows_nbytes(info, start, stop), np.uint8) if into is None else into
    read_into(info.path, info.start + (info.row_bytes * start if info.shape else 0), raw)
    return raw


def tensor_rows(info, start: int, stop: int, buffers, key: str):
    """Rows [start, stop) of a stored tensor (all of a scalar) as a torch tensor of its dtype, read into the torch
    ``buffers``' bytes named ``key`` (reused)."""
    import torch

    from .dtypes import torch_dtype

    raw = buffers.take(key, (rows_nbytes(info, start, stop),), torch.uint8)
    read_rows(info, start, stop, raw.numpy())
    shape = (stop - start, *info.shape[1:]) if info.shape else ()
    return raw.view(torch_dtype(info.dtype)).reshape(shape)


def read_flat(info, first: int, last: int, into: np.ndarray | None = None) -> np.ndarray:
    """Bytes [first, last) of a stored tensor's data, into ``into`` or a fresh array."""
    raw = np.empty(last - first, np.uint8) if into is None else into
    read_into(info.path, info.start + first, raw)
    return raw


def raw_bytes(t) -> np.ndarray:
    """An adapter tensor as stored (read from its file, or the bytes of one already in memory), as uint8."""
    if getattr(t, "info", None) is None:  # a tensor in memory
        import torch

        return t.tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
    info = t.info
    return read_flat(info, 0, info.nbytes)


def stored_rows(info, start: int, stop: int, buffers, name: str) -> np.ndarray:
    """Rows [start, stop) of a stored float tensor (a vector or scalar: all of it) as its elements' bits, uint16 or
    float32, in ``buffers``' buffer ``name``."""
    row = info.row_bytes if len(info.shape) > 1 else info.nbytes
    raw = buffers(name, ((stop - start) * row,), np.uint8)
    read_into(info.path, info.start + row * start, raw)
    return raw.view(np.float32 if info.dtype == "F32" else np.uint16)


def as_float32(t) -> np.ndarray:
    """An adapter tensor's values as float32 (exactly: it is stored as float32, bfloat16 or float16)."""
    if getattr(t, "info", None) is None:
        return t.tensor.float().numpy()
    raw = raw_bytes(t)
    return kernels.plain.load(kernels.KINDS[t.dtype], raw.view(np.float32 if t.dtype == "F32" else np.uint16)
                              ).reshape(t.shape)
