"""Feature normalisation: per speaker from that speaker's own utterances only, never from labels."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import run_sertk
from ser_toolkit.errors import SertkError
from ser_toolkit.normalize import MIN_GROUP, groups, normalize


@st.composite
def sets(draw):
    n_speakers = draw(st.integers(1, 4))
    sizes = [draw(st.integers(MIN_GROUP, 9)) for _ in range(n_speakers)]
    speakers = [f"s{k}" for k, n in enumerate(sizes) for _ in range(n)]
    order = draw(st.permutations(range(len(speakers))))
    speakers = [speakers[i] for i in order]
    seed = draw(st.integers(0, 2**31))
    x = np.random.default_rng(seed).normal(3.0, 2.0, (len(speakers), 4)).astype(np.float32)
    return x, speakers, seed


@settings(max_examples=60, deadline=None)
@given(sets())
def test_a_speaker_is_standardised_with_its_own_statistics_only(data):
    x, speakers, seed = data
    out = normalize(x, groups(speakers, "speaker")[0])
    rng = np.random.default_rng(seed + 1)
    target = speakers[0]
    mine = np.array([s == target for s in speakers])
    own = x[mine]
    np.testing.assert_allclose(out[mine], (own - own.mean(0)) / own.std(0), rtol=1e-4, atol=1e-4)
    # changing every other speaker's features changes nothing for this one
    other = x.copy()
    other[~mine] = rng.normal(-5, 9, other[~mine].shape)
    np.testing.assert_array_equal(normalize(other, groups(speakers, "speaker")[0])[mine], out[mine])


def test_fallbacks_are_noted():
    x = np.random.default_rng(0).normal(size=(12, 3)).astype(np.float32)
    g, note = groups(["unknown"] * 12, "speaker")
    assert note and "corpus" in note
    np.testing.assert_allclose(normalize(x, g), (x - x.mean(0)) / x.std(0), rtol=1e-5)
    few = ["a"] * 10 + ["b"] * 2  # b has too few utterances of its own: the set's statistics
    g, note = groups(few, "speaker")
    assert note and f"fewer than {MIN_GROUP}" in note
    out = normalize(x, g)
    np.testing.assert_allclose(out[10:], (x[10:] - x.mean(0)) / x.std(0), rtol=1e-5)
    np.testing.assert_allclose(out[:10], (x[:10] - x[:10].mean(0)) / x[:10].std(0), rtol=1e-4, atol=1e-5)
    assert normalize(x, groups(few, "none")[0]) is not None
    np.testing.assert_array_equal(normalize(x, groups(few, "none")[0]), x)
    with pytest.raises(SertkError, match="unknown normalisation"):
        groups(few, "gender")


class _NoLabels:
    """A cache reader that refuses to give its labels."""

    def __init__(self, reader):
        self._reader = reader

    def __getattr__(self, name):
        if name == "labels":
            raise AssertionError("normalisation read the labels")
        return getattr(self._reader, name)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    assert run_sertk("cache", "synthetic", "--set", "per_emotion=1", "--cache-dir", out, "-q").code == 0
    return out


def test_set_features_never_read_labels(cache_dir):
    from ser_toolkit.cache.reader import CacheReader
    from ser_toolkit.training.features import set_features

    reader = CacheReader(next(cache_dir.glob("*.h5")))
    rows = list(range(0, len(reader.ids), 2))
    x, info = set_features(_NoLabels(reader), rows, ("acoustic", {}), "speaker")
    assert x.shape[0] == len(rows) and info["normalize"] == "speaker" and info["features"]


@settings(max_examples=40, deadline=None)
@given(sets(), st.integers(0, 2**31))
def test_speaker_train_uses_a_seen_speakers_training_statistics_only(data, seed):
    """speaker-train: a seen speaker of the same source audio is standardised with their training statistics
    (nobody else's, no labels); unseen speakers and other sources keep the per-set statistics."""
    from ser_toolkit.normalize import SpeakerStats

    x_train, speakers, _ = data
    rng = np.random.default_rng(seed)
    stats = SpeakerStats.fit("src", "acoustic", x_train, speakers)
    x_test = rng.normal(1.0, 3.0, (9, 4)).astype(np.float32)
    test_speakers = [speakers[0]] * 5 + ["unseen"] * 4
    per_set = normalize(x_test, groups(test_speakers, "speaker")[0])
    out, seen = stats.apply(x_test, per_set, test_speakers, "src", "acoustic")
    assert seen == 5
    own = np.asarray(speakers) == speakers[0]
    expected = (x_test[:5] - x_train[own].mean(0)) / x_train[own].std(0)
    np.testing.assert_allclose(out[:5], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[5:], per_set[5:])  # unseen: their own unlabelled audio
    # another speaker's training features do not move this speaker's statistics
    other = ~own
    if other.any():
        moved = x_train.copy()
        moved[other] += 100.0
        again, _ = SpeakerStats.fit("src", "acoustic", moved, speakers).apply(x_test, per_set, test_speakers,
                                                                            "src", "acoustic")
        np.testing.assert_array_equal(again[:5], out[:5])
    # another source (another corpus or cache) or another feature block: nothing is replaced
    for source, block in (("other", "acoustic"), ("src", "egemaps")):
        same, n = stats.apply(x_test, per_set, test_speakers, source, block)
        assert n == 0 and same is per_set


def test_speaker_statistics_file_round_trip_and_refusals(tmp_path):
    from ser_toolkit.normalize import SpeakerStats

    x = np.random.default_rng(0).normal(size=(12, 3)).astype(np.float32)
    stats = SpeakerStats.fit("src", "acoustic", x, ["a"] * 6 + ["b"] * 6)
    path = tmp_path / "speaker_stats.safetensors"
    stats.save(path, "run-1")
    back = SpeakerStats.load(path, "run-1")
    assert back.source == "src" and set(back.blocks["acoustic"]) == {"a", "b"}
    np.testing.assert_array_equal(back.blocks["acoustic"]["a"][0], x[:6].mean(0))
    with pytest.raises(SertkError, match="belong to another run"):
        SpeakerStats.load(path, "run-2")
    path.write_bytes(b"not safetensors")
    with pytest.raises(SertkError, match="missing or unreadable"):
        SpeakerStats.load(path, "run-1")


def test_speaker_train_never_treats_unknown_or_rare_speakers_as_seen():
    from ser_toolkit.normalize import MIN_GROUP, SpeakerStats

    x = np.random.default_rng(1).normal(size=(3 * MIN_GROUP + 2, 2)).astype(np.float32)
    speakers = ["a"] * MIN_GROUP + ["unknown"] * MIN_GROUP + [""] * MIN_GROUP + ["rare"] * 2
    stats = SpeakerStats.fit("src", "acoustic", x, speakers)
    assert set(stats.blocks["acoustic"]) == {"a"}
    assert stats.seen(["a", "unknown", "", "rare"], "src", "acoustic").tolist() == [True, False, False, False]
