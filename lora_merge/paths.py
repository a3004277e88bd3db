"""Files as lora-merge touches them: it reads only regular files, and never writes through a link.

Inputs come from strangers: a shard may be a named pipe (an ``open`` that never returns), a device, or a
link that loops. Each input file is opened without blocking and checked to be a regular file before a
byte is read. Everything lora-merge creates (the lock, the staged folder's files, the report) is
created anew, never opened through a link a stranger planted where it will be.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from .errors import InputFileError, OutputError

_KINDS = {stat.S_IFIFO: "a named pipe", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder"}
_NO_LINKS = getattr(os, "O_NOFOLLOW", 0)


def kind(mode: int) -> str:
    """What a file that is not a regular file is, in words."""
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def open_read(path: Path | str) -> int:
    """A descriptor to read the regular file ``path`` (links followed); a pipe, a device, a folder or a link
    loop is refused by name, before anything could block."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InputFileError(f"{path}: a symbolic link that loops back on itself",
                                 "replace the link with the file it should point to") from None
        if e.errno == errno.ENXIO:  # a socket, or a FIFO nobody writes to on some systems
            raise InputFileError(f"{path}: not a regular file", "replace it with the real file") from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise InputFileError(f"{path}: {kind(mode)}, not a regular file; lora-merge reads only regular files",
                                 "replace it with the real file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bytes(path: Path | str, limit: int | None = None) -> bytes:
    """The whole of a regular file (at most ``limit`` bytes: a longer file is refused)."""
    fd = open_read(path)
    try:
        size = os.fstat(fd).st_size
        if limit is not None and size > limit:
            raise InputFileError(f"{path}: {size:,} bytes, more than the {limit:,} such a file may have",
                                 "check that it is the right file")
        chunks, done = [], 0
        while True:
            chunk = os.pread(fd, max(size - done, 1 << 16), done)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            done += len(chunk)
    finally:
        os.close(fd)


def read_text(path: Path | str) -> str:
    return read_bytes(path, limit=MAX_TEXT_BYTES).decode("utf-8")


MAX_TEXT_BYTES = 256 * 1024 * 1024  # a config, an index or a tokenizer; a larger "JSON file" is not one


def is_regular(path: Path) -> bool:
    """A regular file (links followed); False for anything else, a link loop included."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def resolved(path: Path) -> Path:
    """``path`` with every link followed, or as an absolute path when a link loops (that shows when it is read)."""
    try:
        return path.resolve()
    except (RuntimeError, OSError):  # "Symlink loop" (RuntimeError before Python 3.13, OSError after)
        return Path(os.path.abspath(path))


def within(a: Path, b: Path) -> bool:
    """True when ``a`` is ``b`` or inside it, links followed on both sides."""
    try:
        resolved(a).relative_to(resolved(b))
        return True
    except ValueError:
        return False


def create(path: Path, mode: int = 0o644) -> int:
    """A descriptor of a new file at ``path``: refused when anything is there already, a link above all (no
    link is ever followed to write through it)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NO_LINKS | os.O_CLOEXEC, mode)
    except FileExistsError:
        what = "a symbolic link" if path.is_symlink() else "a file"
        raise OutputError(f"{path}: {what} is already there, where lora-merge writes a file of its own",
                          "remove it and run again") from None


def write_new(path: Path, data: str | bytes) -> None:
    """Write a new file (see ``create``) in one piece."""
    fd = create(path)
    try:
        view = memoryview(data.encode() if isinstance(data, str) else data)
        while len(view):
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def copy_new(source: Path, target: Path) -> None:
    """Copy the regular file ``source`` into a new file ``target`` (see ``create``), keeping its times."""
    src = open_read(source)
    try:
        dst = create(target)
        try:
            size = os.fstat(src).st_size
            done = 0
            while done < size:
                chunk = os.pread(src, min(size - done, 1 << 24), done)
                if not chunk:
                    break
                view = memoryview(chunk)
                while len(view):
                    view = view[os.write(dst, view):]
                done += len(chunk)
        finally:
            os.close(dst)
        st = os.fstat(src)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    finally:
        os.close(src)
