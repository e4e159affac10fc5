"""``sertk augment`` on real RAVDESS files: the output is what the printed parameters say."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from helpers import write_audio
from ser_toolkit.audio import load
from ser_toolkit.plugins.noise import active_power

ANGRY = "ravdess/Actor_01/03-01-05-02-01-01-01.flac"
NEUTRAL = "ravdess/Actor_01/03-01-01-01-01-01-01.flac"


def run(cli, *args):
    r = cli("augment", *args, "--json")
    assert r.code == 0, r.err
    out = json.loads(r.out)
    assert set(out) == {"augmentation", "params"}
    return out["params"]


@pytest.mark.shared_data
def test_timestretch_rate(shared_data, tmp_path, cli):
    src = shared_data / ANGRY
    p = run(cli, "timestretch", src, tmp_path / "o.wav", "--set", "rate=0.8")
    x, y = load(src), sf.read(str(tmp_path / "o.wav"), dtype="float32")[0]
    assert p == {"rate": 0.8} and abs(y.size - round(x.size / 0.8)) <= 1


@pytest.mark.shared_data
def test_noise_snr_and_level(shared_data, tmp_path, cli):
    src = shared_data / ANGRY
    x = load(src)
    p = run(cli, "noise", src, tmp_path / "snr.wav", "--set", "snr_db=10", "--seed", "4")
    y = sf.read(str(tmp_path / "snr.wav"), dtype="float32")[0]
    assert p["snr_db"] == 10 and abs(10 * np.log10(active_power(x) / np.mean((y - x) ** 2.0)) - 10) <= 0.5
    p = run(cli, "noise", src, tmp_path / "lvl.flac", "--set", "level=0.005")
    y = sf.read(str(tmp_path / "lvl.flac"), dtype="float32")[0]
    assert p["level"] == 0.005 and np.std(y - x) == pytest.approx(0.005, rel=0.05)


@pytest.mark.shared_data
def test_specaugment_masks_where_it_says(shared_data, tmp_path, cli):
    src = shared_data / ANGRY
    x = load(src)
    p = run(cli, "specaugment", src, tmp_path / "o.wav", "--set", "time_mask=30", "--set", "freq_mask=0",
            "--seed", "2")
    y = sf.read(str(tmp_path / "o.wav"), dtype="float32")[0]
    (s0, s1), = p["time_masks_s"]
    inner = slice(int((s0 + 0.04) * 16000), int((s1 - 0.04) * 16000))
    if inner.stop > inner.start:
        assert np.sum(y[inner] ** 2) <= 1e-3 * np.sum(x[inner] ** 2) + 1e-9
    outside = slice(int((s1 + 0.05) * 16000), None)
    assert np.max(np.abs(y[outside] - x[outside])) < 1e-3


@pytest.mark.shared_data
def test_ncp_with_partner(shared_data, tmp_path, cli):
    src, partner = shared_data / ANGRY, shared_data / NEUTRAL
    p = run(cli, "ncp", src, tmp_path / "o.wav", "--partner", partner)
    x, n = load(src), load(partner)
    y = sf.read(str(tmp_path / "o.wav"), dtype="float32")[0]
    third = n.size // 3
    assert y.size == n.size and p["cut_s"] == [third / 16000, 2 * third / 16000]
    start = (x.size - third) // 2
    np.testing.assert_allclose(y[third:2 * third], x[start:start + third], atol=1e-7)


def test_any_format_rate_and_channels(tmp_path, cli):
    write_audio(tmp_path / "st.wav", 1.0, rate=44100, channels=2)
    write_audio(tmp_path / "lo.flac", 1.0, rate=8000)
    for f in ("st.wav", "lo.flac"):
        run(cli, "noise", tmp_path / f, tmp_path / f"out-{f}.wav")
        info = sf.info(str(tmp_path / f"out-{f}.wav"))
        assert info.samplerate == 16000 and info.channels == 1 and abs(info.frames - 16000) <= 1


def test_augment_errors(tmp_path, cli):
    write_audio(tmp_path / "a.wav")
    (tmp_path / "bad.wav").write_text("nope")
    for args, needle in ((("nope", tmp_path / "a.wav", tmp_path / "o.wav"), "unknown augmentation"),
                         (("noise", tmp_path / "bad.wav", tmp_path / "o.wav"), "not an audio file"),
                         (("noise", tmp_path / "none.wav", tmp_path / "o.wav"), "no such file"),
                         (("timestretch", tmp_path / "a.wav", tmp_path / "o.wav", "--set", "rate=9"), "'rate'"),
                         (("ncp", tmp_path / "a.wav", tmp_path / "o.wav"), "--partner")):
        r = cli("augment", *args)
        assert r.code == 2 and needle in r.err and len(r.err.strip().splitlines()) == 1
    assert not (tmp_path / "o.wav").exists()
