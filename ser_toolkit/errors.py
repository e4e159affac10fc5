"""Errors a user can cause and fix; the CLI prints them as one line and exits 2."""

from __future__ import annotations


class SertkError(Exception):
    """A problem the user caused (bad path, option, file, plugin name...).

    ``str(err)`` is the one line shown to the user: it names the problem and,
    through ``hint``, the fix.
    """

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message}; {hint}" if hint else message)


WRITE_ELSEWHERE = "write elsewhere (--cache-dir, --out)"
"""How to write elsewhere when a disk is full, unless the printing command says its own (``cli.main``)."""


class DiskFull(SertkError):
    """Not enough disk space. ``template``, the hint, holds ``{elsewhere}``: how the printing command can write
    elsewhere (:meth:`elsewhere`; :data:`WRITE_ELSEWHERE` until a command says)."""

    def __init__(self, message: str, template: str) -> None:
        super().__init__(message, template.format(elsewhere=WRITE_ELSEWHERE))
        self.template = template

    def elsewhere(self, how: str) -> SertkError:
        """This error with ``how`` (a command's own options) as the way to write elsewhere."""
        return SertkError(self.message, self.template.format(elsewhere=how))

    def __reduce__(self):  # the template survives process boundaries (decoding workers)
        return type(self), (self.message, self.template)


class PluginError(SertkError):
    """Unknown, duplicate or broken plugin."""


class ParameterError(SertkError):
    """A plugin or option parameter outside what is allowed."""


class AudioError(SertkError):
    """An audio file that cannot be used (unreadable, empty, truncated, not audio)."""


class CacheError(SertkError):
    """A cache file that is missing, incomplete, foreign or of another schema."""


class SplitError(SertkError):
    """A split specification or split file that cannot be applied."""


class OutOfMemory(SertkError):
    """The device ran out of memory on a batch; ``batch`` says which (utterances, padded seconds)."""

    def __init__(self, message: str, hint: str | None = None, batch: dict | None = None) -> None:
        super().__init__(message, hint)
        self.batch = batch or {}

    def __reduce__(self):  # one line across process boundaries (study workers, Slurm jobs)
        return type(self), (self.message, self.hint, self.batch)


def os_error_line(exc: OSError, elsewhere: str = WRITE_ELSEWHERE) -> str:
    """One line for an ``OSError`` a user can act on; a full disk is named as such (``elsewhere``: how the
    printing command can write elsewhere).

    h5py reports a failed write as a multi-line message with ``errno = 28`` inside
    rather than as ``ENOSPC``; both forms are recognised.
    """
    import errno
    import re
    from pathlib import Path

    text = " ".join(str(exc.strerror or exc).split())
    filename = getattr(exc, "filename", None)
    named = re.search(r"filename = '([^']+)'", str(exc))
    if filename is None and named:
        filename = str(Path(named.group(1)).parent)
    if exc.errno == errno.ENOSPC or "errno = 28" in text or "No space left on device" in text:
        where = f" under {filename}" if filename else ""
        return (f"the disk is full{where} (No space left on device); free space or {elsewhere}, then rerun: "
                "finished parts are kept and half-written files removed")
    where = f" {filename}" if filename else ""
    return f"cannot access{where}: {text}; check the path and its permissions"
