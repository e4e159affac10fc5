"""The feature cache: a featurizer's output for every utterance of an input cache, computed once.

Layout: beside an input cache ``X.h5`` (a corpus cache or a materialised
augmented set), one HDF5 file per featurizer identity (name, options, version)::

    X.features/<featurizer>-<key>.h5       key = Featurizer.key(), 12 hex digits
        /features       (N, *shape) float32, in the input cache's row order
        /ids            utterance ids, /audio_digest  the audio digest of each row
        attrs           sertk_features (schema), source_digest (the input cache's content digest),
                        source_path, sample_rate, featurizer (JSON identity), feature_names (JSON or
                        null), shape (JSON), sertk_version, digest, created, build (JSON: what the
                        build computed, reused, resumed, in how many seconds), complete (written last)
    X.features/<featurizer>-<key>.h5.lock  serialises builds of that file (flock; freed if the holder dies)
    X.features/<featurizer>-<key>.parts/<source digest 12>/part-*.npz    only while a build runs

``digest`` is a SHA-256 over the identity, the source digest, the shape and
the feature bytes: a derived result (a trained feature model, an evaluation)
records it. It is checked whenever the features are loaded.

Incremental: rows are keyed by the utterance's ``audio_digest`` (the digest of
its stored samples) and the sample rate. When the input cache is rebuilt and
some utterances changed, were added or removed, the previous feature file of
the same identity gives its rows to every unchanged audio digest and only the
rest is computed; the stale file is then replaced. Utterances with identical
audio are computed once. Rows are also taken, by audio digest, from the
complete feature files of the same featurizer identity next to the input
cache's siblings (the other sets of its folder) and its source cache: a
materialised mixture whose copies equal single-method copies
(:mod:`ser_toolkit.augment_sets`), or a duplicate of clean audio, computes
nothing new. Each donor's features are digest-checked before use.

Parallel: a featurizer with ``parallel = True`` runs in ``workers`` processes;
each worker receives the featurizer and the :class:`CacheReader` once (at fork,
or pickled under spawn/forkserver) and then only row indices, reads the audio
itself from the input cache (the same version of the file, see the reader) and
writes its features straight into a part file: nothing but a count travels
back. ``parallel = False`` (e.g. a model on a GPU) runs :meth:`extract_many` in
this process over the same chunks.

Crash safety, as for the input cache (:mod:`ser_toolkit.cache.build`):

1. Every chunk of utterances (``SERTK_FEATURE_CHUNK``, default 32) is written
   to a part file under a temporary name and renamed when complete.
2. When every row has features, the final file is written to a temporary name
   from the previous file and the parts, fsynced and renamed over the target;
   only then are the parts removed.

``kill -9`` at any moment leaves the previous file (complete, and marked with
the source digest it belongs to) or none, complete part files and dead
temporaries; the next call removes the temporaries and resumes from the parts.
Workers die with their parent (Linux). An exclusive lock serialises concurrent
builds of one feature file: the second waits, then finds the file up to date.

A file that fails validation (foreign, truncated, damaged, features not
matching their digest) is an error for :class:`FeatureReader` (one line: delete
it; it is rebuilt); :func:`load_features` says so through ``log`` and rebuilds it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import time
import zipfile
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ser_toolkit import __version__
from ser_toolkit.atomic import atomic_path, exclusive_lock, remove_stale_tmp
from ser_toolkit.errors import CacheError, SertkError
from ser_toolkit.space import new_h5
from ser_toolkit.workers import default_workers, start_worker, state

FEATURE_SCHEMA = 1
CHUNK = 32  # utterances per worker task and part file
PROGRESS_EVERY = 5.0  # seconds between progress lines when not on a terminal
Log = Callable[[str], None]


def chunk_size() -> int:
    """Utterances per task and part file (``SERTK_FEATURE_CHUNK`` overrides it)."""
    return max(1, int(os.environ.get("SERTK_FEATURE_CHUNK", CHUNK)))


def feature_dir(cache_path: str | Path) -> Path:
    """``X.features`` beside the input cache ``X.h5``."""
    p = Path(cache_path)
    stem = p.name[:-3] if p.name.endswith(".h5") else p.name
    return p.with_name(stem + ".features")


def _file_name(featurizer: Any) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", str(featurizer.name)).lstrip(".") or "featurizer"
    return f"{name}-{featurizer.key()}"


def feature_path(reader: Any, featurizer: Any) -> Path:
    """Where the features of ``featurizer`` for the input cache of ``reader`` live."""
    return feature_dir(reader.path) / f"{_file_name(featurizer)}.h5"


def _identity_json(featurizer: Any) -> str:
    return json.dumps(featurizer.identity(), sort_keys=True, default=str)


def features_digest(features: np.ndarray, identity_json: str, source_digest: str) -> str:
    """The content digest of a feature array for one featurizer identity and input cache."""
    arr = np.ascontiguousarray(features, dtype="<f4")
    h = hashlib.sha256()
    h.update(json.dumps({"featurizer": json.loads(identity_json), "source_digest": source_digest,
                         "shape": list(arr.shape), "dtype": "float32"}, sort_keys=True).encode())
    h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


def _bad(path: Path, what: str) -> CacheError:
    return CacheError(f"feature file {path} {what}", "delete it; it is rebuilt by 'sertk features' or by the next "
                      "run that needs it")


class FeatureReader:
    """One complete feature file, validated on open; ``features`` is loaded (and its digest checked) on first use.

    The file stays open for the reader's lifetime, so a rebuild renaming a new
    file over the path never changes what this reader returns.
    """

    def __init__(self, path: str | Path) -> None:
        import h5py

        self.path = Path(path)
        self.hit: bool | None = None  # set by load_features: True when nothing was computed
        self._features: np.ndarray | None = None
        self._fh = None
        if not self.path.exists():
            raise CacheError(f"feature file {self.path} does not exist",
                             "build it with 'sertk features CACHE --featurizer NAME'")
        from ser_toolkit.cache.reader import check_regular

        check_regular(self.path)
        try:
            self._fh = h5py.File(self.path, "r")
        except OSError:
            raise _bad(self.path, "is not an HDF5 file (corrupt, truncated or foreign)") from None
        try:
            self._read_header()
        except BaseException:
            self.close()
            raise

    def _read_header(self) -> None:
        fh, path = self._fh, self.path
        schema = fh.attrs.get("sertk_features")
        if schema is None:
            raise _bad(path, "is not a sertk feature file")
        if int(schema) != FEATURE_SCHEMA:
            raise _bad(path, f"has feature schema {int(schema)}, this sertk reads {FEATURE_SCHEMA}")
        if not bool(fh.attrs.get("complete", False)):
            raise _bad(path, "is incomplete")
        try:
            ds = fh["features"]
            self.ids: list[str] = [s.decode() if isinstance(s, bytes) else str(s) for s in fh["ids"][()]]
            self.audio_digests: list[str] = [s.decode() if isinstance(s, bytes) else str(s)
                                             for s in fh["audio_digest"][()]]
            self._identity_json = str(fh.attrs["featurizer"])
            self.identity: dict[str, Any] = json.loads(self._identity_json)
            self.feature_names: list[str] | None = json.loads(str(fh.attrs["feature_names"]))
            self.shape: tuple[int, ...] = tuple(json.loads(str(fh.attrs["shape"])))
            self.source_digest: str = str(fh.attrs["source_digest"])
            self.source_path: str = str(fh.attrs["source_path"])
            self.sample_rate = int(fh.attrs["sample_rate"])
            self.digest: str = str(fh.attrs["digest"])
            self.created: str = str(fh.attrs["created"])
            self.sertk_version: str = str(fh.attrs["sertk_version"])
            self.build: dict[str, Any] = json.loads(str(fh.attrs.get("build", "{}")))
            rows, dtype, stored = ds.shape[0] if ds.ndim else -1, ds.dtype, tuple(ds.shape[1:])
        except (KeyError, ValueError, TypeError, OSError, UnicodeDecodeError) as exc:
            raise _bad(path, f"is damaged (unreadable data or attributes: {type(exc).__name__})") from None
        if dtype != np.float32 or stored != self.shape:
            raise _bad(path, f"is damaged (features of {dtype} {stored}, recorded float32 {self.shape})")
        if not (rows == len(self.ids) == len(self.audio_digests)) or rows < 1:
            raise _bad(path, f"is damaged ({rows} feature rows for {len(self.ids)} ids)")
        if not isinstance(self.identity, dict) or "name" not in self.identity:
            raise _bad(path, "is damaged (no featurizer identity)")

    @property
    def features(self) -> np.ndarray:
        """The (N, *shape) float32 features (read once; their digest is checked)."""
        if self._features is None:
            if self._fh is None:
                raise CacheError(f"feature file {self.path} was closed", "open it again")
            try:
                data = self._fh["features"][()]
            except OSError:
                raise _bad(self.path, "is damaged (its features cannot be read)") from None
            if features_digest(data, self._identity_json, self.source_digest) != self.digest:
                raise _bad(self.path, "is damaged (its features do not match their recorded digest)")
            self._features = data
        return self._features

    @property
    def name(self) -> str:
        return str(self.identity.get("name"))

    def __len__(self) -> int:
        return len(self.ids)

    def __getstate__(self) -> dict[str, Any]:
        self.features  # noqa: B018 - loaded (and checked) before the handle is dropped
        return {**self.__dict__, "_fh": None}

    def close(self) -> None:
        if self._fh is not None:
            try:
                self._fh.close()
            finally:
                self._fh = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def describe(self) -> dict[str, Any]:
        """JSON-ready metadata (no features)."""
        return {"path": str(self.path), "featurizer": self.identity, "shape": list(self.shape),
                "utterances": len(self), "feature_names": len(self.feature_names) if self.feature_names else None,
                "source_digest": self.source_digest, "digest": self.digest, "created": self.created,
                "build": self.build}


# --- computing features -------------------------------------------------------------------------------


def _extract_checked(featurizer: Any, waves: list[np.ndarray], ids: list[str], rate: int) -> np.ndarray:
    """Features of a chunk as one (n, *shape) array; a crash, a shape change or NaN/inf names the utterance."""
    try:
        out = featurizer.extract_many(waves, rate)
        if len(out) != len(waves):
            raise SertkError(f"featurizer '{featurizer.name}' returned {len(out)} results for {len(waves)} "
                             f"utterances ({ids[0]!r}...)", "extract_many must return one array per waveform")
    except SertkError:
        raise
    except Exception as exc:
        if len(waves) > 1:  # find the utterance it fails on
            for w, uid in zip(waves, ids):
                _extract_checked(featurizer, [w], [uid], rate)
        raise SertkError(f"featurizer '{featurizer.name}' failed on utterance {ids[0]!r}"
                         + (f" (or its chunk of {len(ids)})" if len(ids) > 1 else "")
                         + f": {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": "),
                         "fix the featurizer or that utterance's audio; features computed so far are kept and "
                         "reused by the next run") from None
    arrays = [np.asarray(a, dtype=np.float32) for a in out]
    common = Counter(a.shape for a in arrays).most_common(1)[0][0] if arrays else ()
    for a, uid in zip(arrays, ids):
        if a.shape != common:
            other = ids[next(k for k, b in enumerate(arrays) if b.shape == common)]
            raise SertkError(f"featurizer '{featurizer.name}' returned shape {a.shape} for utterance {uid!r} but "
                             f"{common} for {other!r}",
                             "a featurizer must return one shape for every utterance; fix it")
        if not np.isfinite(a).all():
            raise SertkError(f"featurizer '{featurizer.name}' returned NaN or infinite values for utterance {uid!r}",
                             "fix the featurizer (e.g. np.nan_to_num) or that utterance's audio")
    return np.stack(arrays) if arrays else np.zeros((0,), np.float32)


def _write_part(part: Path, features: np.ndarray, ids: list[str], digests: list[str], identity_json: str,
                rate: int) -> None:
    with atomic_path(part) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, features=features, ids=np.array(ids, dtype=str), audio_digest=np.array(digests, dtype=str),
                     identity=np.array(identity_json), rate=np.array(rate, dtype=np.int64))


def _compute_chunk(reader: Any, featurizer: Any, rows: list[int], part: Path, identity_json: str
                   ) -> tuple[int, tuple[int, ...], str]:
    """Read, featurize and store ``rows`` of the cache in one part file; returns (count, shape, first id)."""
    ids = [reader.ids[i] for i in rows]
    digests = reader.column("audio_digest")
    waves = [reader.wave(i) for i in rows]
    feats = _extract_checked(featurizer, waves, ids, reader.sample_rate)
    _write_part(part, feats, ids, [digests[i] for i in rows], identity_json, reader.sample_rate)
    return len(rows), tuple(feats.shape[1:]), ids[0]


def _worker_chunk(rows: list[int], part: Path, identity_json: str) -> tuple[int, tuple[int, ...], str]:
    return _compute_chunk(state("reader"), state("featurizer"), rows, part, identity_json)


_WARM: set[tuple[str, int]] = set()


def _warm(featurizer: Any, rate: int) -> None:
    """Warm the featurizer up in this process before forking workers from it (once per identity and rate)."""
    import multiprocessing

    key = (_identity_json(featurizer), rate)
    if key in _WARM or multiprocessing.get_start_method(allow_none=False) != "fork":
        return
    try:
        featurizer.warm_up(rate)
    except Exception:  # a featurizer that cannot take noise: its workers simply warm up themselves
        pass
    _WARM.add(key)


def _run_chunks(reader: Any, featurizer: Any, chunks: list[list[int]], parts_dir: Path, identity_json: str,
                workers: int) -> Iterator[tuple[int, tuple[int, ...], str]]:
    token = f"{os.getpid()}-{time.time_ns()}"
    tasks = [(rows, parts_dir / f"part-{token}-{k:05d}.npz") for k, rows in enumerate(chunks)]
    if not featurizer.parallel or workers <= 1 or len(tasks) <= 1:
        for rows, part in tasks:
            yield _compute_chunk(reader, featurizer, rows, part, identity_json)
        return
    _warm(featurizer, int(reader.sample_rate))
    pool = ProcessPoolExecutor(max_workers=min(workers, len(tasks)), initializer=partial(
        start_worker, os.getpid(), reader=reader, featurizer=featurizer))
    try:
        pending: set = set()
        for rows, part in tasks:  # a bounded number of tasks in flight
            pending.add(pool.submit(_worker_chunk, rows, part, identity_json))
            if len(pending) >= 2 * workers:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    yield f.result()
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                yield f.result()
    finally:  # on an error or Ctrl-C: drop queued tasks; running ones finish their (atomic) part
        pool.shutdown(wait=True, cancel_futures=True)


class _Progress:
    """A rich bar on a terminal, a line every few seconds otherwise, nothing when quiet."""

    def __init__(self, total: int, quiet: bool, label: str, log: Log | None) -> None:
        self.total, self.label, self.done = total, label, 0
        self._bar = None
        self._emit: Log | None = None
        self._t0 = self._last = time.monotonic()
        if quiet or not total:
            return
        if sys.stdout.isatty():
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
            self._bar.start()
            self._task = self._bar.add_task(label, total=total)
        else:
            self._emit = log or (lambda m: print(m, file=sys.stderr, flush=True))

    def advance(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.advance(self._task, n)
        elif self._emit is not None and time.monotonic() - self._last >= PROGRESS_EVERY:
            from ser_toolkit.progress import duration

            self._last = time.monotonic()
            rate = self.done / max(1e-9, self._last - self._t0)
            left = (self.total - self.done) / rate if rate > 0 else None
            self._emit(f"{self.label}: {self.done}/{self.total} utterances, {rate:.1f} utt/s, "
                       f"{duration(left)} left")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


# --- the build ----------------------------------------------------------------------------------------------


def _read_parts(root: Path, identity_json: str, rate: int) -> dict[str, tuple[np.ndarray, str]]:
    """audio digest -> (features, an utterance id) from every complete part file of this featurizer."""
    found: dict[str, tuple[np.ndarray, str]] = {}
    for part in sorted(root.glob("*/part-*.npz")):
        try:
            with np.load(part, allow_pickle=False) as z:
                if str(z["identity"]) != identity_json or int(z["rate"]) != rate:
                    continue
                feats, ids, digests = z["features"], z["ids"].tolist(), z["audio_digest"].tolist()
            if feats.dtype != np.float32 or len(feats) != len(ids) or len(ids) != len(digests):
                raise ValueError("inconsistent part")
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
            part.unlink(missing_ok=True)  # renamed parts are complete; be safe anyway
            continue
        for d, uid, row in zip(digests, ids, feats):
            found[d] = (row, uid)
    return found


def _previous(path: Path, identity_json: str, rate: int, say: Log | None) -> FeatureReader | None:
    """The previous feature file if its rows can be reused (checked), else None (said why, when damaged)."""
    if not path.exists():
        return None
    try:
        old = FeatureReader(path)
        old.features  # noqa: B018 - checks the digest: damaged rows are never carried over
    except CacheError as exc:
        if say:
            say(f"{exc.message}; rebuilding it")
        return None
    if old._identity_json != identity_json or old.sample_rate != rate:
        if say:
            say(f"feature file {path} holds other features ({old._identity_json}); rebuilding it")
        old.close()
        return None
    return old


def _donors(reader: Any, path: Path) -> list[Path]:
    """Feature files of the same name (featurizer identity key) for the input cache's siblings and source cache."""
    found = sorted(p for p in Path(reader.path).parent.glob(f"*.features/{path.name}") if p != path)
    source = (getattr(reader, "config", None) or {}).get("augmentation", {}).get("source_cache")
    if source:
        candidate = feature_dir(source) / path.name
        if candidate.exists() and candidate != path:
            found.append(candidate)
    return found


def _donated(reader: Any, path: Path, identity_json: str, rate: int, wanted: set[str]
             ) -> dict[str, tuple[np.ndarray, str]]:
    """audio digest -> (features, utterance id) for the ``wanted`` digests that a donor file already holds."""
    got: dict[str, tuple[np.ndarray, str]] = {}
    for donor in _donors(reader, path) if wanted else []:
        try:
            fr = FeatureReader(donor)
        except CacheError:
            continue  # damaged or being replaced: simply not a donor
        try:
            if fr._identity_json != identity_json or fr.sample_rate != rate:
                continue
            rows = [(d, i) for i, d in enumerate(fr.audio_digests) if d in wanted and d not in got]
            if rows:
                feats = fr.features  # digest-checked
                got.update((d, (feats[i], fr.ids[i])) for d, i in rows)
        except CacheError:
            continue
        finally:
            fr.close()
        if len(got) == len(wanted):
            break
    return got


def _say(quiet: bool, log: Log | None) -> Log | None:
    if log is not None:
        return log
    return None if quiet else (lambda m: print(m, file=sys.stderr, flush=True))


def build_features(reader: Any, featurizer: Any, workers: int | None = None, quiet: bool = True,
                   log: Log | None = None) -> Path:
    """Compute (incrementally, in parallel, crash-safely) the features of every utterance of ``reader``'s cache.

    Returns the feature file's path (left as it is when already up to date); see the module doc.
    """
    path = feature_path(reader, featurizer)
    fr = _ensure(reader, featurizer, path, workers, quiet, log)
    fr.close()
    return path


def _ensure(reader: Any, featurizer: Any, path: Path, workers: int | None, quiet: bool, log: Log | None
            ) -> FeatureReader:
    """Under the lock: the current feature file (``hit``), else build it (not ``hit``); features loaded."""
    identity_json = _identity_json(featurizer)
    path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(path.with_name(path.name + ".lock"),
                        f"another sertk process is computing {path}; waiting for it to finish"):
        fr = _current(path, reader, identity_json)  # another process may have built it meanwhile
        if fr is not None:
            fr.hit = True
            return fr
        _build(reader, featurizer, path, workers, quiet, log)
        fr = FeatureReader(path)
        fr.features  # noqa: B018 - checked once more, as any reader would
        fr.hit = False
        return fr


def _build(reader: Any, featurizer: Any, path: Path, workers: int | None, quiet: bool, log: Log | None
           ) -> dict[str, Any]:
    """The build itself, under the lock; returns what it did (also stored in the file's ``build`` attr)."""
    import h5py

    t0 = time.perf_counter()
    workers = default_workers() if workers is None else max(0, int(workers))
    say = _say(quiet, log)
    identity_json = _identity_json(featurizer)
    rate = int(reader.sample_rate)
    ids = list(reader.ids)
    digests = [str(d) for d in reader.column("audio_digest")]
    remove_stale_tmp(path.parent, path.name)
    parts_root = path.with_name(path.stem + ".parts")
    parts_dir = parts_root / str(reader.digest)[:12]
    parts_dir.mkdir(parents=True, exist_ok=True)
    for folder in parts_root.iterdir():
        if folder.is_dir():
            remove_stale_tmp(folder, "part-*")

    old = _previous(path, identity_json, rate, say)
    old_rows: dict[str, int] = {}
    if old is not None:
        old_rows = {d: i for i, d in enumerate(old.audio_digests)}
    parts = _read_parts(parts_root, identity_json, rate)
    before = set(parts)
    shared = _donated(reader, path, identity_json, rate, set(digests) - set(old_rows) - set(parts))
    todo: dict[str, int] = {}  # audio digest -> a row of the cache holding it
    for i, d in enumerate(digests):
        if d not in old_rows and d not in parts and d not in shared and d not in todo:
            todo[d] = i
    rows = sorted(todo.values())
    size = chunk_size()
    chunks = [rows[k:k + size] for k in range(0, len(rows), size)]
    progress = _Progress(len(rows), quiet, f"features {featurizer.name}", say)
    shape: tuple[int, ...] | None = None
    first = ""
    t1 = time.perf_counter()
    try:
        with contextlib.closing(_run_chunks(reader, featurizer, chunks, parts_dir, identity_json, workers)) as done:
            for n, chunk_shape, uid in done:
                if shape is None:
                    shape, first = chunk_shape, uid
                elif chunk_shape != shape:
                    shutil.rmtree(parts_root, ignore_errors=True)  # parts of an inconsistent featurizer: suspect
                    raise SertkError(f"featurizer '{featurizer.name}' returned shape {chunk_shape} for utterance "
                                     f"{uid!r} but {shape} for {first!r}",
                                     "a featurizer must return one shape for every utterance; fix it")
                progress.advance(n)
    finally:
        progress.close()
    compute_seconds = time.perf_counter() - t1
    if rows:
        parts = _read_parts(parts_root, identity_json, rate)

    # Assemble every row from the previous file and the parts, check it, write it under a temporary name.
    sources: list[tuple[np.ndarray, str]] = []
    counts = {"computed": 0, "reused": 0, "resumed": 0, "shared": 0}
    for uid, d in zip(ids, digests):
        if d in old_rows:
            sources.append((old.features[old_rows[d]], old.ids[old_rows[d]]))  # type: ignore[union-attr]
            counts["reused"] += 1
        elif d in shared:
            sources.append(shared[d])
            counts["shared"] += 1
        elif d in parts:
            sources.append(parts[d])
            counts["resumed" if d in before else "computed"] += 1
        else:  # a part vanished under us (removed by hand?): compute again next time
            raise CacheError(f"the features of utterance {uid!r} went missing while {path} was built",
                             "rerun the command")
    ref_shape, ref_id = sources[0][0].shape, sources[0][1]
    for (row, src), uid in zip(sources, ids):
        if row.shape != ref_shape:
            shutil.rmtree(parts_root, ignore_errors=True)
            raise SertkError(f"featurizer '{featurizer.name}' gave shape {row.shape} for utterance {uid!r} "
                             f"(audio of {src!r}) but {ref_shape} for {ref_id!r}",
                             "a featurizer must return one shape for every utterance; fix it and bump its version")
        if not np.isfinite(row).all():
            shutil.rmtree(parts_root, ignore_errors=True)
            raise SertkError(f"featurizer '{featurizer.name}' returned NaN or infinite values for utterance {uid!r}",
                             "fix the featurizer (e.g. np.nan_to_num) or that utterance's audio")
    features = np.stack([s[0] for s in sources]).astype(np.float32, copy=False)
    names = featurizer.feature_names()
    if names is not None:
        names = [str(n) for n in names]
        if len(ref_shape) == 1 and len(names) != ref_shape[0]:
            raise SertkError(f"featurizer '{featurizer.name}' names {len(names)} features but returns "
                             f"{ref_shape[0]}", "make feature_names() match the features (or return None)")
    digest = features_digest(features, identity_json, str(reader.digest))
    unique = len(rows)
    summary = {**counts, "utterances": len(ids), "unique_computed": unique, "workers": workers,
               "parallel": bool(featurizer.parallel), "compute_seconds": round(compute_seconds, 3),
               "utterances_per_s": round(unique / compute_seconds, 2) if unique and compute_seconds > 0 else None}
    with atomic_path(path) as tmp:
        with new_h5(tmp, features.nbytes + 256 * len(ids), f"feature file {path.name}") as fh:
            s = h5py.string_dtype()
            fh.create_dataset("features", data=features)
            fh.create_dataset("ids", data=ids, dtype=s)
            fh.create_dataset("audio_digest", data=digests, dtype=s)
            fh.attrs["sertk_features"] = FEATURE_SCHEMA
            fh.attrs["source_digest"] = str(reader.digest)
            fh.attrs["source_path"] = str(Path(reader.path).resolve())
            fh.attrs["sample_rate"] = rate
            fh.attrs["featurizer"] = identity_json
            fh.attrs["feature_names"] = json.dumps(names)
            fh.attrs["shape"] = json.dumps(list(ref_shape))
            fh.attrs["sertk_version"] = __version__
            fh.attrs["digest"] = digest
            fh.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            summary["seconds"] = round(time.perf_counter() - t0, 3)
            fh.attrs["build"] = json.dumps(summary)
            fh.attrs["complete"] = True  # last
        if old is not None:
            old.close()
    shutil.rmtree(parts_root, ignore_errors=True)
    return summary


def _current(path: Path, reader: Any, identity_json: str) -> FeatureReader | None:
    """The feature file if it holds this featurizer's features of exactly this cache (checked), else None."""
    if not path.exists():
        return None
    try:
        fr = FeatureReader(path)
    except CacheError:
        return None  # the build says why and replaces it
    if fr.source_digest != reader.digest or fr._identity_json != identity_json or fr.ids != list(reader.ids) \
            or fr.sample_rate != int(reader.sample_rate):
        fr.close()
        return None
    try:
        fr.features  # noqa: B018 - checks the digest
    except CacheError:
        fr.close()
        return None
    return fr


def load_features(reader: Any, featurizer: Any, workers: int | None = None, quiet: bool = True,
                  log: Log | None = None) -> FeatureReader:
    """The features of every utterance of ``reader``'s cache: cached, else (re)built incrementally.

    A hit opens one file and checks its digest (no audio is read or hashed). A
    stale file (the cache changed) is updated; a damaged or foreign one is
    rebuilt after saying so through ``log`` (or on stderr unless ``quiet``).
    The returned reader's ``hit`` says whether anything was computed.
    """
    path = feature_path(reader, featurizer)
    fr = _current(path, reader, _identity_json(featurizer))
    if fr is not None:  # the common case: no lock, no computation
        fr.hit = True
        return fr
    return _ensure(reader, featurizer, path, workers, quiet, log)


def feature_caches(cache_path: str | Path, digest: str | None = None) -> list[dict[str, Any]]:
    """The feature files beside a cache: featurizer, shape, current or stale, size (for ``sertk inspect``).

    ``digest`` is the cache's content digest (read from the cache when not given).
    A damaged file is listed with its ``error``.
    """
    folder = feature_dir(cache_path)
    if not folder.is_dir():
        return []
    if digest is None:
        from ser_toolkit.cache.reader import read_header

        try:
            digest = read_header(Path(cache_path))["digest"]
        except CacheError:
            digest = None
    out: list[dict[str, Any]] = []
    for p in sorted(folder.glob("*.h5")):
        entry: dict[str, Any] = {"path": str(p), "size_bytes": p.stat().st_size}
        try:
            fr = FeatureReader(p)
        except CacheError as exc:
            out.append({**entry, "error": str(exc), "state": "damaged"})
            continue
        try:
            out.append({**entry, "featurizer": fr.name, "options": fr.identity.get("options", {}),
                        "version": fr.identity.get("version"), "shape": list(fr.shape), "utterances": len(fr),
                        "source_digest": fr.source_digest, "digest": fr.digest, "created": fr.created,
                        "state": "current" if digest is not None and fr.source_digest == digest else "stale"})
        finally:
            fr.close()
    return out
