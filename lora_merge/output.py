"""OUT is written under a temporary name beside it and renamed into place only when complete."""

from __future__ import annotations

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


class StagedOutput:
    """A temporary folder beside OUT; ``commit`` renames it to OUT, leaving the context removes it otherwise."""

    def __init__(self, out: Path):
        self.out = out
        self.tmp = out.parent / f".{out.name}.lora-merge-tmp-{os.getpid()}"
        self._flushing = None

    def flush_soon(self) -> None:
        """Start flushing what is written so far on a thread, so the disk works while checks run."""
        import threading

        self._flushing = threading.Thread(target=_fsync_tree, args=(self.tmp,), daemon=True)
        self._flushing.start()

    def __enter__(self) -> StagedOutput:
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        return self

    def commit(self) -> None:
        """Flush every file to disk, then rename the temporary folder to OUT."""
        if self._flushing is not None:
            self._flushing.join()
        _fsync_tree(self.tmp)  # what was written since (cheap for files already flushed)
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

    def __exit__(self, *exc) -> None:
        if self._flushing is not None:
            self._flushing.join()
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)


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
