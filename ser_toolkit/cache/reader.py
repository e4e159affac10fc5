"""Reading a cache: the utterance table, waveforms by index or id, and its summary.

Opening a cache validates it (schema, completeness, table consistency, content
digest); reads are checksummed per chunk. A :class:`CacheReader` is a snapshot
of one version of the file and pickles for DataLoader workers.
"""

from __future__ import annotations

import json
import os
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ser_toolkit.cache import SCHEMA_VERSION
from ser_toolkit.datasets import Utterance
from ser_toolkit.emotions import EMOTIONS
from ser_toolkit.errors import CacheError

COLUMNS = ("id", "path", "emotion", "emotion_index", "speaker", "gender", "corpus", "extra",
           "offset", "length", "fingerprint", "clipped", "audio_digest", "crc32")
INT16_SCALE = 32768.0
MAX_TABLE_SECONDS = 6 * 3600  # no utterance of a valid cache is longer (builds skip far shorter)


def _strings(ds) -> list[str]:
    return [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in ds[()]]


def check_regular(path: Path) -> None:
    """A cache (or feature) file is a regular file: a FIFO or device is never opened (it would block or be
    read as data); one line naming what it is."""
    if path.exists() and not path.is_file():
        from ser_toolkit.audio import _kind

        what = "a folder" if path.is_dir() else _kind(path)
        raise CacheError(f"{path} is not a sertk cache: it is {what}", "pass a cache file written by 'sertk cache'")


def _open_hdf5(path: Path, source: str | Path | None = None):
    import h5py

    check_regular(Path(path))
    try:
        return h5py.File(source or path, "r")
    except OSError:
        raise CacheError(f"{path} is not an HDF5 file (corrupt or foreign)",
                         "pass a sertk cache, or rebuild it with 'sertk cache DATASET --force'") from None


def _header(fh, path: Path) -> dict[str, Any]:
    """Validate an open file as a complete, undamaged sertk cache; return its attrs and table."""
    from ser_toolkit.cache.identity import content_digest, damaged, validate_table

    schema = fh.attrs.get("sertk_schema")
    if schema is None:
        raise CacheError(f"{path} is not a sertk cache", "pass a file written by 'sertk cache'")
    if int(schema) != SCHEMA_VERSION:
        raise CacheError(f"{path} has cache schema {int(schema)}, this sertk reads {SCHEMA_VERSION}",
                         "rebuild it with 'sertk cache DATASET'")
    if not fh.attrs.get("sertk_complete", False) or "utterances" not in fh or "audio" not in fh:
        raise CacheError(f"{path} is incomplete", "rerun 'sertk cache DATASET' to finish it")
    try:
        table = fh["utterances"]
        columns: dict[str, Any] = {}
        for name in COLUMNS:
            ds = table[name]
            columns[name] = _strings(ds) if ds.dtype.kind in ("O", "S") else ds[()]
        config = json.loads(fh.attrs["config"])
        summary = json.loads(fh.attrs.get("summary", "{}"))
        recorded = str(fh.attrs["content_digest"])
        audio = fh["audio"]
        rate = int(config["preprocess"]["sample_rate"])
    except (KeyError, ValueError, TypeError, OSError, UnicodeDecodeError) as exc:
        raise damaged(path, f"unreadable table or attributes: {type(exc).__name__}") from None
    validate_table(path, columns, int(audio.shape[0]), MAX_TABLE_SECONDS * rate)
    digest = content_digest(config["preprocess"], columns)
    if digest != recorded:
        raise damaged(path, "its utterance table does not match its recorded content digest")
    return {"config": config, "summary": summary, "columns": columns, "audio_len": int(audio.shape[0]),
            "audio_dtype": str(audio.dtype), "digest": digest}


def read_header(path: Path) -> dict[str, Any]:
    """Validate ``path`` as a complete, undamaged sertk cache; return its attrs, table and digest."""
    path = Path(path)
    if not path.exists():
        raise CacheError(f"cache {path} does not exist", "build it with 'sertk cache DATASET'")
    with _open_hdf5(path) as fh:
        return _header(fh, path)


_HEADERS: dict[tuple[int, ...], dict[str, Any]] = {}
_HEADERS_KEPT = 512


def _checked_header(fh, path: Path, st: os.stat_result) -> dict[str, Any]:
    """:func:`_header`, validated once per file version in this process (a study opens each test set for
    every run): keyed by device, inode, size and modification time, which any rewrite or rename changes."""
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    header = _HEADERS.get(key)
    if header is None:
        header = _header(fh, path)
        if len(_HEADERS) >= _HEADERS_KEPT:
            _HEADERS.pop(next(iter(_HEADERS)))
        _HEADERS[key] = header
    return {**header, "columns": {k: (list(v) if isinstance(v, list) else v) for k, v in header["columns"].items()}}


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


class CacheReader:
    """Random access to one version of a complete cache file (a snapshot).

    The file is opened once; every later open, in this process or in a forked
    DataLoader worker, reopens that same inode through ``/proc/self/fd`` (a new
    file description, so workers never share a file offset), so a rebuild that
    renames a new file over the path never changes what a running job reads.
    Where that is impossible (another OS, a spawned process) the path is
    reopened and must still hold the same file or the same content digest;
    otherwise the job stops with one line. ``expect_digest`` refuses a cache
    whose content is not the expected one.
    """

    def __init__(self, path: str | Path, expect_digest: str | None = None) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise CacheError(f"cache {self.path} does not exist", "build it with 'sertk cache DATASET'")
        check_regular(self.path)
        self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 - held for the reader's lifetime
        self._fd: int | None = self._file.fileno()
        self._ident = _identity(os.fstat(self._fd))
        self._owner: int | None = os.getpid()
        self._fh = None
        self._pid: int | None = None
        self._audio = None
        self._local = None
        try:
            fh = self._reopen()
            header = _checked_header(fh, self.path, os.fstat(self._fd))
        except BaseException:
            self.close()
            raise
        self.digest: str = header["digest"]
        if expect_digest is not None and expect_digest != self.digest:
            self.close()
            from ser_toolkit.cache.identity import short

            raise CacheError(f"cache {self.path} changed: it holds data {short(self.digest)}, "
                             f"expected {short(expect_digest)}", "use the data the result was computed on, or "
                             "recompute the result (--allow-changed-data accepts the change where offered)")
        self.config: dict[str, Any] = header["config"]
        self.build_summary: dict[str, Any] = header["summary"]
        cols = header["columns"]
        self._cols = cols
        self.ids: list[str] = cols["id"]
        self.offsets = np.asarray(cols["offset"], dtype=np.int64)
        self.lengths = np.asarray(cols["length"], dtype=np.int64)
        self.labels = np.asarray(cols["emotion_index"], dtype=np.int64)
        self._crc = cols["crc32"].tolist()
        self._index = {uid: i for i, uid in enumerate(self.ids)}
        self._int16 = header["audio_dtype"] == "int16"
        self.sample_rate = int(self.config["preprocess"]["sample_rate"])
        self._audio = self._fh["audio"]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_file=None, _fh=None, _pid=None, _audio=None, _owner=None, _local=None)
        return state

    def __len__(self) -> int:
        return len(self.ids)

    def _same_inode(self) -> bool:
        try:
            return self._fd is not None and _identity(os.fstat(self._fd)) == self._ident
        except OSError:
            return False

    def _reopen(self):
        """Open this reader's version of the file in this process."""
        pid = os.getpid()
        if pid == self._owner and self._file is not None:
            source = self._file
        elif self._same_inode() and os.path.exists(f"/proc/self/fd/{self._fd}"):
            self._local = source = open(f"/proc/self/fd/{self._fd}", "rb", buffering=0)  # noqa: SIM115
        else:
            source = None
        fh = _open_hdf5(self.path, source)
        if source is None:
            try:
                ident = _identity(os.fstat(fh.id.get_vfd_handle()))
            except (OSError, ValueError, TypeError):
                ident = None
            if ident != self._ident and getattr(self, "digest", None) is not None and \
                    str(fh.attrs.get("content_digest", "")) != self.digest:
                fh.close()
                raise CacheError(f"cache {self.path} was replaced while this job was reading it",
                                 "rerun the job; it reads one version of a cache from start to end")
        self._fh, self._pid = fh, pid
        return fh

    def _dataset(self):
        if self._pid != os.getpid() or self._fh is None:
            self._audio = self._reopen()["audio"]
        return self._audio

    def close(self) -> None:
        pid = os.getpid()
        if self._fh is not None and self._pid == pid:
            self._fh.close()
        if self._local is not None and self._pid == pid:
            self._local.close()
        if self._file is not None and self._owner == pid:
            self._file.close()
            self._file = None
            self._fd = None
        self._fh = self._audio = self._pid = self._local = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def index(self, uid: str) -> int:
        try:
            return self._index[uid]
        except KeyError:
            raise CacheError(f"utterance {uid!r} is not in {self.path}", "check the id") from None

    def wave(self, key: int | str) -> np.ndarray:
        """The float32 waveform of utterance ``key`` (index or id)."""
        i = self.index(key) if isinstance(key, str) else int(key)
        start = int(self.offsets[i])
        try:
            data = self._dataset()[start:start + int(self.lengths[i])]
        except OSError:  # an HDF5 read failure
            data = None
        if data is None or zlib.crc32(data) != self._crc[i]:
            from ser_toolkit.cache.identity import damaged

            raise damaged(self.path, f"the audio of utterance {self.ids[i]!r} fails its checksum")
        if self._int16:
            return data.astype(np.float32) / INT16_SCALE
        return data

    def crc(self, i: int) -> int:
        """The recorded CRC-32 of utterance ``i``'s stored audio (checked by every :meth:`wave`)."""
        return int(self._crc[i])

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
            "digest": self.digest,
            "config": self.config,
            "skipped": b.get("skipped", []),
            "ignored": b.get("ignored", {}),
            "clipped_utterances": int(np.count_nonzero(np.asarray(self._cols["clipped"]) > 0)),
            "size_bytes": self.path.stat().st_size,
        }
