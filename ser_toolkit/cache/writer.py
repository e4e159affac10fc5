"""Writing the cache schema: the utterance table and the attributes (shared by caches and augmented sets)."""

from __future__ import annotations

import json
import time
from typing import Any, Sequence

import numpy as np

from ser_toolkit.cache import SCHEMA_VERSION
from ser_toolkit.cache.reader import COLUMNS
from ser_toolkit.datasets import Utterance
from ser_toolkit.emotions import EMOTION_INDEX


def write_table(fh, rows: Sequence[Utterance], offsets: np.ndarray, lengths: np.ndarray,
                fingerprints: Sequence[str], clipped: Sequence[int]) -> None:
    """Write ``/utterances/<column>`` for ``rows``."""
    import h5py

    t = fh.create_group("utterances")
    s = h5py.string_dtype()
    t.create_dataset("id", data=[u.id for u in rows], dtype=s)
    t.create_dataset("path", data=[u.path or "" for u in rows], dtype=s)
    t.create_dataset("emotion", data=[u.emotion for u in rows], dtype=s)
    t.create_dataset("emotion_index", data=np.array([EMOTION_INDEX[u.emotion] for u in rows], np.int8))
    t.create_dataset("speaker", data=[u.speaker for u in rows], dtype=s)
    t.create_dataset("gender", data=[u.gender or "" for u in rows], dtype=s)
    t.create_dataset("corpus", data=[u.corpus for u in rows], dtype=s)
    t.create_dataset("extra", data=[json.dumps(dict(u.extra), sort_keys=True) for u in rows], dtype=s)
    t.create_dataset("offset", data=np.asarray(offsets, dtype=np.int64))
    t.create_dataset("length", data=np.asarray(lengths, dtype=np.int64))
    t.create_dataset("fingerprint", data=list(fingerprints), dtype=s)
    t.create_dataset("clipped", data=np.asarray(clipped, dtype=np.int64))
    assert set(t) == set(COLUMNS)


def finish(fh, config: dict[str, Any], summary: dict[str, Any]) -> None:
    """Write the config and summary, then the completeness mark (last)."""
    fh.attrs["config"] = json.dumps(config, sort_keys=True)
    fh.attrs["summary"] = json.dumps({**summary, "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    fh.attrs["sertk_schema"] = SCHEMA_VERSION
    fh.attrs["sertk_complete"] = True
