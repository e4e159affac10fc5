"""The synthetic corpus: deterministic, varied, learnable but not trivially separable."""

from __future__ import annotations

import numpy as np
import pytest

from ser_toolkit.cache.build import build_cache
from ser_toolkit.cache.reader import CacheReader
from ser_toolkit.emotions import EMOTIONS
from ser_toolkit.plugins.synthetic import Synthetic, SyntheticShifted


def test_layout_and_labels():
    scan = Synthetic().scan(None)
    assert len(scan.utterances) == 8 * 7 * 6
    genders = {u.speaker: u.gender for u in scan.utterances}
    assert sorted(genders.values()).count("female") == 4 and len(genders) == 8
    shifted = SyntheticShifted().scan(None)
    assert not {u.speaker for u in shifted.utterances} & set(genders)


def test_bit_identical_and_seed_sensitive():
    ds = Synthetic(per_emotion=1, speakers=1)
    u = ds.scan(None).utterances[3]
    a, rate = ds.load(u, None)
    b, _ = Synthetic(per_emotion=1, speakers=1).load(u, None)
    assert rate == 16000 and a.dtype == np.float32 and np.array_equal(a, b)
    other = Synthetic(per_emotion=1, speakers=1, seed=5)
    c, _ = other.load(other.scan(None).utterances[3], None)
    assert not np.array_equal(a, c)
    assert ds.fingerprint(u, None) != other.fingerprint(other.scan(None).utterances[3], None)


def test_cache_is_identical_across_worker_counts(tmp_path):
    ds = Synthetic(per_emotion=1)
    build_cache(ds, None, tmp_path / "w1.h5", workers=1, quiet=True)
    build_cache(ds, None, tmp_path / "w2.h5", workers=2, quiet=True)
    a, b = CacheReader(tmp_path / "w1.h5"), CacheReader(tmp_path / "w2.h5")
    assert a.ids == b.ids and all(np.array_equal(a.wave(i), b.wave(i)) for i in range(len(a)))


def test_audio_is_sane():
    ds = Synthetic(per_emotion=1)
    for u in ds.scan(None).utterances:
        w, _ = ds.load(u, None)
        assert np.isfinite(w).all() and 0.5 < w.size / 16000 < 6 and np.abs(w).max() < 1
        assert np.sqrt(np.mean(w ** 2)) > 1e-3


def _features(w: np.ndarray) -> np.ndarray:
    import librosa

    m = librosa.feature.mfcc(y=w, sr=16000, n_mfcc=20)
    rms = librosa.feature.rms(y=w)[0]
    f0 = librosa.yin(w, fmin=60, fmax=500, sr=16000)
    return np.concatenate([m.mean(1), m.std(1), [rms.mean(), rms.std(), np.median(f0), f0.std(), w.size / 16000]])


@pytest.mark.slow
def test_learnable_but_not_trivial():
    """Speaker-independent logistic regression on acoustic statistics: well above chance, far from perfect."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    ds = Synthetic()
    utts = ds.scan(None).utterances
    X = np.array([_features(ds.load(u, None)[0][:, 0]) for u in utts])
    y = np.array([EMOTIONS.index(u.emotion) for u in utts])
    test = np.array([u.speaker in ("sf1", "sm1") for u in utts])
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)).fit(X[~test], y[~test])
    acc = clf.score(X[test], y[test])
    assert 0.3 < acc < 0.9, acc  # chance is 1/7
    shifted = SyntheticShifted()
    su = shifted.scan(None).utterances
    Xs = np.array([_features(shifted.load(u, None)[0][:, 0]) for u in su])
    cross = clf.score(Xs, [EMOTIONS.index(u.emotion) for u in su])
    assert cross < acc  # the shifted corpus is harder: a real cross-corpus gap
