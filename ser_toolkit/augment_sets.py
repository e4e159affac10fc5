"""Where augmentation runs: on the fly (:class:`OnlineAugmented`) or materialised into the cache.

Every random choice is seeded by (seed, utterance id, epoch or copy, method),
so the audio an utterance gets does not depend on worker count or order.

Materialised sets are cache files of the same schema (read them with
:class:`~ser_toolkit.cache.reader.CacheReader`) in ``<cache>.aug/<source digest>-<split key>/``,
so a set is never paired with a source other than the one it was computed from
(a re-cached corpus gets a new folder):

- ``test-<method>.h5`` and ``test-mixed.h5`` (and ``valid-…`` for a study's
  validation part): the augmented held-out sets; every model is evaluated on the
  very same audio. Partners (N-CP) of a held-out utterance come from the same
  held-out part only, never from training audio; a part without the partners a
  method needs skips that method with a warning.
- ``train-<method>-x<k>-s<seed>.h5``: ``k`` augmented copies of every training
  utterance (the reference 1:1 protocol is ``k = 1``); N-CP uses the reference
  pairing (distinct neutral partners, each pair at most once). Runs with
  different seeds never share a file.

A set's recorded key is (source digest, split, part, method config, seed,
copies); an existing set is reused only when its key is the one asked for.

Mixtures (a :class:`~ser_toolkit.augmentations.Weighted` set: Top-k, the
held-out ``mixed``) use common random numbers: copy ``k`` of an utterance first
draws its method ``m`` (seeded by the set's name), then applies ``m`` with the
very generator (and, for N-CP in training sets, the very partner) that the
single-method set ``m`` of the same seed uses. So a mixture's copy equals the
single-method copy it picked, sample for sample: comparisons between a Top-k
model and its single-method models are paired on the same augmented audio, and
the feature cache computes those copies once (features are keyed by audio
digest, :mod:`ser_toolkit.cache.features`). Recorded as ``draws = "per-method"``.
When that single-method set already exists (same source, split, part, seed,
copies and method options) its rows are read instead of computed again: each
read is CRC-checked like any cache read.

Each row's ``extra`` holds ``source`` (the clean utterance id), ``partners``
(the ids of every partner utterance mixed in), ``copy``, ``method`` and the
sampled ``params``: the augmentation log.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ser_toolkit.atomic import atomic_path, exclusive_lock, remove_stale_tmp
from ser_toolkit.augmentations import AugmentContext, Augmentation, PartnerPool, Weighted, utterance_seed
from ser_toolkit.cache.reader import CacheReader
from ser_toolkit.datasets import Utterance
from ser_toolkit.errors import CacheError, SertkError
from ser_toolkit.space import new_h5


def split_key(assignment: Mapping[str, str]) -> str:
    """A short stable key for a split assignment (names the folder of its augmented sets)."""
    blob = json.dumps(sorted(assignment.items())).encode()
    return "split-" + hashlib.sha1(blob).hexdigest()[:10]


def sets_dir(reader: CacheReader, assignment: Mapping[str, str]) -> Path:
    """The folder of the augmented sets of ``reader``'s data under one split."""
    from ser_toolkit.cache.identity import short

    return reader.path.with_name(reader.path.stem + ".aug") / f"{short(reader.digest)}-{split_key(assignment)}"


@dataclass
class OnlineAugmented:
    """Training items augmented on the fly: new parameters every epoch, reproducible by seed.

    ``item(i)`` returns ``(wave, emotion_index, log)`` for the ``i``-th of
    ``indices``; call :meth:`set_epoch` at the start of each epoch (in every
    worker, as with a distributed sampler). Pickles for DataLoader workers.
    """

    reader: CacheReader
    indices: Sequence[int]
    augmentation: Augmentation
    seed: int = 0
    partners: PartnerPool | None = None
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def item(self, i: int) -> tuple[np.ndarray, int, dict[str, Any]]:
        idx = int(self.indices[i])
        u = self.reader.utterance(idx)
        rng = utterance_seed(self.seed, u.id, "online", self.epoch)
        wave, params = self.augmentation(self.reader.wave(idx), rng,
                                         AugmentContext(utterance_id=u.id, emotion=u.emotion, partners=self.partners))
        return wave, int(self.reader.labels[idx]), {"id": u.id, "epoch": self.epoch, "params": params}


class PartnersUnavailable(SertkError):
    """A held-out part lacks the partner utterances an augmentation needs (the set is skipped, never filled
    from training audio)."""


def missing_partners(reader: CacheReader, assignment: Mapping[str, str], subset: str,
                     augmentation: Augmentation) -> str | None:
    """Why ``augmentation`` cannot be applied to every utterance of part ``subset`` with partners from that
    part only (None if it can)."""
    if not getattr(augmentation, "needs_partners", False):
        return None
    pool = PartnerPool.from_split(reader, assignment, subset)
    for uid in pool.ids:
        for emotion in augmentation.partner_emotions:
            if not pool.candidates(emotion, exclude=uid):
                return (f"the {subset} part has no {emotion} partner for {uid!r} other than itself "
                        "(partners are drawn from the same part only)")
    return None


def build_augmentation(names: Sequence[str], options: Mapping[str, Mapping[str, Any]] | None = None,
                       weights: Mapping[str, float] | None = None) -> Augmentation:
    """One augmentation, or a :class:`Weighted` selector over several (equal weights by default)."""
    from ser_toolkit.registry import get

    options = options or {}
    methods = {n: get("augmentation", n).obj(**options.get(n, {})) for n in names}
    if len(methods) == 1 and not weights:
        return next(iter(methods.values()))
    return Weighted(methods, weights or {n: 1.0 for n in names})


def materialize_heldout(reader: CacheReader, assignment: Mapping[str, str], subset: str, methods: Sequence[str],
                        options: Mapping[str, Mapping[str, Any]], *, seed: int = 0, log=print,
                        quiet: bool = True) -> dict[str, tuple[Path, bool]]:
    """The augmented versions of held-out part ``subset``: one set per method, plus ``mixed`` (equal weights
    over the methods that apply) when there are several; returns name -> (path, written).

    A method whose partners the part lacks is skipped with a one-line warning (``log``).
    """
    out: dict[str, tuple[Path, bool]] = {}
    usable = []
    for m in methods:
        aug = build_augmentation([m], options)
        try:
            out[m] = materialize(reader, assignment, subset, m, aug, seed=seed,
                                 aug_config={"methods": {m: dict(options.get(m, {}))}}, quiet=quiet)
            usable.append(m)
        except PartnersUnavailable as exc:
            log(f"warning: {exc}")
    if len(usable) > 1:
        out["mixed"] = materialize(reader, assignment, subset, "mixed", build_augmentation(usable, options),
                                   seed=seed, aug_config={"methods": {m: dict(options.get(m, {})) for m in usable},
                                                          "weights": "equal"}, quiet=quiet)
    return out


@dataclass
class _Job:
    """What computing one utterance's augmented copies needs (sent once to each worker)."""

    reader: CacheReader
    augmentation: Augmentation
    partners: PartnerPool | None
    plan: dict[str, list[str]] | None
    seed: int
    name: str
    copies: int
    donors: dict[str, tuple[CacheReader, dict[str, int], list[str], list[str]]] | None = None
    """method -> (its single-method set, row by id, extra and audio digest columns): a mixture's copies are
    read, not recomputed."""


def _single_method_sets(folder: Path, subset: str, suffix: str, key: Mapping[str, Any], mixture: Weighted
                        ) -> dict[str, tuple[CacheReader, dict[str, int], list[str], list[str]]]:
    """The existing single-method sets whose copies a mixture's copies equal (common random numbers)."""
    found: dict[str, tuple[CacheReader, dict[str, int], list[str], list[str]]] = {}
    for method, aug in mixture.methods.items():
        path = folder / f"{subset}-{method}{suffix}.h5"
        if not path.is_file():
            continue
        try:
            single = CacheReader(path)
        except CacheError:
            continue
        recorded = single.config.get("augmentation") or {}
        cfg = recorded.get("config") or {}
        options = (cfg.get("options") or {}).get(method) if "plugins" in cfg else (cfg.get("methods") or {}).get(method)
        try:
            same_options = build_augmentation([method], {method: options or {}}).options == aug.options
        except SertkError:
            same_options = False
        if (recorded.get("name") == method and same_options and "draws" not in recorded
                and (cfg.get("plugins") in (None, [method])) and not cfg.get("weights")
                and all(recorded.get(k) == key[k] for k in ("subset", "split", "source_digest", "seed", "copies"))):
            found[method] = (single, {uid: i for i, uid in enumerate(single.ids)}, single.column("extra"),
                             single.column("audio_digest"))
        else:
            single.close()
    return found


def _copies(job: _Job, i: int, u: Utterance) -> list[tuple[np.ndarray, dict, list[str], str, str, int]]:
    """(wave, params, partners used, method, audio digest, crc) of each augmented copy of utterance ``u``."""
    from ser_toolkit.cache.identity import audio_checks

    wave_in = None  # read only when some copy is computed here
    partners, out = job.partners, []
    for k in range(job.copies):
        if isinstance(job.augmentation, Weighted):  # the method, then exactly the single-method draw (module doc)
            method = job.augmentation.pick(utterance_seed(job.seed, u.id, job.name, k))
            apply = job.augmentation.methods[method]
        else:
            method, apply = job.name, job.augmentation
        donor = (job.donors or {}).get(method)
        row = donor[1].get(f"{u.id}#{method}{k}") if donor else None
        if row is not None:  # the single-method set's copy, which this one equals (its CRC checked on read)
            info = json.loads(donor[2][row])
            out.append((donor[0].wave(row), info["params"], info["partners"], method, donor[3][row],
                        donor[0].crc(row)))
            continue
        if wave_in is None:
            wave_in = job.reader.wave(i)
        extra = {"partner_id": job.plan[u.id][k]} if job.plan and method == "ncp" else {}
        ctx = AugmentContext(utterance_id=u.id, emotion=u.emotion, partners=partners, extra=extra)
        if partners is not None:
            partners.drawn.clear()
        wave, params = apply(wave_in, utterance_seed(job.seed, u.id, method, k), ctx)
        used = sorted(set(partners.drawn) | ({extra["partner_id"]} if extra else set())) \
            if partners is not None else []
        out.append((wave, params, used, method, *audio_checks(wave)))
    return out


def _worker_copies(chunk: list[tuple[int, Utterance]]) -> list[list[tuple]]:
    from ser_toolkit.workers import state

    return [_copies(state("job"), i, u) for i, u in chunk]


CHUNK = 16
"""Utterances per worker task when a set is materialised in parallel."""


def _augmented(job: _Job, todo: list[tuple[int, Utterance]], workers: int | None):
    """Each utterance's copies (:func:`_copies`), in order; in worker processes when there are enough."""
    import os
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    from ser_toolkit.workers import default_workers, start_worker

    workers = default_workers() if workers is None else max(1, int(workers))
    methods = set(job.augmentation.methods) if isinstance(job.augmentation, Weighted) else {job.name}
    if workers <= 1 or len(todo) <= CHUNK or methods <= set(job.donors or {}):  # reading is faster than forking
        for i, u in todo:
            yield _copies(job, i, u)
        return
    # Warm-up in this process: the first utterances are computed here until every method has run once (at
    # most a chunk), so forked workers inherit its lazy imports and JIT compilation (3.5 s per process for
    # timestretch, 2.4 s for specaugment) instead of each paying them again.
    methods -= set(job.donors or {})
    done = 0
    while done < min(CHUNK, len(todo)) and methods:
        result = _copies(job, *todo[done])
        methods -= {r[3] for r in result}
        done += 1
        yield result
    chunks = [todo[k:k + CHUNK] for k in range(done, len(todo), CHUNK)]
    if not chunks:
        return
    pool = ProcessPoolExecutor(max_workers=min(workers, len(chunks)),
                               initializer=partial(start_worker, os.getpid(), job=job))
    try:
        pending: deque = deque()
        for chunk in chunks:  # a bounded number of chunks in flight, consumed in order
            pending.append(pool.submit(_worker_copies, chunk))
            if len(pending) >= 2 * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
    finally:  # on an error or Ctrl-C: drop queued chunks; nothing half-written is ever renamed
        pool.shutdown(wait=True, cancel_futures=True)


def materialize(reader: CacheReader, assignment: Mapping[str, str], subset: str, name: str,
                augmentation: Augmentation, *, copies: int = 1, seed: int = 0,
                aug_config: Mapping[str, Any] | None = None, quiet: bool = True,
                workers: int | None = None) -> tuple[Path, bool]:
    """Write the augmented set ``<subset>-<name>`` of ``reader``'s utterances in split ``subset``.

    Returns the path and whether it was (re)written; an existing set with the
    same config is reused. The audio is computed in ``workers`` processes (the
    CPUs by default) and written in order by this one: every draw is seeded per
    utterance, so the set is the same for any worker count.
    """

    from ser_toolkit.cache.build import table_digest
    from ser_toolkit.cache.writer import create_audio, finish, write_table
    from ser_toolkit.plugins.ncp import plan_pairs

    if subset not in set(assignment.values()):
        raise SertkError(f"the split has no '{subset}' part", f"parts: {', '.join(sorted(set(assignment.values())))}")
    indices = [i for i, uid in enumerate(reader.ids) if assignment.get(uid) == subset]
    source = [reader.utterance(i) for i in indices]
    config = {
        "preprocess": {**reader.config["preprocess"], "dtype": "float32"},
        "dataset": {**reader.config["dataset"], "augmented_set": f"{subset}-{name}"},
        "augmentation": {"name": name, "config": dict(aug_config or {}), "copies": copies, "seed": seed,
                         "subset": subset, "split": split_key(assignment),
                         "source_cache": str(reader.path), "source_digest": reader.digest},
    }
    mixture = isinstance(augmentation, Weighted)
    if mixture:
        config["augmentation"]["draws"] = "per-method"  # common random numbers with the single-method sets
    suffix = f"-x{copies}-s{seed}" if subset == "train" else ""
    path = sets_dir(reader, assignment) / f"{subset}-{name}{suffix}.h5"
    with exclusive_lock(path.parent / ".lock"):
        remove_stale_tmp(path.parent, "*")  # what killed writers of this folder left (and reserved)
        if path.exists():
            try:
                from ser_toolkit.cache.build import verify_cache

                existing = CacheReader(path)
                same = existing.config.get("augmentation") == config["augmentation"]
                existing.close()
                if same and not verify_cache(path)["damaged"]:  # a damaged set is written again
                    return path, False
            except CacheError:
                pass
        partners = None
        if getattr(augmentation, "needs_partners", False):
            why = missing_partners(reader, assignment, subset, augmentation)
            if why is not None and subset != "train":
                raise PartnersUnavailable(f"augmented set {subset}-{name} skipped: {why}",
                                          "held-out sets are never filled with training audio")
            partners = PartnerPool.from_split(reader, assignment, subset)  # never training audio in held-out sets
        plan = None
        if subset == "train" and (name == "ncp" or (mixture and "ncp" in augmentation.methods)):
            plan = plan_pairs([u.id for u in source], [u.emotion for u in source], copies,
                              np.random.default_rng(seed))
        rows: list[Utterance] = []
        lengths, clipped, digests, crcs = [], [], [], []
        progress = None
        if not quiet:
            from ser_toolkit.cache.build import _Progress

            progress = _Progress(len(indices) * copies, False, f"{subset}-{name}")
        donors = _single_method_sets(path.parent, subset, suffix, config["augmentation"], augmentation) \
            if mixture else None
        job = _Job(reader, augmentation, partners, plan, seed, name, copies, donors)
        try:
            with atomic_path(path) as tmp:
                growth = 1.0 if getattr(augmentation, "keeps_length", False) else 1.3  # time-stretch lengthens
                size = int(reader.lengths[indices].sum() * copies * 4 * growth) + 512 * len(indices) * copies
                with new_h5(tmp, size, f"augmented set {path.name}") as fh:
                    audio = create_audio(fh, "float32")
                    pending: list[np.ndarray] = []  # written in blocks: one resize per block, not per row

                    def flush() -> None:
                        if pending:
                            block = np.concatenate(pending)
                            end = audio.shape[0]
                            audio.resize((end + block.size,))
                            audio[end:] = block
                            pending.clear()

                    for u, results in zip(source, _augmented(job, list(zip(indices, source)), workers)):
                        for k, (wave, params, used, method, digest, crc) in enumerate(results):
                            pending.append(np.asarray(wave, dtype=np.float32))
                            if len(pending) >= 64:
                                flush()
                            lengths.append(wave.size)
                            digests.append(digest)
                            crcs.append(crc)
                            clipped.append(int(np.count_nonzero(np.abs(wave) >= 0.999)))
                            rows.append(Utterance(id=f"{u.id}#{name}{k}", path=None, emotion=u.emotion,
                                                  speaker=u.speaker, corpus=u.corpus, gender=u.gender,
                                                  extra={"source": u.id, "partners": used, "copy": k, "method": method,
                                                         "params": params}))
                        if progress is not None:
                            progress.advance(copies)
                    flush()
                    if progress is not None:
                        progress.close()
                    lengths_a = np.asarray(lengths, dtype=np.int64)
                    offsets = np.concatenate([[0], np.cumsum(lengths_a)[:-1]]).astype(np.int64)
                    write_table(fh, rows, offsets, lengths_a, [""] * len(rows), clipped, digests, crcs)
                    finish(fh, config, {"skipped": [], "ignored": {}, "table_digest": table_digest(rows)})
        finally:
            for donor in (donors or {}).values():
                donor[0].close()
    return path, True
