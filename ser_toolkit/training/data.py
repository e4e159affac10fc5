"""Training data: clean + augmented items, length bucketing, collation.

An *item* is (source, row, augmentation copy): ``source`` 0 is the clean cache,
higher sources are materialised augmented sets (offline mode); ``copy >= 0``
marks an on-the-fly augmented version (online mode). Every random choice (order,
augmentation, crop) is seeded by (seed, epoch, utterance id), so an epoch is the
same whatever the worker count, and a resumed run repeats it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ser_toolkit.augmentations import AugmentContext, Augmentation, PartnerPool, utterance_seed
from ser_toolkit.cache.reader import CacheReader


@dataclass
class TrainItems:
    """The training set: which rows of which readers, and how each is augmented."""

    readers: list[CacheReader]
    items: list[tuple[int, int, int]]  # (reader, row, online copy or -1)
    augmentation: Augmentation | None = None
    partners: PartnerPool | None = None
    featurize: Callable[[np.ndarray], np.ndarray] | None = None
    max_samples: int | None = None
    seed: int = 0
    epoch: int = 0
    memo: dict[int, np.ndarray] | None = None
    log: bool = True

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def lengths(self) -> np.ndarray:
        return np.array([self.readers[r].lengths[i] for r, i, _ in self.items], dtype=np.int64)

    def labels(self) -> np.ndarray:
        return np.array([self.readers[r].labels[i] for r, i, _ in self.items], dtype=np.int64)

    def raw(self, k: int) -> tuple[np.ndarray, int, dict[str, Any]]:
        """Item ``k`` before featurisation: (wave, label, log entry)."""
        r, i, copy = self.items[k]
        reader = self.readers[r]
        uid = reader.ids[i]
        wave = reader.wave(i)
        entry: dict[str, Any] = {"id": uid, "epoch": self.epoch}
        if r > 0:
            entry["set"] = reader.path.stem
        if copy >= 0 and self.augmentation is not None:
            u = reader.utterance(i)
            rng = utterance_seed(self.seed, uid, "online", self.epoch, copy)
            wave, params = self.augmentation(wave, rng, AugmentContext(utterance_id=uid, emotion=u.emotion,
                                                                        partners=self.partners))
            entry.update(copy=copy, params=params)
        if self.max_samples is not None and wave.size > self.max_samples:
            rng = utterance_seed(self.seed, uid, "crop", self.epoch, copy)
            start = int(rng.integers(0, wave.size - self.max_samples + 1))
            wave = wave[start:start + self.max_samples]
            entry["crop_start"] = start
        return wave, int(reader.labels[i]), entry

    def __getitem__(self, k: int) -> tuple[np.ndarray, int, dict[str, Any] | None]:
        if self.memo is not None and k in self.memo:
            return self.memo[k], int(self.readers[self.items[k][0]].labels[self.items[k][1]]), None
        wave, label, entry = self.raw(k)
        x = self.featurize(wave) if self.featurize is not None else wave
        return x, label, entry if (self.log and "params" in entry) else None


def bucket_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, bucket: bool = True,
                   rank: int = 0, world: int = 1, chunk: int = 50) -> list[list[int]]:
    """Batches of similar lengths, in a seeded random order (the same on every rank).

    Indices are shuffled, cut into chunks of ``chunk`` batches, sorted by
    length within each chunk and cut into batches; the batches are shuffled. With
    ``world > 1`` rank ``r`` gets batches ``r, r + world, ...``, truncated so every
    rank takes the same number of steps.
    """
    rng = np.random.default_rng([seed, epoch, 7919])
    order = rng.permutation(len(lengths))
    lengths = np.asarray(lengths)
    batches: list[list[int]] = []
    step = batch_size * chunk if bucket else len(order)
    for start in range(0, len(order), step):
        part = order[start:start + step]
        if bucket:
            part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[i:i + batch_size].tolist() for i in range(0, len(part), batch_size)]
    batches = [batches[i] for i in rng.permutation(len(batches))]
    if world > 1:
        usable = len(batches) // world * world
        batches = batches[:usable][rank::world]
    return batches


@dataclass
class Collate:
    """Pads waveforms to the longest in the batch (with an attention mask) or stacks vectors."""

    input_kind: str = "wave"
    logs: list = field(default_factory=list)

    def __call__(self, batch):
        import torch

        xs, ys, entries = zip(*batch)
        labels = torch.as_tensor(ys, dtype=torch.long)
        if self.input_kind == "vector":
            return torch.as_tensor(np.stack(xs)), None, labels, [e for e in entries if e]
        n = max(x.size for x in xs)
        inputs = torch.zeros(len(xs), n, dtype=torch.float32)
        mask = torch.zeros(len(xs), n, dtype=torch.long)
        for j, x in enumerate(xs):
            inputs[j, :x.size] = torch.from_numpy(np.ascontiguousarray(x))
            mask[j, :x.size] = 1
        return inputs, mask, labels, [e for e in entries if e]


def featurize_all(data: TrainItems, workers: int) -> dict[int, np.ndarray]:
    """Featurise every item once (for models with static features and no online augmentation)."""
    if workers <= 1 or len(data) < 64:
        return {k: data[k][0] for k in range(len(data))}
    import multiprocessing as mp

    global _SHARED
    _SHARED = data  # inherited by the forked workers, not pickled
    try:
        with mp.get_context("fork").Pool(workers) as pool:
            feats = pool.map(_featurize_one, range(len(data)), chunksize=32)
    finally:
        _SHARED = None
    return dict(enumerate(feats))


_SHARED: TrainItems | None = None


def _featurize_one(k: int) -> np.ndarray:
    assert _SHARED is not None
    return _SHARED[k][0]
