"""Content identity, names, snapshot reads, integrity and sealed runs (issue 8).

Each test fails on a sertk that trusts paths and names: results must never
refer to data they were not computed on.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from helpers import one_line_error as one_line
from helpers import run_sertk, write_audio
from ser_toolkit.cache.build import Preprocess, build_cache, verify_cache
from ser_toolkit.cache.reader import CacheReader
from ser_toolkit.errors import CacheError, SertkError
from ser_toolkit.plugins.synthetic import Synthetic

torch = pytest.importorskip("torch")

FAST = ["--model", "tiny", "--model-set", "hidden_size=16", "--epochs", "1", "--batch-size", "8",
        "--workers", "0", "--split", "speaker:test=0.25", "-q"]


def one_line_error(r, needle: str) -> None:
    assert r.code == 2, (r.code, r.out, r.err)
    assert needle in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err + r.out, r.err


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def flip_audio_byte(path: Path, utterance: int = 3) -> None:
    with h5py.File(path, "r") as fh:
        itemsize = fh["audio"].dtype.itemsize
        offset = fh["audio"].id.get_offset() + itemsize * (int(fh["utterances/offset"][utterance]) + 100)
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0xFF]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A synthetic cache and a finished, evaluated tiny run on it (copied per test when changed)."""
    root = tmp_path_factory.mktemp("identity")
    cache = root / "cache"
    assert run_sertk("cache", "synthetic", "--set", "per_emotion=2", "--cache-dir", cache, "-q").code == 0
    run = root / "run"
    r = run_sertk("train", "--cache-dir", cache, "--out", run, *FAST)
    assert r.code == 0, r.err
    assert run_sertk("evaluate", run).code == 0
    return cache, run


def test_recached_corpus_is_refused_by_evaluate_and_report(tmp_path):
    cache, run = tmp_path / "cache", tmp_path / "run"
    assert run_sertk("cache", "synthetic", "--set", "per_emotion=2", "--cache-dir", cache, "-q").code == 0
    assert run_sertk("train", "--cache-dir", cache, "--out", run, *FAST).code == 0
    assert run_sertk("evaluate", run).code == 0
    # a hand-edited run.json (e.g. pointing the run at other data) breaks the seal
    info_text = (run / "run.json").read_text()
    (run / "run.json").write_text(info_text.replace('"run_id"', '"run_id" ', 1))
    one_line_error(run_sertk("evaluate", run), "was changed after the run was sealed")
    (run / "run.json").write_text(info_text)
    before = CacheReader(cache / "synthetic.h5").digest
    # the same name, other content: re-cached with another option (the finished run depends on it: --force)
    one_line_error(run_sertk("cache", "synthetic", "--set", "per_emotion=3", "--cache-dir", cache, "-q"),
                   "--force")
    assert CacheReader(cache / "synthetic.h5").digest == before
    assert run_sertk("cache", "synthetic", "--set", "per_emotion=3", "--cache-dir", cache, "-q",
                     "--force").code == 0
    assert CacheReader(cache / "synthetic.h5").digest != before
    evals = snapshot(run / "eval")
    one_line_error(run_sertk("evaluate", run), "changed since run")
    assert snapshot(run / "eval") == evals  # no result overwritten
    r = run_sertk("evaluate", run, "--allow-changed-data", "--test", "test")
    assert r.code == 0, r.err
    recorded = json.loads((run / "eval" / "test.json").read_text())["data"]
    assert recorded["changed"] and recorded["digest"] != recorded["trained_digest"] == before
    one_line_error(run_sertk("report", run, "-o", tmp_path / "r.md"), "after its data changed")
    assert not (tmp_path / "r.md").exists()
    r = run_sertk("report", run, "-o", tmp_path / "r.md", "--allow-changed-data")
    assert r.code == 0, r.err
    assert "data changed (accepted with --allow-changed-data)" in (tmp_path / "r.md").read_text()


def test_report_refuses_runs_evaluated_on_different_data(trained, tmp_path):
    cache, run = trained
    a, b = shutil.copytree(run, tmp_path / "a"), tmp_path / "b"  # two runs (a copy would be the same run)
    assert run_sertk("train", "--cache-dir", cache, "--out", b, *FAST, "--seed", "7").code == 0
    assert run_sertk("evaluate", b).code == 0
    e = json.loads((b / "eval" / "test.json").read_text())
    e["data"]["digest"] = "0" * 64
    (b / "eval" / "test.json").write_text(json.dumps(e))
    one_line_error(run_sertk("report", a, b, "-o", tmp_path / "r.md"), "was changed after the evaluation")
    from ser_toolkit.evaluation import seal_evaluation

    seal_evaluation(b / "eval", e["run_id"], list(json.loads((b / "eval" / "summary.json").read_text())))
    one_line_error(run_sertk("report", a, b, "-o", tmp_path / "r.md"), "is different data in different runs")


def test_cache_names_are_names(tmp_path):
    write_audio(tmp_path / "a.wav")
    (tmp_path / "m.csv").write_text("path,label,speaker\na.wav,happy,s1\n")
    cache = tmp_path / "c" / "cache"
    for bad in ("../../x", ".hidden", "a/b"):
        one_line_error(run_sertk("cache", "manifest", "--root", tmp_path / "m.csv", "--set", f"corpus={bad}",
                                 "--cache-dir", cache, "-q"), "is not a plain name")
    one_line_error(run_sertk("cache", "synthetic", "--name", "../x", "--cache-dir", cache, "-q"), "plain name")
    assert not any(p.suffix == ".h5" for p in tmp_path.rglob("*"))
    # another corpus under an existing name is refused; the cache is untouched
    assert run_sertk("cache", "synthetic", "--set", "per_emotion=1", "--cache-dir", cache, "-q").code == 0
    before = snapshot(cache)
    one_line_error(run_sertk("cache", "manifest", "--root", tmp_path / "m.csv", "--set", "corpus=synthetic",
                             "--cache-dir", cache, "-q"), "holds another corpus")
    assert snapshot(cache) == before
    r = run_sertk("cache", "manifest", "--root", tmp_path / "m.csv", "--set", "corpus=synthetic",
                  "--cache-dir", cache, "-q", "--force")
    assert r.code == 0 and len(CacheReader(cache / "synthetic.h5")) == 1


def test_cache_options_are_never_silently_changed(tmp_path):
    cache = tmp_path / "cache"
    assert run_sertk("cache", "synthetic", "--set", "per_emotion=1", "--cache-dir", cache, "--dtype", "int16",
                     "-q").code == 0
    before = snapshot(cache)
    one_line_error(run_sertk("cache", "synthetic", "--set", "per_emotion=1", "--cache-dir", cache, "-q"),
                   "was built with dtype=int16, not dtype=float32")
    assert snapshot(cache) == before
    # a study that does not ask for the user's options is refused too, before any training
    cfg = tmp_path / "s.toml"
    cfg.write_text('[data]\noptions = { per_emotion = 1 }\ncache_dir = "cache"\n')
    one_line_error(run_sertk("study", "--preset", "demo", "--config", cfg, cwd=tmp_path), "dtype=int16")
    assert snapshot(cache) == before and not (tmp_path / "runs").exists()


def _read_all(reader: CacheReader) -> list[np.ndarray]:
    return [reader.wave(i) for i in range(len(reader))]


def _child_reads(reader: CacheReader) -> list[np.ndarray]:
    return _read_all(reader)


def test_a_reader_is_a_snapshot_of_one_version(tmp_path):
    path = tmp_path / "s.h5"
    build_cache(Synthetic(per_emotion=1), None, path, quiet=True)
    reader = CacheReader(path)
    old = _read_all(reader)
    reader.close()
    reader = CacheReader(path)
    build_cache(Synthetic(per_emotion=1, seed=7), None, path, quiet=True)  # renamed over the path
    assert CacheReader(path).digest != reader.digest
    assert all(np.array_equal(a, b) for a, b in zip(old, _read_all(reader)))  # still the old version
    with mp.get_context("fork").Pool(1) as pool:  # a forked worker reads the same version
        child = pool.apply(_child_reads, (reader,))
    assert all(np.array_equal(a, b) for a, b in zip(old, child))
    copy = pickle.loads(pickle.dumps(reader))
    copy._fd = None  # as in a spawned process: only the path is left, and it holds other data now
    with pytest.raises(CacheError, match="was replaced while this job was reading it"):
        copy.wave(0)
    with pytest.raises(CacheError, match="changed"):
        CacheReader(path, expect_digest=reader.digest)


def test_damage_is_detected_and_rebuilt(tmp_path):
    cache = tmp_path / "cache"
    assert run_sertk("cache", "synthetic", "--set", "per_emotion=2", "--cache-dir", cache, "-q").code == 0
    path = cache / "synthetic.h5"
    clean = _read_all(CacheReader(path))
    digest = CacheReader(path).digest
    flip_audio_byte(path)
    reader = CacheReader(path)  # the table is intact
    with pytest.raises(CacheError, match="fails its checksum"):
        _read_all(reader)
    reader.close()
    assert verify_cache(path)["damaged"]
    one_line_error(run_sertk("cache", "--verify", path), "fail their checksums")
    r = run_sertk("cache", "synthetic", "--set", "per_emotion=2", "--cache-dir", cache, "--force")
    assert r.code == 0, r.err
    assert verify_cache(path)["damaged"] == [] and CacheReader(path).digest == digest
    assert all(np.array_equal(a, b) for a, b in zip(clean, _read_all(CacheReader(path))))
    # an incremental build never carries damaged audio over: it decodes everything again
    flip_audio_byte(path)
    r = run_sertk("cache", "synthetic", "--set", "per_emotion=3", "--cache-dir", cache, "-q")
    assert r.code == 0, r.err
    assert verify_cache(path)["damaged"] == []
    assert run_sertk("cache", "synthetic", "--set", "per_emotion=2", "--cache-dir", cache, "-q").code == 0
    assert CacheReader(path).digest == digest
    # a corrupt table column: refused on open, rebuilt by sertk cache
    with h5py.File(path, "r+") as fh:
        fh["utterances/offset"][3] += 10
    one_line_error(run_sertk("inspect", path), "is damaged")
    with h5py.File(path, "r+") as fh:
        fh["utterances/offset"][3] -= 10
        fh["utterances/emotion_index"][0] = 99
    one_line_error(run_sertk("inspect", path), "is damaged")
    r = run_sertk("cache", "synthetic", "--set", "per_emotion=2", "--cache-dir", cache)  # recognised: rebuilt
    assert r.code == 0 and "damaged" in r.out, r.err
    assert CacheReader(path).digest == digest


def test_implausible_sources_are_skipped(tmp_path):
    import soundfile as sf

    write_audio(tmp_path / "ok.wav", 0.5)
    write_audio(tmp_path / "long.wav", 3.0)
    sf.write(str(tmp_path / "slow.wav"), np.zeros(800, np.float32), 1)  # a header claiming 1 Hz
    (tmp_path / "m.csv").write_text("path,label,speaker\nok.wav,happy,s1\nlong.wav,sad,s1\nslow.wav,angry,s1\n")
    from ser_toolkit.plugins.manifest import Manifest

    summary = build_cache(Manifest(), tmp_path / "m.csv", tmp_path / "c.h5", Preprocess(max_seconds=2.0),
                          quiet=True)
    reasons = " | ".join(s["reason"] for s in summary.skipped)
    assert summary.utterances == 1 and "below 4000 Hz" in reasons and "longer than the cache's maximum" in reasons
    assert (tmp_path / "c.h5").stat().st_size < 1_000_000


def test_waveform_training_refuses_what_would_not_fit(tmp_path):
    for i in range(8):
        write_audio(tmp_path / f"u{i}.wav", 61.0 if i == 0 else 0.5, freq=200 + 30 * i)
    rows = "".join(f"u{i}.wav,{'happy' if i % 2 else 'sad'},s{i % 4}\n" for i in range(8))
    (tmp_path / "m.csv").write_text("path,label,speaker\n" + rows)
    cache = tmp_path / "cache"
    assert run_sertk("cache", "manifest", "--root", tmp_path / "m.csv", "--cache-dir", cache, "-q").code == 0
    r = run_sertk("train", "--cache-dir", cache, "--dataset", "manifest", "--out", tmp_path / "r",
                  *[a if a != "speaker:test=0.25" else "stratified:test=0.25" for a in FAST])
    one_line_error(r, "--max-seconds")


def test_unfinished_and_foreign_runs_are_refused(trained, tmp_path):
    cache, run = trained
    unfinished = shutil.copytree(run, tmp_path / "unfinished")
    (unfinished / "final.json").unlink()
    for command in (["evaluate", unfinished], ["predict", unfinished, cache.parent / "none.wav"]):
        one_line_error(run_sertk(*command), "is unfinished")
    write_audio(tmp_path / "x.wav")
    r = run_sertk("predict", unfinished, tmp_path / "x.wav", "--allow-unfinished", "--json")
    assert r.code == 0 and json.loads(r.out)[0]["emotion"]
    one_line_error(run_sertk("report", unfinished, "-o", tmp_path / "r.md"), "is unfinished")
    # weights copied in from another run are refused, even with a matching seal
    other = tmp_path / "other"
    assert run_sertk("train", "--cache-dir", cache, "--out", other, *FAST, "--seed", "7").code == 0
    foreign = shutil.copytree(run, tmp_path / "foreign")
    shutil.copy(other / "checkpoints" / "best.safetensors", foreign / "checkpoints" / "best.safetensors")
    one_line_error(run_sertk("evaluate", foreign), "is not the file this run sealed")
    final = json.loads((foreign / "final.json").read_text())
    final["checkpoints"]["best.safetensors"] = json.loads((other / "final.json").read_text())[
        "checkpoints"]["best.safetensors"]
    (foreign / "final.json").write_text(json.dumps(final))
    one_line_error(run_sertk("evaluate", foreign), "belong to another run")


def test_a_crafted_checkpoint_runs_no_code(trained, tmp_path):
    cache, run = trained
    crafted = shutil.copytree(run, tmp_path / "crafted")
    (crafted / "final.json").unlink()
    marker = tmp_path / "pwned"

    class _Exploit:
        def __reduce__(self):  # unpickling would call Path.touch(marker)
            return (Path.touch, (marker,))

    torch.save({"model": _Exploit(), "run_id": json.loads((crafted / "run.json").read_text())["run_id"]},
               crafted / "checkpoints" / "epoch-001.pt")
    r = run_sertk("train", "--cache-dir", cache, "--out", crafted, "--resume", "-q", "--workers", "0")
    one_line_error(r, "cannot be read safely")
    assert not marker.exists()


def test_materialised_sets_follow_their_source(tmp_path):
    path = tmp_path / "s.h5"
    build_cache(Synthetic(per_emotion=2), None, path, quiet=True)
    from ser_toolkit.augment_sets import build_augmentation, materialize
    from ser_toolkit.splits import make_split

    reader = CacheReader(path)
    assignment = make_split(reader.utterances, "speaker:test=0.25")
    first, written = materialize(reader, assignment, "test", "noise", build_augmentation(["noise"]))
    assert written and CacheReader(first).config["augmentation"]["source_digest"] == reader.digest
    assert materialize(reader, assignment, "test", "noise", build_augmentation(["noise"]))[1] is False
    a, _ = materialize(reader, assignment, "train", "noise", build_augmentation(["noise"]), seed=1)
    b, _ = materialize(reader, assignment, "train", "noise", build_augmentation(["noise"]), seed=2)
    assert a != b and a.exists() and b.exists()  # seeds never share a file
    build_cache(Synthetic(per_emotion=2, seed=3), None, path, quiet=True)  # the source changes
    changed = CacheReader(path)
    second, written = materialize(changed, make_split(changed.utterances, "speaker:test=0.25"), "test", "noise",
                                  build_augmentation(["noise"]))
    assert written and second.parent != first.parent and first.exists()
    assert CacheReader(second).config["augmentation"]["source_digest"] == changed.digest


def test_predict_uses_the_training_down_mix(trained, tmp_path):
    _, run = trained
    write_audio(tmp_path / "st.wav", 0.5, channels=2)
    a = run_sertk("predict", run, tmp_path / "st.wav", "--json")
    b = run_sertk("predict", run, tmp_path / "st.wav", "--json", "--mono", "first")
    assert a.code == 0 and b.code == 0, a.err + b.err
    assert json.loads(a.out)[0]["probabilities"] != json.loads(b.out)[0]["probabilities"]
    one_line_error(run_sertk("predict", run, tmp_path / "st.wav", "--mono", "sideways"), "unknown --mono rule")


def test_augment_refuses_to_overwrite_its_input(tmp_path):
    src = write_audio(tmp_path / "in.wav")
    before = src.read_bytes()
    one_line_error(run_sertk("augment", "noise", src, src), "is the input file")
    assert src.read_bytes() == before


def test_sertk_errors_pickle_as_one_line():
    err = pickle.loads(pickle.dumps(SertkError("problem", "fix")))
    assert str(err) == "problem; fix"


def test_names_with_dots_and_unstorable_strings(tmp_path):
    cache = tmp_path / "cache"
    assert run_sertk("cache", "synthetic", "--set", "per_emotion=1", "--name", "a.b", "--cache-dir", cache,
                     "-q").code == 0
    (tmp_path / "a.b").mkdir()  # a folder of that name in the working folder does not shadow the cache
    r = run_sertk("inspect", "a.b", "--json", cwd=tmp_path)
    assert r.code == 0 and json.loads(r.out)["utterances"] == 56
    write_audio(tmp_path / "x.wav")
    (tmp_path / "nul.csv").write_text("path,label,speaker\nx.wav,happy,sp\x00k\n")
    one_line_error(run_sertk("cache", "manifest", "--root", tmp_path / "nul.csv", "--cache-dir", cache, "-q"),
                   "NUL byte")
    assert not (cache / "manifest.h5").exists()


def test_a_damaged_resumable_checkpoint_is_refused(trained, tmp_path):
    cache, run = trained
    copy = shutil.copytree(run, tmp_path / "run")
    (copy / "final.json").unlink()
    ckpt = copy / "checkpoints" / "epoch-001.pt"  # a sealed run keeps no state: write one as training would
    from ser_toolkit.training import runs

    runs.save_checkpoint(ckpt, {"model": {"w": torch.arange(20000, dtype=torch.float32)}, "epoch": 0,
                                "run_id": json.loads((copy / "run.json").read_text())["run_id"]})
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    r = run_sertk("train", "--cache-dir", cache, "--out", copy, "--resume", "-q", "--workers", "0")
    one_line_error(r, "fails its checksum")


def test_held_out_sets_are_what_their_names_say(trained, tmp_path):
    cache, run = trained
    cache = shutil.copytree(cache, tmp_path / "cache")
    assert run_sertk("materialize", cache / "synthetic.h5", "--plugins", "noise,specaugment",
                     "--split", "speaker:test=0.25", "-q").code == 0
    folder = next((cache / "synthetic.aug").iterdir())
    (folder / "test-noise.h5").rename(folder / "x.h5")
    (folder / "test-specaugment.h5").rename(folder / "test-noise.h5")
    runs_copy = shutil.copytree(run, tmp_path / "run")
    from ser_toolkit.evaluation import test_sets
    from ser_toolkit.training.runs import run_info

    info = run_info(runs_copy)
    info["data"]["cache"]["path"] = str(cache / "synthetic.h5")
    with pytest.raises(SertkError, match="was not made as the test part"):
        test_sets(runs_copy, ["augmented"], info)
    # a cross-corpus set holding the run's own training audio is refused, whatever its name
    from ser_toolkit.cache.build import locate_cache

    assert run_sertk("cache", "synthetic", "--set", "per_emotion=2", "--name", "other-corpus", "--cache-dir",
                     cache, "-q").code == 0
    with pytest.raises(SertkError, match="holds .* of the run's own training data"):
        test_sets(runs_copy, ["cross"], info, cross=[str(locate_cache("other-corpus", cache))])


def test_a_cache_finished_runs_depend_on_is_not_replaced_without_force(tmp_path):
    cache, run = tmp_path / "cache", tmp_path / "run"
    assert run_sertk("cache", "synthetic", "--set", "per_emotion=2", "--cache-dir", cache, "-q").code == 0
    before = CacheReader(cache / "synthetic.h5").digest
    assert run_sertk("train", "--cache-dir", cache, "--out", run, *FAST).code == 0
    r = run_sertk("cache", "synthetic", "--set", "per_emotion=3", "--cache-dir", cache, "-q")
    one_line_error(r, "1 finished run trained on")
    assert str(run) in r.err and "--force" in r.err and "--name" in r.err
    assert CacheReader(cache / "synthetic.h5").digest == before  # untouched
    assert run_sertk("evaluate", run).code == 0
    assert run_sertk("cache", "synthetic", "--set", "per_emotion=2", "--cache-dir", cache, "-q").code == 0  # same
    # a study over that cache with other content: the runs are not its own, so it refuses too
    cfg = tmp_path / "s.toml"
    cfg.write_text(f'[data]\ncache_dir = "{cache}"\noptions = {{ per_emotion = 3 }}\ncross = []\n')
    r = run_sertk("study", "--preset", "demo", "--config", cfg, cwd=tmp_path)
    one_line(r, "1 finished run trained on", "study config's [data]", "sertk cache synthetic")
    assert CacheReader(cache / "synthetic.h5").digest == before
    # a moved run is still protected (its record cannot tell moved from deleted)
    moved = tmp_path / "elsewhere"
    run.rename(moved)
    r = run_sertk("cache", "synthetic", "--set", "per_emotion=3", "--cache-dir", cache, "-q")
    one_line(r, "(not there now: moved or deleted)", "synthetic.h5.runs/")
    assert CacheReader(cache / "synthetic.h5").digest == before
    assert run_sertk("evaluate", moved).code == 0
    r = run_sertk("cache", "synthetic", "--set", "per_emotion=3", "--cache-dir", cache, "-q", "--force")
    assert r.code == 0, r.err
    assert CacheReader(cache / "synthetic.h5").digest != before
