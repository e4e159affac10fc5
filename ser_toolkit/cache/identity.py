"""Content identity and integrity of caches: digests, table validation, cache names.

A cache's *content digest* is a SHA-256 over its preprocessing config, its
utterance table (ids, labels, speakers, genders, corpora, extra fields, lengths,
in order) and one BLAKE2b digest per utterance of the stored audio bytes. It
does not depend on file paths, modification times or the corpus root, so a
rebuild that stores the same data has the same digest, and any change to
audio, labels or preprocessing gives another. Everything derived from a cache
(augmented sets, runs, evaluations, reports) records this digest and refuses to
pair with data of another digest. docs/cache.md has the whole identity model.
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ser_toolkit.emotions import EMOTION_INDEX
from ser_toolkit.errors import CacheError, SertkError

HASHED_COLUMNS = ("id", "emotion", "speaker", "gender", "corpus", "extra", "length", "audio_digest", "crc32")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def audio_digest(stored: np.ndarray) -> str:
    """Digest of one utterance's stored samples (as written: float32 or int16), for identity."""
    return hashlib.blake2b(np.ascontiguousarray(stored).tobytes(), digest_size=16).hexdigest()


def audio_crc(stored: np.ndarray) -> int:
    """CRC-32 of one utterance's stored samples: the integrity check made on every read (fast)."""
    return zlib.crc32(np.ascontiguousarray(stored))


def audio_checks(stored: np.ndarray) -> tuple[str, int]:
    """(identity digest, integrity CRC) of one utterance's stored samples."""
    return audio_digest(stored), audio_crc(stored)


def content_digest(preprocess: Mapping[str, Any], columns: Mapping[str, Any]) -> str:
    """The cache's content digest from its preprocessing config and table columns."""
    h = hashlib.sha256()
    h.update(json.dumps({"preprocess": dict(preprocess)}, sort_keys=True).encode())
    for name in HASHED_COLUMNS:
        values = columns[name]
        values = values.tolist() if isinstance(values, np.ndarray) else list(values)
        h.update(b"\x1e" + name.encode() + b"\x1f" + json.dumps(values).encode())
    return h.hexdigest()


def assignment_digest(assignment: Mapping[str, str]) -> str:
    """Digest of a split assignment (utterance id -> part)."""
    return hashlib.sha256(json.dumps(sorted(assignment.items())).encode()).hexdigest()


def short(digest: str | None) -> str:
    """The first 12 hex digits, for messages and folder names."""
    return (digest or "none")[:12]


def damaged(path: Path, what: str) -> CacheError:
    """The one-line error for a cache (or materialised set) whose contents fail a check."""
    if ".aug" in Path(path).parent.parent.name or ".aug" in Path(path).parent.name:
        return CacheError(f"augmented set {path} is damaged ({what})",
                          "run 'sertk materialize' (or the study) again: it rewrites a damaged set")
    return CacheError(f"cache {path} is damaged ({what})",
                      f"rebuild it with 'sertk cache DATASET --force' ('sertk cache --verify {path}' lists what "
                      "is damaged)")


def validate_table(path: Path, columns: Mapping[str, Any], audio_len: int, max_samples: int) -> None:
    """Check the utterance table against itself and the audio array; raise a CacheError if damaged."""
    n = len(columns["id"])
    if any(len(columns[c]) != n for c in columns):
        raise damaged(path, "table columns of different lengths")
    offsets = np.asarray(columns["offset"], dtype=np.int64)
    lengths = np.asarray(columns["length"], dtype=np.int64)
    if n and (lengths.min() <= 0 or lengths.max() > max_samples):
        i = int(np.argmax((lengths <= 0) | (lengths > max_samples)))
        raise damaged(path, f"utterance {columns['id'][i]!r} has length {int(lengths[i])}, "
                            f"outside 1..{max_samples} samples")
    expected = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if n else offsets
    if not np.array_equal(offsets, expected):
        i = int(np.argmax(offsets != expected))
        raise damaged(path, f"utterance {columns['id'][i]!r} has offset {int(offsets[i])}, expected "
                            f"{int(expected[i])}")
    if int(lengths.sum()) != audio_len:
        raise damaged(path, f"the table covers {int(lengths.sum())} samples, the audio array has {audio_len}")
    labels = np.asarray(columns["emotion_index"], dtype=np.int64)
    for i, (emotion, label) in enumerate(zip(columns["emotion"], labels.tolist())):
        if EMOTION_INDEX.get(emotion) != label:
            raise damaged(path, f"utterance {columns['id'][i]!r} has label {label} for emotion {emotion!r}")
    if len(set(columns["id"])) != n:
        raise damaged(path, "duplicate utterance ids")


def cache_name(config: Mapping[str, Any]) -> str:
    """The name a cache was built under (``sertk cache --name``, else its dataset's cache name), from its header
    ``config``: never from its file name, so a renamed or copied cache keeps its name. Caches written before the
    name was recorded: the dataset's cache name for the recorded options (its plugin name if not installed)."""
    if config.get("name"):
        return str(config["name"])
    dataset = config.get("dataset") or {}
    try:
        from ser_toolkit.registry import get

        return get("dataset", dataset["name"]).obj(**(dataset.get("options") or {})).cache_name()
    except Exception:  # noqa: BLE001 - a plugin not installed here, or options it no longer takes
        return str(dataset.get("name", "unnamed"))


def check_name(name: str) -> str:
    """A cache name is a file stem: letters, digits, '.', '_', '-', not starting with '.' or '-'."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name.endswith(".h5"):
        raise SertkError(f"cache name {name!r} is not a plain name",
                         "use letters, digits, '.', '_' and '-' only, no path separators, not starting with '.'")
    return name
