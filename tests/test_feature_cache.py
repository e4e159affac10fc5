"""The feature cache: computed once, reused on a hit, incremental, parallel, crash-safe, validated."""

from __future__ import annotations

import fcntl
import inspect
import json
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from helpers import write_audio
from ser_toolkit.cache.build import build_cache
from ser_toolkit.cache.features import (FeatureReader, build_features, feature_caches, feature_path,
                                        load_features)
from ser_toolkit.cache.reader import CacheReader
from ser_toolkit.errors import CacheError, SertkError
from ser_toolkit.featurizers import Featurizer
from ser_toolkit.params import Param


class Tiny(Featurizer):
    """Mean, spread, peak and log-length of a wave, times ``scale`` (cheap, deterministic).

    Test knobs outside the identity, from the environment (inherited by workers):
    ``TINY_COUNTER`` a file that gets one byte per utterance featurized, ``TINY_SLEEP``
    seconds per utterance, ``TINY_CRASH`` / ``TINY_NAN`` / ``TINY_SHAPE`` a wave length
    (samples) on which to raise, return NaN, or return another shape.
    """

    name = "tiny"
    description = "test featurizer: mean, std, peak, log length"
    params = (Param("scale", 1.0, "multiplier", type="float", min=0.0, max=100.0),)

    def extract(self, wave, rate):
        import os
        import time

        import numpy as np

        n = str(wave.size)
        if os.environ.get("TINY_COUNTER"):
            with open(os.environ["TINY_COUNTER"], "ab") as fh:
                fh.write(b".")
        if float(os.environ.get("TINY_SLEEP", "0")):
            time.sleep(float(os.environ["TINY_SLEEP"]))
        if os.environ.get("TINY_CRASH") == n:
            raise RuntimeError("tiny crashed on purpose")
        out = np.array([wave.mean(), wave.std(), np.abs(wave).max(), np.log(wave.size / rate)], np.float32)
        if os.environ.get("TINY_NAN") == n:
            out[1] = np.nan
        if os.environ.get("TINY_SHAPE") == n:
            out = out[:3]
        return out * self.options["scale"]

    def feature_names(self):
        return ["mean", "std", "peak", "log_seconds"]


PLUGIN = "from ser_toolkit import hookimpl\nfrom ser_toolkit.featurizers import Featurizer\n" \
         "from ser_toolkit.params import Param\n\n\n" + textwrap.dedent(inspect.getsource(Tiny)) + \
         "\n\n@hookimpl\ndef register_featurizers(registry):\n    registry.register(Tiny)\n"


def direct(reader: CacheReader, feat: Featurizer) -> np.ndarray:
    return np.stack([feat.extract(reader.wave(i), reader.sample_rate) for i in range(len(reader))])


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text, text
    return text


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """A small synthetic corpus cache (28 utterances), built once; tests copy it."""
    from ser_toolkit.plugins.synthetic import Synthetic

    out = tmp_path_factory.mktemp("synthetic") / "synthetic.h5"
    build_cache(Synthetic(speakers=1, per_emotion=2), None, out, quiet=True)
    return out


@pytest.fixture
def cache(synthetic, tmp_path) -> CacheReader:
    import shutil

    shutil.copy(synthetic, tmp_path / "synthetic.h5")
    return CacheReader(tmp_path / "synthetic.h5")


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setenv("SERTK_FEATURE_CHUNK", "4")


def leftovers(cache_path: Path) -> list[str]:
    folder = cache_path.with_name(cache_path.stem + ".features")
    return sorted(p.name for p in folder.iterdir() if p.suffix not in (".h5", ".lock"))


@pytest.mark.parametrize("workers", [0, 2])
def test_features_equal_direct_extract(cache, small_chunks, workers):
    feat = Tiny()
    fr = load_features(cache, feat, workers=workers)
    path = cache.path.parent / "synthetic.features" / f"tiny-{feat.key()}.h5"
    assert fr.path == path == feature_path(cache, feat) and fr.hit is False
    np.testing.assert_array_equal(fr.features, direct(cache, feat))
    assert fr.ids == cache.ids and fr.audio_digests == cache.column("audio_digest")
    assert fr.source_digest == cache.digest and fr.identity == {"name": "tiny", "options": {"scale": 1.0},
                                                                "version": "1"}
    assert fr.feature_names == ["mean", "std", "peak", "log_seconds"] and fr.shape == (4,)
    assert fr.build["computed"] == len(cache) and fr.build["workers"] == workers
    assert len(fr.digest) == 64 and fr.source_path == str(cache.path.resolve())
    with h5py.File(path) as fh:
        assert fh["features"].dtype == np.float32 and json.loads(fh.attrs["featurizer"])["name"] == "tiny"
    assert leftovers(cache.path) == []  # parts removed, no temporaries


def test_second_call_is_a_hit(cache, small_chunks, tmp_path, monkeypatch):
    counter = tmp_path / "calls"
    monkeypatch.setenv("TINY_COUNTER", str(counter))
    first = load_features(cache, Tiny(), workers=2)
    assert counter.stat().st_size == len(cache) and not first.hit
    mtime = first.path.stat().st_mtime_ns
    again = load_features(CacheReader(cache.path), Tiny(), workers=2)
    assert again.hit and counter.stat().st_size == len(cache)  # nothing computed in any process
    np.testing.assert_array_equal(again.features, first.features)
    assert again.digest == first.digest
    assert build_features(cache, Tiny(), workers=2) == first.path  # up to date: not rewritten
    assert counter.stat().st_size == len(cache) and first.path.stat().st_mtime_ns == mtime


def test_other_options_other_file_both_kept(cache):
    one, two = load_features(cache, Tiny(), workers=0), load_features(cache, Tiny(scale=2.0), workers=0)
    assert one.path != two.path and one.path.exists() and two.path.exists()
    np.testing.assert_allclose(two.features, 2 * one.features, rtol=1e-6)
    assert one.digest != two.digest
    assert load_features(cache, Tiny(), workers=0).hit and load_features(cache, Tiny(scale=2.0), workers=0).hit
    listed = feature_caches(cache.path)
    assert sorted(f["options"]["scale"] for f in listed) == [1.0, 2.0]
    assert {f["state"] for f in listed} == {"current"} and all(f["shape"] == [4] for f in listed)


def test_only_changed_utterances_are_recomputed(tmp_path, monkeypatch):
    from ser_toolkit.plugins.manifest import Manifest

    files = {f"f{i}.wav": (0.3 + 0.05 * i, 200.0 + 30 * i) for i in range(5)}
    for name, (seconds, freq) in files.items():
        write_audio(tmp_path / name, seconds, freq=freq)
    manifest = tmp_path / "manifest.csv"

    def write_manifest() -> None:
        manifest.write_text("path,label,speaker\n" + "".join(f"{p},happy,s{i % 2}\n" for i, p in enumerate(files)))

    write_manifest()
    out = tmp_path / "corpus.h5"
    build_cache(Manifest(), manifest, out, quiet=True)
    before = load_features(CacheReader(out), Tiny(), workers=0)
    assert before.build["computed"] == 5
    # one file changes, one is added: the cache is rebuilt incrementally
    time.sleep(0.01)
    write_audio(tmp_path / "f2.wav", 0.5, freq=555.0)
    files["f5.wav"] = (0.4, 300.0)
    write_audio(tmp_path / "f5.wav", 0.4, freq=300.0)
    write_manifest()
    build_cache(Manifest(), manifest, out, quiet=True)
    reader = CacheReader(out)
    assert reader.digest != before.source_digest
    assert [f["state"] for f in feature_caches(out)] == ["stale"]
    counter = tmp_path / "calls"
    monkeypatch.setenv("TINY_COUNTER", str(counter))
    after = load_features(reader, Tiny(), workers=0)
    assert not after.hit and counter.stat().st_size == 2
    assert (after.build["computed"], after.build["reused"], after.build["resumed"]) == (2, 4, 0)
    np.testing.assert_array_equal(after.features, direct(reader, Tiny()))
    assert after.path == before.path and after.source_digest == reader.digest
    assert [p.name for p in after.path.parent.glob("*.h5")] == [after.path.name]  # the stale file was replaced
    assert [f["state"] for f in feature_caches(out)] == ["current"]


@pytest.mark.parametrize("knob, expected", [("TINY_CRASH", "failed on utterance .*RuntimeError: tiny crashed"),
                                            ("TINY_NAN", "NaN or infinite values for utterance"),
                                            ("TINY_SHAPE", r"returned shape \(3,\) for utterance .* but \(4,\)")])
def test_featurizer_errors_name_the_utterance(cache, small_chunks, monkeypatch, knob, expected):
    target = len(cache) // 2
    lengths = cache.lengths.tolist()
    target = next(i for i in range(target, len(cache)) if lengths.count(lengths[i]) == 1)
    monkeypatch.setenv(knob, str(lengths[target]))
    with pytest.raises(SertkError, match=expected) as info:
        load_features(cache, Tiny(), workers=0)
    text = one_line(info.value)
    assert "featurizer 'tiny'" in text and cache.ids[target] in text
    assert not feature_path(cache, Tiny()).exists()
    monkeypatch.delenv(knob)
    fr = load_features(cache, Tiny(), workers=0)  # the chunks finished before the error are reused
    if knob != "TINY_SHAPE":
        assert fr.build["resumed"] >= 4 and fr.build["computed"] < len(cache)
    np.testing.assert_array_equal(fr.features, direct(cache, Tiny()))


def test_a_crash_in_a_worker_is_one_line(cache, small_chunks, monkeypatch):
    monkeypatch.setenv("TINY_CRASH", str(int(cache.lengths[-1])))
    with pytest.raises(SertkError, match="failed on utterance") as info:
        load_features(cache, Tiny(), workers=2)
    one_line(info.value)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign", "features", "incomplete"])
def test_damaged_or_foreign_feature_file(cache, damage):
    good = load_features(cache, Tiny(), workers=0)
    expected = good.features.copy()
    path = good.path
    good.close()
    if damage == "garbage":
        path.write_bytes(b"not a feature file\n" * 50)
    elif damage == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif damage == "foreign":
        path.unlink()
        with h5py.File(path, "w") as fh:
            fh.create_dataset("features", data=np.zeros((3, 4), np.float32))
    else:
        with h5py.File(path, "r+") as fh:
            if damage == "features":
                fh["features"][0, 0] += 1.0
            else:
                fh.attrs["complete"] = False
    with pytest.raises(CacheError) as info:
        FeatureReader(path).features  # noqa: B018
    text = one_line(info.value)
    assert str(path) in text and "delete it; it is rebuilt" in text
    listed = feature_caches(cache.path)  # sertk inspect lists it (the data digest is checked on load only)
    assert [f["state"] for f in listed] == ["current" if damage == "features" else "damaged"]
    said: list[str] = []
    fr = load_features(cache, Tiny(), workers=0, log=said.append)
    assert not fr.hit and len(said) == 1 and "rebuilding it" in said[0] and str(path) in said[0]
    np.testing.assert_array_equal(fr.features, expected)
    assert load_features(cache, Tiny(), workers=0).hit


def one_line_error(r) -> str:
    assert r.code == 2, (r.out, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.err, r.err
    return lines[0]


def test_cli_features_and_inspect(cli, tmp_path):
    """The built-in acoustic featurizer through ``sertk features``; ``sertk inspect`` lists the file."""
    d = tmp_path / "cache"
    assert cli("cache", "synthetic", "--set", "per_emotion=1", "--set", "speakers=1", "--cache-dir", d, "-q").code == 0
    r = cli("features", "synthetic", "--featurizer", "acoustic", "--cache-dir", d, "-q")
    assert r.code == 0, r.err
    assert "written: 14 utterances, shape (588,) (14 computed, 0 reused, 0 resumed)" in " ".join(r.out.split())
    r = cli("features", str(d / "synthetic.h5"), "--featurizer", "acoustic", "--json")
    assert r.code == 0, r.err
    summary = json.loads(r.out)
    assert summary["unchanged"] and summary["computed"] == 0 and summary["shape"] == [588]
    assert Path(summary["path"]).parent == d / "synthetic.features"
    r = cli("inspect", str(d / "synthetic.h5"))
    assert r.code == 0 and "features acoustic (default options; version" in r.out and "current" in r.out, r.out
    listed = json.loads(cli("inspect", str(d / "synthetic.h5"), "--json").out)["feature_caches"]
    assert [(f["featurizer"], f["shape"], f["state"]) for f in listed] == [("acoustic", [588], "current")]
    assert "unknown featurizer 'nope'" in one_line_error(cli("features", "synthetic", "--featurizer", "nope",
                                                             "--cache-dir", d))
    assert "does not exist" in one_line_error(cli("features", "missing", "--featurizer", "acoustic",
                                                  "--cache-dir", d))


# --- crash safety through the CLI, with the tiny featurizer as an installed plugin ---------------------------


@pytest.fixture
def plugin_env(tmp_path) -> dict:
    site = tmp_path / "site"
    info = site / "sertk_tiny-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sertk-tiny\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[sertk]\nsertk_tiny = sertk_tiny\n")
    (site / "sertk_tiny.py").write_text(PLUGIN)
    return {**os.environ, "PYTHONPATH": str(site), "SERTK_LOAD_PLUGINS": "sertk-tiny",
            "SERTK_FEATURE_CHUNK": "4", "TINY_SLEEP": "0.05"}


def _start(cache_path: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ser_toolkit", "features", str(cache_path), "--featurizer", "tiny",
                             "--workers", "2", "-q", "--json"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _parts(path: Path) -> set[str]:
    return {p.name for p in path.with_name(path.stem + ".parts").glob("*/part-*.npz")}


def _wait_started(proc: subprocess.Popen, path: Path, before: set[str], timeout: float = 60) -> None:
    """Until the build wrote its first part file, or wrote the feature file, or ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _parts(path) - before or path.exists() or proc.poll() is not None:
            return
        time.sleep(0.01)
    pytest.fail("the feature build did not start")


def _lock_free(lock: Path, timeout: float = 10) -> bool:
    """Whether the build lock can be taken (no orphaned worker holds it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(lock, "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fh, fcntl.LOCK_UN)
                return True
            except BlockingIOError:
                time.sleep(0.05)
    return False


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_kill_9_at_random_moments_never_leaves_wrong_features(cache, plugin_env):
    expected = direct(cache, Tiny())
    path = feature_path(cache, Tiny())
    rng = random.Random(7)
    progressed = 0
    for _ in range(8):
        before = _parts(path)
        proc = _start(cache.path, plugin_env)
        _wait_started(proc, path, before)
        time.sleep(rng.uniform(0.0, 0.6))  # computing (about 0.7 s in all), assembling, renaming or done
        proc.kill()
        proc.communicate(timeout=60)
        assert _lock_free(path.with_name(path.name + ".lock")), "an orphaned worker holds the build lock"
        progressed += len(_parts(path) - before)
        if path.exists():  # a file that reads as complete must be right
            fr = FeatureReader(path)
            np.testing.assert_array_equal(fr.features, expected)
            assert fr.source_digest == cache.digest
            fr.close()
            path.unlink()  # and start over, to be killed again
    assert progressed > 0, "no kill happened while features were being computed"
    proc = _start(cache.path, plugin_env)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    summary = json.loads(out)
    assert summary["computed"] + summary["resumed"] == len(cache) and not summary["unchanged"]
    fr = FeatureReader(path)
    np.testing.assert_array_equal(fr.features, expected)
    assert leftovers(cache.path) == [] and not list(path.parent.glob("*.tmp-*"))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_concurrent_builds_wait_for_each_other(cache, plugin_env):
    procs = [_start(cache.path, plugin_env) for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    summaries = [json.loads(o) for o, _ in outs]
    assert sorted(s["unchanged"] for s in summaries) == [False, True]  # the second found it built
    np.testing.assert_array_equal(FeatureReader(feature_path(cache, Tiny())).features, direct(cache, Tiny()))
