"""Decoding edge cases and the cache's incremental, strict and format behaviour."""

from __future__ import annotations

import json
import pickle

import h5py
import numpy as np
import pytest
import soundfile as sf

from helpers import tone, write_audio
from ser_toolkit.audio import decode, prepare, to_mono
from ser_toolkit.cache.build import Preprocess, build_cache
from ser_toolkit.cache.reader import CacheReader
from ser_toolkit.errors import AudioError, CacheError
from ser_toolkit.plugins.manifest import Manifest


def corpus(tmp_path, files: dict[str, str]):
    """A manifest corpus: ``{relative path: emotion}``."""
    (tmp_path / "manifest.csv").write_text(
        "path,label,speaker\n" + "".join(f"{p},{e},s{i % 2}\n" for i, (p, e) in enumerate(files.items())))
    return Manifest(), tmp_path / "manifest.csv"


@pytest.fixture
def variants(tmp_path):
    """One file of each awkward kind."""
    d = tmp_path / "corpus"
    write_audio(d / "good.wav", 1.0)
    write_audio(d / "stereo44.wav", 1.0, rate=44100, channels=2)
    write_audio(d / "eight_bit.wav", 0.5, subtype="PCM_U8")
    write_audio(d / "short10ms.wav", 0.01)
    write_audio(d / "rate48.flac", 0.5, rate=48000)
    (d / "empty.wav").write_bytes(b"")
    (d / "text.wav").write_text("this is not audio\n" * 20)
    good = (d / "good.wav").read_bytes()
    (d / "truncated.wav").write_bytes(good[: len(good) // 2])
    flac = d / "x.flac"
    write_audio(flac, 1.0)
    (d / "corrupt.flac").write_bytes(flac.read_bytes()[:2000] + b"\x00" * 5000)
    flac.unlink()
    nan = np.full((1600, 1), np.nan, dtype=np.float32)
    sf.write(str(d / "nan.wav"), nan, 16000, subtype="FLOAT")
    return d


@pytest.mark.parametrize("name, reason", [
    ("empty.wav", "empty file"),
    ("text.wav", "not an audio file"),
    ("truncated.wav", "truncated WAV"),
    ("corrupt.flac", "cannot decode"),
    ("nan.wav", "NaN"),
])
def test_bad_files_are_rejected_with_reason(variants, name, reason):
    with pytest.raises(AudioError, match=reason) as info:
        decode(variants / name)
    assert name in str(info.value)


def test_good_variants_decode_to_16k_mono(variants):
    for name, seconds in (("good.wav", 1.0), ("stereo44.wav", 1.0), ("eight_bit.wav", 0.5),
                          ("short10ms.wav", 0.01), ("rate48.flac", 0.5)):
        data, rate = decode(variants / name)
        wave = prepare(data, rate)
        assert wave.dtype == np.float32 and wave.ndim == 1
        assert abs(wave.size - seconds * 16000) <= 2, name
    stereo, rate = decode(variants / "stereo44.wav")
    assert stereo.shape[1] == 2 and rate == 44100


def test_mono_rules():
    x = np.stack([np.ones(4), np.zeros(4), 3 * np.ones(4)], axis=1).astype(np.float32)
    assert np.allclose(to_mono(x, "mean"), 4 / 3)
    assert np.allclose(to_mono(x, "first"), 1)
    assert np.allclose(to_mono(x, "loudest"), 3)


def test_cache_skips_bad_files_and_strict_fails(variants, tmp_path):
    files = {p.name: "happy" for p in sorted(variants.iterdir())}
    ds, root = corpus(variants, files)
    out = tmp_path / "c" / "v.h5"
    s = build_cache(ds, root, out, quiet=True)
    reasons = {x["path"]: x["reason"] for x in s.skipped}
    assert set(reasons) == {"empty.wav", "text.wav", "truncated.wav", "corrupt.flac", "nan.wav"}
    assert s.utterances == 5
    reader = CacheReader(out)
    assert reader.summary()["skipped"] and reader.wave("stereo44").size == 16000
    with pytest.raises(AudioError):
        build_cache(ds, root, tmp_path / "c" / "strict.h5", strict=True, quiet=True)
    assert not (tmp_path / "c" / "strict.h5").exists()
    # skipped files are remembered: an unchanged re-run does not decode them again
    again = build_cache(ds, root, out, quiet=True)
    assert again.unchanged and again.decoded == 0 and len(again.skipped) == 5


def test_clipping_counted(tmp_path):
    sf.write(str(tmp_path / "loud.wav"), np.clip(tone(0.2, amp=1.5), -1, 1), 16000)
    write_audio(tmp_path / "quiet.wav")
    ds, root = corpus(tmp_path, {"loud.wav": "angry", "quiet.wav": "sad"})
    s = build_cache(ds, root, tmp_path / "c.h5", quiet=True)
    assert s.clipped_utterances == 1
    assert CacheReader(tmp_path / "c.h5").summary()["clipped_utterances"] == 1


def test_incremental_rebuild_and_config_change(tmp_path):
    for i in range(4):
        write_audio(tmp_path / f"f{i}.wav", 0.3, freq=200 + 50 * i)
    ds, root = corpus(tmp_path, {f"f{i}.wav": "happy" for i in range(4)})
    out = tmp_path / "c.h5"
    first = build_cache(ds, root, out, quiet=True)
    assert first.decoded == 4
    before = CacheReader(out).wave("f1").copy()
    # change one file, add one: only those two are decoded
    write_audio(tmp_path / "f2.wav", 0.6, freq=999)
    write_audio(tmp_path / "f4.wav", 0.3)
    ds, root = corpus(tmp_path, {f"f{i}.wav": "happy" for i in range(5)})
    second = build_cache(ds, root, out, quiet=True)
    assert (second.decoded, second.reused, second.utterances) == (2, 3, 5)
    reader = CacheReader(out)
    assert reader.wave("f2").size == int(0.6 * 16000)
    np.testing.assert_array_equal(reader.wave("f1"), before)
    # a different preprocessing config is refused, never silently rebuilt; --force rebuilds, never mixes
    digest = CacheReader(out).digest
    with pytest.raises(CacheError, match="was built with dtype=float32, not dtype=int16"):
        build_cache(ds, root, out, Preprocess(dtype="int16"), quiet=True)
    assert CacheReader(out).digest == digest
    third = build_cache(ds, root, out, Preprocess(dtype="int16"), quiet=True, force=True)
    assert third.rebuilt and third.decoded == 5 and third.reused == 0
    reader = CacheReader(out)
    assert reader.config["preprocess"]["dtype"] == "int16"
    np.testing.assert_allclose(reader.wave("f1"), before, atol=1 / 32768)
    with h5py.File(out) as fh:
        assert fh["audio"].dtype == np.int16
    # a label change rewrites the table without decoding
    (tmp_path / "manifest.csv").write_text((tmp_path / "manifest.csv").read_text().replace("happy", "sad"))
    fourth = build_cache(ds, root, out, Preprocess(dtype="int16"), quiet=True)
    assert fourth.decoded == 0 and not fourth.unchanged
    assert set(CacheReader(out).column("emotion")) == {"sad"}


def test_reader_pickles_and_reads_in_other_processes(tmp_path):
    import multiprocessing as mp

    for i in range(3):
        write_audio(tmp_path / f"f{i}.wav", 0.2 + 0.1 * i)
    ds, root = corpus(tmp_path, {f"f{i}.wav": "fear" for i in range(3)})
    build_cache(ds, root, tmp_path / "c.h5", quiet=True)
    reader = CacheReader(tmp_path / "c.h5")
    reader.wave(0)  # opened in the parent
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._fh is None and clone.wave(2).size == reader.wave(2).size
    with mp.get_context("fork").Pool(2) as pool:
        sizes = pool.map(_size_of, [(reader, i) for i in range(3)])
    assert sizes == [int((0.2 + 0.1 * i) * 16000) for i in range(3)]


def _size_of(args):
    reader, i = args
    return int(reader.wave(i).size)


def test_inspect_json_keys(tmp_path, cli):
    r = cli("cache", "synthetic", "--set", "per_emotion=1", "--set", "speakers=1", "--cache-dir", tmp_path, "-q")
    assert r.code == 0, r.err
    info = json.loads(cli("inspect", tmp_path / "synthetic.h5", "--json").out)
    for key in ("utterances", "emotions", "speakers", "sample_rate", "hours", "schema_version", "config", "skipped"):
        assert key in info
    assert info["utterances"] == 14 and list(info["emotions"]) == [
        "neutral", "happy", "sad", "angry", "fear", "disgust", "surprise"]
    assert info["config"]["preprocess"] == {"sample_rate": 16000, "mono": "mean", "dtype": "float32",
                                            "resampler": "soxr-hq", "max_seconds": 600.0}
    assert len(info["digest"]) == 64


def test_cache_equals_the_reference_loader(tmp_path):
    """44.1 kHz stereo and 48 kHz mono: the cache holds exactly what librosa.load(path, sr=16000) returns."""
    import librosa

    write_audio(tmp_path / "stereo.wav", 0.7, rate=44100, channels=2)
    write_audio(tmp_path / "mono48.wav", 0.33, rate=48000, subtype="PCM_24")
    ds, root = corpus(tmp_path, {"stereo.wav": "happy", "mono48.wav": "sad"})
    build_cache(ds, root, tmp_path / "c.h5", quiet=True)
    reader = CacheReader(tmp_path / "c.h5")
    for name in ("stereo", "mono48"):
        ref, _ = librosa.load(str(tmp_path / f"{name}.wav"), sr=16000)
        np.testing.assert_array_equal(reader.wave(name), ref)
