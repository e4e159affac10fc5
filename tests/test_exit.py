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


def _group(pgid: int) -> list[int]:
    """The live (not zombie) processes of a process group."""
    from pathlib import Path

    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _kill_and_check_group(proc) -> None:
    """kill -9 ``proc`` (a session leader), then assert that its whole process group ends within 30 s (the
    survivors are killed either way, so that a failure leaves nothing running)."""
    import os
    import signal
    import time

    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while _group(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _group(proc.pid)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == []


@pytest.mark.slow
def test_a_killed_study_leaves_no_process_behind(tmp_path):
    """kill -9 of `sertk study --jobs 2` while its runs train: its fork server, its workers and theirs (feature
    workers forked by the workers' own fork servers) all end with it."""
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "ser_toolkit", "study", "--preset", "demo", "--jobs", "2", "-q"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    jobs = tmp_path / "runs" / "demo" / ".jobs"
    deadline = time.monotonic() + 300
    try:
        while len(list(jobs.glob("*.json"))) < 2:  # two runs handed to the two workers
            assert proc.poll() is None and time.monotonic() < deadline, "the study ended before its runs started"
            time.sleep(0.2)
        time.sleep(2.0)
        members = _group(proc.pid)
        assert len(members) >= 4  # the orchestrator, its fork server, two workers (and theirs)
    finally:
        _kill_and_check_group(proc)
    # their multiprocessing folders (fork server sockets) carry their pids: the next sertk process removes them
    import tempfile
    from pathlib import Path

    def left() -> list[Path]:
        return [p for p in Path(tempfile.gettempdir()).glob("sertk-mp.tmp-*")
                if int(p.name.rsplit("-", 2)[1]) in members]

    assert left(), "the study's processes named no multiprocessing folder of their own"
    subprocess.run([sys.executable, "-c", "from ser_toolkit.workers import own_mp_tempdir; own_mp_tempdir()"],
                   check=True)
    assert left() == []


def test_a_killed_cache_build_leaves_no_worker_holding_its_lock(tmp_path):
    """kill -9 of `sertk cache -j 2` while its workers decode: they end with it (an orphan held the build lock,
    so the rerun waited forever), and the rerun finishes the cache."""
    import os
    import subprocess
    import sys
    import time

    args = ["cache", "synthetic", "--set", "per_emotion=40", "--set", "speakers=4", "--cache-dir", str(tmp_path),
            "-j", "2", "-q"]
    proc = subprocess.Popen([sys.executable, "-m", "ser_toolkit", *args], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "SERTK_CACHE_TASK_SIZE": "4"})
    deadline = time.monotonic() + 120
    try:
        while len(_group(proc.pid)) < 3:  # the command and its two decoding workers
            assert proc.poll() is None and time.monotonic() < deadline, "the build ended before its workers started"
            time.sleep(0.05)
    finally:
        _kill_and_check_group(proc)
    r = run_sertk(*args, timeout=120)
    assert r.code == 0, r.err
