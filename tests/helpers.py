"""Test helpers: paths, a subprocess CLI runner, synthetic audio files."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """``$SERTK_SHARED_DATA`` or ``../shared/data`` beside the repository."""
    return Path(os.environ.get("SERTK_SHARED_DATA", REPO.parent / "shared" / "data")).resolve()


@dataclass
class Result:
    code: int
    out: str
    err: str


def run_sertk(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 300) -> Result:
    """Run ``python -m ser_toolkit ARGS`` in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "ser_toolkit", *map(str, args)], capture_output=True,
                          text=True, env=full_env, cwd=cwd, timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def tone(seconds: float = 0.5, rate: int = 16000, channels: int = 1, freq: float = 220.0,
         amp: float = 0.3) -> np.ndarray:
    """A test signal (frames, channels): a tone per channel at different pitches."""
    t = np.arange(int(seconds * rate)) / rate
    cols = [amp * np.sin(2 * np.pi * freq * (c + 1) * t) for c in range(channels)]
    return np.stack(cols, axis=1).astype(np.float32)


def write_audio(path: Path, seconds: float = 0.5, rate: int = 16000, channels: int = 1,
                subtype: str | None = None, freq: float = 220.0) -> Path:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), tone(seconds, rate, channels, freq), rate, subtype=subtype)
    return path


def seal_fake_run(folder: Path) -> str:
    """Make ``folder`` (with a config.json) a finished run: run.json, tiny best weights, final.json."""
    import json
    import uuid

    import torch
    from safetensors.torch import save_file

    from ser_toolkit.training import runs

    run_id = uuid.uuid4().hex
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    (folder / "run.json").write_text(json.dumps({"run_id": run_id, "data": {}}))
    save_file({"w": torch.zeros(1)}, str(folder / "checkpoints" / runs.BEST), metadata={"run_id": run_id})
    runs.seal(folder, run_id)
    return run_id


def one_line_error(r: Result, *needles: str) -> str:
    """Assert a user error: exit 2, one line on stderr naming every needle, no traceback; return the line."""
    assert r.code == 2 and all(n in r.err for n in needles), (r.code, r.err)
    assert len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err + r.out
    return r.err.strip()


def synthetic_cache(out: Path, **options: int) -> Path:
    """The synthetic corpus with ``options`` (e.g. speakers=1, per_emotion=1) cached in ``out``."""
    sets = [a for k, v in options.items() for a in ("--set", f"{k}={v}")]
    r = run_sertk("cache", "synthetic", *sets, "--cache-dir", out, "-q")
    assert r.code == 0, r.err
    return out


def synthetic_caches(out: Path) -> Path:
    """The small synthetic corpus and its shifted twin (cross-corpus) cached in ``out``."""
    assert run_sertk("cache", "synthetic", "--set", "per_emotion=2", "--cache-dir", out, "-q").code == 0
    assert run_sertk("cache", "synthetic-shifted", "--set", "per_emotion=1", "--cache-dir", out, "-q").code == 0
    return out


def kill_when(path: Path, proc, timeout: float = 300) -> None:
    """SIGKILL ``proc`` as soon as ``path`` exists (failing if it ends first or ``timeout`` passes)."""
    import signal
    import time

    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else path
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
