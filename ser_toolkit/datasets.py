"""The dataset plugin contract: utterances, scans and the :class:`Dataset` base class."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

from ser_toolkit.emotions import EMOTIONS
from ser_toolkit.errors import SertkError
from ser_toolkit.params import Param, validate

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")


@dataclass(frozen=True)
class Utterance:
    """One labelled recording.

    ``path`` is relative to the scanned root (``None`` for synthesised audio);
    ``emotion`` is a canonical emotion name; ``gender`` is ``"female"``,
    ``"male"`` or ``None``; ``extra`` holds corpus-specific fields (JSON values).
    """

    id: str
    path: str | None
    emotion: str
    speaker: str
    corpus: str
    gender: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Scan:
    """What a dataset found: utterances (sorted by id) and counts of ignored files by reason."""

    utterances: list[Utterance]
    ignored: Counter = field(default_factory=Counter)


class Dataset:
    """Base class for dataset plugins (see ``register_datasets`` in the hookspecs)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    needs_root: ClassVar[bool] = True
    root_may_be_file: ClassVar[bool] = False
    params: ClassVar[tuple[Param, ...]] = ()
    label_map: ClassVar[Mapping[str, str | None]] = {}
    mono: ClassVar[str] = "mean"
    """The corpus' down-mix rule for the cache (e.g. ``first`` for a close-talk + far microphone pair)."""

    def __init__(self, **options: Any) -> None:
        self.options = validate(self.params, options, f"dataset '{self.name}'")
        bad = {v for v in self.label_map.values() if v is not None and v not in EMOTIONS}
        if bad:
            raise SertkError(f"dataset '{self.name}' maps labels to unknown emotions {sorted(bad)}",
                             f"use canonical emotions: {', '.join(EMOTIONS)}")

    def scan(self, root: Path | None) -> Scan:
        """Find the corpus's utterances under ``root``."""
        raise NotImplementedError

    def load(self, utterance: Utterance, root: Path | None):
        """Return ``(samples, sample_rate)``; samples are float32 ``(frames, channels)``."""
        from ser_toolkit.audio import decode

        return decode(self.source_path(utterance, root))

    def source_path(self, utterance: Utterance, root: Path | None) -> Path:
        assert utterance.path is not None and root is not None
        return root / utterance.path

    def fingerprint(self, utterance: Utterance, root: Path | None) -> str:
        """A string that changes when the utterance's audio changes (size and mtime by default)."""
        st = os.stat(self.source_path(utterance, root))
        return f"{st.st_size}:{st.st_mtime_ns}"

    def cache_name(self) -> str:
        """File stem of this dataset's cache (``<cache-dir>/<cache_name>.h5``)."""
        return self.name


def check_root(dataset: str, root: Path | None, allow_file: bool = False) -> Path:
    """Validate a corpus root folder (or file, where allowed) and return it resolved."""
    if root is None:
        raise SertkError(f"dataset '{dataset}' needs a corpus folder",
                         f"pass --root PATH (e.g. sertk cache {dataset} --root ../shared/data/{dataset})")
    root = Path(root).expanduser()
    if not root.exists():
        raise SertkError(f"corpus folder {root} does not exist", "check the --root path")
    if not root.is_dir() and not (allow_file and root.is_file()):
        raise SertkError(f"corpus root {root} is not a folder", "pass the corpus's top folder as --root")
    return root.resolve()


def note_duplicates(ignored: Counter, duplicates: list[tuple[str, str]]) -> None:
    """Count ``(ignored path, kept path)`` pairs of files with one utterance id under a reason naming the first."""
    if duplicates:
        (lost, kept), more = duplicates[0], len(duplicates) - 1
        ignored[f"duplicate utterance id: {lost} (kept {kept}, the first in sorted order)"
                + (f" and {more} more" if more else "")] += len(duplicates)


def audio_files(root: Path, extensions: tuple[str, ...] = AUDIO_EXTENSIONS) -> list[Path]:
    """Audio files below ``root`` (any nesting, symbolic links to folders followed once), sorted, hidden files
    and folders skipped."""
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:  # a link back to a folder already walked (a loop, or twice linked)
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            if not fn.startswith(".") and fn.lower().endswith(extensions):
                found.append(Path(dirpath) / fn)
    return found
