"""Training data: clean + augmented items, length bucketing, collation.

An *item* is (source, row, augmentation copy): ``source`` 0 is the clean cache,
higher sources are materialised augmented sets (offline mode); ``copy >= 0``
marks an on-the-fly augmented version (online mode). Every random choice (order,
augmentation, crop) is seeded by (seed, epoch, utterance id), so an epoch is the
same whatever the worker count, and a resumed run repeats it exactly.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ser_toolkit.augmentations import AugmentContext, Augmentation, PartnerPool, utterance_seed
from ser_toolkit.cache.reader import CacheReader
from ser_toolkit.errors import SertkError


def _in_loader_worker() -> bool:
    """True in a torch DataLoader worker process (torch is then imported already)."""
    torch_data = sys.modules.get("torch.utils.data")
    return torch_data is not None and torch_data.get_worker_info() is not None


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

    def __getitem__(self, k: int) -> tuple[np.ndarray, int, dict[str, Any] | None] | SertkError:
        """Item ``k``: (features, label, log entry or None).

        In a DataLoader worker a :class:`SertkError` is *returned*, not raised: torch would re-raise it in
        the main process as a multi-line traceback; :class:`Collate` passes it on as the batch and the
        training loop raises the original.
        """
        try:
            if self.memo is not None and k in self.memo:
                return self.memo[k], int(self.readers[self.items[k][0]].labels[self.items[k][1]]), None
            wave, label, entry = self.raw(k)
            x = self.featurize(wave) if self.featurize is not None else wave
            return x, label, entry if (self.log and "params" in entry) else None
        except SertkError as exc:
            if not _in_loader_worker():
                raise
            return exc


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
    """Pads waveforms to the longest in the batch (with an attention mask) or stacks vectors.

    A batch holding a :class:`SertkError` (see :meth:`TrainItems.__getitem__`) collates to that error.
    """

    input_kind: str = "wave"
    logs: list = field(default_factory=list)

    def __call__(self, batch):
        import torch

        for item in batch:
            if isinstance(item, SertkError):
                return item
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


_MEMO: dict[tuple[str, str, int], np.ndarray] = {}
"""Features of static featurisers (e.g. acoustic statistics), by (featuriser, cache digest, row): a study
featurises each clean or materialised utterance once, however many models it trains and evaluates."""


def _featurizer_key(featurize: Callable) -> str:
    return f"{getattr(featurize, '__module__', '')}.{getattr(featurize, '__qualname__', repr(featurize))}"


def featurize_rows(featurize: Callable, reader: CacheReader, rows: Sequence[int], static: bool,
                   workers: int = 1) -> list[np.ndarray]:
    """Featurise rows of a cache (in parallel, memoised for static featurisers)."""
    key = _featurizer_key(featurize)
    path = reader.digest  # by content: a re-cached file at the same path never reuses old features
    todo = [r for r in rows if not static or (key, path, r) not in _MEMO]
    if todo:
        feats = _parallel(lambda r: featurize(reader.wave(r)), todo, workers)
        if not static:
            done = dict(zip(todo, feats))
            return [done[r] for r in rows]
        for r, f in zip(todo, feats):
            _MEMO[(key, path, r)] = f
    return [_MEMO[(key, path, r)] for r in rows]


def featurize_all(data: TrainItems, workers: int, static: bool = True) -> dict[int, np.ndarray]:
    """Featurise every item once (models with static features and no online augmentation)."""
    out: dict[int, np.ndarray] = {}
    by_reader: dict[int, list[int]] = {}
    for k, (r, _, copy) in enumerate(data.items):
        by_reader.setdefault(r, []).append(k)
    for r, ks in by_reader.items():
        if data.max_samples is None:
            feats = featurize_rows(data.featurize, data.readers[r], [data.items[k][1] for k in ks], static, workers)
        else:  # crops depend on the epoch's seed: no memo
            feats = _parallel(lambda k: data[k][0], ks, workers)
        out.update(zip(ks, feats))
    return out


_TASK: Callable | None = None


def _run_task(x):
    assert _TASK is not None
    return _TASK(x)


def _parallel(fn: Callable, xs: Sequence, workers: int) -> list:
    """``[fn(x) for x in xs]`` in forked worker processes (``fn`` is inherited, not pickled)."""
    if workers <= 1 or len(xs) < 64:
        return [fn(x) for x in xs]
    import multiprocessing as mp

    global _TASK
    _TASK = fn
    try:
        with mp.get_context("fork").Pool(workers) as pool:
            return pool.map(_run_task, xs, chunksize=16)
    except SertkError as exc:  # re-raised here with the worker's traceback as its cause: drop that
        raise exc from None
    finally:
        _TASK = None
