"""Built-in featurizers: egemaps and compare (openSMILE) and acoustic."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest

from helpers import run_sertk
from ser_toolkit.errors import PluginError
from ser_toolkit.featurizers import get_featurizer

RATE = 16000
DIMS = {"egemaps": 88, "compare": 6373, "acoustic": 588}
UTTERANCE = "ravdess/Actor_01/03-01-05-02-01-01-01.flac"


def sine(seconds: float = 1.0, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture(scope="module")
def featurizers():
    return {name: get_featurizer(name) for name in DIMS}


@pytest.mark.shared_data
@pytest.mark.parametrize("name, feature_set", [("egemaps", "eGeMAPSv02"), ("compare", "ComParE_2016")])
def test_opensmile_matches_direct_call(shared_data, featurizers, name, feature_set):
    import opensmile
    import soundfile as sf

    wave, rate = sf.read(str(shared_data / UTTERANCE), dtype="float32")
    assert rate == RATE and wave.ndim == 1
    smile = opensmile.Smile(feature_set=opensmile.FeatureSet[feature_set],
                            feature_level=opensmile.FeatureLevel.Functionals)
    expected = smile.process_signal(wave, rate)
    got = featurizers[name].extract(wave, rate)
    assert got.dtype == np.float32 and got.shape == (DIMS[name],)
    np.testing.assert_array_equal(got, expected.to_numpy()[0].astype(np.float32))  # bit-identical
    assert featurizers[name].feature_names() == list(expected.columns)


@pytest.mark.parametrize("name", sorted(DIMS))
@pytest.mark.parametrize("wave", [sine(), sine(100 / RATE), np.zeros(1, np.float32), np.zeros(0, np.float32)],
                         ids=["sine-1s", "100-samples", "1-sample", "empty"])
def test_shape_dtype_finite(featurizers, name, wave):
    out = featurizers[name].extract(wave, RATE)
    assert out.shape == (DIMS[name],) and out.dtype == np.float32
    assert np.isfinite(out).all()
    names = featurizers[name].feature_names()
    assert len(names) == DIMS[name] and len(set(names)) == DIMS[name]


def test_short_input_is_padded_to_min_seconds(featurizers):
    """Zero-padding to min_seconds is what extract does to short input (no NaN from openSMILE)."""
    short = sine(0.03)
    padded = np.pad(short, (0, int(0.1 * RATE) - short.size))
    f = featurizers["egemaps"]
    np.testing.assert_array_equal(f.extract(short, RATE), f.extract(padded, RATE))
    longer = get_featurizer("egemaps", {"min_seconds": "0.2"})
    assert not np.array_equal(longer.extract(short, RATE), f.extract(short, RATE))


@pytest.mark.parametrize("name", sorted(DIMS))
def test_pickles_and_extracts_identically(featurizers, name):
    f = featurizers[name]
    wave = sine(0.5, 180.0)
    before = f.extract(wave, RATE)  # the openSMILE extractor now exists; it must not travel
    copy = pickle.loads(pickle.dumps(f))
    assert getattr(copy, "_smile", None) is None
    assert copy.identity() == f.identity()
    np.testing.assert_array_equal(copy.extract(wave, RATE), before)


def test_identity_and_key():
    eg, co = get_featurizer("egemaps"), get_featurizer("compare")
    assert eg.key() != co.key() and eg.identity() != co.identity()
    import opensmile

    assert eg.identity()["opensmile"] == opensmile.__version__
    assert eg.identity()["feature_set"] == "eGeMAPSv02"
    assert get_featurizer("egemaps", {"min_seconds": 0.1}).key() == eg.key()  # the default, spelled out
    assert get_featurizer("egemaps", {"min_seconds": 0.5}).key() != eg.key()
    assert get_featurizer("acoustic").key() not in {eg.key(), co.key()}


def test_acoustic_needs_16k(featurizers):
    from ser_toolkit.errors import SertkError

    with pytest.raises(SertkError, match="16000 Hz"):
        featurizers["acoustic"].extract(sine(), 8000)


def test_acoustic_featurizer_is_the_model_features(featurizers):
    from ser_toolkit.plugins.acoustic import acoustic_features

    wave = sine(0.7, 300.0)
    np.testing.assert_array_equal(featurizers["acoustic"].extract(wave, RATE), acoustic_features(wave))
    names = featurizers["acoustic"].feature_names()
    assert names[0] == "mfcc1_mean" and names[20] == "mfcc1_std" and names[142] == "log_duration_s" and names[398] == "spectral_contrast7_std" and names[-1] == "energy_db_slope_per_s" and len(names) == 588


def test_plugins_lists_featurizers():
    r = run_sertk("plugins", "--kind", "featurizer", "--json")
    assert r.code == 0, r.err
    entries = json.loads(r.out)
    assert {"acoustic", "compare", "egemaps"} <= {e["name"] for e in entries}
    assert {e["kind"] for e in entries} == {"featurizer"}


def test_unknown_featurizer_is_one_line():
    with pytest.raises(PluginError) as info:
        get_featurizer("gemaps")
    msg = str(info.value)
    assert "\n" not in msg and "unknown featurizer 'gemaps'" in msg
    assert all(n in msg for n in DIMS)


def test_import_does_not_load_opensmile():
    code = ("import sys, ser_toolkit.plugins.opensmile_features as m\n"
            "assert 'opensmile' not in sys.modules, 'imported at module level'\n"
            "m.Egemaps()\nassert 'opensmile' not in sys.modules, 'imported at construction'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_missing_opensmile_is_one_line(monkeypatch):
    from ser_toolkit.errors import SertkError

    monkeypatch.setitem(sys.modules, "opensmile", None)  # import opensmile -> ImportError
    f = get_featurizer("egemaps")
    with pytest.raises(SertkError, match="the opensmile package is not installed; pip install opensmile"):
        f.extract(sine(), RATE)


def test_zero_crossing_rate_is_librosas():
    import librosa

    from ser_toolkit.plugins.acoustic import _zero_crossing_rate

    rng = np.random.default_rng(0)
    edge = rng.normal(size=5000).astype(np.float32)
    edge[::7], edge[::11], edge[100:300] = 0.0, -0.0, 1e-11  # exact zeros, negative zeros, below the threshold
    for x in (edge, np.zeros(2048, np.float32), rng.normal(size=2049).astype(np.float32),
              np.sin(np.arange(16000) / 7.0).astype(np.float32)):
        expected = librosa.feature.zero_crossing_rate(x, frame_length=512, hop_length=160)
        assert np.array_equal(_zero_crossing_rate(x), expected)


def _yin_inputs(shared_root=None):
    rng = np.random.default_rng(1)
    waves = [sine(1.3, 180.0), rng.normal(size=9000).astype(np.float32) * 0.1, np.zeros(4000, np.float32),
             (sine(2.0, 95.0) + sine(2.0, 310.0)) * np.linspace(0, 1, 32000, dtype=np.float32)]
    if shared_root is not None:
        import soundfile as sf

        for path in sorted((shared_root / "ravdess" / "Actor_02").glob("*.flac"))[::9]:
            waves.append(sf.read(path, dtype="float32")[0])
    return waves


def _check_yin(waves):
    import librosa
    import soxr

    from ser_toolkit.plugins.acoustic import PITCH_RATE, _yin

    rng = np.random.default_rng(2)
    for wave in waves:
        x8 = soxr.resample(wave, RATE, PITCH_RATE, quality="HQ")
        expected = librosa.yin(x8, fmin=60, fmax=500, sr=PITCH_RATE, frame_length=512, hop_length=PITCH_RATE // 100)
        for keep in (np.ones(expected.size, bool), rng.random(expected.size) < 0.5, np.zeros(expected.size, bool)):
            got = _yin(x8, keep)
            assert got.shape == expected.shape
            assert np.array_equal(got[keep], expected[keep])  # bit for bit where kept
            assert np.isnan(got[~keep]).all()


def test_yin_on_kept_frames_is_librosas():
    _check_yin(_yin_inputs())


@pytest.mark.shared_data
def test_yin_on_kept_frames_is_librosas_on_real_speech(shared_data):
    _check_yin(_yin_inputs(shared_data))


@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")  # scipy on the constant row
def test_skew_is_scipys():
    from scipy.stats import skew

    from ser_toolkit.plugins.acoustic import _skew

    x = np.random.default_rng(3).gamma(2.0, size=(20, 300)).astype(np.float32)
    x[3] = 0.5  # a constant row: NaN, as scipy
    expected = skew(x, axis=1)
    got = _skew(x)
    assert np.isnan(got[3]) and np.isnan(expected[3])
    np.testing.assert_allclose(np.delete(got, 3), np.delete(expected, 3), rtol=1e-4, atol=1e-6)
