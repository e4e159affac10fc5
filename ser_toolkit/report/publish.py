"""Publishing a report atomically: the markdown and every file it links change together or not at all.

A report ``reports/NAME.md`` links its figures and numbers in ``reports/NAME/<generation>/``.
A new report is drawn into ``reports/NAME/.tmp-<generation>/``, renamed to its
generation folder, and only then is the markdown replaced (an atomic rename: the
commit). An interrupted ``sertk report`` therefore leaves the previous report and
its folder intact; the next one removes what the interrupted one left behind.
"""

from __future__ import annotations

import re
import secrets
import shutil
from pathlib import Path
from typing import Callable

from ser_toolkit.errors import SertkError

MARKER = "<!-- sertk report files: {} -->"


def files_of(report: Path) -> Path:
    """The folder of the figures and numbers ``report`` (markdown) links."""
    try:
        text = Path(report).read_text(encoding="utf-8")
    except OSError as exc:
        raise SertkError(f"cannot read report {report}: {exc.strerror}", "write it with sertk report") from None
    found = re.search(MARKER.format(r"(\S+)"), text)
    if not found:
        raise SertkError(f"{report} is not a sertk report (no files marker)", "write it with sertk report")
    return Path(report).parent / found.group(1)


def publish(output: Path, render: Callable[[Path, str], str]) -> Path:
    """Write a report: ``render(folder, prefix)`` draws its files into ``folder`` and returns the markdown,
    whose links start with ``prefix`` (the folder relative to the markdown)."""
    from ser_toolkit.atomic import fsync_path, write_text

    output = Path(output)
    home = output.parent / output.stem
    home.mkdir(parents=True, exist_ok=True)
    generation = "r" + secrets.token_hex(4)
    tmp = home / f".tmp-{generation}"
    prefix = f"{output.stem}/{generation}"
    text = render(tmp, prefix)
    for f in tmp.rglob("*"):
        if f.is_file():
            fsync_path(f)
    tmp.rename(home / generation)
    fsync_path(home)
    write_text(output, MARKER.format(prefix) + "\n" + text)  # the commit
    for old in home.iterdir():  # earlier generations, and what interrupted reports left behind
        if old.name != generation and old.is_dir() and re.fullmatch(r"(\.tmp-)?r[0-9a-f]{8}", old.name):
            shutil.rmtree(old, ignore_errors=True)
    return output
