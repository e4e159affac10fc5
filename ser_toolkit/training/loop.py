"""The training loop: one loop for every model plugin, GPU-efficient, reproducible, resumable.

- Batches of similar lengths (bucketing), attention masks, dynamic padding; with
  ``--batch-seconds`` filled up to a budget of padded audio, on the lengths each
  epoch's augmentation will produce (its plans are sampled first).
- On CUDA: bf16 autocast where the GPU computes bf16 natively, else fp16 autocast
  with a gradient scaler (its state is resumed; ``precision`` in train_summary.json;
  the learning-rate schedule advances only on steps the scaler did not skip),
  TF32, fused AdamW, pinned memory, non-blocking copies; the loss is accumulated on
  the device and read back only when logging. CPU trains in fp32.
- Loader workers read the cache and augment in parallel: one loader per run, its
  workers persistent (fork; forkserver once CUDA is initialised).
- ``torchrun --nproc_per_node N`` runs DistributedDataParallel (NCCL on CUDA, each
  rank on its own GPU; gloo on CPU): gradients are all-reduced only on the
  micro-batch an optimizer step follows (``no_sync``), unused parameters are searched
  for only when the model says some may get no gradient (``find_unused_parameters``,
  e.g. layerdrop), dropout is seeded per rank, validation is sharded across ranks
  and gathered on rank 0, which alone decides (best epoch, early stopping) and
  broadcasts, so every rank runs the same epochs; rank 0 alone writes, and the
  ranks wait for its snapshot after each epoch and for the seal at the end.
- Bounded checkpoints: after each epoch a CPU snapshot of the resumable state
  (model, optimizer, scheduler, epoch) is written off the training thread and
  replaces the previous one; the best weights are written when validation
  improves (without validation once, at the end); sealing drops the state.
  ``resume`` repeats nothing that finished and, on CPU, ends with the same
  weights as an uninterrupted run (every epoch reseeds torch from (seed, epoch)).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import io
import json
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ser_toolkit import memory, settings
from ser_toolkit.atomic import remove_stale_tmp, write_text
from ser_toolkit.emotions import EMOTIONS
from ser_toolkit.errors import SertkError
from ser_toolkit.settings import SCHEDULES  # noqa: F401  (re-exported)

COMPILE_BUCKET = 16000
"""--compile pads each batch's length up to a multiple of this many samples (1 s at 16 kHz): a few fixed lengths,
one compiled graph each (docs/benchmarks.md, "--compile")."""
LONG_WAVE_SECONDS = 60.0  # longer waveform inputs need --max-seconds (memory grows with length, attention quadratically)


@settings.dataclass_of(settings.TRAIN_SETTINGS)
class TrainConfig:
    """Every setting of a training run (the resolved form is saved as config.json).

    Fields, types, defaults and allowed values are declared once, in
    :data:`ser_toolkit.settings.TRAIN_SETTINGS`.
    """

    @classmethod
    def from_settings(cls, *layers: Mapping[str, Any]) -> "TrainConfig":
        """Resolved (declaration < the model's ``train_defaults`` < each layer in turn) and validated."""
        cfg = cls(**settings.resolve(*layers))
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Check (and normalise, e.g. int -> float) every setting; one-line errors name the option."""
        for name, value in settings.check_settings(asdict(self)).items():
            setattr(self, name, value)


def _dist() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _device(name: str, local_rank: int):
    import torch

    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SertkError("--device cuda asked for, but no GPU is available", "use --device cpu or auto")
    return torch.device(f"cuda:{local_rank}" if name == "cuda" else name)  # under torchrun: each rank its GPU


def _init_distributed(device) -> bool:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU); True when this call created it.

    The rank's GPU is made current first, so NCCL and the object collectives use it, not GPU 0.
    """
    import torch

    if device.type == "cuda":
        torch.cuda.set_device(device)
    if torch.distributed.is_initialized():
        return False
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def precision_for(device_type: str, mixed: bool, bf16_native: bool) -> str:
    """The training precision: ``bf16`` autocast on GPUs that compute bf16 natively (Ampere and later), else
    ``fp16`` autocast with a gradient scaler; ``fp32`` on CPU and MPS, and with ``--no-bf16``."""
    if device_type != "cuda" or not mixed:
        return "fp32"
    return "bf16" if bf16_native else "fp16"


def bf16_native() -> bool:
    """Whether the current GPU computes bf16 natively (``is_bf16_supported`` alone also counts emulation)."""
    import torch

    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch < 2.4 has no emulation flag
        return torch.version.hip is not None or torch.cuda.get_device_capability() >= (8, 0)


def optimizer_step(scaler, optimizer, scheduler) -> bool:
    """One optimizer step through the gradient scaler; the schedule advances only when the step was taken.

    With fp16 the scaler skips a step whose gradients overflowed (and lowers its scale): the learning-rate
    schedule must not advance then. Reading the scale costs one sync a step, in fp16 mode only.
    """
    scale = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(optimizer)
    scaler.update()
    taken = scale is None or scaler.get_scale() >= scale
    if taken:
        scheduler.step()
    return taken


def _grad_scaler(enabled: bool):
    """A CUDA gradient scaler (fp16 autocast); disabled, its calls pass through."""
    import torch

    amp = getattr(torch, "amp", None)
    if amp is not None and hasattr(amp, "GradScaler"):
        return amp.GradScaler("cuda", enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)  # torch < 2.3


def _broadcast(obj: Any, distributed: bool) -> Any:
    """Rank 0's ``obj`` on every rank (every rank waits for rank 0 here)."""
    if not distributed:
        return obj
    import torch

    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _gather_text(text: str, distributed: bool) -> str:
    """Every rank's ``text``, concatenated in rank order, on rank 0 (other ranks get '')."""
    if not distributed:
        return text
    import torch

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    parts: list[Any] | None = [None] * world if rank == 0 else None
    torch.distributed.gather_object(text, parts, dst=0)
    return "".join(parts) if parts is not None else ""


def _check_same_steps(steps: int, distributed: bool) -> None:
    """Every rank must take the same number of steps, or DDP's all-reduces wait forever."""
    if not distributed:
        return
    import torch

    counts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(counts, steps)
    if len(set(counts)) > 1:
        raise SertkError(f"the ranks would take different numbers of steps this epoch ({counts}); DDP would hang",
                         "report this bug; train on one process meanwhile")


def validate(model, featurize, reader, rows: list[int], features: Any, batch_size: int, device,
             rank: int = 0, world: int = 1) -> dict[str, Any] | None:
    """Validation metrics (``valid_accuracy``, ``valid_uar``...), sharded across ranks.

    Rank ``r`` predicts rows ``r, r + world, ...`` (from ``features``, the cached features of ``rows``, when
    given); the probabilities are gathered on rank 0, which alone computes the metrics (other ranks get None).
    """
    from ser_toolkit.evaluation import compute_metrics, predict_features, predict_rows
    from ser_toolkit.memory import VALID_FIX

    fix = VALID_FIX.replace("{size}", f" (now {batch_size})")
    if features is not None:
        probs = predict_features(model, list(features)[rank::world], batch_size, device, fix=fix)
    else:
        probs = predict_rows(model, featurize, reader, rows[rank::world], batch_size, device, fix=fix)
    if world > 1:
        import torch

        parts: list[Any] | None = [None] * world if rank == 0 else None
        torch.distributed.gather_object(probs, parts, dst=0)
        if rank != 0:
            return None
        probs = np.zeros((len(rows), probs.shape[1]), dtype=np.float32)
        for r, part in enumerate(parts):
            probs[r::world] = part
    metrics = compute_metrics(reader.labels[rows], probs.argmax(1))
    return {f"valid_{k}": metrics[k] for k in ("accuracy", "weighted_f1", "macro_f1", "uar")}


def _lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def _seed_everything(seed: int) -> None:
    """torch, numpy's and Python's global generators: transformers draws HuBERT's own
    training-time masks (``mask_time_prob``) from numpy's global generator."""
    import random

    import torch

    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The global generators' seed of an epoch on a rank (dropout, HF's masks and layerdrop differ between
    ranks); rank 0's is the single-process seed."""
    return (seed * 1_000_003 + epoch * 7919 + rank * 104_729 + 17) % (2**31)


@dataclass
class Prepared:
    """What :func:`prepare_data` returns: readers, the split, and the train/valid item sets."""

    reader: Any
    assignment: dict[str, str]
    train: Any
    valid_rows: list[int]
    augmentation: Any
    summary: dict[str, Any]
    data: dict[str, Any]
    """Digests of every set the run trains and validates on (recorded in run.json)."""


def prepare_data(cfg: TrainConfig, featurize, run_dir: Path | None) -> Prepared:
    """Cache, split (+ validation carved from train), augmentation and the training items."""
    from ser_toolkit.augment_sets import build_augmentation, materialize
    from ser_toolkit.augmentations import PartnerPool
    from ser_toolkit.cache.identity import assignment_digest
    from ser_toolkit.cache.reader import CacheReader
    from ser_toolkit.splits import make_split, overlap
    from ser_toolkit.training.data import TrainItems

    path = resolve_cache(cfg.dataset, cfg.cache_dir)
    reader = CacheReader(path)
    assignment = make_split(reader.utterances, cfg.split)
    split_digest = assignment_digest(assignment)
    if "train" not in assignment.values():
        raise SertkError(f"split {cfg.split!r} has no training part", "check --split")
    train_rows = [i for i, uid in enumerate(reader.ids) if assignment[uid] == "train"]
    valid_rows = [i for i, uid in enumerate(reader.ids) if assignment[uid] == "valid"]  # a split with its own
    if cfg.valid > 0 and not valid_rows:  # carved from the training data, never from test
        carve = carve_validation([reader.utterance(i) for i in train_rows], cfg.valid, cfg.seed)
        valid_rows = [i for i in train_rows if carve[reader.ids[i]] == "valid"]
        train_rows = [i for i in train_rows if carve[reader.ids[i]] == "train"]
        for i in valid_rows:
            assignment[reader.ids[i]] = "valid"
    readers = [reader]
    augmented: list[dict[str, str]] = []
    items = [(0, i, -1) for i in train_rows]
    augmentation = None
    partners = None
    if cfg.plugins:
        augmentation = build_augmentation(cfg.plugins, cfg.plugin_options, cfg.weights)
        if getattr(augmentation, "needs_partners", False):
            partners = PartnerPool.from_split(reader, assignment, "train")
        if all(getattr(augmentation_cls(n), "identity", False) for n in cfg.plugins):
            # e.g. the clean x2 control: the same rows again, no copy of the audio needed
            items += [(0, i, -1) for _ in range(cfg.aug_copies) for i in train_rows]
            augmentation = None
        elif cfg.aug_mode == "online":
            items += [(0, i, k) for k in range(cfg.aug_copies) for i in train_rows]
        else:
            name = cfg.plugins[0] if len(cfg.plugins) == 1 and not cfg.weights else "weighted-" + "-".join(cfg.plugins)
            set_path, _ = materialize(reader, assignment, "train", name, augmentation, copies=cfg.aug_copies,
                                      seed=cfg.seed, aug_config={"plugins": cfg.plugins, "options": cfg.plugin_options,
                                                                 "weights": cfg.weights})
            aug_reader = CacheReader(set_path)
            augmented.append({"path": str(set_path.resolve()), "digest": aug_reader.digest})
            keep = {reader.ids[i] for i in train_rows}
            readers.append(aug_reader)
            items += [(1, j, -1) for j, u in enumerate(aug_reader.column("extra"))
                      if json.loads(u)["source"] in keep]
    max_samples = int(cfg.max_seconds * reader.sample_rate) if cfg.max_seconds else None
    train = TrainItems(readers, items, augmentation if cfg.aug_mode == "online" else None, partners, featurize,
                       max_samples, cfg.seed)
    summary = {"cache": str(path), "train_utterances": len(train_rows), "valid_utterances": len(valid_rows),
               "test_utterances": sum(1 for s in assignment.values() if s == "test"),
               "train_items_per_epoch": len(items), "overlap": overlap(reader.utterances, assignment),
               "train_emotions": {EMOTIONS[k]: int(n) for k, n in sorted(Counter(reader.labels[train_rows]).items())}}
    here = run_dir.resolve() if run_dir is not None else None
    data = {"cache": {"path": str(path.resolve()), "digest": reader.digest,
                      "preprocess": reader.config["preprocess"],
                      **({"relative": os.path.relpath(path.resolve(), here)} if here else {})},
            "split": {"spec": cfg.split, "digest": split_digest,
                      **({"file": os.path.relpath(Path(cfg.split[5:]).resolve(), here)}
                         if here and cfg.split.startswith("file:") else {})},
            "train_valid": assignment_digest(assignment), "augmented": augmented}
    return Prepared(reader, assignment, train, valid_rows, augmentation, summary, data)


def carve_validation(train_utts: list, share: float, seed: int) -> dict[str, str]:
    """Split training utterances into train/valid: speaker-disjoint with >= 4 speakers, else stratified."""
    from ser_toolkit.splits import speaker_independent, stratified

    speakers = {u.speaker for u in train_utts}
    carve = (speaker_independent(train_utts, share, seed) if len(speakers) >= 4
             else stratified(train_utts, share, seed))
    return {uid: "valid" if part == "test" else "train" for uid, part in carve.items()}


def resolve_cache(dataset: str, cache_dir: str | Path) -> Path:
    """A cache path, or a cache name looked up in ``cache_dir``."""
    from ser_toolkit.cache.build import locate_cache

    from ser_toolkit.cache.reader import check_regular

    path = locate_cache(dataset, cache_dir)
    check_regular(path)  # a FIFO or a folder is named as such, never opened
    if not path.is_file():
        raise SertkError(f"no cache {path}", f"build it first: sertk cache {path.stem}")
    return path


def check_wave_lengths(lengths: np.ndarray, ids: list[str], rate: int, what: str, fix: str | None = None) -> None:
    """Refuse waveform inputs too long to hold in memory, naming the longest and the fix (default: training's)."""
    i = longest_over(lengths, rate)
    if i is not None:
        raise SertkError(f"{what} utterance {ids[i]!r} is {lengths[i] / rate:.0f} s long; waveform models hold "
                         f"whole utterances in memory (limit {LONG_WAVE_SECONDS:.0f} s)",
                         fix or "pass --max-seconds 20 (random crops), or leave such files out of the cache "
                         "(sertk cache --max-seconds 60)")


def longest_over(lengths: np.ndarray, rate: int) -> int | None:
    """The position of the longest utterance over :data:`LONG_WAVE_SECONDS`, if any."""
    if len(lengths) and lengths.max() > LONG_WAVE_SECONDS * rate:
        return int(np.argmax(lengths))
    return None


def augmentation_cls(name: str):
    from ser_toolkit.registry import get

    return get("augmentation", name).obj


def _class_weights(labels: np.ndarray, mode: str):
    import torch

    if mode == "none":
        return None
    counts = np.bincount(labels, minlength=len(EMOTIONS)).astype(np.float64)
    w = np.where(counts > 0, counts.sum() / (len(EMOTIONS) * np.maximum(counts, 1)), 0.0)
    return torch.as_tensor(w, dtype=torch.float32)


def train(cfg: TrainConfig, run_dir: Path, resume: bool = False, quiet: bool = False, *,
          on_epoch: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train (or resume) the run in ``run_dir``; returns the final summary.

    ``on_epoch`` (main process only) gets each epoch's history row (``epoch``,
    ``train_loss``, ``seconds``, ``valid_*`` with validation...) plus ``epochs``
    (``cfg.epochs``), once that epoch's checkpoint is handed to the writer thread.
    """
    return train_model(cfg, run_dir, resume, quiet, on_epoch=on_epoch).sealed()


@dataclass
class Trained:
    """What :func:`train_model` returns: the summary, the trained model (with ``keep``) and the end of the run.

    ``loaded``: the model as :func:`ser_toolkit.evaluation.load_run_model` would load it from the sealed run
    (the selected weights; ``(model, featurizer, config, device)``), None on other ranks or without ``keep``.
    :meth:`sealed` waits until the best weights are written and the run is sealed (in the background with
    ``keep``, so that evaluation overlaps the write), re-raises what failed there, and returns the summary.
    """

    summary: dict[str, Any]
    loaded: Any = None
    finishing: Any = None  # the thread writing the weights and the seal
    errors: list = None  # type: ignore[assignment]
    stop: Any = None  # the training's signal handlers, kept until the run is sealed

    def sealed(self) -> dict[str, Any]:
        if self.finishing is not None:
            self.finishing.join()
            self.finishing = None
        if self.stop is not None:
            stop, self.stop = self.stop, None
            stop.__exit__(None, None, None)
            if stop.received:  # it came while the run was being sealed: the run is finished, then stopped
                from ser_toolkit.training.checkpoints import TrainingStopped

                raise TrainingStopped(stop.received, stop.epochs_done, finished=True)
        if self.errors:
            raise self.errors.pop()
        return self.summary


def train_model(cfg: TrainConfig, run_dir: Path, resume: bool = False, quiet: bool = False, *,
                on_epoch: Callable[[dict[str, Any]], None] | None = None, keep: bool = False) -> Trained:
    """:func:`train`, and with ``keep`` the trained model in memory, to evaluate it at once (no rebuild, no second
    read or hash of the weights) while its weights are written and the run sealed; see :class:`Trained`."""
    from ser_toolkit.models import FeatureClassifier
    from ser_toolkit.registry import get

    from ser_toolkit.training import runs

    cfg.validate()
    rank, world, local_rank = _dist()
    distributed = world > 1
    if rank == 0 and not (run_dir / "config.json").is_file():  # called as a library function
        runs.write_run_config(run_dir, cfg, resolve_cache(cfg.dataset, cfg.cache_dir))
    if issubclass(get("model", cfg.model).obj, FeatureClassifier):  # fitted once on cached features, no torch
        if distributed:
            raise SertkError(f"model '{cfg.model}' is fitted once on cached features, in one process",
                             "run sertk train without torchrun (its hyper-parameter search uses the CPUs itself)")
        from ser_toolkit.training.features import fit_classifier

        run_dir.mkdir(parents=True, exist_ok=True)
        summary, fitted = fit_classifier(cfg, run_dir, resume, quiet, on_epoch)
        return Trained(summary, (fitted, None, asdict(cfg), None) if keep else None)

    from ser_toolkit.memory import is_out_of_memory, out_of_memory

    device = _device(cfg.device, local_rank)
    try:
        return _train_torch(cfg, run_dir, resume, quiet, on_epoch, keep, device)
    except BaseException as exc:  # out of memory before the first step (the model, the optimizer...)
        if not is_out_of_memory(exc):
            raise
        oom = out_of_memory(device, "while setting up training", {}, cfg.batch_seconds, cfg.batch_size,
                            train_fix(cfg))
    raise oom  # outside the handler: the failed attempt's tensors are freed with its frames


def train_fix(cfg: TrainConfig, retried: bool = False) -> str:
    """What shrinks a training step's memory, with the options that exist for ``cfg``'s model."""
    from ser_toolkit.memory import TRAIN_FIX, TRAIN_FIX_CHECKPOINTING, TRAIN_FIX_RETRY
    from ser_toolkit.registry import get

    fix = TRAIN_FIX
    if "gradient_checkpointing" in {p.name for p in get("model", cfg.model).obj.params}:
        fix += TRAIN_FIX_CHECKPOINTING
    return fix + ("" if retried else TRAIN_FIX_RETRY)


def _train_torch(cfg: TrainConfig, run_dir: Path, resume: bool, quiet: bool,
                 on_epoch: Callable[[dict[str, Any]], None] | None, keep: bool, device) -> Trained:
    """The epochs of a model trained by torch (see :func:`train_model`)."""
    import torch

    from ser_toolkit.memory import batch_facts, is_out_of_memory, out_of_memory
    from ser_toolkit.registry import get
    from ser_toolkit.training import runs
    from ser_toolkit.training.checkpoints import Checkpoints, StopSignals, TrainingStopped
    from ser_toolkit.training.data import Collate, EpochBatches, close_loader, featurize_all, train_loader

    rank, world, _ = _dist()
    distributed = world > 1
    created_group = distributed and _init_distributed(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        share = os.environ.get(memory.GPU_SHARE_ENV)
        if share:  # a study runs several runs on this GPU: this one keeps to its share of the memory
            torch.cuda.set_per_process_memory_fraction(float(share), device)
    main_process = rank == 0
    run_dir.mkdir(parents=True, exist_ok=True)
    if main_process:  # what a killed writer of this run left half-written
        for folder in (run_dir, run_dir / "checkpoints", run_dir / "aug_log"):
            remove_stale_tmp(folder, "*")
    plugin = get("model", cfg.model).obj(**cfg.model_options)
    spec = plugin.featurizer_spec()
    if cfg.normalize != "none" and (spec is None or (cfg.plugins and cfg.aug_mode == "online")):
        raise SertkError(f"--normalize {cfg.normalize} needs a model on cached features and materialised "
                         "augmentation", "use a feature model (e.g. --model acoustic) with --aug-mode offline, "
                         "or --normalize none")
    if resume and (run_dir / runs.RUN_FILE).is_file():  # the data it started on, wherever it is now
        info = runs.run_info(run_dir)
        try:
            given: Path | None = resolve_cache(cfg.dataset, cfg.cache_dir)
        except SertkError:
            given = None
        cfg = dataclasses.replace(cfg, dataset=str(runs.locate_cache(run_dir, info, given, option="--dataset")),
                                  split=runs.locate_split(run_dir, info, cfg.split))
    torch.manual_seed(cfg.seed)
    model = plugin.build(len(EMOTIONS), run_dir if main_process else None)
    parameters = {"total": sum(p.numel() for p in model.parameters()),
                  "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    featurize = model.featurizer()
    data = prepare_data(cfg, featurize, run_dir)
    train_items = data.train
    cached = spec is not None and train_items.augmentation is None and cfg.max_seconds is None
    if spec is not None and not cached and featurize is None:  # e.g. a frozen SSL probe: cached features only
        raise SertkError(f"model '{cfg.model}' trains on cached features only, computed once per whole utterance "
                         f"({'online augmentation' if train_items.augmentation is not None else '--max-seconds'} "
                         "would need them again every epoch)", "use --aug-mode offline (materialised copies) and "
                         "no --max-seconds")
    valid_x = seen = None
    if cfg.normalize != "none" and not cached:  # normalisation applies to cached features only
        raise SertkError(f"--normalize {cfg.normalize} needs cached features of whole utterances",
                         "drop --max-seconds and use --aug-mode offline, or --normalize none")
    if cached:  # features from the feature cache, normalised per set (--normalize)
        from ser_toolkit.normalize import SEEN
        from ser_toolkit.training.features import item_features, set_features, training_statistics

        seen = training_statistics(data, spec, cfg.workers) if cfg.normalize == SEEN else None
        x, sets = item_features(train_items, spec, cfg.normalize, cfg.workers, seen=seen)
        train_items.memo = {k: x[k] for k in range(len(x))}
        data.data["features"] = [{"set": f["set"], "digest": f["features"]} for f in sets]
        if data.valid_rows:
            valid_x, _ = set_features(data.reader, data.valid_rows, spec, cfg.normalize, cfg.workers, seen=seen)
    if model.input_kind == "wave" and cfg.max_seconds is None:
        check_wave_lengths(train_items.lengths(), [train_items.readers[r].ids[i] for r, i, _ in train_items.items],
                           data.reader.sample_rate, "training")
        test_rows = [i for i, uid in enumerate(data.reader.ids) if data.assignment.get(uid) == "test"]
        i = longest_over(data.reader.lengths[test_rows], data.reader.sample_rate) if test_rows else None
        if i is not None and main_process:  # said now, not hours later when the run is evaluated
            import sys

            print(f"warning: test utterance {data.reader.ids[test_rows[i]]!r} is "
                  f"{data.reader.lengths[test_rows[i]] / data.reader.sample_rate:.0f} s long: evaluating this run "
                  f"will need sertk evaluate --max-seconds (windows)", file=sys.stderr)
    start_epoch, best, history = 0, -math.inf, []
    step_log: list[list[float]] = []  # [epoch, step, loss]: read back once per epoch, not per step
    ckpt_path = runs.last_epoch_checkpoint(run_dir) if resume else None
    resuming = ckpt_path is not None and (run_dir / runs.RUN_FILE).is_file()
    run_id = _start_run(run_dir, data.data, resuming, main_process)  # only rank 0's id is ever written
    if seen is not None and main_process:  # --normalize speaker-train: what evaluation applies, sealed with the run
        seen.save(run_dir / "checkpoints" / runs.SPEAKER_STATS, run_id)
    if not resuming:
        if resume and main_process:
            import sys

            every = "every epoch" if cfg.checkpoint_every == 1 else f"every {cfg.checkpoint_every} epochs"
            when = f"{every} (--checkpoint-every) and " if cfg.checkpoint_every else "only (--checkpoint-every 0) "
            print(f"{run_dir} holds no resumable state: it ended before one was written (states are written "
                  f"{when}when training is interrupted); training it from the first epoch", file=sys.stderr)
        ckpt_path = None

    if model.static_features and train_items.augmentation is None and not cached:
        train_items.memo = featurize_all(train_items, max(cfg.workers, 1))
    clean_feats = [train_items[k][0] for k in range(len(train_items)) if train_items.items[k][0] == 0
                   and train_items.items[k][2] < 0] if model.static_features else []
    model.prepare(clean_feats)
    # all inputs already in memory: worker processes would only add their start-up cost
    loader_workers = 0 if train_items.memo is not None and len(train_items.memo) == len(train_items) else cfg.workers
    model.to(device)
    threads = torch.get_num_threads()
    if model.input_kind == "vector" and device.type == "cpu":
        torch.set_num_threads(1)  # small matrices: threads cost more than they give (3x faster backward)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")
    # one loader per run (persistent workers); its sampler forms each epoch's batches (by --batch-seconds: on
    # the lengths that epoch's augmentation produces) and tags every index with its epoch
    sampler = EpochBatches(train_items, cfg.batch_size, cfg.seed, cfg.bucket, rank, world, cfg.batch_seconds,
                           data.reader.sample_rate)
    loader = None
    steps_per_epoch = math.ceil(len(sampler) / cfg.grad_accum)  # epoch 0's (--batch-seconds: varies a little)
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(cfg.schedule, int(cfg.warmup * total_steps), total_steps))
    precision = precision_for(device.type, cfg.bf16, device.type == "cuda" and bf16_native())
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = _grad_scaler(precision == "fp16")
    patience_left = cfg.early_stopping
    if ckpt_path is not None:
        state = runs.load_checkpoint(ckpt_path, run_id)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):  # fp16: the loss scale reached so far
                scaler.load_state_dict(state["scaler"])
            start_epoch, best, history = state["epoch"] + 1, state["best"], state["history"]
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:  # another model, or a damaged state
            why = " ".join(str(exc).split())[:160] or type(exc).__name__
            raise SertkError(f"checkpoint {ckpt_path} does not fit this run's model ({why})",
                             "restore the model the run was trained from, or delete the checkpoint to train the run "
                             "again from the start") from None
        patience_left = state.get("patience_left", patience_left)
        step_log = state.get("steps", [])
    net = model
    ddp = None
    if distributed:  # unused-parameter search (a graph walk every step) only for models that need it
        net = ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None,
            find_unused_parameters=bool(getattr(model, "find_unused_parameters", False)))
    if cfg.compile:
        net = torch.compile(net, dynamic=False)  # dynamic shapes crash inductor on HuBERT (docs/benchmarks.md)
    loss_fn = torch.nn.CrossEntropyLoss(weight=None if (w := _class_weights(train_items.labels(), cfg.class_weights))
                                        is None else w.to(device))
    collate = Collate(model.input_kind, pad_to=COMPILE_BUCKET if cfg.compile else None)
    ckpts = Checkpoints(run_dir, pin=device.type == "cuda", track_best=bool(data.valid_rows)) \
        if main_process else None
    if ckpts is not None:
        ckpts.state_epoch_on_disk = start_epoch  # resumed from that state (0: none)
    names = runs.unique_names(model.state_dict())  # the weights file's tensor names (no tied aliases)
    stop = StopSignals()
    where: dict[str, Any] = {}  # the batch in hand, for an out-of-memory message
    oom = None
    progress = None
    if main_process and not quiet:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]:.4f}  {task.fields[rate]:.1f} utt/s"),
                            TimeElapsedColumn())
        progress.start()
    try:
        stop.__enter__()  # SIGTERM/SIGINT: stop at the next step, with the last epoch's state written
        for epoch in range(start_epoch, cfg.epochs):
            _seed_everything(epoch_seed(cfg.seed, epoch, rank))
            train_items.set_epoch(epoch)
            sampler.set_epoch(epoch)
            batches = sampler.batches
            if loader is None:  # started once: its workers serve every epoch
                loader = train_loader(train_items, sampler, collate, loader_workers, device.type == "cuda")
            net.train()
            loss_sum = torch.zeros((), device=device)
            step_losses = []
            n_seen, t0, log_lines = 0, time.perf_counter(), io.StringIO()
            task = progress.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=len(batches), loss=0.0, rate=0.0) \
                if progress else None
            optimizer.zero_grad(set_to_none=True)
            _check_same_steps(len(batches), distributed)
            for step, batch in enumerate(loader):
                if (signum := _stop_agreed(stop, step, distributed, device)):
                    raise TrainingStopped(signum, epoch)
                if isinstance(batch, SertkError):  # raised in a loader worker (see TrainItems.__getitem__)
                    raise batch
                inputs, mask, labels, logs = batch
                where.update(epoch=epoch + 1, step=step + 1, inputs=inputs, mask=mask)
                inputs = inputs.to(device, non_blocking=True)
                mask = mask.to(device, non_blocking=True) if mask is not None else None
                if cfg.compile:  # one graph per length bucket, whatever the batch size
                    torch._dynamo.maybe_mark_dynamic(inputs, 0)
                    if mask is not None:
                        torch._dynamo.maybe_mark_dynamic(mask, 0)
                labels = labels.to(device, non_blocking=True)
                update = (step + 1) % cfg.grad_accum == 0 or step + 1 == len(batches)
                # DDP all-reduces the gradients only on the micro-batch whose step follows
                with ddp.no_sync() if ddp is not None and not update else contextlib.nullcontext():
                    with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                        logits = net(inputs, mask)
                    loss = loss_fn(logits.float(), labels)
                    scaler.scale(loss / cfg.grad_accum).backward()
                if update:
                    optimizer_step(scaler, optimizer, scheduler)
                    optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach() * labels.numel()
                step_losses.append(loss.detach())
                n_seen += labels.numel()
                for entry in logs:
                    log_lines.write(json.dumps(entry, default=float) + "\n")
                if task is not None and (step % cfg.log_every == 0 or step + 1 == len(batches)):
                    elapsed = time.perf_counter() - t0
                    progress.update(task, completed=step + 1, loss=float(loss_sum) / max(n_seen, 1),
                                    rate=n_seen * world / max(elapsed, 1e-9))
            if step_losses:
                losses = torch.stack(step_losses).float()
                if distributed:  # the ranks take the same steps: each step's loss is the mean over ranks
                    torch.distributed.all_reduce(losses)
                    losses /= world
                step_log += [[epoch + 1, j + 1, v] for j, v in enumerate(losses.cpu().tolist())]
            if distributed:
                torch.distributed.all_reduce(loss_sum)
            seconds = time.perf_counter() - t0
            row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": float(loss_sum) / max(n_seen * world, 1),
                                   "lr": scheduler.get_last_lr()[0], "utterances_per_s": n_seen * world / seconds,
                                   "seconds": seconds}
            if data.valid_rows:  # every rank predicts its share; rank 0 gets the metrics
                row.update(validate(model, featurize, data.reader, data.valid_rows, valid_x, cfg.batch_size, device,
                                    rank, world) or {})
            aug_log = _gather_text(log_lines.getvalue(), distributed)
            decision = None
            if main_process:  # decided once, on rank 0, and broadcast: every rank takes the same epochs
                score = row.get(f"valid_{cfg.select_metric}", epoch)  # no validation: the last epoch is the best
                improved = score > best
                decision = (row, improved, max(score, best), cfg.early_stopping if improved else patience_left - 1)
            row, improved, best, patience_left = _broadcast(decision, distributed)
            stopping = bool(cfg.early_stopping and patience_left <= 0 and data.valid_rows)
            history.append(row)
            if main_process:
                if aug_log:
                    write_text(run_dir / "aug_log" / f"epoch-{epoch + 1:03d}.jsonl", aug_log)
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": copy.deepcopy(scheduler.state_dict()), "scaler": scaler.state_dict(),
                         "epoch": epoch, "best": best, "patience_left": patience_left,
                         "history": copy.deepcopy(history), "steps": list(step_log), "config": asdict(cfg),
                         "run_id": run_id}
                last = stopping or epoch + 1 == cfg.epochs  # its state would be removed by the seal at once
                write_state = bool(cfg.checkpoint_every) and (epoch + 1) % cfg.checkpoint_every == 0 and not last
                best_meta = {"run_id": run_id, "epoch": epoch + 1, "score": best, "metric": cfg.select_metric} \
                    if improved and data.valid_rows else None
                ckpts.snapshot(epoch + 1, state, best_meta, write_state, names, last)  # copied; written off
                # this thread
                _write_curves(run_dir / "curves.csv", history)
                write_text(run_dir / "steps.csv", "epoch,step,loss\n" + "".join(f"{e},{j},{v:.6f}\n"
                                                                               for e, j, v in step_log))
            if distributed:  # no rank goes on before rank 0 has its snapshot of this epoch
                torch.distributed.barrier()
            if task is not None:
                progress.remove_task(task)
            if on_epoch is not None and main_process:
                on_epoch({**row, "epochs": cfg.epochs})
            stop.epochs_done = epoch + 1
            if (signum := _stop_agreed(stop, None, distributed, device)) and not stopping \
                    and epoch + 1 < cfg.epochs:
                raise TrainingStopped(signum, epoch + 1)
            if stopping:
                break
    except BaseException as exc:
        failed = None
        if ckpts is not None:  # a save in flight finishes; stopped by a signal: the latest epoch's state too
            failed = ckpts.interrupted(write=isinstance(exc, KeyboardInterrupt))
            if isinstance(exc, TrainingStopped):
                exc.epochs_done = ckpts.state_epoch_on_disk  # where a resume starts
        stop.__exit__(None, None, None)
        if failed is not None:  # the state could not be written (a full disk...): that is the news
            raise failed from None
        if not is_out_of_memory(exc):
            raise
        oom = out_of_memory(device, f"in epoch {where.get('epoch', start_epoch + 1)}, step {where.get('step', 0)}",
                            batch_facts(where.get("inputs"), where.get("mask"), data.reader.sample_rate),
                            cfg.batch_seconds, cfg.batch_size, train_fix(cfg))
    finally:
        close_loader(loader)  # its persistent workers end with the training loop
        torch.set_num_threads(threads)
        if progress is not None:
            progress.stop()
    if oom is not None:  # raised here, not in the handler: the failed step's tensors are freed with its frames
        where.clear()
        raise oom
    summary = {"epochs_run": len(history), "best": best, "history": history, "parameters": parameters,
               "precision": precision, "processes": world, **data.summary}
    trained = Trained(summary, errors=[], stop=stop)
    # the signal handlers stay until the run is sealed: a SIGTERM now waits for the seal, then acts (Trained)
    if main_process:
        def finish() -> None:
            try:
                ckpts.finish(model, {"run_id": run_id, "epoch": len(history), "score": best,
                                     "metric": "last epoch"})
                summary["checkpoint_bytes_written"] = ckpts.bytes_written  # by this invocation
                runs.write_json(run_dir / "train_summary.json", summary)
                runs.seal(run_dir, run_id, ckpts.digests)  # last: only now is the run finished
            except BaseException as exc:  # re-raised by Trained.sealed()
                trained.errors.append(exc)
            finally:
                stop.sealed()

        if keep:  # the selected weights in the model, as load_run_model gives it, evaluated while they are written
            ckpts.load_best(model)
            model.eval()
            model.speaker_stats = seen
            model.feature_spec = spec
            trained.loaded = (model, featurize, asdict(cfg), device)
        if keep and not distributed:
            import threading

            trained.finishing = threading.Thread(target=finish, name="sertk-finish", daemon=False)
            trained.finishing.start()
        else:
            finish()
    else:
        stop.sealed()
    if distributed:  # no rank returns before the run is sealed
        torch.distributed.barrier()
        if created_group:
            torch.distributed.destroy_process_group()
    if trained.finishing is None:
        trained.sealed()  # acts on a signal that came while the run was being sealed
    return trained


STOP_CHECK_STEPS = 16
"""Under torchrun the ranks agree on a stop signal every this many steps (and after every epoch): one small
all-reduce, so that every rank stops after the same step."""


def _stop_agreed(stop, step: int | None, distributed: bool, device) -> int | None:
    """The signal that stops training now (None: go on). One process: the one it received. Under torchrun: the
    largest any rank received, read every :data:`STOP_CHECK_STEPS` steps (``step``) and after each epoch
    (``step`` None), so that every rank takes the same steps."""
    if not distributed:
        return stop.received
    if step is not None and step % STOP_CHECK_STEPS:
        return None
    import torch

    flag = torch.tensor([stop.received or 0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item()) or None


def _start_run(run_dir: Path, data: dict[str, Any], resuming: bool, main_process: bool) -> str:
    """The run id: the recorded one when resuming on unchanged data, else a new one (recorded in run.json)."""
    from ser_toolkit.training import runs

    if resuming:  # the same data, wherever it is now (a moved study, another working directory)
        info = runs.run_info(run_dir)
        if runs.data_identity(info.get("data")) != runs.data_identity(data):
            was, now = info.get("data", {}).get("cache", {}), data["cache"]
            raise SertkError(f"the data of run {run_dir} changed since it started (cache {was.get('path')} "
                             f"{str(was.get('digest'))[:12]} -> {now['path']} {now['digest'][:12]}, or its split "
                             "or augmented sets)", "start a new run (another --out), or restore the data")
        return info["run_id"]
    run_id = runs.new_run_id()
    if main_process:
        (run_dir / runs.SEAL_FILE).unlink(missing_ok=True)
        runs.write_json(run_dir / runs.RUN_FILE, {"run_id": run_id, "data": data})
    return run_id


def _write_curves(path: Path, history: list[dict[str, Any]]) -> None:
    keys = list(dict.fromkeys(k for row in history for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    write_text(path, buf.getvalue())
