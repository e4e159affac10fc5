"""Run directories: resolved config, provenance, checkpoints, curves, augmentation log.

``runs/<name>/``::

    config.json            every setting spelled out, plugins and versions, commit, seeds
    model/                 what is needed to rebuild the architecture offline
    run.json               the run id and the digests of the data it trains/validates on
    checkpoints/epoch-NNN.pt   the latest resumable state only (loaded with weights_only=True), carries
                           the run id; written every --checkpoint-every epochs and when training is
                           interrupted (:mod:`ser_toolkit.training.checkpoints`), removed once the run is sealed
    checkpoints/best.safetensors   the selected weights (safetensors; metadata: run id, epoch, score):
                           written at the end, and before each resumable state
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
import os
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


SEED_RULES = {"torch_per_epoch": "seed * 1000003 + epoch * 7919 + rank * 104729 + 17",
              "augmentation": "sha256(seed, utterance id, epoch, copy)"}
"""How every generator of a run is seeded from its seed (recorded in ``config.json``)."""


def write_run_config(run_dir: Path, cfg: Any, cache: Path | str, command: list[str] | None = None,
                     given: set[str] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``RUN/config.json``, the run's record of what it is: every resolved setting (``train``), where each
    came from (``sources``: user, model or default, when ``given`` names the user's), the plugins with their distributions and versions,
    seeds, the command line, commit, library versions, hardware, the training cache and ``extra`` (a study's
    ``planned`` settings when it retried the run with a smaller batch). The one writer of it,
    for ``sertk train``, a study's runs and :func:`ser_toolkit.training.loop.train` called from a notebook."""
    from dataclasses import asdict

    from ser_toolkit.registry import get
    from ser_toolkit.settings import sources

    entries = [get("model", cfg.model)] + [get("augmentation", n) for n in cfg.plugins]
    record = {
        "train": asdict(cfg),
        **({"sources": sources(cfg.model, {n: "user" for n in given})} if given is not None else {}),
        "plugins": {f"{e.kind}:{e.name}": {"distribution": e.provider.distribution, "version": e.provider.version}
                    for e in entries},
        "seeds": {"seed": cfg.seed, "split": cfg.split, **SEED_RULES},
        "command": list(command) if command is not None else ["sertk", *sys.argv[1:]],
        "commit": git_commit(), "versions": versions(), "hardware": hardware(),
        "data": {"cache": str(Path(cache).resolve()), "cache_relative": os.path.relpath(Path(cache).resolve(),
                                                                                   run_dir.resolve()),
                 "cross_relative": [os.path.relpath(Path(c).resolve(), run_dir.resolve()) for c in cfg.cross]},
        **(extra or {}),
    }
    write_json(run_dir / "config.json", record)
    return record


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


def resumable_states(run_dir: Path) -> list[Path]:
    """Every resumable state file of a run, oldest first."""
    return sorted((run_dir / "checkpoints").glob(STATE_GLOB))


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


def save_weights(path: Path, model, metadata: dict[str, Any]) -> tuple[Path, str]:
    """Model weights as safetensors (no pickled code), with string metadata (run id, epoch, score); returns the
    path and the file's SHA-256."""
    from safetensors.torch import save_model

    with atomic_path(path) as tmp:
        save_model(model, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
        digest = file_digest(tmp)
    return path, digest


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


def save_weights_dict(path: Path, tensors: dict[str, Any], metadata: dict[str, Any]) -> tuple[Path, str]:
    """A weights snapshot (no tied aliases, see :func:`unique_names`) as safetensors, like :func:`save_weights`."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp),
                  metadata={k: str(v) for k, v in metadata.items()})
        digest = file_digest(tmp)
    return path, digest


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
    mismatch = weights_mismatch(path, model)
    if mismatch:
        raise SertkError(f"weights {path} do not fit this run's model ({mismatch})", "retrain the run")
    try:
        load_model(model, str(path), strict=True)
    except Exception as exc:
        raise SertkError(f"weights {path} do not fit this run's model ({type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else 'no message'})",
                         "retrain the run") from None
    return meta


def _listed(names: list[str], most: int = 3) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def weights_mismatch(path: Path, model) -> str:
    """What keeps a weights file from loading strictly into ``model``: missing and unexpected tensor names and
    the first shape differences ('' when it fits). Tied tensors are saved once, under any of their names."""
    from safetensors import safe_open

    live = model.state_dict()
    groups: dict[tuple, list[str]] = {}  # one entry per tensor, all its names
    for k, t in live.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else (k,)
        groups.setdefault(key, []).append(k)
    with safe_open(str(path), framework="pt") as fh:
        stored = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    missing, shapes = [], []
    for names in groups.values():
        found = [k for k in names if k in stored]
        if not found:
            missing.append(names[0])
            continue
        want, have = tuple(live[names[0]].shape), stored[found[0]]
        if want != have:
            shapes.append(f"{found[0]} {'x'.join(map(str, have)) or 'scalar'} in the file, "
                          f"{'x'.join(map(str, want)) or 'scalar'} in the model")
    unexpected = sorted(k for k in stored if k not in live)
    parts = ([f"missing {_listed(sorted(missing))}"] if missing else []) + \
        ([f"unexpected {_listed(unexpected)}"] if unexpected else []) + \
        ([f"shape of {_listed(shapes, 2)}"] if shapes else [])
    return "; ".join(parts)


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


LOCATIONS = frozenset({"path", "relative", "spec", "file"})
"""The keys of ``run.json``'s data record that say where data was, not what it is (its digests do)."""


def data_identity(data: Any) -> Any:
    """``run.json``'s data record without locations (:data:`LOCATIONS`): what a moved or copied run, or one
    resumed from another working directory, must still train on."""
    if isinstance(data, dict):
        return {k: data_identity(v) for k, v in data.items() if k not in LOCATIONS}
    if isinstance(data, list):
        return [data_identity(v) for v in data]
    return data


def _candidates(run_dir: Path, record: dict[str, Any]) -> list[Path]:
    """Where a recorded file may be now: where it was, then where it is relative to the run (both moved)."""
    out = [Path(record["path"])] if record.get("path") else []
    if record.get("relative"):
        out.append((run_dir / record["relative"]).resolve())
    return out


def locate_cache(run_dir: Path, info: dict[str, Any], first: Path | str | None = None,
                 option: str = "--cache") -> Path:
    """The run's training cache: ``first`` (a path the user gave: ``--cache``, ``--dataset``), else where it
    was, else where it is relative to the run folder (a study moved or copied with its caches). The first of
    them holding the data the run trained on (by content digest); else ``first`` or the first that exists
    (its caller refuses other data, naming the digests); else one line asking for the cache by its digest,
    with ``option``, the caller's option for it."""
    from ser_toolkit.cache.reader import CacheReader

    record = (info.get("data") or {}).get("cache") or {}
    digest = record.get("digest")
    if first and option == "--cache":  # named to say where the run's own cache is now: it, and nothing else
        given = Path(first)
        if not given.exists():
            raise SertkError(f"--cache {given} does not exist", "pass the path of the run's training cache "
                             f"(data {str(digest)[:12]}; sertk inspect CACHE shows a cache's digest)")
        reader = CacheReader(given)  # not a cache (a folder, a FIFO, a damaged file): one line
        other = reader.digest
        reader.close()
        if other != digest:
            raise SertkError(f"--cache {given} holds other data ({other[:12]}) than run {run_dir} trained on "
                             f"({str(digest)[:12]})", "pass the run's own training cache, wherever it is now "
                             "(--cache names where it moved; other data is never evaluated as the run's)")
        return given
    given = [Path(first)] if first else []
    found = [p for p in given + _candidates(run_dir, record) if p.is_file()]
    for p in found:
        try:
            reader = CacheReader(p)
        except SertkError:
            continue
        same = reader.digest == digest
        reader.close()
        if same:
            return p
    if found:
        return found[0]
    where = " nor at ".join(dict.fromkeys(str(p) for p in _candidates(run_dir, record))) or "no recorded place"
    raise SertkError(f"the training cache of run {run_dir} (data {str(digest)[:12]}) is not at {where}",
                     f"pass the cache of that data with {option} PATH (sertk inspect CACHE shows its data digest)")


def locate_split(run_dir: Path, info: dict[str, Any], spec: str) -> str:
    """A run's split spec with its ``file:`` found again: where it was, else relative to the run folder (the
    study's split files travel with its runs); the split's digest is checked by whoever applies it."""
    if not spec.startswith("file:"):
        return spec
    record = (info.get("data") or {}).get("split") or {}
    for p in _candidates(run_dir, {"path": spec[5:], "relative": record.get("file")}):
        if p.is_file():
            return f"file:{p}"
    return spec


def seal(run_dir: Path, run_id: str, known: dict[str, tuple[int, int, str]] | None = None) -> dict[str, Any]:
    """Mark a run finished: ``final.json`` with its weights' digests (written last), then drop its resumable state.

    The optimizer state is useless once a run is finished (it is as large as two
    copies of the weights), so a sealed run keeps its weights only. ``known``: digests computed when the
    files were written, by name, with the size and modification time they had then (else the file is read).
    """
    import time

    def digest(p: Path) -> str:
        st = p.stat()
        size, mtime, value = (known or {}).get(p.name, (None, None, None))
        return value if (size, mtime) == (st.st_size, st.st_mtime_ns) else file_digest(p)

    digests = {p.name: digest(p) for p in sorted((run_dir / "checkpoints").glob("*")) if p.is_file()
               and ".tmp-" not in p.name and not p.match(STATE_GLOB)}
    record = {"run_id": run_id, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "checkpoints": digests,
              "files": {name: file_digest(run_dir / name) for name in SEALED_FILES}}
    write_json(run_dir / SEAL_FILE, record)
    for state in resumable_states(run_dir):
        state.unlink(missing_ok=True)
    cache = (run_info(run_dir).get("data") or {}).get("cache") or {}
    if cache.get("path") and cache.get("digest"):
        from ser_toolkit.cache.dependents import register

        register(Path(cache["path"]), run_dir, run_id, cache["digest"])
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
    from ser_toolkit.settings import SETTINGS, check_settings

    check_settings({k: v for k, v in config["train"].items() if k in SETTINGS},  # as declared, however sealed
                   lambda s: f"{run_dir / 'config.json'}: {s.name}", hint="the run folder is damaged; retrain it")
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

    try:
        with safe_open(str(best), framework="pt") as fh:
            owner = (fh.metadata() or {}).get("run_id")
    except Exception as exc:  # noqa: BLE001 - truncated, a huge or malformed header: damaged, however sealed
        raise SertkError(f"weights {best} cannot be read ({type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0][:120] if str(exc).strip() else 'damaged'})",
                         "retrain the run") from None
    if owner != info["run_id"]:
        raise SertkError(f"weights {best} belong to another run", "copy no checkpoints between runs; retrain")
    return info


def last_epoch_checkpoint(run_dir: Path) -> Path | None:
    """The newest resumable state of a run, if any."""
    found = resumable_states(run_dir)
    return found[-1] if found else None
