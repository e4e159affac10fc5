"""Building a cache: decode, down-mix, resample once; incremental, parallel, crash-safe.

How a build survives interruption:

1. Decoded audio is flushed every few seconds of work into *part files*
   (``<cache>.parts/<config-hash>/part-*.h5``), each written under a temporary
   name and renamed when complete.
2. When every utterance is decoded, the final cache is written to a temporary
   file from the previous cache (for unchanged utterances) and the parts, then
   renamed over ``<cache>.h5``; only then are the parts removed.

A killed build leaves at most complete part files and a stale temporary; the
next run reuses the parts and removes the temporary. An exclusive lock on
``<cache>.h5.lock`` serialises concurrent builds of the same cache (the second
waits, then finds little or nothing to do). Parts are keyed by a hash of the
preprocessing config, so a different config never mixes with old audio.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import zlib
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ser_toolkit import __version__
from ser_toolkit.atomic import atomic_path, exclusive_lock, remove_stale_tmp
from ser_toolkit.audio import CLIP_LEVEL, MIN_SOURCE_RATE, MONO_RULES, RESAMPLER, RESAMPLERS, TARGET_RATE, prepare
from ser_toolkit.cache.reader import INT16_SCALE, read_header
from ser_toolkit.cache.writer import create_audio, finish, write_table
from ser_toolkit.datasets import Dataset, Utterance
from ser_toolkit.errors import AudioError, CacheError, SertkError
from ser_toolkit.space import new_h5, require_space

DTYPES = ("float32", "int16")
MAX_SECONDS = 600.0  # default longest utterance kept in a cache (10 min)
TASK_SIZE = 128  # utterances per worker task and part file
COPY_SAMPLES = 4 * 1024 * 1024  # largest slice copied at once while assembling


@dataclass(frozen=True)
class Preprocess:
    """Everything that changes the cached audio; a change rebuilds the cache."""

    sample_rate: int = TARGET_RATE
    mono: str = "mean"
    dtype: str = "float32"
    resampler: str = RESAMPLER
    max_seconds: float = MAX_SECONDS

    def __post_init__(self) -> None:
        if self.mono not in MONO_RULES:
            raise SertkError(f"unknown mono rule {self.mono!r}", f"use one of {', '.join(MONO_RULES)}")
        if self.resampler not in RESAMPLERS:
            raise SertkError(f"unknown resampler {self.resampler!r}", f"use one of {', '.join(RESAMPLERS)}")
        if self.dtype not in DTYPES:
            raise SertkError(f"unknown cache dtype {self.dtype!r}", f"use one of {', '.join(DTYPES)}")
        if not 1000 <= self.sample_rate <= 192000:
            raise SertkError(f"sample rate {self.sample_rate} is out of range", "use e.g. 16000")
        if not 0 < self.max_seconds <= 6 * 3600:
            raise SertkError(f"--max-seconds {self.max_seconds} is out of range", "use e.g. 600 (10 minutes)")

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self).items())

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class BuildSummary:
    """What a build did (printed at the end of ``sertk cache``)."""

    path: str
    utterances: int = 0
    decoded: int = 0
    reused: int = 0
    resumed: int = 0
    hours: float = 0.0
    skipped: list[dict[str, str]] = field(default_factory=list)
    ignored: dict[str, int] = field(default_factory=dict)
    clipped_utterances: int = 0
    seconds: float = 0.0
    rebuilt: bool = False
    unchanged: bool = False
    mode: str = "new"
    digest: str = ""


def _decode_task(dataset: Dataset, root: Path | None, utts: list[Utterance], pre: Preprocess,
                 fingerprints: list[str], part: Path) -> list[tuple[str, int, int, str | None]]:
    """Worker: decode and prepare a few utterances, streaming them into one part file.

    Only metadata (id, length, clipped samples, error) travels back to the parent;
    the audio goes straight to disk, one utterance in memory at a time.
    """
    import h5py

    from ser_toolkit.cache.identity import audio_checks

    out: list[tuple[str, int, int, str | None]] = []
    kept: list[tuple[str, str, int, int, str, int]] = []
    with atomic_path(part) as tmp:
        with h5py.File(tmp, "w") as fh:
            audio = fh.create_dataset("audio", shape=(0,), maxshape=(None,), dtype=pre.dtype,
                                      chunks=(1 << 18,))
            for u, fp in zip(utts, fingerprints):
                try:
                    data, rate = dataset.load(u, root)
                    _check_source(u, data, rate, pre)
                    clipped = int(np.count_nonzero(np.abs(data) >= CLIP_LEVEL))
                    wave = prepare(data, rate, pre.mono, pre.sample_rate, pre.resampler)
                    del data
                    if not np.isfinite(wave).all():
                        raise AudioError(f"{u.path or u.id}: non-finite samples after resampling", "check the file")
                except AudioError as exc:
                    out.append((u.id, 0, 0, exc.message))
                    continue
                except Exception as exc:  # a decoder crash on one file must not stop the corpus
                    out.append((u.id, 0, 0, f"{u.path or u.id}: {type(exc).__name__}: {exc}"))
                    continue
                end = audio.shape[0]
                stored = _to_storage(wave, pre.dtype)
                # HDF5 cannot survive a full disk (it may crash the process): checked before every write
                require_space(part.parent, stored.nbytes + 64 * len(utts), f"the audio of {u.path or u.id}",
                              PARTS_KEPT)
                audio.resize((end + wave.size,))
                audio[end:] = stored
                kept.append((u.id, fp, wave.size, clipped, *audio_checks(stored)))
                out.append((u.id, wave.size, clipped, None))
            s = h5py.string_dtype()
            fh.create_dataset("id", data=[k[0] for k in kept], dtype=s)
            fh.create_dataset("fingerprint", data=[k[1] for k in kept], dtype=s)
            fh.create_dataset("length", data=np.array([k[2] for k in kept], dtype=np.int64))
            fh.create_dataset("clipped", data=np.array([k[3] for k in kept], dtype=np.int64))
            fh.create_dataset("audio_digest", data=[k[4] for k in kept], dtype=s)
            fh.create_dataset("crc32", data=np.array([k[5] for k in kept], dtype=np.uint32))
    return out


PARTS_KEPT = "free space or {elsewhere}, then rerun: finished part files are kept and reused"


def _check_source(u: Utterance, data: np.ndarray, rate: int, pre: Preprocess) -> None:
    """Skip what is not speech audio or too long to cache, before resampling makes it large."""
    where = u.path or u.id
    if rate < MIN_SOURCE_RATE:
        raise AudioError(f"{where}: sample rate {rate} Hz is below {MIN_SOURCE_RATE} Hz (damaged header?)",
                         "re-export the file")
    seconds = data.shape[0] / rate
    if seconds > pre.max_seconds:
        raise AudioError(f"{where}: {seconds:.0f} s is longer than the cache's maximum of {pre.max_seconds:.0f} s",
                         "cut the file, or raise the limit with --max-seconds")


def table_digest(utts: list[Utterance]) -> str:
    """A hash of the utterance table (ids, labels, speakers, extra fields...)."""
    rows = [[u.id, u.path, u.emotion, u.speaker, u.gender, u.corpus, dict(u.extra)] for u in utts]
    return hashlib.sha1(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def _to_storage(wave: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "int16":
        return np.clip(np.round(wave * INT16_SCALE), -32768, 32767).astype(np.int16)
    return wave.astype(np.float32, copy=False)


def _read_parts(folder: Path) -> dict[str, tuple[Path, int, int, str, int, str, int]]:
    """id -> (part file, offset, length, fingerprint, clipped, audio digest, crc) for complete part files."""
    import h5py

    found: dict[str, tuple[Path, int, int, str, int, str, int]] = {}
    for part in sorted(folder.glob("part-*.h5")):
        try:
            with h5py.File(part, "r") as fh:
                ids = [s.decode() for s in fh["id"][()]]
                fps = [s.decode() for s in fh["fingerprint"][()]]
                lengths = fh["length"][()]
                clipped = fh["clipped"][()]
                digests = [s.decode() for s in fh["audio_digest"][()]]
                crcs = fh["crc32"][()].tolist()
        except (OSError, KeyError):
            part.unlink(missing_ok=True)  # cannot be complete: renamed parts are; be safe anyway
            continue
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else []
        for uid, fp, off, n, c, d, crc in zip(ids, fps, offsets, lengths, clipped, digests, crcs):
            found[uid] = (part, int(off), int(n), fp, int(c), d, int(crc))
    return found


def _rebuild_command(dataset: Dataset, root: Path | None, path: Path, pre: Preprocess) -> str:
    """The ``sertk cache ... --force`` command that replaces ``path`` with this corpus (for refusals seen by a
    caller without ``sertk cache``'s options, e.g. a study)."""
    import shlex

    def shown(v: Any) -> str:
        return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v).lower() if isinstance(v, bool) \
            else str(v)

    words = ["sertk", "cache", dataset.name, *(["--root", str(root)] if root is not None else [])]
    defaults = {p.name: p.default for p in dataset.params}
    words += [w for k, v in dataset.options.items() if v is not None and v != defaults.get(k)
              for w in ("--set", f"{k}={shown(v)}")]
    own = asdict(preprocess_for(dataset))
    words += [w for k, v in asdict(pre).items() if k in _PRE_OPTIONS and v != own[k]
              for w in (_PRE_OPTIONS[k], str(v))]
    if path.stem != dataset.cache_name():
        words += ["--name", path.stem]
    return " ".join(shlex.quote(w) for w in [*words, "--cache-dir", str(path.parent), "--force"])


_PRE_OPTIONS = {"mono": "--mono", "dtype": "--dtype", "resampler": "--resampler", "max_seconds": "--max-seconds"}


def _existing(path: Path, pre: Preprocess, identity: dict[str, Any], force: bool,
              rebuild: str | None = None) -> tuple[dict[str, Any] | None, str]:
    """The previous cache's header if it can be reused (None and why if not).

    A damaged, incomplete or older-schema sertk cache is rebuilt. A file that is
    not a sertk cache, a cache of another corpus (plugin or root) and a cache
    built with other preprocessing options are refused unless ``force``. The refusals name ``sertk cache``'s
    options, or (``rebuild``: the command that replaces the cache) what a study's config can do.
    """
    if not path.exists():
        return None, "new"
    try:
        header = read_header(path)
    except CacheError as exc:
        if force:
            return None, "rebuilt (--force)"
        if "is not a sertk cache" in exc.message or "not an HDF5 file" in exc.message:
            raise CacheError(f"{path} exists and is not a sertk cache",
                             "choose another --cache-dir/--name, move that file away, or pass --force to "
                             "replace it" if rebuild is None else "move that file away, set another cache_dir in "
                             f"the study config's [data], or replace it: {rebuild}") from None
        return None, "rebuilt (it was damaged, incomplete or of an older schema)"
    old = header["config"]
    old_identity = {"name": old["dataset"].get("name"), "root": old["dataset"].get("root")}
    if old_identity != identity and not force:
        def corpus(i: dict[str, Any]) -> str:
            return f"dataset '{i['name']}'" + (f" at {i['root']}" if i["root"] else "")

        raise CacheError(f"{path} holds another corpus ({corpus(old_identity)}), not {corpus(identity)}",
                         "give this corpus another name (--name), or pass --force to replace that cache"
                         if rebuild is None else "set another cache_dir in the study config's [data], or replace "
                         f"that cache: {rebuild}")
    if old.get("preprocess") != asdict(pre):
        if not force:
            was = ", ".join(f"{k}={v}" for k, v in old.get("preprocess", {}).items() if asdict(pre).get(k) != v)
            asked = ", ".join(f"{k}={v}" for k, v in asdict(pre).items() if old.get("preprocess", {}).get(k) != v)
            raise CacheError(f"{path} was built with {was}, not {asked}",
                             "ask for the cache's own options (sertk cache: --mono/--dtype/--resampler/"
                             "--max-seconds; study configs: the same keys per corpus), another --name, or "
                             "--force to rebuild it" if rebuild is None else "ask for the cache's own options "
                             "(the same keys per corpus in the study config: mono, dtype, resampler, max_seconds), "
                             f"set another cache_dir in its [data], or rebuild the cache: {rebuild}")
        return None, "rebuilt (--force)"
    if force:
        return None, "rebuilt (--force)"
    return header, "incremental"


class _OldAudioDamaged(Exception):
    """The previous cache's audio failed its checksum while being reused."""


class _PartDamaged(Exception):
    """A part file's audio failed its checksum (the part was removed; decode again)."""


class _Progress:
    """A rich progress bar (no-op when quiet)."""

    def __init__(self, total: int, quiet: bool, label: str) -> None:
        self._bar = None
        if not quiet and total:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
            self._bar.start()
            self._task = self._bar.add_task(label, total=total)

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _decode_all(dataset: Dataset, root: Path | None, todo: list[Utterance], fingerprints: dict[str, str],
                pre: Preprocess, workers: int, parts_dir: Path) -> Iterable[list[tuple[str, int, int, str | None]]]:
    """Decode ``todo`` in tasks of ``task_size()`` utterances, each writing one part file."""
    size = task_size()
    token = f"{os.getpid()}-{time.time_ns()}"
    tasks = [(todo[i:i + size], [fingerprints[u.id] for u in todo[i:i + size]],
              parts_dir / f"part-{token}-{i // size:05d}.h5") for i in range(0, len(todo), size)]
    if workers <= 1:
        for utts, fps, part in tasks:
            yield _decode_task(dataset, root, utts, pre, fps, part)
        return
    try:  # warm this process (lazy imports of the decoder or synthesiser) so forked workers start warm
        dataset.load(todo[0], root)
    except Exception:  # noqa: BLE001 - a bad first file is reported by the worker that decodes it
        pass
    from functools import partial

    from ser_toolkit.workers import start_worker

    # workers leave Ctrl-C to the parent and die with it: an orphan would hold the build lock
    pool = ProcessPoolExecutor(max_workers=workers, initializer=partial(start_worker, os.getpid()))
    try:
        pending = set()
        for utts, fps, part in tasks:  # a bounded number of tasks in flight: memory stays flat
            pending.add(pool.submit(_decode_task, dataset, root, utts, pre, fps, part))
            if len(pending) >= 2 * workers:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    yield _result(f, parts_dir)
        for f in pending:
            yield _result(f, parts_dir)
    finally:  # on Ctrl-C or an error: drop queued tasks; running ones finish their (atomic) part
        pool.shutdown(wait=True, cancel_futures=True)


def _result(future: Any, parts_dir: Path) -> list[tuple[str, int, int, str | None]]:
    """A decoding task's result; a worker that died (a decoder crash, the kernel's OOM killer) is one line."""
    from concurrent.futures.process import BrokenProcessPool

    try:
        return future.result()
    except BrokenProcessPool:
        free = shutil.disk_usage(parts_dir).free
        raise SertkError(f"a decoding worker process died while caching ({free / 1e9:.2f} GB free under "
                         f"{parts_dir.parent})", "rerun (finished part files are kept and half-written ones "
                         "removed); if it dies again, run with --workers 1 to find the file") from None


def task_size() -> int:
    """Utterances per worker task and part file (``SERTK_CACHE_TASK_SIZE`` overrides it)."""
    return max(1, int(os.environ.get("SERTK_CACHE_TASK_SIZE", TASK_SIZE)))


def cache_file(cache_dir: str | Path, name: str) -> Path:
    """``<cache_dir>/<name>.h5`` for a validated cache name (never a path that escapes the folder)."""
    from ser_toolkit.cache.identity import check_name

    return Path(cache_dir) / f"{check_name(name)}.h5"


def locate_cache(arg: str | Path, cache_dir: str | Path) -> Path:
    """A cache given by path (``*.h5`` or with a folder) or by name (``<cache_dir>/<name>.h5``; dots allowed)."""
    text = str(arg)
    if text.endswith(".h5") or "/" in text or os.sep in text:
        return Path(text)
    return cache_file(cache_dir, text)


def preprocess_for(dataset: Dataset, mono: str | None = None, dtype: str | None = None,
                   resampler: str | None = None, max_seconds: float | None = None) -> Preprocess:
    """The preprocessing of a corpus: given options, else the dataset's own (e.g. its down-mix), else defaults."""
    given = {"mono": mono or dataset.mono, "dtype": dtype, "resampler": resampler, "max_seconds": max_seconds}
    return Preprocess(**{k: v for k, v in given.items() if v is not None})


def build_cache(dataset: Dataset, root: Path | None, path: Path, pre: Preprocess | None = None,
                workers: int = 1, strict: bool = False, quiet: bool = False, force: bool = False,
                protect_runs: bool = False, own_runs: Path | None = None) -> BuildSummary:
    """Build or update the cache of ``dataset`` at ``path``; see the module doc for the guarantees.

    ``protect_runs``: other content never replaces a cache that finished runs trained on, unless ``force``
    (:mod:`ser_toolkit.cache.dependents`), except the runs under ``own_runs``: a study's own runs folder (it
    retrains them). With ``own_runs`` (a study) the refusals name what a study can do (its config, a
    ``sertk cache ... --force`` command), not ``sertk cache``'s options."""
    from ser_toolkit.cache.identity import check_name

    pre = pre or Preprocess()
    path = Path(path)
    check_name(path.stem)
    if path.exists() and not path.is_file() or force and path.is_symlink():  # before decoding anything
        from ser_toolkit.audio import _kind

        what = "a symbolic link" if path.is_symlink() else "a folder" if path.is_dir() else _kind(path)
        raise CacheError(f"{path} is {what}, not a cache file: sertk writes caches as regular files of its own",
                         "move it away, or choose another --cache-dir or --name")
    t0 = time.perf_counter()
    # refusals (a bad corpus, another corpus or other options under this name) before anything is written
    scan = dataset.scan(root)
    if not scan.utterances:
        raise SertkError(f"dataset '{dataset.name}' found no utterances under {root}",
                         "check --root (it should be the corpus's top folder)")
    _check_strings(scan.utterances)
    _existing(path, pre, _identity(dataset, root), force,
              None if own_runs is None else _rebuild_command(dataset, root, path, pre))
    path.parent.mkdir(parents=True, exist_ok=True)
    waiting = f"another sertk process is building {path}; waiting for it to finish"
    with exclusive_lock(path.with_name(path.name + ".lock"), waiting):
        for attempt in range(3):  # damaged audio found mid-assembly: decode it again
            try:
                return _build(dataset, root, scan, path, pre, workers, strict, quiet, force, t0, protect_runs,
                              own_runs)
            except _OldAudioDamaged:
                force = True
            except _PartDamaged:
                pass
        raise CacheError(f"building {path} keeps finding damaged audio", "check the disk, then rerun")


def _check_strings(utts: list[Utterance]) -> None:
    """Every table string must be storable: UTF-8 text without NUL bytes."""
    for u in utts:
        fields = {"id": u.id, "path": u.path or "", "speaker": u.speaker, "corpus": u.corpus,
                  "gender": u.gender or "", "extra": json.dumps(dict(u.extra), sort_keys=True)}
        for name, value in fields.items():
            try:
                ok = "\x00" not in value and bool(value.encode("utf-8") or True)
            except UnicodeEncodeError:
                ok = False
            if not ok:
                raise SertkError(f"utterance {u.id.encode('utf-8', 'backslashreplace').decode()!r}: its {name} holds "
                                 "a NUL byte or an unpaired surrogate", "fix that entry of the corpus or manifest")


def _identity(dataset: Dataset, root: Path | None) -> dict[str, Any]:
    """What makes a cache the cache of one corpus: the dataset plugin and the corpus root."""
    return {"name": dataset.name, "root": str(root) if root is not None else None}


def _build(dataset: Dataset, root: Path | None, scan: Any, path: Path, pre: Preprocess, workers: int,
           strict: bool, quiet: bool, force: bool, t0: float, protect_runs: bool = False,
           own_runs: Path | None = None) -> BuildSummary:
    """The build itself, under the lock (the existing cache is checked again: it may have changed)."""
    from ser_toolkit.registry import get

    remove_stale_tmp(path.parent, path.name)
    summary = BuildSummary(path=str(path), ignored=dict(scan.ignored))
    fingerprints: dict[str, str] = {}
    skipped: list[dict[str, str]] = []
    for u in scan.utterances:
        try:
            fingerprints[u.id] = dataset.fingerprint(u, root)
        except OSError as exc:
            reason = f"{u.path}: cannot read ({exc.strerror})"
            if strict:
                raise AudioError(reason, "fix the file or run without --strict") from None
            skipped.append({"id": u.id, "path": u.path or "", "reason": reason, "fingerprint": ""})
    identity = _identity(dataset, root)
    header, mode = _existing(path, pre, identity, force,
                             None if own_runs is None else _rebuild_command(dataset, root, path, pre))
    summary.rebuilt = mode not in ("new", "incremental")
    summary.mode = mode
    try:
        provider = get("dataset", dataset.name).provider
        plugin = {"distribution": provider.distribution, "version": provider.version}
    except SertkError:  # a dataset object built directly (tests, scripts)
        plugin = {"distribution": type(dataset).__module__, "version": None}
    config = {
        "name": path.stem,  # the name it was built under: a renamed or copied file keeps it (set names)
        "preprocess": asdict(pre),
        "dataset": {**identity, "options": dataset.options, "plugin": plugin},
        "sertk_version": __version__,
    }
    old: dict[str, tuple[int, int, str, int, str, int]] = {}
    old_skipped: dict[str, dict[str, str]] = {}
    if header is not None:
        c = header["columns"]
        old = {uid: (int(o), int(n), fp, int(cl), d, int(crc)) for uid, o, n, fp, cl, d, crc in
               zip(c["id"], c["offset"], c["length"], c["fingerprint"], c["clipped"], c["audio_digest"],
                   c["crc32"])}
        old_skipped = {s["id"]: s for s in header["summary"].get("skipped", []) if "id" in s}
    parts_dir = path.with_name(path.name + ".parts") / pre.key()
    parts_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(parts_dir, "part-*")  # half-written parts of dead workers (a crash, a full disk)
    parts = _read_parts(parts_dir)
    todo = []
    for u in scan.utterances:
        fp = fingerprints.get(u.id)
        if fp is None:
            continue
        if u.id in old and old[u.id][2] == fp:
            summary.reused += 1
        elif u.id in parts and parts[u.id][3] == fp:
            summary.resumed += 1
        elif u.id in old_skipped and old_skipped[u.id].get("fingerprint") == fp and not strict:
            skipped.append(old_skipped[u.id])
        else:
            todo.append(u)
    digest = table_digest([u for u in scan.utterances if u.id in old and u.id not in {s["id"] for s in skipped}])
    table_same = header is not None and header["config"]["dataset"] == config["dataset"] and \
        not todo and summary.resumed == 0 and len(old) == summary.reused and \
        header["summary"].get("table_digest") == digest
    if table_same and header is not None:
        summary.unchanged = True
        summary.utterances = len(old)
        summary.skipped = skipped
        summary.hours = sum(v[1] for v in old.values()) / pre.sample_rate / 3600
        summary.digest = header["digest"]
        summary.clipped_utterances = sum(1 for v in old.values() if v[3] > 0)
        summary.seconds = time.perf_counter() - t0
        shutil.rmtree(parts_dir.parent, ignore_errors=True)
        return summary

    # Decode what is new or changed; every finished task is a complete part file.
    by_id = {u.id: u for u in todo}
    progress = _Progress(len(todo), quiet, f"caching {dataset.name}")
    try:
        for results in _decode_all(dataset, root, todo, fingerprints, pre, workers, parts_dir):
            for uid, _, _, error in results:
                if error is None:
                    summary.decoded += 1
                elif strict:
                    raise AudioError(error, "fix or remove the file, or run without --strict")
                else:
                    skipped.append({"id": uid, "path": by_id[uid].path or "", "reason": error,
                                    "fingerprint": fingerprints[uid]})
            progress.advance(len(results))
    finally:
        progress.close()
    parts = _read_parts(parts_dir)

    # Assemble the final file from the old cache and the parts, then rename it into place.
    rows = [u for u in scan.utterances if (u.id in old and old[u.id][2] == fingerprints.get(u.id))
            or (u.id in parts and parts[u.id][3] == fingerprints.get(u.id))]
    summary.skipped = skipped
    summary.utterances = len(rows)
    if not rows:
        raise SertkError(f"no utterance of dataset '{dataset.name}' could be decoded "
                         f"({len(skipped)} skipped; first: {skipped[0]['reason'] if skipped else '-'})",
                         "check the corpus files")
    summary.digest = _assemble(path, rows, fingerprints, old, parts, pre, config, summary,
                               _keep_for_runs(path, header["digest"], own_runs,
                                              None if own_runs is None else _rebuild_command(dataset, root, path, pre))
                               if protect_runs and not force and header else None)
    shutil.rmtree(parts_dir.parent, ignore_errors=True)
    summary.seconds = time.perf_counter() - t0
    return summary


def _assemble(path: Path, rows: list[Utterance], fingerprints: dict[str, str],
              old: dict[str, tuple[int, int, str, int, str, int]],
              parts: dict[str, tuple[Path, int, int, str, int, str, int]],
              pre: Preprocess, config: dict[str, Any], summary: BuildSummary,
              guard: Any = None) -> str:
    """Write the final cache from the old cache and the parts; returns its content digest. ``guard(digest)``
    may refuse the new content before it replaces the old file (the parts stay for the next run)."""
    import h5py

    def from_old(u: Utterance) -> bool:
        return u.id in old and old[u.id][2] == fingerprints[u.id]

    lengths = np.array([old[u.id][1] if from_old(u) else parts[u.id][2] for u in rows], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    clipped = [old[u.id][3] if from_old(u) else parts[u.id][4] for u in rows]
    digests = [old[u.id][4] if from_old(u) else parts[u.id][5] for u in rows]
    crcs = [old[u.id][5] if from_old(u) else parts[u.id][6] for u in rows]
    summary.hours = float(lengths.sum()) / pre.sample_rate / 3600
    summary.clipped_utterances = sum(1 for c in clipped if c > 0)
    # Where each row's audio comes from, coalesced into contiguous runs: one slice copy per run.
    # Where each row's audio comes from: the previous cache or a part file. Each row is copied on its own and
    # its CRC checked, so damaged audio (an old cache's or a part's) is never carried into the new file.
    runs: list[list[Any]] = []  # [source, source offset, target offset, length, expected crc]
    for u, off, n in zip(rows, offsets, lengths):
        if from_old(u):
            runs.append([None, old[u.id][0], int(off), int(n), old[u.id][5]])
        else:
            runs.append([parts[u.id][0], parts[u.id][1], int(off), int(n), parts[u.id][6]])
    with atomic_path(path) as tmp:
        previous = h5py.File(path, "r") if old else None
        part, part_file = None, None  # one part open at a time: memory stays flat
        try:
            size = int(lengths.sum()) * np.dtype(pre.dtype).itemsize + 512 * len(rows)
            with new_h5(tmp, size, f"cache {path.name}") as fh:
                audio = create_audio(fh, pre.dtype, int(lengths.sum()))
                for src, o, off, n, crc in runs:
                    if src is None:
                        source = previous
                    else:
                        if src != part:
                            if part_file is not None:
                                part_file.close()
                            part, part_file = src, h5py.File(src, "r")
                        source = part_file
                    running = 0
                    for start in range(0, n, COPY_SAMPLES):
                        k = min(COPY_SAMPLES, n - start)
                        try:
                            block = source["audio"][o + start:o + start + k]
                        except OSError:
                            if src is None:
                                raise _OldAudioDamaged() from None
                            raise
                        running = zlib.crc32(block, running)
                        audio[off + start:off + start + k] = block
                    if running != crc:
                        if src is None:
                            raise _OldAudioDamaged()
                        Path(src).unlink(missing_ok=True)  # its utterances are decoded again
                        raise _PartDamaged()
                write_table(fh, rows, offsets, lengths, [fingerprints[u.id] for u in rows], clipped, digests, crcs)
                digest = finish(fh, config, {"skipped": summary.skipped, "ignored": summary.ignored,
                                             "table_digest": table_digest(rows)})
            if guard is not None:
                guard(digest)  # before the new file replaces the old one
            return digest
        finally:
            for f in (previous, part_file):
                if f is not None:
                    f.close()


def _keep_for_runs(path: Path, current: str, own: Path | None = None, rebuild: str | None = None):
    """A guard for :func:`_assemble`: other content may not replace ``path`` while finished runs depend on its
    ``current`` content (:mod:`ser_toolkit.cache.dependents`), except runs under ``own`` (the study's own, which
    it retrains). ``rebuild``: the replacing command, for a caller without ``sertk cache``'s options."""
    from ser_toolkit.cache.dependents import finished_runs
    from ser_toolkit.cache.identity import short

    def guard(digest: str) -> None:
        if digest == current:
            return
        runs, gone = finished_runs(path, current, own)
        if runs or gone:
            every = [*map(str, runs), *(f"{r} (not there now: moved or deleted)" for r in gone)]
            named = ", ".join(every[:3]) + (f" and {len(every) - 3} more" if len(every) > 3 else "")
            fix = ("build it under another --name, or pass --force to replace it (those runs can then no longer "
                   "be evaluated)" if rebuild is None else "set another cache_dir (or a corpus name) in the study "
                   f"config's [data], or replace it (those runs can then no longer be evaluated): {rebuild}")
            raise CacheError(f"cache {path} holds the data ({short(current)}) that {len(every)} finished "
                             f"run{'' if len(every) == 1 else 's'} trained on ({named}); this build would replace "
                             f"it with other data ({short(digest)})", fix + (
                                 f"; the records of deleted runs are in {path.name}.runs/" if gone else ""))

    return guard


def verify_cache(path: Path, quiet: bool = True) -> dict[str, Any]:
    """Read every utterance of a cache, checking its CRC-32 and its audio digest.

    Returns ``{"path", "utterances", "digest", "damaged": [ids]}``; a table that
    fails validation raises :class:`CacheError` (the file cannot be read at all).
    """
    from ser_toolkit.cache.identity import audio_checks
    from ser_toolkit.cache.reader import CacheReader

    reader = CacheReader(path)
    expected = list(zip(reader.column("audio_digest"), reader.column("crc32")))
    audio = reader._dataset()
    bad: list[str] = []
    progress = _Progress(len(reader), quiet, f"verifying {path.name}")
    try:
        for i, uid in enumerate(reader.ids):
            start = int(reader.offsets[i])
            try:
                ok = audio_checks(audio[start:start + int(reader.lengths[i])]) == expected[i]
            except OSError:  # unreadable
                ok = False
            if not ok:
                bad.append(uid)
            progress.advance(1)
    finally:
        progress.close()
        reader.close()
    return {"path": str(path), "utterances": len(reader), "digest": reader.digest, "damaged": bad}
