"""OUT is written under a temporary name beside it and renamed into place only when complete and checked.

One run at a time writes a given OUT (a lock file beside it), only when the disk has room for it. The run
that holds the lock owns everything lora-merge keeps beside OUT, so it clears what a killed run left there.
With ``resume``, the temporary folder has a fixed name and survives an interruption, so that the next run
can keep the shards already finished. An output that fails its checks never becomes OUT: it is kept beside
it under a name that says so, and OUT stays as it was.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import stat
from pathlib import Path

from .errors import OutputError
from .memory import megabytes
from .paths import read_text, within

log = logging.getLogger("lora_merge")
LOCK_SUFFIX = ".lora-merge.lock"
TMP_INFIX = ".lora-merge-tmp-"
OLD_INFIX = ".lora-merge-old-"
FAILED_SUFFIX = ".lora-merge-failed"


def check_output(out: Path, overwrite: bool, protected: dict[str, Path]) -> Path:
    """Refuse an OUT that would lose data; return its absolute path."""
    out = Path(os.path.abspath(out.expanduser()))
    for role, path in protected.items():
        if within(out, path):
            raise OutputError(f"OUT {str(out)!r} is {role} or inside it", "choose a new folder for the merged model")
        if within(path, out):
            raise OutputError(f"OUT {str(out)!r} contains {role}", "choose a folder that does not hold the inputs")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise OutputError(f"OUT {str(out)!r} exists and is not a folder", "remove it or choose another path")
        if any(out.iterdir()) and not overwrite:
            partial = partial_folder(out)
            if report_status(out) == "passed" and not partial.exists():  # a run of this command that finished
                raise OutputError(f"OUT {str(out)!r} already holds a finished merge, checked (its report passed)",
                                  f"lora-merge verify {out} --base BASE --adapter ADAPTER checks it again; pass "
                                  "--overwrite to merge anew")
            also = (f", or remove {partial} (the partial output of an interrupted --resume run) if it is not needed"
                    if partial.exists() else "")
            raise OutputError(f"OUT {str(out)!r} already exists and is not empty", f"pass --overwrite to replace it{also}")
    if not out.parent.is_dir():
        raise OutputError(f"the parent folder of OUT, {str(out.parent)!r}, does not exist", "create it first")
    if not os.access(out.parent, os.W_OK):
        raise OutputError(f"cannot write in {str(out.parent)!r}", "choose a folder you can write to")
    return out


def check_space(folder: Path, needed: int) -> None:
    """Refuse to start when the disk holding ``folder`` has less than ``needed`` bytes free."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OutputError(
            f"not enough free disk for OUT: the merge writes {megabytes(needed)} and {megabytes(free)} are free in {str(folder)!r}",
            "free some space, or choose an OUT on a disk with room",
        )


NO_ROOM = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # a full disk, a file size limit, a quota


def no_room(e: OSError, what: str) -> None:
    """A full disk (or a file size limit) while writing ``what``, as one line that says what to do."""
    if e.errno in NO_ROOM:
        raise OutputError(
            f"no room left on the disk while writing {what} ({e.strerror})",
            "free some disk space (or raise the file size limit) and run again; OUT was not changed",
        ) from e


class OutputLock:
    """An exclusive lock on writing OUT, held through a file beside it: a second run is refused.

    The kernel releases the lock when its holder dies, so a crashed run never blocks the next one. The file
    is opened without following a link, and must be a plain file of its own: a link (symbolic or hard) planted
    there is refused, so that the pid written into it never lands in somebody else's file.
    """

    def __init__(self, out: Path):
        self.out = out
        self.path = out.parent / f".{out.name}{LOCK_SUFFIX}"
        self.fd: int | None = None

    def __enter__(self) -> OutputLock:
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_pid(fd)
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise OutputError(
                    f"another lora-merge run{f' (pid {holder})' if holder else ''} is writing OUT {str(self.out)!r}",
                    "wait for it to finish, or choose another OUT",
                ) from None
            # the holder before us may have removed the file between our open and our lock: lock anew
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def _open(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.EMLINK):  # O_NOFOLLOW met a symbolic link
                raise OutputError(f"{self.path} is a symbolic link; lora-merge never writes through one",
                                  "remove the link (it is not lora-merge's) and run again") from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            what = "a hard link to another file" if stat.S_ISREG(st.st_mode) else "not a plain file"
            raise OutputError(f"{self.path} is {what}, where lora-merge keeps its lock for OUT",
                              "remove it (it is not lora-merge's) and run again")
        return fd

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = None


def _read_pid(fd: int) -> str | None:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return None
    return text if text.isdigit() else None


def partial_folder(out: Path) -> Path:
    """Where a ``--resume`` run keeps its finished shards until OUT is complete."""
    return out.parent / f".{out.name}.lora-merge-partial"


def failed_folder(out: Path) -> Path:
    """Where an output that failed its checks is kept for inspection: beside OUT, under a name that says so. An
    earlier failed output of lora-merge's there is replaced; anything else there is left alone."""
    for n in range(1, 1000):
        place = out.parent / (f"{out.name}{FAILED_SUFFIX}" + (f"-{n}" if n > 1 else ""))
        if not (place.exists() or place.is_symlink()):
            return place
        if _is_failed_output(place):
            remove_path(place)
            return place
    raise OutputError(f"too many folders named {out.name}{FAILED_SUFFIX}-N beside OUT", "remove some of them")


def _is_failed_output(folder: Path) -> bool:
    return not folder.is_symlink() and report_status(folder) == "failed"


def report_status(folder: Path) -> str | None:
    """What the parity report in ``folder`` says (passed, failed), or None where there is none to read."""
    from .check.report import REPORT_NAME

    if not folder.is_dir():
        return None
    try:
        return json.loads(read_text(folder / REPORT_NAME)).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def clear_leftovers(out: Path) -> list[str]:
    """What killed runs left beside OUT, cleared by the run that holds the lock (no other run can be writing
    them): a temporary output is removed, and an old OUT moved aside by a commit that never finished is put
    back where OUT was missing, else removed. Returns what was done, a line each."""
    done = []
    prefix = f".{out.name}"
    for path in sorted(out.parent.iterdir()):
        name = path.name
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix):]
        for infix in (TMP_INFIX, OLD_INFIX):
            if rest.startswith(infix) and rest[len(infix):].isdigit():
                break
        else:
            continue
        pid = rest[len(infix):]
        if infix == OLD_INFIX and not (out.exists() or out.is_symlink()):
            os.rename(path, out)
            done.append(f"put back {out}, which a run (pid {pid}) killed while replacing it had moved to {path.name}")
        else:
            what = "temporary output" if infix == TMP_INFIX else "previous OUT"
            remove_path(path)
            done.append(f"removed {path.name}, the {what} of a run (pid {pid}) that did not finish")
    for line in done:
        log.warning(line)
    return done


class StagedOutput:
    """A temporary folder beside OUT; ``commit`` renames it to OUT, ``keep_failed`` beside OUT under a name that
    says it failed, and leaving the context otherwise removes it.

    With ``resume`` the folder is ``partial_folder(OUT)``: what it holds is kept on entry (the caller decides what
    to reuse) and on a failure or interruption.
    """

    def __init__(self, out: Path, resume: bool = False):
        self.out = out
        self.resume = resume
        self.tmp = partial_folder(out) if resume else out.parent / f".{out.name}{TMP_INFIX}{os.getpid()}"
        self._flusher = None
        self._flushes: list = []
        self._done = False

    def flush(self, name: str, then=None) -> None:
        """Flush one finished file to disk on a thread, files in the order given, then call ``then()``: the
        disk works while the next file is made, and the rename at the end waits for little."""
        from concurrent.futures import ThreadPoolExecutor

        if self._flusher is None:
            self._flusher = ThreadPoolExecutor(1, "lora-merge-flush")
        self._flushes.append(self._flusher.submit(_flush_file, self.tmp / name, then))

    def flushed(self, raise_errors: bool = True) -> None:
        """Wait for the flushes started and what each calls after it; the first failure is raised when asked."""
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
        """Flush every file to disk, then rename the temporary folder to OUT; an earlier --resume run's partial
        output for OUT, which this complete one makes obsolete, is removed."""
        self.flushed()
        _fsync_tree(self.tmp)  # the files not flushed yet (cheap for those that were)
        out = self.out
        old = None
        if out.exists() or out.is_symlink():
            old = out.parent / f".{out.name}{OLD_INFIX}{os.getpid()}"
            if old.exists() or old.is_symlink():
                remove_path(old)
            os.rename(out, old)
        try:
            os.rename(self.tmp, out)
        except OSError:
            if old is not None:
                os.rename(old, out)
            raise
        self._done = True
        _fsync_dir(out.parent)
        if old is not None:
            remove_path(old)
        partial = partial_folder(out)
        if not self.resume and partial.is_dir() and not partial.is_symlink():
            shutil.rmtree(partial, ignore_errors=True)
            log.warning("removed %s, the partial output of an interrupted --resume run: OUT is now complete",
                        partial.name)

    def keep_failed(self) -> Path:
        """Rename the (complete) temporary folder to the place of a failed output beside OUT; return it."""
        self.flushed(raise_errors=False)
        place = failed_folder(self.out)
        os.rename(self.tmp, place)
        self._done = True
        return place

    def __exit__(self, exc_type, exc, tb) -> None:
        self.flushed(raise_errors=False)
        if self._done or not self.tmp.exists():
            return
        if self.resume and exc_type is not None:
            return  # kept: the next --resume run continues from it
        shutil.rmtree(self.tmp, ignore_errors=True)


def remove_path(path: Path) -> None:
    """Remove a file, a link (not what it points to) or a whole folder."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _flush_file(path: Path, then=None) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if then is not None:
        then()


def _fsync_tree(folder: Path) -> None:
    """Data before names: the rename must never expose files whose bytes are not on disk yet."""
    for path in folder.iterdir():
        if path.is_file() and not path.is_symlink():
            _flush_file(path)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
