"""What a hostile round found after issue 23's fixes: each case a one-line refusal (or a correct result), never a
traceback, a hang, a lost result or a file of someone else's written over."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import one_line_error, run_sertk, synthetic_cache, write_audio
from ser_toolkit.training import runs

pytest.importorskip("torch")

TINY = ["--model", "tiny", "--model-set", "hidden_size=16", "--workers", "0", "-q"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    caches = synthetic_cache(root / "C", per_emotion=2)
    run = root / "run"
    assert run_sertk("train", "--cache-dir", caches, "--out", run, "--epochs", "1", *TINY).code == 0
    return root, caches / "synthetic.h5", run


def _reseal(run: Path, name: str) -> None:
    """Recompute the seal's digest of ``name`` (as anyone handing over a run folder can)."""
    final = json.loads((run / "final.json").read_text())
    if name.startswith("checkpoints/"):
        final["checkpoints"][name.split("/", 1)[1]] = runs.file_digest(run / name)
    else:
        final["files"][name] = runs.file_digest(run / name)
    (run / "final.json").write_text(json.dumps(final))


def test_two_trainings_into_one_folder_never_both_write_it(world):
    root, cache, _ = world
    out = root / "race"
    slow = subprocess.Popen([sys.executable, "-m", "ser_toolkit", "train", "--dataset", str(cache), "--out", str(out),
                             "--epochs", "3", *TINY], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "config.json").is_file():
            assert slow.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        r = run_sertk("train", "--dataset", cache, "--out", out, "--epochs", "1", "--seed", "3", *TINY)
        one_line_error(r, f"another sertk process is training run {out} now", "another --out")
    finally:
        assert slow.wait(timeout=300) == 0
    assert run_sertk("evaluate", out).code == 0  # the first run, whole


def test_a_folder_with_a_config_json_of_its_own_is_not_written_over(world):
    root, cache, _ = world
    mine = root / "mine"
    mine.mkdir()
    for text in ("not json", json.dumps({"my": "settings"})):
        (mine / "config.json").write_text(text)
        one_line_error(run_sertk("train", "--dataset", cache, "--out", mine, "--epochs", "1", *TINY),
                       "holds a config.json that is not a sertk run's")
        assert (mine / "config.json").read_text() == text


@pytest.mark.parametrize("damage", ["truncated", "huge header", "header not JSON"])
def test_damaged_weights_with_a_recomputed_seal_are_one_line(world, damage):
    root, _, run = world
    copy = shutil.copytree(run, root / f"w-{damage.replace(' ', '-')}")
    path = copy / "checkpoints" / "best.safetensors"
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    path.write_bytes({"truncated": data[: len(data) // 2], "huge header": struct.pack("<Q", 2 ** 62) + data[8:],
                      "header not JSON": data[:8] + b"{" * n + data[8 + n:]}[damage])
    _reseal(copy, "checkpoints/best.safetensors")
    one_line_error(run_sertk("evaluate", copy), "cannot be read", "retrain the run")


@pytest.mark.parametrize("key, value, says", [("max_seconds", -5, "max_seconds must be a number > 0"),
                                               ("epochs", "seven", "epochs must be an int >= 1")])
def test_a_sealed_config_is_checked_against_the_declared_settings(world, key, value, says):
    root, _, run = world
    copy = shutil.copytree(run, root / f"cfg-{key}")
    cfg = json.loads((copy / "config.json").read_text())
    cfg["train"][key] = value
    (copy / "config.json").write_text(json.dumps(cfg))
    _reseal(copy, "config.json")
    one_line_error(run_sertk("evaluate", copy), says, "retrain it")


def test_nan_weights_are_never_sealed_as_predictions(world):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file, save_file

    root, _, run = world
    copy = shutil.copytree(run, root / "nan")
    path = copy / "checkpoints" / "best.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    tensors = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
               for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata=meta)
    _reseal(copy, "checkpoints/best.safetensors")
    one_line_error(run_sertk("evaluate", copy), "predicts no finite probabilities", "retrain the run")
    assert not (copy / "eval" / "test.predictions.csv").exists() or \
        "nan" not in (copy / "eval" / "test.predictions.csv").read_text().lower()
    write_audio(root / "a.wav")
    one_line_error(run_sertk("predict", copy, root / "a.wav"), "NaN or infinite probabilities")


def test_a_fifo_where_a_cache_belongs_is_named_never_opened(world, tmp_path):
    fifo = tmp_path / "synthetic.h5"
    os.mkfifo(fifo)
    for args in (["cache", "synthetic", "--cache-dir", tmp_path, "-q"],
                 ["cache", "synthetic", "--cache-dir", tmp_path, "--force", "-q"],
                 ["inspect", fifo], ["cache", "--verify", fifo], ["features", fifo, "-f", "acoustic"],
                 ["train", "--dataset", fifo, "--out", tmp_path / "r", *TINY]):
        one_line_error(run_sertk(*args, timeout=60), "FIFO")
    assert not (tmp_path / "synthetic.h5.parts").exists()  # refused before decoding anything
    split = tmp_path / "split.csv"
    os.mkfifo(split)
    _, cache, _ = world
    one_line_error(run_sertk("split", cache, "--split", f"file:{split}", timeout=60), "is not a regular file")


def test_evaluate_cache_is_the_run_s_own_cache_or_a_refusal(world, tmp_path):
    root, cache, run = world
    other = synthetic_cache(tmp_path / "other", per_emotion=3) / "synthetic.h5"
    one_line_error(run_sertk("evaluate", run, "--cache", tmp_path / "nothere.h5"), "--cache", "does not exist")
    one_line_error(run_sertk("evaluate", run, "--cache", other), "holds other data", "never evaluated as the run's")
    one_line_error(run_sertk("evaluate", run, "--cache", other, "--allow-changed-data"), "holds other data")
    os.mkfifo(tmp_path / "fifo.h5")
    one_line_error(run_sertk("evaluate", run, "--cache", tmp_path / "fifo.h5", timeout=60), "FIFO")
    assert run_sertk("evaluate", run, "--cache", cache).code == 0


def test_audio_shorter_than_one_frame_is_predicted(world, tmp_path):
    import soundfile as sf

    _, _, run = world
    for n in (1, 100, 399):
        sf.write(tmp_path / f"s{n}.wav", np.full(n, 0.1, np.float32), 16000)
    r = run_sertk("predict", run, *(tmp_path / f"s{n}.wav" for n in (1, 100, 399)))
    assert r.code == 0 and r.out.count("(") == 3 and all(f"s{n}.wav" in r.out for n in (1, 100, 399)), r.err


def test_odd_option_values_and_paths_are_one_line(world, tmp_path):
    _, _, run = world
    one_line_error(run_sertk("evaluate", run, "--max-seconds", "inf"), "--max-seconds")
    loop = tmp_path / "loop.wav"
    loop.symlink_to(loop)
    one_line_error(run_sertk("predict", run, loop), "symbolic link that leads to no file")


def test_a_copied_study_reports_its_own_runs(world, tmp_path):
    from ser_toolkit.report.collect import _listed_run

    study = tmp_path / "copy"
    (study / "baseline-s42").mkdir(parents=True)
    (study / "baseline-s42" / "config.json").write_text("{}")
    original = tmp_path / "runs" / "baseline-s42"
    original.mkdir(parents=True)
    (original / "config.json").write_text("{}")
    assert _listed_run(study, str(original)) == study / "baseline-s42"  # beside its study.json first


def test_a_full_disk_is_one_line_for_library_writers(world, tmp_path):
    """safetensors and libsndfile report a full disk in their own exception types."""
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        subprocess.run(["fallocate", "-l", "2900k", str(small / "fill")], check=True)
        _, cache, _ = world
        r = run_sertk("train", "--dataset", cache, "--out", small / "run", "--epochs", "1", "--model", "tiny",
                      "--model-set", "hidden_size=64", "--workers", "0", "-q")
        one_line_error(r, "the disk is full")
        write_audio(tmp_path / "long.wav", seconds=120)
        one_line_error(run_sertk("augment", "noise", tmp_path / "long.wav", small / "out.wav"), "the disk is full",
                       "write OUT elsewhere")
    finally:
        subprocess.run(["umount", "-l", str(small)])


def test_prediction_takes_the_source_rules_of_caching(world, tmp_path):
    import soundfile as sf

    _, _, run = world
    sf.write(tmp_path / "1hz.wav", np.full(8, 0.1, np.float32), 1)
    one_line_error(run_sertk("predict", run, tmp_path / "1hz.wav"), "sample rate 1 Hz is below 4000 Hz")
    sf.write(tmp_path / "zero.wav", np.full(16000, 0.1, np.float32), 16000, subtype="PCM_16")
    data = bytearray((tmp_path / "zero.wav").read_bytes())
    at = data.index(b"data")
    data[at + 4:at + 8] = struct.pack("<I", 0)  # a writer that never filled in the size
    (tmp_path / "zero.wav").write_bytes(bytes(data))
    one_line_error(run_sertk("predict", run, tmp_path / "zero.wav"), "declares 0 data bytes but 32000 follow",
                   "re-export the file")
