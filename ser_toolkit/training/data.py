"""Training data: clean + augmented items, length bucketing, collation.

An *item* is (source, row, augmentation copy): ``source`` 0 is the clean cache,
higher sources are materialised augmented sets (offline mode); ``copy >= 0``
marks an on-the-fly augmented version (online mode). Every random choice (order,
augmentation, crop) is seeded by (seed, epoch, utterance id), so an epoch is the
same whatever the worker count, and a resumed run repeats it exactly.

One DataLoader serves a whole run (:func:`train_loader`): persistent workers, and
an :class:`EpochBatches` sampler whose indices carry their epoch. With a budget of
audio seconds (``batch_seconds``) an epoch's batches are formed on the lengths its
items will have (:meth:`TrainItems.epoch_lengths`: augmentation plans sampled
first, output lengths computed from them, crops applied), and the workers then
render those very plans.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

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
        """Samples of each item's stored audio (before augmentation and crops)."""
        return np.array([self.readers[r].lengths[i] for r, i, _ in self.items], dtype=np.int64)

    def _context(self, k: int) -> AugmentContext:
        r, i, _ = self.items[k]
        reader = self.readers[r]
        return AugmentContext(utterance_id=reader.ids[i], emotion=reader.utterance(i).emotion,
                              partners=self.partners)

    def plan(self, k: int, epoch: int | None = None) -> dict[str, Any] | None:
        """The augmentation plan of item ``k`` in ``epoch`` (None if not augmented on the fly).

        Seeded by (seed, utterance id, epoch, copy), as the one-step call was: any process gets the same plan.
        """
        r, i, copy = self.items[k]
        if copy < 0 or self.augmentation is None:
            return None
        reader = self.readers[r]
        rng = utterance_seed(self.seed, reader.ids[i], "online", self.epoch if epoch is None else epoch, copy)
        return self.augmentation.plan(int(reader.lengths[i]), rng, self._context(k))

    def epoch_lengths(self, epoch: int) -> np.ndarray:
        """Samples each item will have in ``epoch``: after its online augmentation and the ``max_samples`` crop.

        Lengths come from the epoch's plans (:meth:`plan`) without processing audio; an augmentation that
        cannot tell its output length (a one-step plugin, no ``randomize``/``keeps_length``) is rendered
        here to learn it, in this process (slow: worth avoiding for large sets).
        """
        out = self.lengths()
        aug = self.augmentation
        if aug is not None and not aug.keeps_length:
            for k, (r, i, copy) in enumerate(self.items):
                if copy < 0 or (self.memo is not None and k in self.memo):
                    continue
                plan = self.plan(k, epoch)
                n = aug.planned_length(int(out[k]), plan)
                if n is None:
                    n = aug.render(self.readers[r].wave(i), plan, self._context(k))[0].size
                out[k] = n
            if self.partners is not None:
                self.partners.drawn.clear()
        if self.max_samples is not None:
            out = np.minimum(out, self.max_samples)
        return out

    def labels(self) -> np.ndarray:
        return np.array([self.readers[r].labels[i] for r, i, _ in self.items], dtype=np.int64)

    def raw(self, k: int, epoch: int | None = None) -> tuple[np.ndarray, int, dict[str, Any]]:
        """Item ``k`` of ``epoch`` (default: :attr:`epoch`) before featurisation: (wave, label, log entry).

        An online augmentation renders the item's :meth:`plan`: the one-step call's very audio, of the length
        :meth:`epoch_lengths` predicted.
        """
        epoch = self.epoch if epoch is None else epoch
        r, i, copy = self.items[k]
        reader = self.readers[r]
        uid = reader.ids[i]
        wave = reader.wave(i)
        entry: dict[str, Any] = {"id": uid, "epoch": epoch}
        if r > 0:
            entry["set"] = reader.path.stem
        if copy >= 0 and self.augmentation is not None:
            if self.partners is not None:
                self.partners.drawn.clear()  # nothing reads it here: bounded over a run
            wave, params = self.augmentation.render(wave, self.plan(k, epoch), self._context(k))
            entry.update(copy=copy, params=params)
        if self.max_samples is not None and wave.size > self.max_samples:
            rng = utterance_seed(self.seed, uid, "crop", epoch, copy)
            start = int(rng.integers(0, wave.size - self.max_samples + 1))
            wave = wave[start:start + self.max_samples]
            entry["crop_start"] = start
        return wave, int(reader.labels[i]), entry

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[np.ndarray, int, dict[str, Any] | None] | SertkError:
        """Item ``k`` or ``(epoch, k)`` (what :class:`EpochBatches` yields): (features, label, log entry or None).

        In a DataLoader worker a :class:`SertkError` is *returned*, not raised: torch would re-raise it in
        the main process as a multi-line traceback; :class:`Collate` passes it on as the batch and the
        training loop raises the original.
        """
        epoch, k = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (self.epoch, key)
        try:
            if self.memo is not None and k in self.memo:
                return self.memo[k], int(self.readers[self.items[k][0]].labels[self.items[k][1]]), None
            wave, label, entry = self.raw(k, epoch)
            x = self.featurize(wave) if self.featurize is not None else wave
            return x, label, entry if (self.log and "params" in entry) else None
        except SertkError as exc:
            if not _in_loader_worker():
                raise
            return exc


def bucket_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, bucket: bool = True,
                   rank: int = 0, world: int = 1, chunk: int = 50, budget: int | None = None) -> list[list[int]]:
    """Batches of similar lengths, in a seeded random order (the same on every rank).

    Indices are shuffled, cut into chunks of ``chunk`` batches, sorted by
    length within each chunk and cut into batches; the batches are shuffled. With
    ``budget`` (samples) a batch takes items in that order while its padded size
    (longest × count) stays within the budget, at most ``batch_size`` of them (an
    item longer than the budget gets a batch of its own); without, every batch
    has ``batch_size`` items. With ``world > 1`` rank ``r`` gets batches
    ``r, r + world, ...``, truncated so every rank takes the same number of steps.
    """
    rng = np.random.default_rng([seed, epoch, 7919])
    order = rng.permutation(len(lengths))
    lengths = np.asarray(lengths, dtype=np.int64)
    batches: list[list[int]] = []
    per_batch = batch_size
    if budget is not None and len(lengths):
        per_batch = max(1, min(batch_size, int(budget // max(1.0, float(lengths.mean())))))
    step = max(1, per_batch * chunk if bucket else len(order))
    for start in range(0, len(order), step):
        part = order[start:start + step]
        if bucket:
            part = part[np.argsort(lengths[part], kind="stable")]
        if budget is None:
            batches += [part[i:i + batch_size].tolist() for i in range(0, len(part), batch_size)]
        else:
            batches += _fill(part, lengths, budget, batch_size)
    batches = [batches[i] for i in rng.permutation(len(batches))]
    if world > 1:
        usable = len(batches) // world * world
        batches = batches[:usable][rank::world]
    return batches


def _fill(part: np.ndarray, lengths: np.ndarray, budget: int, cap: int) -> list[list[int]]:
    """``part`` cut in order into batches of padded size (longest × count) <= ``budget``, count <= ``cap``."""
    batches: list[list[int]] = []
    batch: list[int] = []
    longest = 0
    for k in part.tolist():
        n = int(lengths[k])
        if batch and (len(batch) >= cap or (len(batch) + 1) * max(longest, n) > budget):
            batches.append(batch)
            batch, longest = [], 0
        batch.append(k)
        longest = max(longest, n)
    if batch:
        batches.append(batch)
    return batches


def padding_efficiency(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Real samples / padded samples (each batch padded to its longest item) over ``batches``."""
    lengths = np.asarray(lengths, dtype=np.int64)
    real = sum(int(lengths[b].sum()) for b in batches if len(b))
    padded = sum(int(lengths[b].max()) * len(b) for b in batches if len(b))
    return real / padded if padded else 1.0


class EpochBatches:
    """The batch sampler of a whole run: :meth:`set_epoch` forms that epoch's batches.

    It yields lists of ``(epoch, item)``: a persistent worker's copy of the dataset
    then augments for the epoch the batch belongs to. With ``batch_seconds`` the
    batches are formed on :meth:`TrainItems.epoch_lengths`; without, on the stored
    lengths (fixed ``batch_size`` batches, as before ``batch_seconds`` existed).
    """

    def __init__(self, data: TrainItems, batch_size: int, seed: int, bucket: bool = True, rank: int = 0,
                 world: int = 1, batch_seconds: float | None = None, sample_rate: int = 16000) -> None:
        self.data, self.batch_size, self.seed, self.bucket = data, batch_size, seed, bucket
        self.rank, self.world = rank, world
        self.budget = None if batch_seconds is None else max(1, int(round(batch_seconds * sample_rate)))
        self.epoch = 0
        self._formed: tuple[np.ndarray, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._formed = epoch, None

    def _form(self) -> tuple[np.ndarray, list[list[int]]]:
        if self._formed is None:
            lengths = self.data.lengths() if self.budget is None else self.data.epoch_lengths(self.epoch)
            self._formed = lengths, bucket_batches(lengths, self.batch_size, self.seed, self.epoch, self.bucket,
                                                   self.rank, self.world, budget=self.budget)
        return self._formed

    @property
    def lengths(self) -> np.ndarray:
        """The item lengths this epoch's batches are formed on."""
        return self._form()[0]

    @property
    def batches(self) -> list[list[int]]:
        """This epoch's batches (of this rank) as item indices."""
        return self._form()[1]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.epoch
        for batch in self.batches:
            yield [(epoch, k) for k in batch]

    def __len__(self) -> int:
        return len(self.batches)


def loader_context() -> str:
    """Start method of loader workers: ``forkserver`` once CUDA is initialised (a forked CUDA context is
    unusable and unsafe), else ``fork`` (no pickling, nothing re-imported: cheapest), ``spawn`` without fork."""
    import multiprocessing as mp

    import torch

    methods = mp.get_all_start_methods()
    if torch.cuda.is_initialized() or "fork" not in methods:
        if "forkserver" in methods:  # workers forked from a server that imported these once per process
            mp.set_forkserver_preload(FORKSERVER_PRELOAD)
            return "forkserver"
        return "spawn"
    return "fork"


FORKSERVER_PRELOAD = ["torch", "ser_toolkit.training.data", "ser_toolkit.cache.reader", "ser_toolkit.augmentations"]
"""Modules the fork server imports before it forks loader workers: every run of a process after the first
starts its workers without importing torch again (seconds each)."""


def loader_worker_init(worker_id: int) -> None:
    """A loader worker leaves SIGINT and SIGTERM to the training process, which stops at the next step and
    writes its checkpoint (the worker ends with it)."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def train_loader(data: TrainItems, sampler: EpochBatches, collate: "Collate", workers: int,
                 pin_memory: bool = False):
    """The run's one DataLoader: ``workers`` persistent processes (started on the first epoch, kept to the end).

    It has a generator of its own: starting an epoch never draws from torch's global one (which the loop seeds
    per epoch for dropout), so a run is the same with any worker count.
    """
    import torch

    return torch.utils.data.DataLoader(data, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                                       pin_memory=pin_memory, persistent_workers=workers > 0,
                                       multiprocessing_context=loader_context() if workers > 0 else None,
                                       worker_init_fn=loader_worker_init if workers > 0 else None,
                                       generator=torch.Generator().manual_seed(0))


def close_loader(loader: Any) -> None:
    """Stop a loader's persistent workers now (else they live until the loader is garbage-collected)."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    if loader is not None:
        loader._iterator = None


@dataclass
class Collate:
    """Pads waveforms to the longest in the batch (with an attention mask) or stacks vectors.

    ``pad_to``: pad the length further, up to a multiple of this many samples (``--compile``: a few fixed
    lengths, one compiled graph each, instead of a recompilation per batch). A batch holding a
    :class:`SertkError` (see :meth:`TrainItems.__getitem__`) collates to that error.
    """

    input_kind: str = "wave"
    logs: list = field(default_factory=list)
    pad_to: int | None = None

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
        if self.pad_to:
            n = -(-n // self.pad_to) * self.pad_to
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
