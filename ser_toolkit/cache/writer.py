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


AUDIO_CHUNK = 1 << 18  # samples per HDF5 chunk of a growable /audio (sets written utterance by utterance)


def create_audio(fh, dtype: str, size: int | None = None):
    """The ``/audio`` dataset: contiguous when its ``size`` is known (a random read is one slice), else growable.

    Integrity comes from the per-utterance ``crc32`` column, checked on every read.
    """
    if size is not None:
        return fh.create_dataset("audio", shape=(size,), dtype=dtype)
    return fh.create_dataset("audio", shape=(0,), maxshape=(None,), dtype=dtype, chunks=(AUDIO_CHUNK,))


def write_table(fh, rows: Sequence[Utterance], offsets: np.ndarray, lengths: np.ndarray,
                fingerprints: Sequence[str], clipped: Sequence[int], audio_digests: Sequence[str],
                crcs: Sequence[int]) -> None:
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
    t.create_dataset("audio_digest", data=list(audio_digests), dtype=s)
    t.create_dataset("crc32", data=np.asarray(crcs, dtype=np.uint32))
    assert set(t) == set(COLUMNS)


def finish(fh, config: dict[str, Any], summary: dict[str, Any]) -> str:
    """Write the config, summary and content digest, then the completeness mark (last); returns the digest."""
    from ser_toolkit.cache.identity import content_digest

    t = fh["utterances"]
    columns = {name: ([v.decode() if isinstance(v, bytes) else v for v in t[name][()]]
                      if t[name].dtype.kind in ("O", "S") else t[name][()]) for name in t}
    digest = content_digest(config["preprocess"], columns)
    fh.attrs["content_digest"] = digest
    fh.attrs["config"] = json.dumps(config, sort_keys=True)
    fh.attrs["summary"] = json.dumps({**summary, "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    fh.attrs["sertk_schema"] = SCHEMA_VERSION
    fh.attrs["sertk_complete"] = True
    return digest
