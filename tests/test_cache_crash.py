"""Crash safety: kill -9 or Ctrl-C mid-build never leaves a cache that reads as complete; reruns finish."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import run_sertk
from ser_toolkit.cache.reader import CacheReader
from ser_toolkit.errors import CacheError

ARGS = ["cache", "synthetic", "--set", "per_emotion=12", "--workers", "1", "-q"]
ENV = {"SERTK_CACHE_TASK_SIZE": "8"}  # a part file every 8 utterances


def _start(cache_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ser_toolkit", *ARGS, "--cache-dir", str(cache_dir)],
                            env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_parts(cache_dir: Path, proc: subprocess.Popen, n: int = 2, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(list(cache_dir.glob("synthetic.h5.parts/*/part-*.h5"))) >= n:
            return
        if proc.poll() is not None:
            pytest.fail(f"build ended before it could be interrupted: {proc.stderr.read()}")
        time.sleep(0.05)
    pytest.fail("no part file appeared")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted build to compare against."""
    out = tmp_path_factory.mktemp("ref")
    r = run_sertk(*ARGS, "--cache-dir", out, env=ENV)
    assert r.code == 0, r.err
    return CacheReader(out / "synthetic.h5")


def _same(a: CacheReader, b: CacheReader) -> None:
    assert a.ids == b.ids
    for i in range(len(a)):
        np.testing.assert_array_equal(a.wave(i), b.wave(i))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_build_resumes(tmp_path, reference, sig):
    proc = _start(tmp_path)
    _wait_for_parts(tmp_path, proc)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "rerun the command to resume" in proc.stderr.read()
    # nothing reads as complete
    with pytest.raises(CacheError):
        CacheReader(tmp_path / "synthetic.h5")
    r = run_sertk(*ARGS, "--cache-dir", tmp_path, "--json", env=ENV)
    assert r.code == 0, r.err
    import json

    summary = json.loads(r.out)
    assert summary["resumed"] > 0 and summary["decoded"] + summary["resumed"] == len(reference)
    _same(CacheReader(tmp_path / "synthetic.h5"), reference)
    assert not list(tmp_path.glob("synthetic.h5.tmp-*")) and not (tmp_path / "synthetic.h5.parts").exists()


@pytest.mark.slow
def test_kill_during_update_keeps_old_cache(tmp_path, reference):
    small = run_sertk("cache", "synthetic", "--set", "per_emotion=2", "-q", "--cache-dir", tmp_path)
    assert small.code == 0
    before = CacheReader(tmp_path / "synthetic.h5")
    n_before = len(before)
    proc = _start(tmp_path)  # grows the cache to per_emotion=12
    _wait_for_parts(tmp_path, proc, n=1)
    proc.kill()
    proc.wait()
    still = CacheReader(tmp_path / "synthetic.h5")  # the old complete cache is intact
    assert len(still) == n_before
    assert run_sertk(*ARGS, "--cache-dir", tmp_path, env=ENV).code == 0
    _same(CacheReader(tmp_path / "synthetic.h5"), reference)


@pytest.mark.slow
def test_concurrent_builds_do_not_corrupt(tmp_path, reference):
    procs = [_start(tmp_path) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    _same(CacheReader(tmp_path / "synthetic.h5"), reference)


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_with_workers(tmp_path, reference):
    """A terminal's Ctrl-C reaches every process: one line, exit 130, no worker tracebacks, resumable."""
    proc = subprocess.Popen([sys.executable, "-m", "ser_toolkit", *ARGS[:-3], "--workers", "2", "-q",
                             "--cache-dir", str(tmp_path)], env={**os.environ, **ENV}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for_parts(tmp_path, proc)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.strip()] == [
        "Interrupted; nothing half-written was left behind, rerun the command to resume."]
    assert run_sertk(*ARGS, "--cache-dir", tmp_path, env=ENV).code == 0
    _same(CacheReader(tmp_path / "synthetic.h5"), reference)


_FULL_DISK = """
import collections, shutil, sys
import ser_toolkit.space as space
real = shutil.disk_usage
Usage = collections.namedtuple("Usage", "total used free")
class Fake:  # the disk reports 1 MB free
    @staticmethod
    def disk_usage(p):
        u = real(p)
        return Usage(u.total, u.total - (1 << 20), 1 << 20)
space.shutil = Fake
from ser_toolkit.cli import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_full_disk_is_one_line_and_the_rerun_finishes(tmp_path, reference):
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK, *ARGS, "--cache-dir", str(tmp_path)],
                          env={**os.environ, **ENV}, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not enough disk space for the audio of" in lines[0], proc.stderr  # a part file's
    assert "--cache-dir" in lines[0] and "part files are kept" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "synthetic.h5").exists()
    assert not list(tmp_path.rglob("*.tmp-*")), "a half-written file was left behind"
    r = run_sertk(*ARGS, "--cache-dir", tmp_path, env=ENV)
    assert r.code == 0, r.err
    _same(CacheReader(tmp_path / "synthetic.h5"), reference)


def test_reserved_space_is_handed_back(tmp_path):
    import h5py

    from ser_toolkit.space import _fallocate, new_h5

    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    if not _fallocate(probe, 1 << 20):
        pytest.skip("this system cannot reserve space (fallocate); only the preflight check applies")
    path = tmp_path / "x.h5"
    with new_h5(path, 32 << 20, "a test file") as fh:
        assert os.stat(path).st_blocks * 512 >= 32 << 20, "the space was not reserved"
        fh.create_dataset("audio", data=np.ones(1 << 18, np.float32))
    assert os.stat(path).st_blocks * 512 < 4 << 20, "the unused reservation was not handed back"
    with h5py.File(path, "r") as fh:
        np.testing.assert_array_equal(fh["audio"][:], np.ones(1 << 18, np.float32))


def test_h5py_disk_full_message_is_named():
    from ser_toolkit.errors import os_error_line

    exc = OSError(28, "Driver write request failed (file write failed: time = Wed Nov 25\n, filename = "
                      "'/data/c/x.h5.tmp-h-1-ab', errno = 28, error message = 'No space left on device')")
    line = os_error_line(exc)
    assert "\n" not in line and line.startswith("the disk is full under /data/c ")
    assert os_error_line(FileNotFoundError(2, "No such file or directory", "/nope")).startswith("cannot access /nope")


_WORKER_DIES = """
import os, signal, sys
import ser_toolkit.cache.build as build
parent, real, calls = os.getpid(), build._to_storage, [0]
def dying(wave, dtype):  # a decoder crash in a worker: killed in the middle of writing its part file
    calls[0] += 1
    if os.getpid() != parent and calls[0] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(wave, dtype)
build._to_storage = dying
from ser_toolkit.cli import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_a_worker_that_dies_is_one_line_and_the_rerun_removes_its_half_written_part(tmp_path, reference):
    args = [a for a in ARGS if a not in ("--workers", "1")] + ["--workers", "2"]
    proc = subprocess.run([sys.executable, "-c", _WORKER_DIES, *args, "--cache-dir", str(tmp_path)],
                          env={**os.environ, **ENV}, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "a decoding worker process died" in lines[0] and "--workers 1" in lines[0], lines
    assert list(tmp_path.glob("synthetic.h5.parts/*/part-*.tmp-*")), "the killed worker left its temporary"
    r = run_sertk(*args, "--cache-dir", tmp_path, env=ENV)
    assert r.code == 0, r.err
    assert not list(tmp_path.rglob("*.tmp-*"))  # removed by the rerun, as the message says
    _same(CacheReader(tmp_path / "synthetic.h5"), reference)


@pytest.mark.slow
def test_a_killed_materialize_leaves_nothing_the_rerun_does_not_remove(tmp_path):
    """kill -9 mid-write: the temporary (with its reserved space) is removed by the next materialize."""
    assert run_sertk(*ARGS, "--cache-dir", tmp_path, env=ENV).code == 0
    cmd = [sys.executable, "-m", "ser_toolkit", "materialize", str(tmp_path / "synthetic.h5"), "--plugins",
           "timestretch", "--subset", "train", "--copies", "3", "--split", "stratified:test=0.2", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(tmp_path.rglob("*.h5.tmp-*")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.rglob("*.h5.tmp-*"))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not list(tmp_path.rglob("*.tmp-*"))
