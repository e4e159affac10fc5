"""The study as a graph of runs: side by side on this machine, as submitit jobs, killed and resumed; Slurm jobs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import run_sertk
from ser_toolkit import atomic

SMALL = """
name = "graph"
[data]
options = { per_emotion = 2 }
cross = [{ dataset = "synthetic-shifted", options = { per_emotion = 1 } }]
[model]
name = "acoustic"
[training]
epochs = 6
workers = 1
[augmentations]
methods = ["noise", "timestretch"]
[study]
runs_dir = "runs/graph"
report = "reports/graph.md"
"""
RUNS = ["baseline-s42", "noise-s42", "timestretch-s42", "duplicate-s42"]


def _study(folder: Path, *args: str, timeout: int = 600):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "graph.toml").write_text(SMALL)
    return run_sertk("study", "--preset", "demo", "--config", "graph.toml", *args, cwd=folder, timeout=timeout)


def _predictions(folder: Path) -> dict[str, str]:
    runs = folder / "runs" / "graph"
    return {f"{run}/{p.name}": p.read_text() for run in RUNS for p in sorted((runs / run / "eval").glob("*.csv"))}


def _intervals(folder: Path) -> dict[str, tuple[float, float, int]]:
    out = {}
    for run in RUNS:
        o = json.loads((folder / "runs" / "graph" / ".jobs" / f"{run}.json").read_text())["outcome"]
        out[run] = (o["started"], o["ended"], o["pid"])
    return out


def _overlap(intervals: dict[str, tuple[float, float, int]]) -> bool:
    items = list(intervals.values())
    return any(a[0] < b[1] and b[0] < a[1] and a[2] != b[2] for i, a in enumerate(items) for b in items[i + 1:])


@pytest.fixture(scope="module")
def one_at_a_time(tmp_path_factory) -> dict[str, str]:
    """The predictions of every run of the study executed one run after another, in this process."""
    folder = tmp_path_factory.mktemp("one")
    one = _study(folder, "--jobs", "1")
    assert one.code == 0, one.err
    return _predictions(folder)


@pytest.mark.timeout(1500)  # above the subprocess limits inside
@pytest.mark.slow
def test_runs_side_by_side_give_the_results_of_one_at_a_time(tmp_path, one_at_a_time):
    pool = _study(tmp_path / "pool", "--executor", "local", "--jobs", "2")
    assert pool.code == 0, pool.err
    jobs = _study(tmp_path / "jobs", "--executor", "submitit-local", "--jobs", "2")
    assert jobs.code == 0, jobs.err
    expected = one_at_a_time
    assert len(expected) >= 2 * len(RUNS)  # test and cross-corpus predictions of every run
    assert _predictions(tmp_path / "pool") == expected
    assert _predictions(tmp_path / "jobs") == expected
    for folder in ("pool", "jobs"):
        assert _overlap(_intervals(tmp_path / folder)), f"{folder}: no two runs executed at once"
        study = json.loads((tmp_path / folder / "runs" / "graph" / "study.json").read_text())
        assert [r["run"].split("/")[-1] for r in study["runs"]] == RUNS
        assert (tmp_path / folder / "reports" / "graph.md").is_file()
    assert "start noise-s42 (2 running" in pool.out
    assert list((tmp_path / "jobs" / "runs" / "graph" / ".submitit").iterdir())  # submitit's job folders


@pytest.mark.timeout(1500)  # above the subprocess limits inside
@pytest.mark.slow
def test_orchestrator_killed_then_resumed_reuses_and_finishes(tmp_path, one_at_a_time):
    (tmp_path / "graph.toml").write_text(SMALL)
    runs = tmp_path / "runs" / "graph"
    proc = subprocess.Popen([sys.executable, "-m", "ser_toolkit", "study", "--preset", "demo", "--config",
                             "graph.toml", "--executor", "submitit-local", "--jobs", "2"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not any((runs / r / "final.json").exists() for r in RUNS):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # the orchestrator only: its jobs live on, as after a lost login node
    proc.wait()
    done_before = {r for r in RUNS if (runs / r / "final.json").exists()}
    stamps = {r: (runs / r / "final.json").stat().st_mtime_ns for r in done_before}
    r = run_sertk("study", "--preset", "demo", "--config", "graph.toml", "--executor", "submitit-local",
                  "--jobs", "2", cwd=tmp_path, timeout=900)
    assert r.code == 0, r.err
    for run in done_before:  # finished before the kill: reused, never trained again
        assert f"{run}: reused" in r.out
        assert (runs / run / "final.json").stat().st_mtime_ns == stamps[run]
    assert all((runs / run / "final.json").is_file() for run in RUNS)
    assert (tmp_path / "reports" / "graph.md").is_file()
    again = run_sertk("study", "--preset", "demo", "--config", "graph.toml", "--jobs", "2", cwd=tmp_path,
                      timeout=600)
    assert again.code == 0 and again.out.count(": reused") == len(RUNS)
    assert _predictions(tmp_path) == one_at_a_time  # the runs equal an uninterrupted study's


def test_slurm_job_specification(tmp_path):
    from ser_toolkit.executors import slurm_script
    from ser_toolkit.study import load_config

    cfg = load_config("reference", None, {"study": {
        "executor": "slurm", "jobs": 4, "slurm": {
            "partition": "gpu", "account": "ser", "gpus": 1, "cpus": 12, "mem_gb": 80, "time_min": 90,
            "setup": ["module load cuda", "source ~/venv/bin/activate"], "sbatch": {"mail-type": "END"}}}})
    script = slurm_script(cfg["study"], tmp_path / "runs", "noise-s42")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --account=ser", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --cpus-per-task=12", "#SBATCH --mem=81920M", "#SBATCH --time=90",
                 "#SBATCH --job-name=sertk-noise-s42", "#SBATCH --mail-type=END", "#SBATCH --ntasks-per-node=1",
                 "module load cuda", "source ~/venv/bin/activate"):
        assert line in script, line
    assert str((tmp_path / "runs").resolve() / ".submitit") in script
    assert "submitit.core._submit" in script


def test_unknown_executor_and_bad_slurm_settings_are_one_line_errors(tmp_path):
    r = run_sertk("study", "--preset", "demo", "--executor", "pbs", cwd=tmp_path)
    assert r.code == 2 and "executor must be one of local, slurm, submitit-local" in r.err
    assert "Traceback" not in r.err
    (tmp_path / "s.toml").write_text('[study]\nslurm = { gpu = 2 }\n')
    r = run_sertk("study", "--preset", "demo", "--config", "s.toml", cwd=tmp_path)
    assert r.code == 2 and "unknown key 'gpu'" in r.err and "did you mean 'gpus'" in r.err


@pytest.mark.skipif(shutil.which("sbatch") is None, reason="no Slurm here (sbatch not on PATH)")
@pytest.mark.timeout(3700)
def test_a_run_submitted_to_slurm(tmp_path):
    from ser_toolkit.executors import RunTask, submitit_executor

    ex = submitit_executor("slurm", {"slurm": {"gpus": 0, "cpus": 1, "mem_gb": 2, "time_min": 10}}, tmp_path)
    job = ex.submit(os.getcwd)
    assert job.result()  # a real job ran and returned
    assert RunTask  # the study path submits ser_toolkit.executors.execute the same way


def test_temporary_names_are_unique_across_hosts_and_processes(tmp_path):
    target = tmp_path / "x.h5"
    a, b = atomic.tmp_name(target), atomic.tmp_name(target)
    assert a != b and a.name.startswith("x.h5.tmp-") and str(os.getpid()) in a.name
    assert atomic._HOST in a.name
    dead = 2**22 + 12345  # above pid_max's default: no such process
    mine_dead = tmp_path / f"x.h5.tmp-{atomic._HOST}-{dead}-abcdef"
    old_style = tmp_path / f"x.h5.tmp-{dead}"
    other_host = tmp_path / f"x.h5.tmp-elsewhere-{dead}-abcdef"
    alive = tmp_path / f"x.h5.tmp-{atomic._HOST}-{os.getpid()}-abcdef"
    for p in (mine_dead, old_style, other_host, alive):
        p.write_text("partial")
    assert atomic.remove_stale_tmp(tmp_path, "x.h5") == 2
    assert not mine_dead.exists() and not old_style.exists()
    assert other_host.exists() and alive.exists()  # another host's writer may live; this process does


@pytest.mark.timeout(1500)  # above the subprocess limits inside
@pytest.mark.slow
def test_slurm_jobs_run_and_a_resumed_orchestrator_reattaches_to_them(tmp_path):
    import fake_slurm

    env = fake_slurm.install(tmp_path / "slurm")
    (tmp_path / "graph.toml").write_text(SMALL + '\nexecutor = "slurm"\njobs = 0\n'
                                         'slurm = { gpus = 0, cpus = 1, mem_gb = 2, time_min = 30 }\n')
    runs = tmp_path / "runs" / "graph"
    cmd = [sys.executable, "-m", "ser_toolkit", "study", "--preset", "demo", "--config", "graph.toml"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while len(fake_slurm.submitted(env)) < len(RUNS):  # every run of the wave queued at once (jobs = 0)
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # the orchestrator dies; its Slurm jobs go on
    proc.wait()
    ids = fake_slurm.submitted(env)
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    records = {run: json.loads((runs / ".jobs" / f"{run}.json").read_text()) for run in RUNS}
    live = [run for run in RUNS if f"re-attached to Slurm job {records[run]['job_id']}: {run}" in r.stdout]
    assert live, r.stdout  # at least one job was still running and was waited for, not submitted again
    assert all(records[run]["job_id"] in ids for run in live)
    assert len(fake_slurm.submitted(env)) == len(ids) + len(RUNS) - len(live)
    assert all(records[run]["executor"] == "slurm" and records[run]["outcome"]["state"] for run in RUNS)
    assert all((runs / run / "final.json").is_file() for run in RUNS)
    assert (tmp_path / "reports" / "graph.md").is_file()
