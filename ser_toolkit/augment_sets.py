"""Where augmentation runs: on the fly (:class:`OnlineAugmented`) or materialised into the cache.

Every random choice is seeded by (seed, utterance id, epoch or copy, method),
so the audio an utterance gets does not depend on worker count or order.

Materialised sets are cache files of the same schema (read them with
:class:`~ser_toolkit.cache.reader.CacheReader`) in ``<cache>.aug/<source digest>-<split key>/``,
so a set is never paired with a source other than the one it was computed from
(a re-cached corpus gets a new folder):

- ``test-<method>.h5`` and ``test-mixed.h5``: the augmented test sets; every
  model is evaluated on the very same audio. N-CP partners for test utterances
  come from the *training* split.
- ``train-<method>-x<k>-s<seed>.h5``: ``k`` augmented copies of every training
  utterance (the reference 1:1 protocol is ``k = 1``); N-CP uses the reference
  pairing (distinct neutral partners, each pair at most once). Runs with
  different seeds never share a file.

A set's recorded key is (source digest, split, part, method config, seed,
copies); an existing set is reused only when its key is the one asked for.

Each row's ``extra`` holds ``source`` (the clean utterance id), ``copy``,
``method`` and the sampled ``params``: the augmentation log.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ser_toolkit.atomic import atomic_path, exclusive_lock
from ser_toolkit.augmentations import AugmentContext, Augmentation, PartnerPool, Weighted, utterance_seed
from ser_toolkit.cache.reader import CacheReader
from ser_toolkit.datasets import Utterance
from ser_toolkit.errors import CacheError, SertkError


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


def build_augmentation(names: Sequence[str], options: Mapping[str, Mapping[str, Any]] | None = None,
                       weights: Mapping[str, float] | None = None) -> Augmentation:
    """One augmentation, or a :class:`Weighted` selector over several (equal weights by default)."""
    from ser_toolkit.registry import get

    options = options or {}
    methods = {n: get("augmentation", n).obj(**options.get(n, {})) for n in names}
    if len(methods) == 1 and not weights:
        return next(iter(methods.values()))
    return Weighted(methods, weights or {n: 1.0 for n in names})


def materialize(reader: CacheReader, assignment: Mapping[str, str], subset: str, name: str,
                augmentation: Augmentation, *, copies: int = 1, seed: int = 0,
                aug_config: Mapping[str, Any] | None = None, quiet: bool = True) -> tuple[Path, bool]:
    """Write the augmented set ``<subset>-<name>`` of ``reader``'s utterances in split ``subset``.

    Returns the path and whether it was (re)written; an existing set with the
    same config is reused.
    """
    import h5py

    from ser_toolkit.cache.build import table_digest
    from ser_toolkit.cache.identity import audio_checks
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
    suffix = f"-x{copies}-s{seed}" if subset != "test" else ""
    path = sets_dir(reader, assignment) / f"{subset}-{name}{suffix}.h5"
    with exclusive_lock(path.parent / ".lock"):
        if path.exists():
            try:
                existing = CacheReader(path)
                same = existing.config.get("augmentation") == config["augmentation"]
                existing.close()
                if same:
                    return path, False
            except CacheError:
                pass
        partners = None
        if getattr(augmentation, "needs_partners", False):
            partners = PartnerPool.from_split(reader, assignment, "train")
        plan = None
        if subset == "train" and name == "ncp":
            plan = plan_pairs([u.id for u in source], [u.emotion for u in source], copies,
                              np.random.default_rng(seed))
        rows: list[Utterance] = []
        lengths, clipped, digests, crcs = [], [], [], []
        progress = None
        if not quiet:
            from ser_toolkit.cache.build import _Progress

            progress = _Progress(len(indices) * copies, False, f"{subset}-{name}")
        with atomic_path(path) as tmp:
            with h5py.File(tmp, "w") as fh:
                audio = create_audio(fh, "float32")
                for i, u in zip(indices, source):
                    wave_in = reader.wave(i)
                    for k in range(copies):
                        extra = {"partner_id": plan[u.id][k]} if plan else {}
                        ctx = AugmentContext(utterance_id=u.id, emotion=u.emotion, partners=partners, extra=extra)
                        wave, params = augmentation(wave_in, utterance_seed(seed, u.id, name, k), ctx)
                        end = audio.shape[0]
                        audio.resize((end + wave.size,))
                        audio[end:] = wave
                        lengths.append(wave.size)
                        digest, crc = audio_checks(wave)
                        digests.append(digest)
                        crcs.append(crc)
                        clipped.append(int(np.count_nonzero(np.abs(wave) >= 0.999)))
                        method = params.get("method", name) if isinstance(augmentation, Weighted) else name
                        rows.append(Utterance(id=f"{u.id}#{name}{k}", path=None, emotion=u.emotion,
                                              speaker=u.speaker, corpus=u.corpus, gender=u.gender,
                                              extra={"source": u.id, "copy": k, "method": method, "params": params}))
                    if progress is not None:
                        progress.advance(copies)
                if progress is not None:
                    progress.close()
                lengths_a = np.asarray(lengths, dtype=np.int64)
                offsets = np.concatenate([[0], np.cumsum(lengths_a)[:-1]]).astype(np.int64)
                write_table(fh, rows, offsets, lengths_a, [""] * len(rows), clipped, digests, crcs)
                finish(fh, config, {"skipped": [], "ignored": {}, "table_digest": table_digest(rows)})
    return path, True
