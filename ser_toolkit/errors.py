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
