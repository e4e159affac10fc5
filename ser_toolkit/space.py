"""Disk space for large HDF5 writes: checked and reserved before the first byte.

HDF5 cannot recover from a full disk: a failed write leaves a file that cannot
be closed, and the process may crash on exit. So a cache, materialised set or
feature file is only started when its estimated size is free, and (on Linux)
that space is reserved with ``fallocate(FALLOC_FL_KEEP_SIZE)`` so that another
process cannot take it meanwhile. What was reserved but not used is handed back
once the file is closed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator

from ser_toolkit.errors import DiskFull

MARGIN = 8 << 20  # HDF5 metadata, the utterance table and rounding
FALLOC_FL_KEEP_SIZE = 1


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _full(what: str, folder: Path, need: int, free: int | None,
          hint: str = "free space or {elsewhere}, then rerun; nothing was written") -> DiskFull:
    have = f", {_gb(free)} free" if free is not None else ""
    return DiskFull(f"not enough disk space for {what}: it needs about {_gb(need)} under {folder}{have}", hint)


def require_space(folder: Path, nbytes: int, what: str, hint: str | None = None) -> None:
    """Raise a one-line :class:`DiskFull` when ``folder``'s disk has less than ``nbytes`` (+ margin) free
    (``hint``: the fix, when the default's "nothing was written" would not be true; ``{elsewhere}`` in it
    becomes the printing command's way to write elsewhere)."""
    need = int(nbytes) + MARGIN
    free = shutil.disk_usage(folder).free
    if free < need:
        raise _full(what, folder, need, free, *([hint] if hint else []))


def _fallocate(path: Path, nbytes: int) -> bool:
    """Reserve ``nbytes`` for ``path`` without changing its size; False where the system cannot."""
    if not sys.platform.startswith("linux") or nbytes <= 0:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fallocate = libc.fallocate
    except (OSError, AttributeError):
        return False
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    fd = os.open(path, os.O_RDWR)
    try:
        if fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, int(nbytes)) == 0:
            return True
        code = ctypes.get_errno()
    finally:
        os.close(fd)
    if code in (errno.ENOSPC, errno.EDQUOT):
        raise OSError(code, os.strerror(code))
    return False  # EOPNOTSUPP and the like: the preflight check is all there is


def _release(path: Path) -> None:
    """Hand back reserved blocks beyond the end of the file (truncating to its own size frees them)."""
    with contextlib.suppress(OSError):
        os.truncate(path, os.path.getsize(path))


@contextlib.contextmanager
def new_h5(tmp: Path, nbytes: int, what: str) -> Iterator[Any]:
    """Create the HDF5 file ``tmp`` for writing about ``nbytes``, with that space checked and reserved.

    Raises a one-line :class:`SertkError` (before anything is written) when the disk is too full.
    """
    import h5py

    tmp = Path(tmp)
    require_space(tmp.parent, nbytes, what)
    fh = h5py.File(tmp, "w")
    try:
        try:
            reserved = _fallocate(tmp, int(nbytes) + MARGIN)
        except OSError:
            raise _full(what, tmp.parent, int(nbytes) + MARGIN, shutil.disk_usage(tmp.parent).free) from None
        yield fh
    finally:
        fh.close()
    if reserved:
        _release(tmp)
