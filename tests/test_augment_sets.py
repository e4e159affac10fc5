"""Materialised augmented sets and on-the-fly augmentation: deterministic, logged, leak-free."""

from __future__ import annotations

import json
import pickle
from collections import Counter

import numpy as np
import pytest

from ser_toolkit.augment_sets import OnlineAugmented, build_augmentation, sets_dir
from ser_toolkit.augmentations import PartnerPool
from ser_toolkit.cache.build import build_cache
from ser_toolkit.cache.reader import CacheReader
from ser_toolkit.plugins.synthetic import Synthetic
from ser_toolkit.splits import make_split

SPLIT = "speaker:test=0.25,seed=1"


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("aug") / "synthetic.h5"
    build_cache(Synthetic(per_emotion=2), None, out, quiet=True)
    return out


def test_cli_materializes_test_sets_once_and_identically(small_cache, tmp_path, cli):
    args = ["materialize", small_cache, "--plugins", "timestretch,noise,specaugment,ncp", "--split", SPLIT, "-q"]
    r = cli(*args)
    assert r.code == 0, r.err
    reader = CacheReader(small_cache)
    assignment = make_split(reader.utterances, SPLIT)
    folder = sets_dir(reader, assignment)
    names = sorted(p.name for p in folder.glob("*.h5"))
    assert names == ["test-mixed.h5", "test-ncp.h5", "test-noise.h5", "test-specaugment.h5", "test-timestretch.h5"]
    assert "unchanged" in cli(*args).out and "written" not in cli(*args).out
    test_ids = {uid for uid, s in assignment.items() if s == "test"}
    mixed = CacheReader(folder / "test-mixed.h5")
    assert {u.extra["source"] for u in mixed.utterances} == test_ids
    assert set(Counter(u.extra["method"] for u in mixed.utterances)) == {"timestretch", "noise", "specaugment", "ncp"}
    ncp = CacheReader(folder / "test-ncp.h5")
    for u in ncp.utterances:  # partners of test utterances come from the test part only: no training audio
        assert assignment[u.extra["params"]["partner"]] == "test" and u.emotion == u.extra["params"]["label"]
        assert u.extra["partners"] == [u.extra["params"]["partner"]] != [u.extra["source"]]
    # the same sets built elsewhere (another cache copy, other order) hold the very same audio
    copy = tmp_path / "synthetic.h5"
    copy.write_bytes(small_cache.read_bytes())
    assert cli("materialize", copy, "--plugins", "specaugment", "--split", SPLIT, "-q").code == 0
    a = CacheReader(folder / "test-specaugment.h5")
    b = CacheReader(sets_dir(CacheReader(copy), assignment) / "test-specaugment.h5")
    assert a.ids == b.ids and all(np.array_equal(a.wave(i), b.wave(i)) for i in range(len(a)))
    assert json.loads(cli("inspect", folder / "test-noise.h5", "--json").out)["utterances"] == len(test_ids)


def test_training_copies_and_reference_ncp_pairing(small_cache, cli):
    r = cli("materialize", small_cache, "--plugins", "ncp,timestretch", "--split", SPLIT, "--subset", "train",
            "--copies", "2", "--set", "timestretch.rate=1.1", "-q")
    assert r.code == 0, r.err
    reader = CacheReader(small_cache)
    assignment = make_split(reader.utterances, SPLIT)
    folder = sets_dir(reader, assignment)
    train = [u for u in reader.utterances if assignment[u.id] == "train"]
    ncp = CacheReader(folder / "train-ncp-x2-s0.h5")
    assert len(ncp) == 2 * len(train)
    assert Counter(u.emotion for u in ncp.utterances) == Counter({e: 2 * n for e, n in
                                                                 Counter(u.emotion for u in train).items()})
    pairs = Counter((u.extra["source"], u.extra["params"]["partner"]) for u in ncp.utterances)
    assert max(pairs.values()) == 1
    ts = CacheReader(folder / "train-timestretch-x2-s0.h5")
    assert {u.extra["params"]["rate"] for u in ts.utterances} == {1.1}
    src = reader.wave(train[0].id)
    assert abs(ts.wave(0).size - round(src.size / 1.1)) <= 1


def test_mixture_copies_are_the_single_method_copies(small_cache):
    """Common random numbers: a Top-k copy is, sample for sample, the single-method copy its draw picked
    (N-CP with the reference pairing's partner), and the feature cache computes none of them again."""
    from ser_toolkit.augment_sets import materialize
    from ser_toolkit.cache.features import build_features, feature_path
    from ser_toolkit.featurizers import get_featurizer

    reader = CacheReader(small_cache)
    assignment = make_split(reader.utterances, SPLIT)
    methods = ["ncp", "timestretch", "noise"]
    weights = {"ncp": 0.5, "timestretch": 0.3, "noise": 0.2}
    path, _ = materialize(reader, assignment, "train", "top3", build_augmentation(methods, None, weights),
                          copies=2, seed=7)  # computed: no single-method set exists yet
    mix = CacheReader(path)
    singles = {}
    feat = get_featurizer("acoustic")
    for m in methods:
        single_path, _ = materialize(reader, assignment, "train", m, build_augmentation([m]), copies=2, seed=7)
        singles[m] = CacheReader(single_path)
        build_features(singles[m], feat, workers=1)
    assert mix.config["augmentation"]["draws"] == "per-method"
    picked = Counter()
    for i, u in enumerate(mix.utterances):
        m, k = u.extra["method"], u.extra["copy"]
        j = singles[m].ids.index(f"{u.extra['source']}#{m}{k}")
        assert np.array_equal(mix.wave(i), singles[m].wave(j)), (u.id, m)
        assert u.extra["params"] == singles[m].utterances[j].extra["params"]
        picked[m] += 1
    assert set(picked) == set(methods)  # every method drawn at least once on this set
    # now that the single-method sets exist, a mixture reads its copies from them instead of computing them
    again = build_augmentation(methods, None, weights)
    for aug in again.methods.values():
        aug.apply = lambda *a, **k: (_ for _ in ()).throw(AssertionError("computed, not read"))
    path.unlink()
    path, written = materialize(reader, assignment, "train", "top3", again, copies=2, seed=7, workers=2)
    reread = CacheReader(path)
    assert written and reread.column("audio_digest") == mix.column("audio_digest")
    assert reread.column("extra") == mix.column("extra") and reread.digest == mix.digest
    mix = reread
    other, _ = materialize(reader, assignment, "train", "top3", build_augmentation(methods, None, weights),
                           copies=2, seed=8)  # another seed: other draws, nothing to share
    assert CacheReader(other).column("audio_digest") != mix.column("audio_digest")
    from ser_toolkit.cache.features import FeatureReader

    build_features(mix, feat, workers=1)
    fr = FeatureReader(feature_path(mix, feat))
    assert fr.build["shared"] == len(mix) and fr.build["computed"] == 0
    assert np.allclose(fr.features, np.stack([feat.extract(mix.wave(i), 16000) for i in range(len(mix))]))


def test_a_set_is_the_same_for_any_worker_count(small_cache, monkeypatch):
    import ser_toolkit.augment_sets as aug_sets

    monkeypatch.setattr(aug_sets, "CHUNK", 2)  # several chunks even on this small set
    reader = CacheReader(small_cache)
    assignment = make_split(reader.utterances, SPLIT)
    augmentation = build_augmentation(["ncp", "timestretch", "noise"])
    sets = []
    for workers in (1, 2):
        path, written = aug_sets.materialize(reader, assignment, "train", "mix-workers", augmentation, copies=2,
                                             seed=11, workers=workers)
        assert written
        got = CacheReader(path)
        sets.append((got.ids, got.column("audio_digest"), [u.extra for u in got.utterances]))
        got.close()
        path.unlink()
    assert sets[0] == sets[1] and len(sets[0][0]) > 2 * aug_sets.CHUNK


def test_materialize_errors(small_cache, cli):
    r = cli("materialize", small_cache, "--plugins", "noise,specaugment", "--set", "level=0.1", "--split", SPLIT)
    assert r.code == 2 and "ambiguous" in r.err
    r = cli("materialize", small_cache, "--plugins", "reverbz", "--split", SPLIT)
    assert r.code == 2 and "unknown augmentation 'reverbz'" in r.err
    r = cli("materialize", small_cache, "--plugins", "noise", "--subset", "valid", "--split", SPLIT)
    assert r.code == 2 and "--subset 'valid' is not a part of split" in r.err


def test_online_augmentation_reproducible_per_epoch(small_cache):
    reader = CacheReader(small_cache)
    assignment = make_split(reader.utterances, SPLIT)
    train_idx = [i for i, uid in enumerate(reader.ids) if assignment[uid] == "train"]
    aug = build_augmentation(["specaugment", "ncp", "noise"])
    view = OnlineAugmented(reader, train_idx, aug, seed=5, partners=PartnerPool.from_split(reader, assignment))
    w0, label, log0 = view.item(3)
    assert label == reader.labels[train_idx[3]] and log0["epoch"] == 0 and "method" in log0["params"]
    clone = pickle.loads(pickle.dumps(view))  # as a DataLoader worker gets it
    assert np.array_equal(clone.item(3)[0], w0)
    changed = 0
    for epoch in range(1, 6):
        view.set_epoch(epoch)
        clone.set_epoch(epoch)
        w, _, log = view.item(3)
        assert np.array_equal(clone.item(3)[0], w)
        changed += not np.array_equal(w, w0)
    assert changed >= 4  # new parameters each epoch


@pytest.mark.slow
def test_online_augmentation_in_torch_dataloader_workers(small_cache):
    """Two DataLoader workers: the same seed and epoch give the same audio as a single process."""
    torch = pytest.importorskip("torch")

    class TorchView(torch.utils.data.Dataset):
        def __init__(self, view):
            self.view = view

        def __len__(self):
            return len(self.view)

        def __getitem__(self, i):
            wave, label, log = self.view.item(i)
            return torch.from_numpy(wave), label, json.dumps(log["params"], sort_keys=True)

    reader = CacheReader(small_cache)
    aug = build_augmentation(["specaugment", "noise", "timestretch"])
    view = OnlineAugmented(reader, list(range(12)), aug, seed=3)

    def epoch_items(epoch, workers):
        view.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(TorchView(view), batch_size=None, num_workers=workers,
                                             multiprocessing_context="fork" if workers else None)
        return [(w.numpy(), params) for w, _, params in loader]

    serial, parallel = epoch_items(1, 0), epoch_items(1, 2)
    assert all(np.array_equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(serial, parallel))
    assert [p for _, p in epoch_items(2, 2)] != [p for _, p in parallel]
