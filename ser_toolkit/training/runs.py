"""Run directories: resolved config, provenance, checkpoints, curves, augmentation log.

``runs/<name>/``::

    config.json            every setting spelled out, plugins and versions, commit, seeds
    model/                 what is needed to rebuild the architecture offline
    run.json               the run id and the digests of the data it trains/validates on
    checkpoints/epoch-NNN.pt   the latest resumable state only (loaded with weights_only=True), carries
                           the run id; written off the training thread, removed once the run is sealed
    checkpoints/best.safetensors   the selected weights (safetensors; metadata: run id, epoch, score):
                           written when validation improves, or once at the end without validation
    checkpoints/classifier.skops   instead, for a feature classifier: the fitted pipeline (skops format)
    final.json             the seal: written last, with the checkpoints' SHA-256; a run without it
                           is unfinished and evaluate/predict/report refuse it
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


VERSIONED = {"torch": "torch", "transformers": "transformers", "numpy": "numpy", "librosa": "librosa",
             "h5py": "h5py", "sklearn": "scikit-learn", "soxr": "soxr", "soundfile": "soundfile",
             "opensmile": "opensmile"}
"""Module -> distribution of the libraries whose versions every run records."""


def versions() -> dict[str, str]:
    """Versions of sertk, Python and :data:`VERSIONED` (an imported module's own, else the installed
    distribution's: nothing is imported just to ask)."""
    from importlib import metadata

    out = {"sertk": __version__, "python": platform.python_version()}
    for mod, dist in VERSIONED.items():
        m = sys.modules.get(mod)
        if m is not None and getattr(m, "__version__", None):
            out[mod] = str(m.__version__)
            continue
        try:
            out[mod] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def hardware() -> dict[str, Any]:
    """Platform, CPUs and GPUs. GPUs come from torch when it is already loaded, else from the NVIDIA driver's
    /proc entries (Linux): importing torch only to ask costs seconds in a run that never uses it."""
    import os

    info: dict[str, Any] = {"platform": platform.platform(), "cpus": os.cpu_count()}
    torch = sys.modules.get("torch")
    if torch is not None:
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpus"] = torch.cuda.device_count()
        return info
    names = []
    for entry in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        try:
            model = next((line.split(":", 1)[1].strip() for line in entry.read_text().splitlines()
                          if line.startswith("Model:")), None)
        except OSError:
            continue
        if model:
            names.append(model)
    if names:
        info["gpu"], info["gpus"] = names[0], len(names)
    return info


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SertkError(f"{path} does not exist", "is this a sertk run directory?") from None
    except json.JSONDecodeError:
        raise SertkError(f"{path} is not valid JSON (corrupt or hand-edited)",
                         "restore it, or recompute it (sertk evaluate RUN for eval files, sertk train for a run)") \
            from None


RUN_FILE = "run.json"
SEAL_FILE = "final.json"
BEST = "best.safetensors"
CLASSIFIER = "classifier.skops"
SPEAKER_STATS = "speaker_stats.safetensors"
"""``--normalize speaker-train``: the training speakers' feature statistics (beside the classifier)."""
"""A feature classifier's fitted pipeline (instead of :data:`BEST`), see ``ser_toolkit/plugins/classifiers.py``."""
SEALED_FILES = ("config.json", RUN_FILE)
STATE = "epoch-{epoch:03d}.pt"  # the latest resumable state (epochs counted from 1)
STATE_GLOB = "epoch-*.pt"
"""Besides the checkpoints, the seal holds the digests of these: what the run was and what data it trained on."""


def new_run_id() -> str:
    import uuid

    return uuid.uuid4().hex


def file_digest(path: Path) -> str:
    """SHA-256 of a file, streamed."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Resumable training state (model, optimizer, scheduler, history, run id), atomically."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def cpu_copy(obj: Any) -> Any:
    """A snapshot of (nested dicts/lists of) tensors on the CPU that later training steps cannot change."""
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        return t.to("cpu", copy=True) if t.device.type != "cpu" else t.clone()
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


def resumable_states(run_dir: Path) -> list[Path]:
    """Every resumable state file of a run, oldest first."""
    return sorted((run_dir / "checkpoints").glob(STATE_GLOB))


class CheckpointWriter:
    """Writes checkpoints off the training thread, one save at a time, each atomically.

    ``save`` takes a CPU snapshot (see :func:`cpu_copy`) and returns while a
    thread writes the best weights (when given) and then the resumable state,
    and removes the older states. Only one state (two while the new one is
    being renamed in) is ever on disk. ``wait`` joins the writer and re-raises
    its error. A kill at any moment leaves the previous state or the new one.
    """

    def __init__(self, run_dir: Path) -> None:
        self.folder = run_dir / "checkpoints"
        self._thread: Any = None
        self._error: BaseException | None = None
        self.bytes_written = 0

    def save(self, epoch: int, state: dict[str, Any], best: tuple[dict[str, Any], dict[str, Any]] | None = None
             ) -> None:
        import threading

        self.wait()
        self._thread = threading.Thread(target=self._write, args=(epoch, state, best),
                                        name="sertk-checkpoint", daemon=False)
        self._thread.start()

    def _write(self, epoch: int, state: dict[str, Any], best: tuple[dict[str, Any], dict[str, Any]] | None) -> None:
        try:
            if best is not None:
                save_weights_dict(self.folder / BEST, *best)
                self.bytes_written += (self.folder / BEST).stat().st_size
            path = self.folder / STATE.format(epoch=epoch)
            save_checkpoint(path, state)
            self.bytes_written += path.stat().st_size
            for old in sorted(self.folder.glob(STATE_GLOB)):
                if old != path:
                    old.unlink(missing_ok=True)
        except BaseException as exc:  # re-raised on the training thread by wait()
            self._error = exc

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def load_checkpoint(path: Path, run_id: str | None = None) -> dict[str, Any]:
    """Resumable state, loaded with ``weights_only=True`` (no code runs); must belong to ``run_id``."""
    import torch

    import zipfile

    if not path.is_file():
        raise SertkError(f"checkpoint {path} does not exist", "train the run first (sertk train)")
    try:
        with zipfile.ZipFile(path) as archive:  # every member's CRC: a flipped byte is never resumed from
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError):
        bad = "archive"
    if bad is not None:
        raise SertkError(f"checkpoint {path} is damaged ({bad} fails its checksum)",
                         "delete it to train the run again from the start")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or crafted file must not show a traceback, nor run code
        raise SertkError(f"checkpoint {path} cannot be read safely ({type(exc).__name__})",
                         "delete it to train the run again from the start") from None
    if run_id is not None and (not isinstance(state, dict) or state.get("run_id") != run_id):
        raise SertkError(f"checkpoint {path} belongs to another run", "remove it, or retrain this run")
    return state


def save_weights(path: Path, model, metadata: dict[str, Any]) -> None:
    """Model weights as safetensors (no pickled code), with string metadata (run id, epoch, score)."""
    from safetensors.torch import save_model

    with atomic_path(path) as tmp:
        save_model(model, str(tmp), metadata={k: str(v) for k, v in metadata.items()})


def unique_names(state_dict: dict[str, Any]) -> list[str]:
    """The names of a live state dict without the aliases of tied tensors (the first name of each is kept)."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    names = []
    for k, t in state_dict.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and key in seen:
            continue
        seen.add(key)
        names.append(k)
    return names


def save_weights_dict(path: Path, tensors: dict[str, Any], metadata: dict[str, Any]) -> None:
    """A weights snapshot (no tied aliases, see :func:`unique_names`) as safetensors, like :func:`save_weights`."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp),
                  metadata={k: str(v) for k, v in metadata.items()})


def load_weights(path: Path, model, run_id: str) -> dict[str, str]:
    """Load safetensors weights into ``model`` after checking they belong to ``run_id``; returns the metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_model

    if not path.is_file():
        raise SertkError(f"weights {path} do not exist", "train the run first (sertk train)")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as exc:
        raise SertkError(f"weights {path} cannot be read ({type(exc).__name__})", "retrain the run") from None
    if meta.get("run_id") != run_id:
        raise SertkError(f"weights {path} belong to another run ({meta.get('run_id', 'no run id')[:12]}, "
                         f"this run is {run_id[:12]})", "copy no checkpoints between runs; retrain this run")
    try:
        load_model(model, str(path), strict=True)
    except Exception as exc:
        raise SertkError(f"weights {path} do not fit this run's model ({type(exc).__name__})",
                         "retrain the run") from None
    return meta


def weights_file(run_dir: Path) -> Path:
    """The file a finished run predicts with: its best weights, or a feature classifier's fitted pipeline."""
    classifier = run_dir / "checkpoints" / CLASSIFIER
    return classifier if classifier.is_file() and not (run_dir / "checkpoints" / BEST).is_file() \
        else run_dir / "checkpoints" / BEST


def run_info(run_dir: Path) -> dict[str, Any]:
    """``run.json``: the run id and its data digests (written when training starts)."""
    info = read_json(run_dir / RUN_FILE)
    if not isinstance(info, dict) or not isinstance(info.get("run_id"), str):
        raise SertkError(f"{run_dir / RUN_FILE} is malformed", "the run folder is damaged; retrain it")
    return info


def seal(run_dir: Path, run_id: str) -> dict[str, Any]:
    """Mark a run finished: ``final.json`` with its weights' digests (written last), then drop its resumable state.

    The optimizer state is useless once a run is finished (it is as large as two
    copies of the weights), so a sealed run keeps its weights only.
    """
    import time

    digests = {p.name: file_digest(p) for p in sorted((run_dir / "checkpoints").glob("*")) if p.is_file()
               and ".tmp-" not in p.name and not p.match(STATE_GLOB)}
    record = {"run_id": run_id, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "checkpoints": digests,
              "files": {name: file_digest(run_dir / name) for name in SEALED_FILES}}
    write_json(run_dir / SEAL_FILE, record)
    for state in resumable_states(run_dir):
        state.unlink(missing_ok=True)
    return record


def is_sealed(run_dir: Path) -> bool:
    return (run_dir / SEAL_FILE).is_file()


def check_run(run_dir: Path, allow_unfinished: bool = False) -> dict[str, Any]:
    """The run's info if it is finished and intact; one-line errors otherwise.

    A finished run has ``final.json`` naming its run id and the SHA-256 of its
    best weights, and the weights on disk still have that digest.
    """
    if not (run_dir / "config.json").is_file():
        raise SertkError(f"{run_dir} is not a sertk run folder", "pass a folder written by 'sertk train'")
    config = read_json(run_dir / "config.json")
    if not isinstance(config, dict) or not isinstance(config.get("train"), dict):
        raise SertkError(f"{run_dir / 'config.json'} is malformed (no 'train' settings)",
                         "the run folder is damaged; retrain it")
    if not (run_dir / RUN_FILE).is_file():
        raise SertkError(f"{run_dir} was never started or was written by an older sertk (no {RUN_FILE})",
                         "retrain it with 'sertk train'")
    info = run_info(run_dir)
    if not is_sealed(run_dir):
        if not allow_unfinished:
            raise SertkError(f"run {run_dir} is unfinished (no {SEAL_FILE})",
                             f"finish it with 'sertk train --out {run_dir} --resume', or pass --allow-unfinished")
        return info
    final = read_json(run_dir / SEAL_FILE)
    if not isinstance(final, dict) or final.get("run_id") != info["run_id"]:
        raise SertkError(f"{run_dir / SEAL_FILE} does not belong to this run", "retrain the run")
    best = weights_file(run_dir)
    recorded = final.get("checkpoints", {}).get(best.name)
    if not best.is_file() or recorded is None or file_digest(best) != recorded:
        raise SertkError(f"{best} is missing or is not the file this run sealed", "retrain the run")
    for name in SEALED_FILES:
        if final.get("files", {}).get(name) != file_digest(run_dir / name):
            raise SertkError(f"{run_dir / name} was changed after the run was sealed",
                             "restore it, or retrain the run")
    if best.name == CLASSIFIER:  # its run id is checked when it is loaded
        return info
    from safetensors import safe_open

    with safe_open(str(best), framework="pt") as fh:
        owner = (fh.metadata() or {}).get("run_id")
    if owner != info["run_id"]:
        raise SertkError(f"weights {best} belong to another run", "copy no checkpoints between runs; retrain")
    return info


def last_epoch_checkpoint(run_dir: Path) -> Path | None:
    """The newest resumable state of a run, if any."""
    found = resumable_states(run_dir)
    return found[-1] if found else None
