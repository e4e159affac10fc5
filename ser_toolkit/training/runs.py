"""Run directories: resolved config, provenance, checkpoints, curves, augmentation log.

``runs/<name>/``::

    config.json            every setting spelled out, plugins and versions, commit, seeds
    model/                 what is needed to rebuild the architecture offline
    checkpoints/epoch-NNN.pt, best.pt   (written atomically)
    curves.csv             per epoch: train loss, validation metrics, lr, utterances/s, seconds
    steps.csv              per optimizer step: epoch, step, training loss
    aug_log/epoch-NNN.jsonl   what was sampled for which utterance
    eval/<test>.json, eval/<test>.predictions.csv
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from ser_toolkit import __version__
from ser_toolkit.atomic import atomic_path, write_text
from ser_toolkit.errors import SertkError


def git_commit() -> str | None:
    """The sertk source commit (with ``+dirty`` when the tree has changes), if it is a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) if commit else None


def versions() -> dict[str, str]:
    out = {"sertk": __version__, "python": platform.python_version()}
    for mod in ("torch", "transformers", "numpy", "librosa", "h5py", "sklearn", "soxr", "soundfile"):
        m = sys.modules.get(mod)
        if m is None:
            try:
                m = __import__(mod)
            except ImportError:
                continue
        out[mod] = str(getattr(m, "__version__", "?"))
    return out


def hardware() -> dict[str, Any]:
    import os

    info: dict[str, Any] = {"platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpus"] = torch.cuda.device_count()
    except ImportError:
        pass
    return info


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SertkError(f"{path} does not exist", "is this a sertk run directory?") from None
    except json.JSONDecodeError:
        raise SertkError(f"{path} is not valid JSON (corrupt run?)", "rerun the training") from None


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    import torch

    if not path.is_file():
        raise SertkError(f"checkpoint {path} does not exist", "train the run first (sertk train)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a corrupt file must not show a traceback
        raise SertkError(f"checkpoint {path} cannot be read ({type(exc).__name__})", "retrain or resume") from None


def last_epoch_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / "checkpoints").glob("epoch-*.pt"))
    return found[-1] if found else None
