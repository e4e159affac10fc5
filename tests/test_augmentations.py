"""Built-in augmentations: what their parameters say is what they do."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ser_toolkit.augmentations import (AugmentContext, PartnerPool, Weighted, utterance_seed,
                                       weights_from_gains)
from ser_toolkit.errors import ParameterError, SertkError
from ser_toolkit.plugins.duplicate import Duplicate
from ser_toolkit.plugins.ncp import NeutralCopyPaste, pair_counts, plan_pairs
from ser_toolkit.plugins.noise import Noise, active_power
from ser_toolkit.plugins.specaugment import HOP, SpecAugment, stft
from ser_toolkit.plugins.timestretch import TimeStretch
from ser_toolkit.testing import speechlike

RATE = 16000


def harmonic(seconds: float, f0: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.2 * sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 6))).astype(np.float32)


def median_f0(x: np.ndarray) -> float:
    import librosa

    return float(np.median(librosa.yin(x, fmin=60, fmax=400, sr=RATE, frame_length=2048)[3:-3]))


# --- timestretch -------------------------------------------------------------------------------

@given(rate=st.floats(0.8, 1.25), f0=st.floats(100, 250))
@settings(max_examples=15, deadline=None)
def test_timestretch_duration_and_pitch(rate, f0):
    x = harmonic(2.0, f0)
    y, params = TimeStretch(rate=rate)(x, np.random.default_rng(0))
    assert params["rate"] == pytest.approx(rate)
    assert abs(y.size / x.size - 1 / rate) <= 0.01 / rate
    assert abs(median_f0(y) / median_f0(x) - 1) < 0.02


def test_timestretch_reference_choices_and_range():
    aug = TimeStretch()
    seen = {aug(speechlike(0.5), np.random.default_rng(s))[1]["rate"] for s in range(60)}
    assert seen == {0.8, 0.9, 1.0, 1.1, 1.2}
    rates = [TimeStretch(rate_range=[0.7, 1.3])(speechlike(0.5), np.random.default_rng(s))[1]["rate"]
             for s in range(30)]
    assert all(0.7 <= r <= 1.3 for r in rates) and len(set(rates)) == 30
    with pytest.raises(ParameterError, match="'rate_range' must be two numbers"):
        TimeStretch(rate_range=[1.3, 0.7])
    with pytest.raises(ParameterError, match="'rate' must be a float between 0.25 and 4.0"):
        TimeStretch(rate=0)


# --- noise -------------------------------------------------------------------------------------

@given(snr=st.floats(-5, 40), seed=st.integers(0, 1000))
@settings(max_examples=25, deadline=None)
def test_noise_achieves_target_snr(snr, seed):
    x = speechlike(1.2, seed)
    y, params = Noise(snr_db=snr)(x, np.random.default_rng(seed))
    achieved = 10 * np.log10(active_power(x) / np.mean((y.astype(np.float64) - x) ** 2))
    assert abs(achieved - snr) <= 0.5 and params["snr_db"] == pytest.approx(snr)


def test_noise_absolute_levels_like_the_reference():
    x = np.zeros(RATE, np.float32)
    levels = set()
    for s in range(40):
        y, p = Noise()(x, np.random.default_rng(s))
        assert y.std() == pytest.approx(p["level"], rel=0.05)
        levels.add(p["level"])
    assert levels == {0.001, 0.005, 0.01}
    y, p = Noise(level=0.02)(x, np.random.default_rng(0))
    assert y.std() == pytest.approx(0.02, rel=0.05)


def test_noise_from_files(tmp_path):
    import soundfile as sf

    hum = 0.3 * np.sin(2 * np.pi * 50 * np.arange(4000) / 8000)
    sf.write(str(tmp_path / "hum.wav"), hum, 8000)
    x = speechlike(1.0)
    y, p = Noise(noise_dir=str(tmp_path), snr_db=10)(x, np.random.default_rng(1))
    assert p["noise"] == "hum.wav"
    residual = y - x
    spectrum = np.abs(np.fft.rfft(residual))
    assert np.argmax(spectrum) == pytest.approx(50 * residual.size / RATE, abs=2)  # the hum, looped
    assert 10 * np.log10(active_power(x) / np.mean(residual.astype(np.float64) ** 2)) == pytest.approx(10, abs=0.5)
    with pytest.raises(ParameterError, match="not a folder"):
        Noise(noise_dir=str(tmp_path / "none"))
    with pytest.raises(ParameterError, match="either level or snr_db"):
        Noise(level=0.1, snr_db=3)


# --- specaugment -------------------------------------------------------------------------------

def _db(a: float, b: float) -> float:
    return 10 * np.log10((a + 1e-30) / b)


@pytest.mark.parametrize("scale", ["mel", "linear"])
@pytest.mark.parametrize("seed", range(6))
def test_specaugment_masks_cells_and_leaves_the_rest(scale, seed):
    x = speechlike(2.0, seed) + 0.01 * np.random.default_rng(seed).standard_normal(2 * RATE).astype(np.float32)
    aug = SpecAugment(time_mask=[30], freq_mask=[30], scale=scale)
    y, p = aug(x, np.random.default_rng(seed))
    X, Y = stft(x), stft(y)
    power_x, err = np.abs(X) ** 2, np.abs(Y - X) ** 2
    n_bins, n_frames = X.shape
    freqs = np.arange(n_bins) * RATE / 512
    guard_t, guard_f = 3, 100.0  # frames and Hz beside a mask reached by the Hann main lobe (+-2.5 hops, +-80 Hz)
    masked = np.zeros(X.shape, bool)
    near = np.zeros(X.shape, bool)
    for t0, t1 in p["time_masks"]:
        if t1 - t0 > 2 * guard_t:
            masked[:, t0 + guard_t:t1 - guard_t] = True
        near[:, max(0, t0 - guard_t):t1 + guard_t] = True
    for lo, hi in p["freq_masks_hz"]:
        if hi - lo > 2 * guard_f:
            masked[(freqs > lo + guard_f) & (freqs < hi - guard_f), :] = True
        near[(freqs > lo - guard_f) & (freqs < hi + guard_f), :] = True
    if masked.any():
        assert _db(np.sum(np.abs(Y[masked]) ** 2), np.sum(power_x[masked])) <= -30
    other = ~near
    assert _db(err[other].sum(), power_x[other].sum()) <= -40
    for (t0, t1), (s0, s1) in zip(p["time_masks"], p["time_masks_s"]):
        assert (s0, s1) == (t0 * HOP / RATE, t1 * HOP / RATE)


def test_specaugment_reports_physical_units_and_time_warp():
    y, p = SpecAugment(n_time_masks=2, n_freq_masks=2, time_warp=5)(speechlike(2.0), np.random.default_rng(3))
    assert len(p["time_masks_s"]) == 2 and len(p["freq_masks_hz"]) == 2
    assert all(0 <= lo <= hi <= 8000 for lo, hi in p["freq_masks_hz"])
    assert abs(p["time_warp"]["shift_frames"]) <= 5 and p["T"] in (10, 20, 30) and p["F"] in (10, 20, 30)
    json.dumps(p)


# --- ncp -------------------------------------------------------------------------------------

def _pool():
    waves = {"n1": np.full(3000, 0.1, np.float32), "n2": np.full(2400, 0.2, np.float32),
             "a1": np.full(1500, 0.7, np.float32), "s1": np.full(100, 0.9, np.float32)}
    emos = {"n1": "neutral", "n2": "neutral", "a1": "angry", "s1": "sad"}
    return PartnerPool(list(waves), [emos[k] for k in waves], waves.__getitem__), waves


def test_ncp_reference_structure_and_label():
    pool, waves = _pool()
    x = np.linspace(-0.5, 0.5, 1500).astype(np.float32)
    y, p = NeutralCopyPaste()(x, np.random.default_rng(0), AugmentContext(utterance_id="a1", emotion="angry",
                                                                           partners=pool))
    partner = waves[p["partner"]]
    third = partner.size // 3
    assert p["partner"] in ("n1", "n2") and p["label"] == "angry"
    np.testing.assert_array_equal(y[:third], partner[:third])
    np.testing.assert_array_equal(y[third:2 * third], x[(x.size - third) // 2:(x.size - third) // 2 + third])
    np.testing.assert_array_equal(y[2 * third:], partner[2 * third:])
    assert y.size == partner.size


def test_ncp_neutral_input_stays_neutral_and_concat_mode():
    pool, waves = _pool()
    for seed in range(10):
        _, p = NeutralCopyPaste()(waves["n1"], np.random.default_rng(seed),
                                  AugmentContext(utterance_id="n1", emotion="neutral", partners=pool))
        assert p["partner"] == "n2" and p["label"] == "neutral"  # never itself, never an emotional partner
    x = np.ones(500, np.float32)
    firsts = set()
    for seed in range(10):
        y, p = NeutralCopyPaste(mode="concat")(x, np.random.default_rng(seed),
                                               AugmentContext(utterance_id="a1", emotion="angry", partners=pool))
        partner = waves[p["partner"]]
        assert y.size == x.size + partner.size
        firsts.add(p["first"])
        head = x if p["first"] == "input" else partner
        np.testing.assert_array_equal(y[:head.size], head)
    assert firsts == {"input", "partner"}


def test_ncp_short_input_and_missing_partners():
    pool, waves = _pool()
    y, p = NeutralCopyPaste()(waves["s1"], np.random.default_rng(0),
                              AugmentContext(utterance_id="s1", emotion="sad", partners=pool))
    partner = waves[p["partner"]]
    assert y.size == partner.size - partner.size // 3 + 100
    with pytest.raises(SertkError, match="needs partner utterances"):
        NeutralCopyPaste()(waves["s1"], np.random.default_rng(0))


def test_ncp_partners_never_come_from_the_test_split(tmp_path):
    from ser_toolkit.cache.build import build_cache
    from ser_toolkit.cache.reader import CacheReader
    from ser_toolkit.plugins.synthetic import Synthetic
    from ser_toolkit.splits import make_split

    build_cache(Synthetic(per_emotion=2), None, tmp_path / "s.h5", quiet=True)
    reader = CacheReader(tmp_path / "s.h5")
    split = make_split(reader.utterances, "speaker:test=0.25")
    pool = PartnerPool.from_split(reader, split, "train")
    aug = NeutralCopyPaste()
    used = set()
    for i, u in enumerate(reader.utterances):
        _, p = aug(reader.wave(i), utterance_seed(0, u.id), AugmentContext(utterance_id=u.id, emotion=u.emotion,
                                                                           partners=pool))
        used.add(p["partner"])
        assert split[p["partner"]] == "train" and reader.column("emotion")[reader.index(p["partner"])] == "neutral"
    assert len(used) > 5


def test_ncp_reference_pairing_plan():
    ids = [f"u{i}" for i in range(30)]
    emotions = ["neutral"] * 6 + ["angry"] * 12 + ["sad"] * 12
    plan = plan_pairs(ids, emotions, copies=3, rng=np.random.default_rng(0))
    assert all(len(set(ps)) == 3 and uid not in ps for uid, ps in plan.items())
    assert pair_counts(plan) == 1
    assert plan == plan_pairs(ids, emotions, copies=3, rng=np.random.default_rng(0))
    with pytest.raises(SertkError, match="distinct neutral partners"):
        plan_pairs(ids, emotions, copies=6, rng=np.random.default_rng(0))


# --- duplicate, weighted, gains -----------------------------------------------------------------

def test_duplicate_is_identity():
    x = speechlike(0.3)
    y, p = Duplicate()(x, np.random.default_rng(0))
    assert np.array_equal(x, y) and p == {}


def test_weighted_selector_follows_probabilities():
    sel = Weighted({"noise": Noise(), "duplicate": Duplicate()}, {"noise": 3, "duplicate": 1})
    rng = np.random.default_rng(0)
    picks = [sel(speechlike(0.05), rng)[1]["method"] for _ in range(2000)]
    assert picks.count("noise") / 2000 == pytest.approx(0.75, abs=0.03)
    with pytest.raises(ParameterError):
        Weighted({"noise": Noise()}, {"noise": -1})
    with pytest.raises(ParameterError, match="unknown methods"):
        Weighted({"noise": Noise()}, {"specaugment": 1})


def test_weights_from_gains_reproduce_the_reference():
    f1 = {"specaugment": 0.756, "timestretch": 0.718, "ncp": 0.684, "noise": 0.654}
    w = weights_from_gains(0.586, f1)
    assert list(w) == ["specaugment", "timestretch", "ncp", "noise"]
    assert [round(v, 3) for v in w.values()] == [0.363, 0.282, 0.209, 0.145]
    assert list(weights_from_gains(0.586, f1, top_k=2)) == ["specaugment", "timestretch"]
    with pytest.warns(UserWarning) as record:
        w = weights_from_gains(0.7, f1)
    assert sorted(str(r.message).split("'")[1] for r in record) == ["ncp", "noise"]
    assert set(w) == {"specaugment", "timestretch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ParameterError, match="no augmentation improves"):
            weights_from_gains(0.9, f1)


def test_a_gain_below_the_declared_minimal_effect_gets_no_weight():
    from ser_toolkit.settings import MIN_GAIN, study_schema

    aug = next(s for s in study_schema() if s.name == "augmentations")
    assert next(e for e in aug.entries if e.name == "min_gain").default == MIN_GAIN == 0.01
    f1 = {"specaugment": 0.756, "timestretch": 0.5903, "noise": 0.5862}  # +0.170, +0.0043, +0.0002
    with pytest.warns(UserWarning, match="less than 0.01; left out") as record:
        w = weights_from_gains(0.586, f1, min_gain=MIN_GAIN)
    assert sorted(str(r.message).split("'")[1] for r in record) == ["noise", "timestretch"]
    assert w == {"specaugment": 1.0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert set(weights_from_gains(0.586, f1)) == set(f1)  # min_gain 0: every positive gain, as before


@given(data=st.data())
@settings(max_examples=20, deadline=None)
def test_never_nan_or_inf_on_odd_inputs(data):
    kind = data.draw(st.sampled_from(["silence", "square", "impulse", "noise"]))
    n = data.draw(st.integers(1, 8000))
    x = {"silence": np.zeros(n), "square": np.sign(np.sin(np.arange(n) / 7.0)),
         "impulse": np.eye(1, n, n // 2)[0], "noise": np.random.default_rng(n).uniform(-1, 1, n)}[kind]
    x = x.astype(np.float32)
    pool = PartnerPool(["n"], ["neutral"], lambda _: speechlike(0.4))
    for aug in (TimeStretch(), Noise(), Noise(snr_db=10), SpecAugment(time_warp=3), NeutralCopyPaste(), Duplicate()):
        y, _ = aug(x, np.random.default_rng(n), AugmentContext(utterance_id="x", emotion="happy", partners=pool))
        assert np.isfinite(y).all() and y.size > 0
