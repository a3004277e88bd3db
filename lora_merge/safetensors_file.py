"""Reading and writing safetensors files one tensor at a time.

Only the header is parsed up front; tensor bytes are read with ``pread`` at their offsets and written
front to back. Untouched tensors move from file to file with ``copy_file_range`` and are never decoded.
The format: 8-byte little-endian header length, a JSON header, then the data region.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .dtypes import DTYPES
from .errors import HeaderError, InputFileError
from .paths import open_read

# A header past this is not a model header but a damaged or hostile file.
MAX_HEADER_BYTES = 100 * 1024 * 1024
COPY_CHUNK = 64 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and absolute byte range."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def row_bytes(self) -> int:
        """Bytes per index of the first dimension."""
        if not self.shape or self.shape[0] == 0:
            return self.nbytes
        return self.nbytes // self.shape[0]


@dataclass
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorInfo]  # in file order
    metadata: dict[str, str] = field(default_factory=dict)


def read_header(path: Path) -> SafetensorsHeader:
    """Parse and check a safetensors header without touching tensor data."""
    path = Path(path)
    try:
        fd = open_read(path)
    except InputFileError:
        raise
    except OSError as e:
        raise HeaderError(f"{path}: cannot read ({e.strerror or e})",
                          "check that the file exists and is readable, or download the model again") from e
    try:
        size = os.fstat(fd).st_size
        prefix = os.pread(fd, 8, 0)
        if len(prefix) < 8:
            raise HeaderError(f"{path}: too short to be a safetensors file ({size} bytes)")
        (hlen,) = struct.unpack("<Q", prefix)
        if hlen > MAX_HEADER_BYTES:
            raise HeaderError(
                f"{path}: its header is {hlen:,} bytes long, past lora-merge's limit of {MAX_HEADER_BYTES:,} bytes "
                "for a safetensors header (a model's is well under a megabyte); the file is damaged or not safetensors")
        if 8 + hlen > size:
            raise HeaderError(f"{path}: header length {hlen:,} is larger than the file ({size:,} bytes) allows; "
                              "the file is truncated or not safetensors")
        raw = pread_exact(fd, hlen, 8)
    except OSError as e:
        raise HeaderError(f"{path}: cannot read ({e.strerror or e})",
                          "check that the file exists and is readable, or download the model again") from e
    finally:
        os.close(fd)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HeaderError(f"{path}: the header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise HeaderError(f"{path}: the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise HeaderError(f"{path}: __metadata__ is not a JSON object")
    data_start = 8 + hlen
    data_size = size - data_start
    entries = []
    for name, entry in header.items():
        try:
            dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise HeaderError(f"{path}: tensor {name!r} has a malformed header entry") from e
        if dtype not in DTYPES:
            raise HeaderError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        if any(d < 0 for d in shape):
            raise HeaderError(f"{path}: tensor {name!r} has a negative dimension {list(shape)}")
        expected = math.prod(shape) * DTYPES[dtype].size
        if not 0 <= begin <= end or end - begin != expected:
            raise HeaderError(
                f"{path}: tensor {name!r} spans bytes [{begin}, {end}) but {dtype}{list(shape)} needs {expected}"
            )
        if end > data_size:
            raise HeaderError(
                f"{path}: tensor {name!r} ends at byte {end} past the data region ({data_size} bytes); "
                "the file is truncated"
            )
        entries.append((begin, end, name, dtype, shape))
    entries.sort()
    for (b0, e0, n0, *_), (b1, _e1, n1, *_) in zip(entries, entries[1:]):
        if b1 < e0:
            raise HeaderError(f"{path}: tensors {n0!r} and {n1!r} overlap")
    tensors = {
        name: TensorInfo(name, path, dtype, shape, data_start + begin, end - begin)
        for begin, end, name, dtype, shape in entries
    }
    return SafetensorsHeader(path, tensors, {str(k): str(v) for k, v in metadata.items()})


def file_sha256(path: Path, chunk_bytes: int = 4 * 1024 * 1024) -> str:
    """The sha256 of a whole file, read in chunks."""
    h = hashlib.sha256()
    fd = open_read(path)
    try:
        at = 0
        while chunk := os.pread(fd, chunk_bytes, at):
            h.update(chunk)
            at += len(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def pread_exact(fd: int, nbytes: int, offset: int) -> bytearray:
    """Read exactly ``nbytes`` at ``offset`` into a fresh buffer."""
    buf = bytearray(nbytes)
    pread_into(fd, memoryview(buf), offset)
    return buf


def pread_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` (a writable buffer of bytes) from ``offset``."""
    view = view.cast("B")
    nbytes, done = len(view), 0
    while done < nbytes:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise HeaderError(f"unexpected end of file while reading {nbytes} bytes at offset {offset}")
        done += n


def encode_header(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    """Build the header bytes for tensors written in the given order.

    Returns the full prefix (length + JSON padded to 8 bytes) and where each tensor starts in the file.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    starts = {}
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * DTYPES[dtype].size
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        starts[name] = offset
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    prefix = struct.pack("<Q", len(raw)) + raw
    return prefix, {name: len(prefix) + at for name, at in starts.items()}


def write_at(fd: int, data, offset: int) -> None:
    """Write all of ``data`` at ``offset``."""
    view = memoryview(data).cast("B")
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def copy_range(src_fd: int, dst_fd: int, offset: int, count: int, dst_offset: int) -> None:
    """Copy ``count`` bytes of ``src_fd`` from ``offset`` to ``dst_fd`` at ``dst_offset``, without passing them
    through Python where the kernel can."""
    remaining = count
    if hasattr(os, "copy_file_range"):
        try:
            while remaining:
                n = os.copy_file_range(src_fd, dst_fd, min(remaining, COPY_CHUNK), offset, dst_offset)
                if n == 0:
                    break
                offset, dst_offset, remaining = offset + n, dst_offset + n, remaining - n
        except OSError as e:
            # old kernels and some filesystems cannot: fall through to the plain copy; a full disk is an error
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF):
                raise
    while remaining:
        chunk = pread_exact(src_fd, min(remaining, COPY_CHUNK), offset)
        write_at(dst_fd, chunk, dst_offset)
        offset, dst_offset, remaining = offset + len(chunk), dst_offset + len(chunk), remaining - len(chunk)
