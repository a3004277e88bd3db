"""Reading the output back: one comparison of written bytes with what they must be, used by the writer as it writes
(each piece read back at once) and by ``verify``, which reads any folder front to back, hashing each weights
file and checking every tensor the plan has, by name, whatever the shard layout."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

from .. import kernels
from ..dtypes import DTYPES
from ..paths import open_read
from ..reader import kept_open
from ..safetensors_file import TensorInfo, pread_into
from .verdict import TensorVerdict

READ_BYTES = 4 * 1024 * 1024  # read back, compared and hashed at a time


def first_difference(ours, theirs) -> int:
    """The first byte where two buffers differ, -1 where they are the same."""
    return kernels.first_difference(ours, theirs)


def finite(data, dtype: str) -> bool:
    """No NaN or Inf among a buffer's elements of a float dtype (other dtypes hold no such values)."""
    if dtype in kernels.KINDS:
        return not kernels.nonfinite(kernels.KINDS[dtype], data)
    if dtype == "F64":
        return bool(np.isfinite(np.frombuffer(data, np.float64)).all())
    return True


@dataclass(frozen=True)
class Compared:
    differs_at: int | None  # the first byte (of the tensor) that differs; None: the same bytes
    finite: bool


def compare_copy(fd: int, offset: int, src_fd: int, src_offset: int, count: int, dtype: str, buffer: np.ndarray,
                 each=None) -> Compared:
    """``count`` bytes at ``offset`` of ``fd`` against those at ``src_offset`` of ``src_fd`` (BASE's), and whether
    they are finite; ``each(at, piece)`` sees every piece read, in order (to hash it). ``buffer``: where pieces are
    read (reused)."""
    size = DTYPES[dtype].size
    piece = max(size, (len(buffer) // 2) // size * size)  # whole elements, to be viewed as numbers
    ours, theirs = buffer[:piece], buffer[piece:2 * piece]
    differs, ok = None, True
    for at in range(0, count, piece):
        n = min(piece, count - at)
        pread_into(fd, memoryview(ours[:n]), offset + at)
        if each is not None:
            each(at, ours[:n])
        if differs is None:
            pread_into(src_fd, memoryview(theirs[:n]), src_offset + at)
            first = first_difference(ours[:n], theirs[:n])
            differs = at + first if first >= 0 else None
        ok = ok and finite(ours[:n], dtype)
    return Compared(differs, ok)


def copy_verdict(found: Compared) -> TensorVerdict:
    return TensorVerdict(check="identical", finite=found.finite, differs_at=found.differs_at)


@dataclass
class Found:
    """What the checks found in the weights files: a verdict per tensor, and each weights file's sha256."""

    tensors: dict[str, TensorVerdict] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)


def read_back(out_model, plan, device, progress, only: set[str] | None = None, jobs: int = 1) -> Found:
    """Read the weights files of a folder front to back (``only``: these files), hashing each, checking every tensor
    the plan has: copies byte for byte against BASE, the others element by element, each as its route says;
    ``jobs`` files at once."""
    from ..route import route

    planned = _Planned({e.name: e for e in plan.entries},
                       {p.name: e for e in plan.entries if e.written_quantized for p in e.base.parts},
                       {e.name: route(e, device) for e in plan.entries})
    headers = [h for h in out_model.shards if only is None or h.path.name in only]
    found = Found()
    with kept_open():
        if jobs == 1 or len(headers) == 1:
            for header in headers:
                _read_file(header, out_model, planned, progress, found)
        else:
            with ThreadPoolExecutor(min(jobs, len(headers)), "lora-merge-verify") as pool:
                for future in [pool.submit(_read_file, h, out_model, planned, progress, found) for h in headers]:
                    future.result()
    return found


@dataclass(frozen=True)
class _Planned:
    """The plan's tensors as the read-back looks them up: by name, by the name of a quantized part, and routes."""

    entries: dict
    parts: dict
    routes: dict


def _read_file(header, out_model, planned: _Planned, progress, found: Found) -> None:
    """One weights file front to back: hashed, and each tensor checked (into ``found``)."""
    entries, parts, routes = planned.entries, planned.parts, planned.routes
    buffer = np.empty(2 * READ_BYTES, np.uint8)
    digest = hashlib.sha256()
    fd = open_read(header.path)
    try:
        at = 0
        for info in sorted(header.tensors.values(), key=lambda i: i.start):
            _hash_range(fd, digest, at, info.start, buffer)  # the header (and any gap)
            e = entries.get(info.name)
            if info.name in parts:  # a quantized format's codes or scales: checked all together, once
                _hash_range(fd, digest, info.start, info.start + info.nbytes, buffer)
                e = parts[info.name]
                if info.name == e.base.parts[0].name:
                    verdict = _check_requantized(out_model, routes[e.name])
                    if verdict is not None:
                        found.tensors[e.name] = verdict
            elif e is None or e.shape != info.shape or e.dtype != info.dtype:  # the structure check says so
                _hash_range(fd, digest, info.start, info.start + info.nbytes, buffer)
            elif e.is_copy:
                src = open_read(e.base.path)
                try:
                    found.tensors[e.name] = copy_verdict(compare_copy(
                        fd, info.start, src, e.base.start, info.nbytes, info.dtype, buffer,
                        lambda _, piece: digest.update(piece)))
                finally:
                    os.close(src)
            else:
                found.tensors[e.name] = _check_stored(fd, info, routes[e.name], digest)
            at = info.start + info.nbytes
            progress.update(info.nbytes)
        _hash_range(fd, digest, at, os.fstat(fd).st_size, buffer)
    finally:
        os.close(fd)
    found.digests[header.path.name] = digest.hexdigest()


def _hash_range(fd: int, digest, start: int, stop: int, buffer: np.ndarray) -> None:
    for at in range(start, stop, len(buffer)):
        piece = buffer[:min(len(buffer), stop - at)]
        pread_into(fd, memoryview(piece), at)
        digest.update(piece)


def _check_stored(fd: int, got: TensorInfo, route, digest) -> TensorVerdict:
    """Every element of a merged or converted tensor, as stored, against its exact value."""
    e = route.entry
    check = route.check()
    row = got.row_bytes if got.shape else got.nbytes
    for start, stop in route.check_spans():
        raw = np.empty(row * (stop - start), np.uint8)
        pread_into(fd, memoryview(raw), got.start + row * start)
        digest.update(raw)
        check.block(start, stop, raw if route.numpy_check else _as_tensor(raw, got, stop - start, e))
    return check.result()


def _as_tensor(raw: np.ndarray, got: TensorInfo, rows: int, e):
    """The raw bytes of rows as a torch tensor of the stored dtype, for torch's checks."""
    import torch

    from ..dtypes import torch_dtype

    shape = (rows, *e.shape[1:]) if e.shape else ()
    return torch.from_numpy(raw).view(torch_dtype(got.dtype)).reshape(shape)


def _check_requantized(out_model, route) -> TensorVerdict | None:
    """A tensor stored in BASE's quantized format, its parts read from OUT (None: OUT does not store them as planned;
    the structure check says so)."""
    e = route.entry
    got = [out_model.stored.get(p.name) for p in e.base.parts]
    if any(g is None or (g.dtype, g.shape) != (p.dtype, p.shape) for g, p in zip(got, e.base.parts, strict=True)):
        return None
    check = route.check()
    for start, stop, parts in route.read_back(replace(e.base, parts=tuple(got))):
        check.block(start, stop, parts)
    return check.result()
