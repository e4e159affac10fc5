"""Atomic, crash-safe file writes and an inter-process lock.

Everything sertk writes (caches, checkpoints, reports) goes to a temporary name
in the same folder and is renamed over the target only when complete, so a
reader never sees a half-written file, whatever kills the writer.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import sys
from pathlib import Path
from typing import Iterator

TMP_MARK = ".tmp-"


def fsync_path(path: Path) -> None:
    """Flush a file (or folder entry) to disk."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on folders
        pass
    finally:
        os.close(fd)


_HOST = socket.gethostname().split(".")[0].replace("-", "_") or "host"


def tmp_name(path: Path) -> Path:
    """The temporary sibling a writer uses for ``path``: unique across hosts sharing a folder and across
    processes (``<name>.tmp-<host>-<pid>-<random>``), so jobs of a cluster never write the same file."""
    return path.with_name(f"{path.name}{TMP_MARK}{_HOST}-{os.getpid()}-{secrets.token_hex(3)}")


def _writer(tmp: Path) -> tuple[str | None, int | None]:
    """(host, pid) of the writer of a temporary (host None for the older ``.tmp-<pid>`` names)."""
    tail = tmp.name.rsplit(TMP_MARK, 1)[-1]
    if tail.isdigit():
        return None, int(tail)
    parts = tail.split("-")
    if len(parts) == 3 and parts[1].isdigit():
        return parts[0], int(parts[1])
    return None, None


def destination(path: Path) -> tuple[Path, str]:
    """Where a write to ``path`` lands and how: ``("file", target)``-like pair ``(target, kind)``.

    ``kind`` is ``file`` (absent or a regular file: replaced atomically), ``stream`` (a character device or a
    FIFO, e.g. ``/dev/null``: written through, never renamed over); a symbolic link (its target may be anyone's
    file), a folder, a socket or a block device is refused in one line.
    """
    import stat

    from ser_toolkit.errors import SertkError

    if path.is_symlink():
        raise SertkError(f"{path} is a symbolic link (to {os.readlink(path)}): sertk never writes through a link, "
                         "whose target may be a file it did not write", "give the target's own path, or another path")
    target = path
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return target, "file"
    if stat.S_ISREG(mode):
        return target, "file"
    if stat.S_ISCHR(mode) or stat.S_ISFIFO(mode):
        return target, "stream"
    what = "a folder" if stat.S_ISDIR(mode) else "a socket" if stat.S_ISSOCK(mode) else \
        "a block device" if stat.S_ISBLK(mode) else "not a regular file"
    raise SertkError(f"{path} is {what}: sertk writes files", "give the path of a file (new or to replace)")


def _write_through(tmp: Path, target: Path) -> None:
    """Copy a finished temporary into a character device or FIFO; a FIFO nobody reads is refused, not waited on."""
    import shutil

    from ser_toolkit.errors import SertkError

    try:
        fd = os.open(target, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        import errno

        if exc.errno == errno.ENXIO:
            raise SertkError(f"no process reads the FIFO {target}", "start its reader first, or write to a file") \
                from None
        raise
    os.set_blocking(fd, True)
    with open(fd, "wb") as out, open(tmp, "rb") as src:
        shutil.copyfileobj(src, out)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path; on success it is fsynced and renamed to ``path``.

    On any exception the temporary file is removed and ``path`` is untouched. Only a regular file is ever
    renamed over: a symbolic link's target is written (the link stays), a character device or a FIFO is
    written through, anything else is refused (:func:`destination`).
    """
    path = Path(path)
    target, kind = destination(path)
    if kind == "stream":  # the temporary goes where temporaries may go; the device or FIFO gets the bytes
        import tempfile

        fd, name = tempfile.mkstemp(prefix="sertk-")
        os.close(fd)
        tmp = Path(name)
        try:
            yield tmp
            _write_through(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(target)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, target)
        fsync_path(target.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_text(path: str | Path, text: str) -> None:
    """Atomically write a text file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def remove_stale_tmp(folder: Path, stem: str) -> int:
    """Remove temporaries of ``stem`` (a name or a glob pattern) left by dead writers of this host; returns how
    many.

    Another host's temporaries are left alone: whether their writer lives cannot be told from here.
    """
    import shutil

    removed = 0
    for p in folder.glob(f"{stem}{TMP_MARK}*"):
        host, pid = _writer(p)
        if pid is not None and host in (None, _HOST) and pid != os.getpid() and not _alive(pid):
            with contextlib.suppress(OSError):
                if p.is_dir() and not p.is_symlink():  # a folder written whole, then renamed into place
                    shutil.rmtree(p)
                else:
                    p.unlink()
                removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_folder(folder: Path, busy: Exception) -> int:
    """Take an exclusive advisory lock on ``folder`` itself now (no lock file is left anywhere), or raise
    ``busy``. Returns the descriptor: the lock is held until it is closed or the process ends."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise busy from None
    return fd


@contextlib.contextmanager
def exclusive_lock(path: Path, waiting_message: str | None = None) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (blocks; released if the process dies)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting_message:
                print(waiting_message, file=sys.stderr, flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
