"""Run folders refer to their data by content digest: a moved or copied study reuses its runs, a run resumes
from any working directory, and a cache that moved is asked for (``--cache``) and checked by its digest."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from helpers import kill_when, one_line_error, run_sertk, synthetic_cache

FAST = ["--model", "tiny", "--model-set", "hidden_size=16", "--batch-size", "8", "--workers", "0",
        "--split", "speaker:test=0.25", "-q"]


@pytest.mark.slow
def test_a_moved_study_reuses_every_run(tmp_path):
    first = tmp_path / "a"
    first.mkdir()
    r = run_sertk("study", "--preset", "demo", "-q", cwd=first, timeout=900)
    assert r.code == 0, r.err
    moved = shutil.move(str(first), tmp_path / "b")  # runs, caches and reports together
    r = run_sertk("study", "--preset", "demo", cwd=moved, timeout=900)
    assert r.code == 0, r.err
    last = json.loads((tmp_path / "b" / "runs" / "demo" / "study.json").read_text())["invocations"][-1]
    assert last["runs"] == last["reused"] > 0, last  # nothing retrained for a new absolute path
    assert "retrained" not in r.out


def test_resume_works_from_any_working_directory(tmp_path):
    here = tmp_path / "project"
    synthetic_cache(here / "cache", speakers=4, per_emotion=2)
    run = here / "runs" / "r"
    proc = subprocess.Popen([sys.executable, "-m", "ser_toolkit", "train", "--dataset", "synthetic",
                             "--cache-dir", "cache", "--out", "runs/r", "--epochs", "3", "--checkpoint-every", "1",
                             *FAST], cwd=here, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    kill_when((run / "checkpoints" / "epoch-001.pt"), proc)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()  # the relative cache_dir "cache" means nothing here: the run's record is used
    r = run_sertk("train", "--out", run, "--resume", "-q", cwd=elsewhere)
    assert r.code == 0, r.err
    assert json.loads((run / "train_summary.json").read_text())["epochs_run"] == 3


def test_a_moved_cache_is_asked_for_and_checked_by_digest(tmp_path):
    caches = synthetic_cache(tmp_path / "cache", speakers=4, per_emotion=2)
    other = synthetic_cache(tmp_path / "other", speakers=4, per_emotion=3)  # another corpus, same name
    run = tmp_path / "run"
    assert run_sertk("train", "--dataset", caches / "synthetic.h5", "--out", run, "--epochs", "1", *FAST).code == 0
    moved = tmp_path / "moved.h5"
    shutil.move(str(caches / "synthetic.h5"), moved)
    err = one_line_error(run_sertk("evaluate", run), "training cache of run", "is not at", "--cache PATH")
    assert str(caches / "synthetic.h5") in err
    r = run_sertk("evaluate", run, "--cache", moved, "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["test"]["n"] > 0
    one_line_error(run_sertk("evaluate", run, "--cache", other / "synthetic.h5"), "holds other data")
