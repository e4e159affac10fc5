"""Commands end when their work is done: library thread pools (joblib/loky, torch.compile's workers) never
keep a finished sertk process alive."""

from __future__ import annotations

import json

import pytest

from helpers import run_sertk, synthetic_cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return synthetic_cache(tmp_path_factory.mktemp("cache"), speakers=4, per_emotion=2) / "synthetic.h5"


def test_a_command_that_used_loky_workers_exits(cache, tmp_path):
    """logreg's hyper-parameter search runs in joblib/loky workers, which idle for 300 s before they exit."""
    r = run_sertk("train", "--model", "logreg", "--dataset", cache, "--out", tmp_path / "run", "--workers", "2",
                  "-q", timeout=150)
    assert r.code == 0, r.err
    assert (tmp_path / "run" / "final.json").is_file()


@pytest.mark.slow
def test_compiled_training_with_batches_by_seconds_runs_and_exits(cache, tmp_path):
    """--compile (inductor on CPU here) with --batch-seconds: one graph per length bucket; the run trains,
    evaluates, and the process ends (the compiler's worker pools are not waited for)."""
    run = tmp_path / "run"
    r = run_sertk("train", "--model", "tiny", "--model-set", "hidden_size=16", "--dataset", cache, "--out", run,
                  "--epochs", "1", "--compile", "--batch-seconds", "8", "--batch-size", "16", "--workers", "0",
                  "-q", timeout=500)
    assert r.code == 0, r.err
    assert json.loads((run / "config.json").read_text())["train"]["compile"] is True
    assert run_sertk("evaluate", run, timeout=300).code == 0
