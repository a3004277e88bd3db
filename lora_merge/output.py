"""OUT is written under a temporary name beside it and renamed into place only when complete.

One run at a time writes a given OUT (a lock file beside it), only when the disk has room for it.
With ``resume``, the temporary folder has a fixed name and survives an interruption, so that the
next run can keep the shards already finished.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from pathlib import Path

from .errors import OutputError


def _within(a: Path, b: Path) -> bool:
    """True when ``a`` is ``b`` or inside it."""
    try:
        a.relative_to(b)
        return True
    except ValueError:
        return False


def check_output(out: Path, overwrite: bool, protected: dict[str, Path]) -> Path:
    """Refuse an OUT that would lose data; return its absolute path."""
    out = Path(os.path.abspath(out.expanduser()))
    real = out.resolve()
    for role, path in protected.items():
        path = path.resolve()
        if _within(real, path):
            raise OutputError(f"OUT {str(out)!r} is {role} or inside it", "choose a new folder for the merged model")
        if _within(path, real):
            raise OutputError(f"OUT {str(out)!r} contains {role}", "choose a folder that does not hold the inputs")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise OutputError(f"OUT {str(out)!r} exists and is not a folder", "remove it or choose another path")
        if any(out.iterdir()) and not overwrite:
            raise OutputError(f"OUT {str(out)!r} already exists and is not empty", "pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise OutputError(f"the parent folder of OUT, {str(out.parent)!r}, does not exist", "create it first")
    if not os.access(out.parent, os.W_OK):
        raise OutputError(f"cannot write in {str(out.parent)!r}", "choose a folder you can write to")
    return out


def _size(n: int) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB"


def check_space(folder: Path, needed: int) -> None:
    """Refuse to start when the disk holding ``folder`` has less than ``needed`` bytes free."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OutputError(
            f"not enough free disk for OUT: the merge writes {_size(needed)} and {_size(free)} are free in {str(folder)!r}",
            "free some space, or choose an OUT on a disk with room",
        )


class OutputLock:
    """An exclusive lock on writing OUT, held through a file beside it: a second run is refused.

    The kernel releases the lock when its holder dies, so a crashed run never blocks the next one.
    """

    def __init__(self, out: Path):
        self.out = out
        self.path = out.parent / f".{out.name}.lora-merge.lock"
        self.fd: int | None = None

    def __enter__(self) -> OutputLock:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                holder = _read_pid(self.path)
                raise OutputError(
                    f"another lora-merge run{f' (pid {holder})' if holder else ''} is writing OUT {str(self.out)!r}",
                    "wait for it to finish, or choose another OUT",
                ) from None
            # the holder before us may have removed the file between our open and our lock: lock anew
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = None


def _read_pid(path: Path) -> str | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return text if text.isdigit() else None


def partial_folder(out: Path) -> Path:
    """Where a ``--resume`` run keeps its finished shards until OUT is complete."""
    return out.parent / f".{out.name}.lora-merge-partial"


class StagedOutput:
    """A temporary folder beside OUT; ``commit`` renames it to OUT, leaving the context removes it otherwise.

    With ``resume`` the folder is ``partial_folder(OUT)``: what it holds is kept on entry (the caller
    decides what to reuse) and on a failure or interruption (``kept`` is then True).
    """

    def __init__(self, out: Path, resume: bool = False):
        self.out = out
        self.resume = resume
        self.tmp = partial_folder(out) if resume else out.parent / f".{out.name}.lora-merge-tmp-{os.getpid()}"
        self.kept = False
        self._flusher = None
        self._flushes: list = []

    def flush(self, name: str, then=None) -> None:
        """Flush one finished file to disk on a thread, files in the order given, then call ``then()``: the
        disk works while the next file is made, and the rename at the end waits for little."""
        from concurrent.futures import ThreadPoolExecutor

        if self._flusher is None:
            self._flusher = ThreadPoolExecutor(1, "lora-merge-flush")
        self._flushes.append(self._flusher.submit(_flush_file, self.tmp / name, then))

    def _flushed(self, raise_errors: bool) -> None:
        """Wait for the flushes started; the first failure is raised when asked."""
        pending, self._flushes = self._flushes, []
        for f in pending:
            f.result() if raise_errors else f.exception()
        if self._flusher is not None:
            self._flusher.shutdown()
            self._flusher = None

    def __enter__(self) -> StagedOutput:
        if self.resume and self.tmp.is_dir() and not self.tmp.is_symlink():
            return self
        if self.tmp.exists() or self.tmp.is_symlink():
            remove_path(self.tmp)
        self.tmp.mkdir()
        return self

    def commit(self) -> None:
        """Flush every file to disk, then rename the temporary folder to OUT."""
        self._flushed(raise_errors=True)
        _fsync_tree(self.tmp)  # the files not flushed yet (cheap for those that were)
        out = self.out
        old = None
        if out.exists() or out.is_symlink():
            old = out.parent / f".{out.name}.lora-merge-old-{os.getpid()}"
            os.rename(out, old)
        try:
            os.rename(self.tmp, out)
        except OSError:
            if old is not None:
                os.rename(old, out)
            raise
        _fsync_dir(out.parent)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()

    def __exit__(self, exc_type, exc, tb) -> None:
        self._flushed(raise_errors=False)
        if not self.tmp.exists():
            return
        if self.resume and exc_type is not None:
            self.kept = True
            return
        shutil.rmtree(self.tmp, ignore_errors=True)


def remove_path(path: Path) -> None:
    """Remove a file, a link or a whole folder."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _flush_file(path: Path, then=None) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if then is not None:
        then()


def _fsync_tree(folder: Path) -> None:
    """Data before names: the rename must never expose files whose bytes are not on disk yet."""
    for path in folder.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
