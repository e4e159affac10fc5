"""Reading a cache: the utterance table, waveforms by index or id, and its summary.

A :class:`CacheReader` opens the HDF5 file lazily, once per process, so it can be
handed to many DataLoader workers (it pickles without the open handle).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ser_toolkit.cache import SCHEMA_VERSION
from ser_toolkit.datasets import Utterance
from ser_toolkit.emotions import EMOTIONS
from ser_toolkit.errors import CacheError

COLUMNS = ("id", "path", "emotion", "emotion_index", "speaker", "gender", "corpus", "extra",
           "offset", "length", "fingerprint", "clipped")
INT16_SCALE = 32768.0


def _strings(ds) -> list[str]:
    return [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in ds[()]]


def read_header(path: Path) -> dict[str, Any]:
    """Validate ``path`` as a complete sertk cache; return its attrs and table columns."""
    import h5py

    if not path.exists():
        raise CacheError(f"cache {path} does not exist", "build it with 'sertk cache DATASET'")
    try:
        fh = h5py.File(path, "r")
    except OSError:
        raise CacheError(f"{path} is not an HDF5 file (corrupt or foreign)",
                         "rebuild it with 'sertk cache DATASET' or pass a sertk cache") from None
    with fh:
        schema = fh.attrs.get("sertk_schema")
        if schema is None:
            raise CacheError(f"{path} is not a sertk cache", "pass a file written by 'sertk cache'")
        if int(schema) != SCHEMA_VERSION:
            raise CacheError(f"{path} has cache schema {int(schema)}, this sertk reads {SCHEMA_VERSION}",
                             "rebuild it with 'sertk cache DATASET'")
        if not fh.attrs.get("sertk_complete", False) or "utterances" not in fh or "audio" not in fh:
            raise CacheError(f"{path} is incomplete", "rerun 'sertk cache DATASET' to finish it")
        table = fh["utterances"]
        columns: dict[str, Any] = {}
        for name in COLUMNS:
            ds = table[name]
            columns[name] = _strings(ds) if ds.dtype.kind in ("O", "S") else ds[()]
        return {
            "config": json.loads(fh.attrs["config"]),
            "summary": json.loads(fh.attrs.get("summary", "{}")),
            "columns": columns,
            "audio_len": int(fh["audio"].shape[0]),
            "audio_dtype": str(fh["audio"].dtype),
        }


class CacheReader:
    """Random access to a complete cache file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        header = read_header(self.path)
        self.config: dict[str, Any] = header["config"]
        self.build_summary: dict[str, Any] = header["summary"]
        cols = header["columns"]
        self._cols = cols
        self.ids: list[str] = cols["id"]
        self.offsets = np.asarray(cols["offset"], dtype=np.int64)
        self.lengths = np.asarray(cols["length"], dtype=np.int64)
        self.labels = np.asarray(cols["emotion_index"], dtype=np.int64)
        self._index = {uid: i for i, uid in enumerate(self.ids)}
        self._int16 = header["audio_dtype"] == "int16"
        self.sample_rate = int(self.config["preprocess"]["sample_rate"])
        self._fh = None
        self._pid: int | None = None
        self._audio = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_fh=None, _pid=None, _audio=None)
        return state

    def __len__(self) -> int:
        return len(self.ids)

    def _dataset(self):
        if self._pid != os.getpid() or self._fh is None:
            import h5py

            self._fh = h5py.File(self.path, "r")
            self._audio = self._fh["audio"]
            self._pid = os.getpid()
        return self._audio

    def close(self) -> None:
        if self._fh is not None and self._pid == os.getpid():
            self._fh.close()
        self._fh = self._audio = self._pid = None

    def index(self, uid: str) -> int:
        try:
            return self._index[uid]
        except KeyError:
            raise CacheError(f"utterance {uid!r} is not in {self.path}", "check the id") from None

    def wave(self, key: int | str) -> np.ndarray:
        """The float32 waveform of utterance ``key`` (index or id)."""
        i = self.index(key) if isinstance(key, str) else int(key)
        start = int(self.offsets[i])
        data = self._dataset()[start:start + int(self.lengths[i])]
        if self._int16:
            return data.astype(np.float32) / INT16_SCALE
        return data

    def utterance(self, i: int) -> Utterance:
        c = self._cols
        return Utterance(id=c["id"][i], path=c["path"][i] or None, emotion=c["emotion"][i],
                         speaker=c["speaker"][i], corpus=c["corpus"][i], gender=c["gender"][i] or None,
                         extra=json.loads(c["extra"][i]))

    @property
    def utterances(self) -> list[Utterance]:
        return [self.utterance(i) for i in range(len(self))]

    def column(self, name: str) -> list[Any]:
        return list(self._cols[name])

    def summary(self) -> dict[str, Any]:
        """What ``sertk inspect`` prints (JSON-ready)."""
        emotions = Counter(self._cols["emotion"])
        seconds = float(self.lengths.sum()) / self.sample_rate
        b = self.build_summary
        return {
            "path": str(self.path),
            "dataset": self.config["dataset"]["name"],
            "utterances": len(self),
            "emotions": {e: emotions.get(e, 0) for e in EMOTIONS},
            "speakers": dict(sorted(Counter(self._cols["speaker"]).items())),
            "genders": dict(sorted(Counter(g or "unknown" for g in self._cols["gender"]).items())),
            "sample_rate": self.sample_rate,
            "hours": seconds / 3600,
            "seconds": seconds,
            "schema_version": SCHEMA_VERSION,
            "config": self.config,
            "skipped": b.get("skipped", []),
            "ignored": b.get("ignored", {}),
            "clipped_utterances": int(np.count_nonzero(np.asarray(self._cols["clipped"]) > 0)),
            "size_bytes": self.path.stat().st_size,
        }
