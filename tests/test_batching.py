"""Duration batching, augmentation plans and the run's one persistent loader (issue 12)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import shared_data_dir, synthetic_cache
from ser_toolkit.augmentations import AugmentContext, Augmentation, PartnerPool, Weighted, utterance_seed
from ser_toolkit.emotions import EMOTIONS
from ser_toolkit.errors import PluginError
from ser_toolkit.params import Param
from ser_toolkit.plugins.timestretch import TimeStretch
from ser_toolkit.testing import check_augmentation, conformance_pool, speechlike
from ser_toolkit.training.data import EpochBatches, TrainItems, bucket_batches, padding_efficiency

RATE = 16000
BUILTINS = ("timestretch", "noise", "specaugment", "ncp", "duplicate")


def builtin(name: str, **options) -> Augmentation:
    from ser_toolkit.registry import get

    return get("augmentation", name).obj(**options)


def mixture() -> Weighted:
    return Weighted({n: builtin(n) for n in BUILTINS}, {n: 1.0 for n in BUILTINS})


class Echo(Augmentation):
    """A third-party plugin of the old, one-step contract: ``apply`` only, and it changes the length."""

    name = "echo"
    description = "the input followed by a random share of itself (a one-step test plugin)"
    params = (Param("most", 0.5, "largest share repeated", type="float", min=0.0, max=1.0),)

    def apply(self, wave, rng, context=None):
        share = float(rng.uniform(0, self.options["most"]))
        return np.concatenate([wave, wave[:int(share * wave.size)]]), {"share": share}


class Stutter(TimeStretch):
    """A subclass that overrides only ``apply`` of a two-step parent: it is one-step again."""

    name = "stutter"
    stochastic = False

    def apply(self, wave, rng, context=None):
        return np.concatenate([wave, wave]), {}


class Liar(Augmentation):
    """A two-step plugin whose output_length is wrong: caught where the audio is rendered."""

    name = "liar"
    description = "doubles its input but says it keeps the length"
    stochastic = False

    def randomize(self, n, rng, context=None):
        return {}

    def apply_params(self, wave, plan, context=None):
        return np.concatenate([wave, wave]), {}


# --- the two-step contract --------------------------------------------------------------------------------------

def _context(uid: str = "happy_0", emotion: str = "happy") -> AugmentContext:
    return AugmentContext(utterance_id=uid, emotion=emotion, partners=conformance_pool())


@pytest.mark.parametrize("aug", [*(builtin(n) for n in BUILTINS), builtin("timestretch", rate_range=[0.5, 2.0]),
                                 builtin("ncp", mode="concat"), builtin("noise", snr_db=5.0),
                                 builtin("specaugment", time_warp=5, scale="linear"), mixture(), Echo(),
                                 Weighted({"ts": builtin("timestretch"), "echo": Echo()}, {"ts": 1, "echo": 1})],
                         ids=lambda a: repr(a)[:40])
def test_plan_then_render_is_the_one_step_call(aug):
    """Same wave, params and length as ``aug(wave, rng, ctx)``; the length is known before any audio is processed."""
    for seconds, seed in ((0.01, 0), (0.2, 1), (1.3, 2), (2.1, 3), (2.1, 4)):
        x = speechlike(seconds, seed)
        ref, ref_params = aug(x, np.random.default_rng(seed), _context())
        plan = aug.plan(x.size, np.random.default_rng(seed), _context())
        length = aug.planned_length(x.size, plan)
        out, params = aug.render(x, plan, _context())
        assert np.array_equal(out, ref) and params == ref_params and json.dumps(params) == json.dumps(ref_params)
        one_step = isinstance(aug, Echo) or (isinstance(aug, Weighted) and params["method"] == "echo")
        assert length == (None if one_step else ref.size)


def test_one_step_plugins_keep_working():
    """Old-contract plugins: conformance passes, the plan defers the draws, the length is unknown until rendered."""
    check_augmentation(Echo)
    check_augmentation(Stutter)
    assert not Echo.two_step() and not Stutter.two_step()
    assert all(builtin(n).two_step() for n in BUILTINS) and mixture().two_step()
    plan = Stutter().plan(100, np.random.default_rng(0))
    assert Stutter().planned_length(100, plan) is None
    assert Stutter().render(speechlike(0.1), plan)[0].size == 3200


def test_a_wrong_output_length_is_one_line():
    x = speechlike(0.1)
    plan = Liar().plan(x.size, np.random.default_rng(0))
    with pytest.raises(PluginError, match="returned 3200 samples where output_length said 1600"):
        Liar().render(x, plan)
    with pytest.raises(AssertionError, match="liar: output_length said 160, apply_params returned 320"):
        check_augmentation(Liar)


def test_plans_need_no_audio():
    """N-CP learns its partner's length from the pool's sizes: nothing is loaded to plan it."""
    def no_audio(uid):
        raise AssertionError(f"{uid} loaded")

    pool = PartnerPool(["n1", "n2", "a1"], ["neutral", "neutral", "angry"], no_audio, sizes={"n1": 30000, "n2": 9000})
    ncp = builtin("ncp")
    for seed in range(6):
        context = AugmentContext(utterance_id="a1", emotion="angry", partners=pool)
        plan = ncp.plan(20000, np.random.default_rng(seed), context)
        m = {"n1": 30000, "n2": 9000}[plan["partner"]]
        assert ncp.planned_length(20000, plan) == m - m // 3 + min(m // 3, 20000)


# --- bucket_batches ---------------------------------------------------------------------------------------------

def old_bucket_batches(lengths, batch_size, seed, epoch, bucket=True, rank=0, world=1, chunk=50):
    """bucket_batches as it was before --batch-seconds (the default must not change a run)."""
    rng = np.random.default_rng([seed, epoch, 7919])
    order = rng.permutation(len(lengths))
    lengths = np.asarray(lengths)
    batches = []
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


lengths_st = st.lists(st.integers(1, 200_000), min_size=1, max_size=400)


@given(lengths=lengths_st, batch_size=st.integers(1, 40), seed=st.integers(0, 2**31), epoch=st.integers(0, 50),
       bucket=st.booleans(), world=st.integers(1, 4))
@settings(max_examples=60, deadline=None)
def test_fixed_batches_are_unchanged(lengths, batch_size, seed, epoch, bucket, world):
    for rank in range(world):
        assert bucket_batches(lengths, batch_size, seed, epoch, bucket, rank, world) == \
            old_bucket_batches(lengths, batch_size, seed, epoch, bucket, rank, world)


@given(lengths=lengths_st, cap=st.integers(1, 64), budget=st.integers(1, 2_000_000), seed=st.integers(0, 2**31),
       epoch=st.integers(0, 50), bucket=st.booleans(), world=st.integers(1, 4))
@settings(max_examples=150, deadline=None)
def test_budget_batches_partition_respect_budget_and_cap(lengths, cap, budget, seed, epoch, bucket, world):
    lengths = np.asarray(lengths)
    whole = bucket_batches(lengths, cap, seed, epoch, bucket, budget=budget)
    flat = [k for b in whole for k in b]
    assert sorted(flat) == list(range(len(lengths)))  # a partition of the items
    for b in whole:
        assert 1 <= len(b) <= cap
        assert len(b) == 1 or lengths[b].max() * len(b) <= budget  # only a lone item may exceed the budget
    ranks = [bucket_batches(lengths, cap, seed, epoch, bucket, r, world, budget=budget) for r in range(world)]
    assert len({len(r) for r in ranks}) == 1  # every rank takes the same number of steps
    assert len(ranks[0]) == len(whole) // world
    seen = [k for r in ranks for b in r for k in b]
    assert len(seen) == len(set(seen)) and set(seen) <= set(flat)  # disjoint; at most world - 1 batches dropped
    assert bucket_batches(lengths, cap, seed, epoch, bucket, budget=budget) == whole  # seeded


def test_budget_batches_of_equal_lengths_are_full():
    batches = bucket_batches([16000] * 100, 64, 0, 0, budget=10 * 16000)
    assert sorted(len(b) for b in batches) == [10] * 10
    assert padding_efficiency([16000] * 100, batches) == 1.0
    assert [len(b) for b in bucket_batches([16000] * 100, 4, 0, 0, budget=10 * 16000)] == [4] * 25  # the cap


# --- the epoch's real lengths -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    return synthetic_cache(tmp_path_factory.mktemp("cache"), per_emotion=2) / "synthetic.h5"


def online_items(cache: Path, augmentation, max_samples=None, copies=1) -> TrainItems:
    from ser_toolkit.cache.reader import CacheReader

    reader = CacheReader(cache)
    rows = list(range(0, len(reader), 2))
    partners = PartnerPool.from_split(reader, {uid: "train" for uid in reader.ids})
    return TrainItems([reader], [(0, i, -1) for i in rows] + [(0, i, c) for c in range(copies) for i in rows],
                      augmentation, partners, None, max_samples, seed=5)


@pytest.mark.parametrize("name", ["timestretch", "ncp", "mixture", "echo"])
def test_epoch_lengths_are_what_the_items_produce(small_cache, name):
    """Predicted lengths (crops included) = the rendered items' lengths; the audio = the one-step call's."""
    aug = mixture() if name == "mixture" else Echo() if name == "echo" else builtin(name)
    items = online_items(small_cache, aug, max_samples=int(2.1 * RATE))
    for epoch in (0, 3):
        predicted = items.epoch_lengths(epoch)
        assert not np.array_equal(predicted, items.lengths())  # the augmentation changed lengths
        for k in range(len(items)):
            wave, _, entry = items[(epoch, k)]
            assert wave.size == predicted[k]
            assert entry is None or entry["epoch"] == epoch
            r, i, copy = items.items[k]
            if copy >= 0:  # the old path: one seeded call, then the crop
                reader = items.readers[r]
                u = reader.utterance(i)
                ref, params = aug(reader.wave(i), utterance_seed(5, u.id, "online", epoch, copy),
                                  AugmentContext(utterance_id=u.id, emotion=u.emotion, partners=items.partners))
                assert params == entry["params"]
                if ref.size <= items.max_samples:
                    assert np.array_equal(ref, wave)


def test_sampler_forms_batches_on_the_epochs_lengths(small_cache):
    items = online_items(small_cache, builtin("timestretch"))
    sampler = EpochBatches(items, 64, seed=5, batch_seconds=6.0)
    seen = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert all(e == epoch for b in batches for e, _ in b)
        assert np.array_equal(sampler.lengths, items.epoch_lengths(epoch))
        assert sorted(k for b in batches for _, k in b) == list(range(len(items)))
        assert all(len(b) == 1 or sampler.lengths[[k for _, k in b]].max() * len(b) <= 6 * RATE for b in batches)
        seen.append(sampler.batches)
    assert seen[0] != seen[1]
    fixed = EpochBatches(items, 8, seed=5)  # no budget: the stored lengths, batches of 8 as before
    fixed.set_epoch(2)
    assert fixed.batches == bucket_batches(items.lengths(), 8, 5, 2)


# --- padding efficiency: every built-in augmentation ---------------------------------------------------------------

class LengthsReader:
    """What planning an epoch reads from a cache (ids, labels, lengths, emotions): no audio."""

    def __init__(self, ids: list[str], emotions: list[str], lengths: list[int]) -> None:
        self.ids, self.emotions = ids, emotions
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.labels = np.array([EMOTIONS.index(e) for e in emotions], dtype=np.int64)
        self.path = Path("lengths.h5")

    def utterance(self, i: int) -> SimpleNamespace:
        return SimpleNamespace(id=self.ids[i], emotion=self.emotions[i])

    def wave(self, i):
        raise AssertionError("planning an epoch processed audio")


def ravdess_lengths() -> LengthsReader:
    """The RAVDESS training part (seed split) with its cached lengths, from the file headers."""
    import soundfile as sf

    from ser_toolkit.plugins.ravdess import Ravdess

    root = shared_data_dir() / "ravdess"
    if not root.is_dir():
        pytest.skip(f"RAVDESS not found at {root} (set SERTK_SHARED_DATA); the synthetic-spread case still runs")
    parts = dict(line.split(",")[:2] for line in (root / "seed_split.csv").read_text().split()[1:])
    utts = [u for u in Ravdess().scan(root).utterances if parts.get(u.id) == "train"]
    lengths = []
    for u in utts:
        info = sf.info(str(root / u.path))
        lengths.append(int(round(info.frames * RATE / info.samplerate)))  # = the cache's resampled length
    return LengthsReader([u.id for u in utts], [u.emotion for u in utts], lengths)


def spread_lengths(n: int = 1200, seed: int = 0) -> LengthsReader:
    """RAVDESS-like lengths (3.7 s mean, 3.0-5.3 s) and emotions, made up."""
    rng = np.random.default_rng(seed)
    seconds = np.clip(rng.lognormal(np.log(3.65), 0.1, n), 2.9, 5.3)
    emotions = [EMOTIONS[k] for k in rng.integers(0, len(EMOTIONS), n)]
    return LengthsReader([f"u{i}" for i in range(n)], emotions, (seconds * RATE).astype(int).tolist())


@pytest.mark.parametrize("corpus", ["ravdess", "synthetic-spread"])
@pytest.mark.parametrize("method", [*BUILTINS, "mixture"])
def test_padding_efficiency_with_every_builtin(corpus, method):
    """>= 0.95 real / padded samples with --batch-seconds, on the lengths each epoch's augmentation produces."""
    reader = ravdess_lengths() if corpus == "ravdess" else spread_lengths()
    rows = range(len(reader.ids))
    pool = PartnerPool(reader.ids, reader.emotions, reader.wave,
                       sizes={u: int(n) for u, n in zip(reader.ids, reader.lengths)})
    aug = mixture() if method == "mixture" else builtin(method)
    items = TrainItems([reader], [(0, i, -1) for i in rows] + [(0, i, 0) for i in rows], aug, pool, seed=42)
    for seconds in (30.0, 120.0):
        sampler = EpochBatches(items, 64, seed=42, batch_seconds=seconds)
        for epoch in range(2):
            sampler.set_epoch(epoch)
            efficiency = padding_efficiency(sampler.lengths, sampler.batches)
            assert efficiency >= 0.95, (method, seconds, epoch, efficiency)


# --- the run's one loader --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    return synthetic_cache(tmp_path_factory.mktemp("tiny"), per_emotion=1)


def tiny_run(cache_dir: Path, out: Path, workers: int):
    from dataclasses import asdict

    from ser_toolkit.training import runs
    from ser_toolkit.training.loop import TrainConfig, train

    cfg = TrainConfig.from_settings({}, {"dataset": "synthetic", "cache_dir": str(cache_dir), "model": "tiny",
                                         "model_options": {"hidden_size": 8}, "epochs": 3, "batch_size": 8,
                                         "batch_seconds": 2.0, "max_seconds": 0.5, "workers": workers,
                                         "split": "speaker:test=0.25", "plugins": ["timestretch", "ncp"]})
    runs.write_json(out / "config.json", {"train": asdict(cfg)})
    return train(cfg, out, quiet=True)


@pytest.mark.slow
def test_one_loader_per_run_and_the_same_run_with_0_or_2_workers(tiny_cache, tmp_path, monkeypatch):
    import os

    import torch
    from safetensors.torch import load_file

    from ser_toolkit.training import data

    serial = tiny_run(tiny_cache, tmp_path / "serial", 0)
    log = tmp_path / "pids.txt"
    raw, make_loader, loaders = TrainItems.raw, data.train_loader, []

    def recording_raw(self, k, epoch=None):  # inherited by the forked workers
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()} {epoch}\n")
        return raw(self, k, epoch)

    def counting_loader(*args, **kwargs):
        loaders.append(make_loader(*args, **kwargs))
        return loaders[-1]

    monkeypatch.setattr(TrainItems, "raw", recording_raw)
    monkeypatch.setattr(data, "train_loader", counting_loader)
    parallel = tiny_run(tiny_cache, tmp_path / "parallel", 2)
    records = [line.split() for line in log.read_text().splitlines()]
    pids = {pid for pid, _ in records}
    assert len(loaders) == 1 and loaders[0].persistent_workers  # one DataLoader for the run...
    assert len(pids) == 2 and str(os.getpid()) not in pids  # ...whose 2 workers served all 3 epochs
    assert {epoch for _, epoch in records} == {"0", "1", "2"}
    assert [h["train_loss"] for h in serial["history"]] == [h["train_loss"] for h in parallel["history"]]
    a = load_file(str(tmp_path / "serial" / "checkpoints" / "best.safetensors"))
    b = load_file(str(tmp_path / "parallel" / "checkpoints" / "best.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for epoch in (1, 2, 3):  # the same augmentation, logged in the same order
        name = f"aug_log/epoch-{epoch:03d}.jsonl"
        assert (tmp_path / "serial" / name).read_text() == (tmp_path / "parallel" / name).read_text()


@pytest.mark.slow
def test_forkserver_workers_give_the_same_batches(small_cache, monkeypatch):
    """The start method used once CUDA is initialised: the dataset is pickled, not forked, and nothing changes."""
    import torch

    from ser_toolkit.training import data
    from ser_toolkit.training.data import Collate, close_loader, train_loader

    def epochs(workers: int) -> list:
        items = online_items(small_cache, mixture(), max_samples=int(1.5 * RATE))
        sampler = EpochBatches(items, 16, seed=5, batch_seconds=8.0)
        loader = train_loader(items, sampler, Collate(), workers)
        out = []
        try:
            for epoch in range(2):
                sampler.set_epoch(epoch)
                out += [(x, mask, y, logs) for x, mask, y, logs in loader]
        finally:
            close_loader(loader)
        return out

    monkeypatch.setattr(data, "loader_context", lambda: "forkserver")
    serial, parallel = epochs(0), epochs(1)
    assert len(serial) == len(parallel)
    for a, b in zip(serial, parallel):
        assert all(torch.equal(u, v) for u, v in zip(a[:3], b[:3])) and a[3] == b[3]


def test_compile_collate_pads_to_whole_buckets_and_masks_the_padding():
    import numpy as np

    from ser_toolkit.training.data import Collate
    from ser_toolkit.training.loop import COMPILE_BUCKET

    waves = [np.ones(n, dtype=np.float32) for n in (12_000, 20_001, 7)]
    inputs, mask, labels, _ = Collate("wave", pad_to=COMPILE_BUCKET)([(w, 1, None) for w in waves])
    assert inputs.shape == (3, 2 * COMPILE_BUCKET) and mask.shape == inputs.shape
    assert mask.sum(1).tolist() == [12_000, 20_001, 7] and float(inputs.sum()) == 12_000 + 20_001 + 7
    plain, plain_mask, _, _ = Collate("wave")([(w, 1, None) for w in waves])
    assert plain.shape == (3, 20_001) and (inputs[:, :20_001] == plain).all()
