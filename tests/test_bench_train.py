"""benchmarks/bench_train.py end to end on CPU: sertk's loop against the plain Trainer-style loops.

Run as a subprocess, as on the GPU image: the packages that image lacks (soundfile, soxr, librosa, skops,
submitit, opensmile, tomli_w) are made unimportable by a ``sitecustomize`` (a None entry in sys.modules:
``import`` raises ImportError, ``importlib.util.find_spec`` returns None), and ``--data`` is an empty
folder, so the benchmark must fall back to sertk's synthetic corpus and every sertk module it needs must
import without them. A tiny HuBERT, 48 utterances in batches of 8, 2 epochs: about 10 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

pytest.importorskip("torch")
pytest.importorskip("transformers")

HIDDEN = ("soundfile", "soxr", "librosa", "skops", "submitit", "opensmile", "tomli_w")
UTTERANCES, BATCH, WARM, COUNTED = 48, 8, 1, 1


def _hide_packages(folder: Path) -> Path:
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(
        "import sys\n"
        f"for _name in {HIDDEN!r}:\n"
        "    sys.modules[_name] = None\n")
    return folder


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("bench-train")
    hide = _hide_packages(tmp / "hide")
    (tmp / "no-data").mkdir()
    out = tmp / "train.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(hide), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_train.py"), "--size", "tiny", "--data", str(tmp / "no-data"),
         "--utterances", str(UTTERANCES), "--batch-size", str(BATCH), "--epochs", "2", "--workers", "0",
         "--warmup-steps", str(WARM), "--sync-steps", str(COUNTED), "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "synthetic" in proc.stdout
    return json.loads(out.read_text())


def test_falls_back_to_synthetic_data(result):
    data = result["data"]
    assert data["source"] == "synthetic"
    assert "no ravdess/seed_split.csv" in data["why"]
    assert data["utterances"] == UTTERANCES
    assert result["device"] == "cpu" and result["model"] == "tiny"


def test_both_loops_timed_the_same_batches(result):
    loops = [result[name] for name in ("sertk", "plain_hf", "plain_sertk_forward")]
    steps = UTTERANCES // BATCH  # bucketed batches of exactly BATCH items (UTTERANCES is a multiple)
    assert result["sertk"]["steps_in_epoch"] == steps
    assert {row["steps_timed"] for row in loops} == {steps - WARM - COUNTED}
    assert {row["utterances_timed"] for row in loops} == {(steps - WARM - COUNTED) * BATCH}
    assert result["same_batches"] is True
    assert len({row["batches_digest"] for row in loops}) == 1
    assert len({row["padding_efficiency"] for row in loops}) == 1
    assert 0 < result["sertk"]["padding_efficiency"] <= 1


def test_reports_steady_state_rates_and_ratio(result):
    sertk, plain = result["sertk"], result["plain_hf"]
    for row in (sertk, plain, result["plain_sertk_forward"]):
        assert row["utterances_per_s"] > 0 and row["audio_s_per_s"] > 0 and row["seconds"] > 0
        assert row["precision"] == "fp32"  # CPU: both loops in fp32
        assert row["peak_memory_gib"] > 0
        assert row["syncs_per_step"] is not None and row["sync_steps"] == COUNTED
        # audio-seconds/s = utterances/s x the timed utterances' mean duration (the same for both loops)
        assert row["audio_s_per_s"] / row["utterances_per_s"] == pytest.approx(
            sertk["audio_s_per_s"] / sertk["utterances_per_s"], rel=0.02)
    assert result["ratio"] == pytest.approx(sertk["utterances_per_s"] / plain["utterances_per_s"], rel=0.01)
    assert result["ratio_vs_plain_sertk_forward"] == pytest.approx(
        sertk["utterances_per_s"] / result["plain_sertk_forward"]["utterances_per_s"], rel=0.01)
    assert len(sertk["epoch_utterances_per_s"]) == 2 and result["settings"]["measured_epoch"] == 2


def test_model_level_syncs_are_counted(result):
    syncs = result["syncs_per_step"]
    assert syncs["device"] == "cpu"
    # HF's forward zeroes padded frames by boolean-mask indexing; sertk's path was built without it
    assert syncs["reference"]["by_kind"].get("boolean-mask indexing", 0) > 0
    assert syncs["sertk"]["per_step"] < syncs["reference"]["per_step"]
