"""Training throughput (issues 4, 22): sertk's own training loop against a plain Trainer-style loop on the same batches.

What it measures, in one process, on one device (a GPU when there is one, else the CPU):

- **sertk**: ``ser_toolkit.training.loop.train`` itself (what ``sertk train`` runs: its loader, length
  bucketing, bf16 autocast + TF32 + fused AdamW on CUDA, fp32 on CPU, pinned memory, each epoch's state
  snapshotted for its checkpoint policy (``--checkpoint-every``), no per-step host read-back), ``--epochs`` epochs (default 2) from a
  random-weight ``HubertForSequenceClassification`` saved to a folder (``make_model_folder``; speed depends on
  the architecture, not the weights; by default with ``superb/hubert-large-superb-er``'s shipped options,
  of which sertk keeps the weighted layer sum and turns layerdrop and SpecAugment off, as in a study);
- **plain_hf**: a Hugging Face Trainer-style step on the SAME batches: sertk's own sampler
  (``training.data.EpochBatches``, same seed, same ``--batch-size``/``--batch-seconds``, the same epoch
  index as the epoch measured in sertk's run) collated by sertk's ``Collate`` (eager: no ``--compile``
  padding), every batch preloaded (pinned on CUDA), then per step: bf16 autocast on CUDA (fp32 on CPU, as
  sertk), HF's own forward (:func:`hf_forward`: boolean-mask pooling, the attention mask to every encoder),
  cross-entropy on float logits, backward, ``clip_grad_norm_(1.0)``, fused AdamW on CUDA (same lr and weight
  decay), a linear learning-rate schedule, the loss read back every 50 steps;
- **plain_sertk_forward**: the same plain loop with sertk's forward (``plugins.hubert``): plain_hf against
  plain_sertk_forward is the forward's share, plain_sertk_forward against sertk the loop's.

Steady state, both measured the same way: the first ``--warmup-steps`` steps of the measured epoch are run
untimed, the next ``--sync-steps`` are run under :class:`ser_toolkit.training.syncs.SyncCounter` (untimed:
the probe slows them down), then the device is synchronised, the remaining steps are timed and it is
synchronised again. For sertk's loop this is done by a timer hook, not from ``train_summary.json``: the
per-epoch ``utterances_per_s`` there includes each epoch's start-up (loader iterator and first batches,
compilations under ``--compile``) and warm-up steps, which the plain loop would not pay. The hook wraps the
DataLoader that ``train()`` makes (``training.data.train_loader``, patched for the run only) and sees each
step as the interval between two batch requests, in the LAST epoch (by default the second: caches,
allocator and ``--compile`` graphs are warm, and the previous epoch's snapshot is being handled, as in a
long run). It adds one synchronisation at the start and end of the timed steps, as the plain loop has. The
summary's per-epoch figures are reported too (``epoch_utterances_per_s``).

Reported per loop: steady-state utterances/s and audio-seconds/s (real audio, padding excluded), padding
efficiency (real / padded samples of the timed batches), peak memory (GPU: peak allocated during that loop;
CPU: the process's peak RSS during that loop, high-water mark reset through /proc/self/clear_refs, so it
includes what earlier phases left allocated and, for the plain loops, the preloaded batches), syncs per
step (the whole step as the loop runs it; on CPU, a proxy that also counts one read per parameter tensor
of the for-loop AdamW's step counters, which both loops use there and which stay on the host on a GPU,
where both use fused AdamW), the loss by quarter; the ratios sertk / plain_hf
(``ratio``) and sertk / plain_sertk_forward; ``same_batches`` checks that both loops timed the very
same batches (sizes and real lengths). ``syncs_per_step`` (top level) is the model-only count of
:func:`sync_counts`: one training step of sertk's model path against HF's forward on the same padded batch.

What is fair: same weights, same batches in the same order, same precision per device, same optimizer
settings, same warm-up and timing rule. What is not identical, by design: sertk's loop reads its audio
from the cache through its loader (workers on CUDA, the training thread on CPU with ``--workers 0``) and
writes checkpoints, while the plain loop has every batch in memory already (the plain loop is the best a
Trainer loop with a free data pipeline could do); the plain loop clips gradients (the Trainer's default),
sertk's does not; with ``--compile`` only sertk's loop is compiled (its batches padded to whole seconds,
which lowers its padding efficiency).

Data: RAVDESS (the reference split's training files, first ``--utterances``) when ``--data`` (default
``$SERTK_SHARED_DATA``, else ``shared/data`` in or beside the checkout) holds ``ravdess/seed_split.csv``
and soundfile and soxr import; otherwise sertk's synthetic corpus (numpy/scipy only: mean about 2 s against
RAVDESS's 3.7 s, so compare audio-seconds/s across corpora). ``data.source`` and ``data.why`` say which.
Needs only torch, transformers, numpy, scipy and h5py (what the GPU image has).

Run from the repository root:

    python benchmarks/bench_train.py --size tiny                 # CPU: tiny HuBERT, ~1.5 minutes on 2 cores
    python benchmarks/bench_train.py --size tiny --utterances 48 --epochs 1 --warmup-steps 1 --out /tmp/t.json
    python benchmarks/bench_train.py --out $OUT/train-large-gpu.json   # GPU: HuBERT-Large-sized
    python benchmarks/bench_train.py --size large --batch-seconds 60 --workers 12   # a budget of padded audio
    python benchmarks/bench_train.py --size large --compile      # sertk's --compile; the plain loop stays eager

Results go to ``benchmarks/results/train-SIZE-DEVICE.json`` unless ``--out`` says otherwise.

Other modes: ``--syncs-only`` measures only the model-level host-device syncs per step of sertk's model path
against HF's ``HubertForSequenceClassification`` forward with the attention mask, on the same padded batch
of 8 unequal utterances (seconds on CPU); ``--compile-probe`` counts ``torch.compile`` graphs, graph breaks
and compilations of a training step over batches of varying sizes and lengths (no data needed).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SAMPLE_RATE = 16000


def make_model_folder(size: str, folder: Path, norm: str = "group", reference: bool = False,
                      **config) -> None:
    """A random-weight ``HubertForSequenceClassification`` saved with ``save_pretrained`` (and its feature
    extractor): ``large`` has the architecture of ``superb/hubert-large-superb-er``. ``reference``: also its
    training-time options as Hugging Face ships them (4 labels, weighted layer sum, ``mask_time_prob`` 0.05,
    layerdrop 0.1; HubertConfig's defaults otherwise),
    which a run must rebuild exactly."""
    import torch
    from transformers import HubertConfig, HubertForSequenceClassification, Wav2Vec2FeatureExtractor

    shipped = {**(dict(use_weighted_layer_sum=True, mask_time_prob=0.05, layerdrop=0.1) if reference else {}),
               **config}
    if size == "large":  # the architecture of superb/hubert-large-superb-er
        cfg = HubertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                           feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True,
                           classifier_proj_size=256, num_labels=4, **shipped)
    else:
        cfg = HubertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                           conv_dim=(32, 32, 32, 32), conv_stride=(5, 4, 4, 2), conv_kernel=(10, 8, 4, 4),
                           num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, classifier_proj_size=64,
                           num_labels=4, feat_extract_norm=norm, do_stable_layer_norm=norm == "layer", **shipped)
    torch.manual_seed(0)
    HubertForSequenceClassification(cfg).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, do_normalize=True,
                             return_attention_mask=True).save_pretrained(folder)


def quarters(losses: list[float]) -> list[float]:
    parts = np.array_split(np.asarray(losses), 4)
    return [float(p.mean()) for p in parts if p.size]


def hf_forward(hf):
    """``hf`` run through HF's own sequence-classification forward (boolean-mask pooling, the attention mask
    given to every encoder), as the reference study ran it; the same ``hf.`` parameter names as sertk's model."""
    import torch

    class HFForward(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hf = hf

        def forward(self, inputs, attention_mask=None):
            return self.hf(input_values=inputs, attention_mask=attention_mask).logits

    return HFForward()


def sync_counts(folder: Path, waves: list[np.ndarray], labels: np.ndarray, steps: int = 3) -> dict:
    """Host-device syncs per training step (forward, backward, fused AdamW step) of sertk's path and of HF's,
    on the same zero-padded batch of the 8 first utterances (unequal lengths) with its attention mask."""
    import torch

    from ser_toolkit.plugins.hubert import Hubert
    from ser_toolkit.training.syncs import count_train_step

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    plugin_model = Hubert(checkpoint=str(folder)).build(7)
    norm = plugin_model.featurizer()
    feats = [norm(w) for w in waves[:8]]
    x = torch.zeros(len(feats), max(f.size for f in feats))
    mask = torch.zeros(x.shape, dtype=torch.long)
    for j, f in enumerate(feats):
        x[j, :f.size] = torch.from_numpy(f)
        mask[j, :f.size] = 1
    x, mask, y = x.to(device), mask.to(device), torch.as_tensor(labels[:8]).to(device)
    out = {"device": device.type, "batch_seconds": [round(f.size / 16000, 2) for f in feats],
           "attention_mask_to_encoder": bool(getattr(plugin_model.hf.config, "feat_extract_norm", "layer") != "group")}
    for name, model in (("sertk", plugin_model), ("reference", hf_forward(plugin_model.hf))):
        counter = count_train_step(model.to(device), x, mask, y, steps=steps)
        out[name] = {"per_step": counter.total / steps, "by_kind": {k: v / steps for k, v in counter.by_kind.items()}}
    return out


COMPILE_SHAPES = ((8, 32000), (6, 43000), (4, 61000), (10, 25000), (5, 47000), (3, 64000), (7, 30000), (9, 60000))
"""(batch, samples) of the compile probe: the varying shapes that batches of a budget of seconds produce."""


def compile_probe(backend: str = "eager", bucket: int = 16000) -> dict:
    """``torch.compile`` of a training step (forward + backward) of the tiny HuBERT on :data:`COMPILE_SHAPES`:
    graphs and breaks of one forward (``torch._dynamo.explain``), then compilations under three settings:
    ``dynamic=None`` (automatic dynamic shapes), ``dynamic=False`` on exact lengths, and ``dynamic=False``
    with lengths padded up to a multiple of ``bucket`` samples and the batch dimension marked dynamic.
    ``backend="eager"`` counts graphs without generating code; ``"inductor"`` compiles for real."""
    import torch
    import torch._dynamo as dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    from ser_toolkit.plugins.hubert import Tiny

    def model(name: str):
        torch.manual_seed(0)
        ours = Tiny().build(7).train()
        return ours if name == "sertk" else hf_forward(ours.hf).train()

    def batch(b: int, n: int, pad_to: int):
        x, mask = torch.zeros(b, pad_to), torch.zeros(b, pad_to, dtype=torch.long)
        for i in range(b):
            k = n - 997 * i % (n // 4)  # unequal lengths, the longest n
            x[i, :k], mask[i, :k] = torch.randn(k), 1
        return x, mask

    out: dict = {"backend": backend, "shapes": COMPILE_SHAPES, "bucket_samples": bucket}
    for name in ("sertk", "reference"):
        dynamo.reset()
        x, mask = batch(*COMPILE_SHAPES[0], COMPILE_SHAPES[0][1])
        explained = dynamo.explain(model(name))(x, mask)
        row: dict = {"graphs_per_forward": explained.graph_count, "graph_breaks": explained.graph_break_count,
                     "break_reasons": sorted({str(r.reason).splitlines()[0][:100] for r in explained.break_reasons})}
        for mode, dynamic, bucketed in (("dynamic=None", None, False), ("dynamic=False", False, False),
                                        ("dynamic=False, length buckets, batch dim dynamic", False, True)):
            dynamo.reset()
            counter = CompileCounterWithBackend(backend)
            compiled = torch.compile(model(name), backend=counter, dynamic=dynamic)
            try:
                for b, n in COMPILE_SHAPES:
                    x, mask = batch(b, n, -(-n // bucket) * bucket if bucketed else n)
                    if bucketed:
                        dynamo.maybe_mark_dynamic(x, 0)
                        dynamo.maybe_mark_dynamic(mask, 0)
                    compiled(x, mask).float().logsumexp(-1).sum().backward()
                row[mode] = {"compilations": counter.frame_count}
            except Exception as exc:  # noqa: BLE001 -- a compiler failure is a result here
                row[mode] = {"compilations": counter.frame_count,
                             "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}"}
        out[name] = row
    return out


# ------------------------------------------------------------------ memory


def reset_peak(cuda: bool) -> None:
    """Start a loop's peak-memory window: GPU peak allocated, else the process's RSS high-water mark."""
    gc.collect()
    if cuda:
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # Linux: "5" resets VmHWM to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_gib(cuda: bool) -> float:
    """Peak GPU memory allocated, or peak RSS, since :func:`reset_peak` (RSS: since the start where the
    high-water mark cannot be reset)."""
    if cuda:
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**30, 3)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 2**20, 3)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


def _sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


# ------------------------------------------------------------------ data


def shared_data_default() -> Path:
    """``$SERTK_SHARED_DATA``, else ``shared/data`` in the checkout (the GPU machine's copy), else beside it."""
    if os.environ.get("SERTK_SHARED_DATA"):
        return Path(os.environ["SERTK_SHARED_DATA"])
    inside = REPO / "shared" / "data"
    return inside if (inside / "ravdess").is_dir() else REPO.parent / "shared" / "data"


def _importable(name: str) -> bool:
    try:
        __import__(name)
        return True
    except Exception:  # noqa: BLE001 -- ImportError, or a broken native library
        return False


def make_data(data_root: Path, utterances: int, folder: Path, seed: int, workers: int) -> dict:
    """Cache the corpus in ``folder`` and write a split file whose ``train`` part is the benchmark's
    utterances (RAVDESS: the reference split's first training files; synthetic: a seeded draw); the rest is
    ``test`` (unused). Returns what was used and why."""
    from ser_toolkit.cache.build import build_cache, preprocess_for
    from ser_toolkit.cache.reader import CacheReader

    split_csv = data_root / "ravdess" / "seed_split.csv"
    decoders = {name: _importable(name) for name in ("soundfile", "soxr")}
    if split_csv.is_file() and all(decoders.values()):
        from ser_toolkit.plugins.ravdess import Ravdess

        dataset, root = Ravdess(), data_root / "ravdess"
        why = f"RAVDESS at {root}"
    else:
        from ser_toolkit.plugins.synthetic import Synthetic

        per_emotion = max(6, math.ceil(utterances / (2 * 50 * 7)))  # 7 emotions, 2 genders, <= 50 speakers each
        speakers = min(50, max(1, math.ceil(utterances / (2 * 7 * per_emotion))))
        dataset, root = Synthetic(speakers=speakers, per_emotion=per_emotion), None
        missing = [n for n, ok in decoders.items() if not ok]
        why = "synthetic: " + "; ".join(
            ([f"no ravdess/seed_split.csv under {data_root}"] if not split_csv.is_file() else [])
            + ([f"{', '.join(missing)} not importable"] if missing else []))
    cache = folder / f"{dataset.name}.h5"
    t = time.perf_counter()
    build_cache(dataset, root, cache, preprocess_for(dataset), workers=workers, quiet=True)
    built = time.perf_counter() - t
    reader = CacheReader(cache)
    if root is not None:
        rows = [r.split(",") for r in split_csv.read_text().split()[1:]]
        train = [u for u, s in rows if s == "train"][:utterances]
    else:
        ids = list(reader.ids)
        train = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))[:utterances]]
    keep = set(train)
    split_file = folder / "split.csv"
    split_file.write_text("utterance,split\n" + "".join(f"{u},{'train' if u in keep else 'test'}\n"
                                                       for u in reader.ids))
    seconds = np.asarray([reader.lengths[reader.index(u)] for u in train]) / reader.sample_rate
    return {"source": dataset.name, "why": why, "cache": str(cache), "split": str(split_file),
            "utterances": len(train), "mean_s": round(float(seconds.mean()), 3),
            "longest_s": round(float(seconds.max()), 3), "cache_build_s": round(built, 1)}


# ------------------------------------------------------------------ sertk's loop, timed from outside


class _TimedLoader:
    """The DataLoader ``train()`` made, iterated through a :class:`StepClock`; everything else delegated
    (``close_loader`` reads and clears ``_iterator``)."""

    def __init__(self, loader, clock: "StepClock") -> None:
        object.__setattr__(self, "_loader", loader)
        object.__setattr__(self, "_clock", clock)

    def __iter__(self):
        return self._clock.iterate(self._loader)

    def __len__(self) -> int:
        return len(self._loader)

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def __setattr__(self, name, value) -> None:
        setattr(self._loader, name, value)


class StepClock:
    """A timer hook on sertk's training loop: in epoch index ``epoch`` (0-based), steps ``[0, warm)`` run
    as they are, steps ``[warm, warm + counted)`` each under a :class:`SyncCounter`, then the device is
    synchronised and the remaining steps are timed up to the epoch's end (synchronised again). A step is
    what the loop does between two batch requests; fetching the batch (the loader's work) is inside the
    timed window, as it is inside the loop's."""

    def __init__(self, epoch: int, warm: int, counted: int, device_type: str, count_syncs: bool = True) -> None:
        self.epoch, self.warm, self.counted, self.device_type = epoch, warm, counted, device_type
        self.count_syncs = count_syncs
        self.cuda = device_type == "cuda"
        self.seconds: float | None = None
        self.steps = 0
        self.sizes: list[int] = []  # per timed batch: utterances
        self.widths: list[int] = []  # per timed batch: padded length
        self.syncs: Counter = Counter()
        self.sync_steps = 0
        self.lengths: np.ndarray | None = None
        self.batches: list[list[int]] | None = None

    def make_loader(self, original):
        def train_loader(*args, **kwargs):
            return _TimedLoader(original(*args, **kwargs), self)

        return train_loader

    def iterate(self, loader):
        sampler = loader.batch_sampler  # the run's EpochBatches
        if sampler.epoch != self.epoch:
            yield from loader
            return
        from ser_toolkit.training.syncs import SyncCounter

        self.lengths, self.batches = np.asarray(sampler.lengths), [list(b) for b in sampler.batches]
        first = self.warm + self.counted
        it = iter(loader)
        start = None
        k = 0
        while True:
            if k == first:
                _sync(self.cuda)
                start = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            if start is not None and isinstance(batch, (tuple, list)):  # not a loader worker's SertkError
                self.sizes.append(int(batch[2].numel()))
                self.widths.append(int(batch[0].shape[-1]))
            if self.count_syncs and self.warm <= k < first:
                counter = SyncCounter(self.device_type)
                with counter:  # active while the loop runs this step (until it asks for the next batch)
                    yield batch
                self.syncs.update(counter.by_kind)
                self.sync_steps += 1
            else:
                yield batch
            k += 1
        _sync(self.cuda)
        self.steps = k
        if start is not None:
            self.seconds = time.perf_counter() - start


def sertk_loop(cfg, run_dir: Path, warm: int, counted: int) -> dict:
    """``train(cfg, run_dir)`` with a :class:`StepClock` on its last epoch. Under ``--compile`` the
    ``counted`` steps run uncounted (a dispatch mode around compiled code measures something else)."""
    import torch

    import ser_toolkit.training.data as data_module
    from ser_toolkit.training.loop import train

    cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
    clock = StepClock(cfg.epochs - 1, warm, counted, "cuda" if cuda else "cpu", count_syncs=not cfg.compile)
    original = data_module.train_loader
    data_module.train_loader = clock.make_loader(original)
    reset_peak(cuda)
    t = time.perf_counter()
    try:
        summary = train(cfg, run_dir, quiet=True)
    finally:
        data_module.train_loader = original
    wall = time.perf_counter() - t
    out: dict = {"precision": summary["precision"], "run_wall_s": round(wall, 1),
                 "epoch_utterances_per_s": [round(h["utterances_per_s"], 2) for h in summary["history"]],
                 "peak_memory_gib": peak_gib(cuda)}
    if clock.seconds is None:
        raise SystemExit("the timer hook never saw sertk's last epoch (did train() stop making its loader with "
                         "ser_toolkit.training.data.train_loader?), or the epoch has no more than "
                         f"--warmup-steps + --sync-steps = {warm + counted} batches (it had {clock.steps})")
    timed = clock.batches[warm + counted:]
    real = [int(clock.lengths[b].sum()) for b in timed]
    steps_csv = [line.split(",") for line in (run_dir / "steps.csv").read_text().splitlines()[1:]]
    losses = [float(v) for e, _, v in steps_csv if int(e) == cfg.epochs]
    out.update(_rates(sum(clock.sizes), sum(real), sum(s * w for s, w in zip(clock.sizes, clock.widths)),
                      clock.seconds, len(clock.sizes)))
    out.update(syncs_per_step=round(sum(clock.syncs.values()) / clock.sync_steps, 2) if clock.sync_steps else None,
               syncs_by_kind={k: v / max(clock.sync_steps, 1) for k, v in clock.syncs.items()},
               sync_steps=clock.sync_steps, loss_quarters=[round(v, 4) for v in quarters(losses)],
               steps_in_epoch=clock.steps,
               batches=[[s, r] for s, r in zip(clock.sizes, real)])
    return out


def _rates(utterances: int, real: int, padded: int, seconds: float, steps: int) -> dict:
    seconds = max(seconds, 1e-9)
    return {"utterances_per_s": round(utterances / seconds, 2),
            "audio_s_per_s": round(real / SAMPLE_RATE / seconds, 2),
            "padding_efficiency": round(real / max(padded, 1), 4), "seconds": round(seconds, 3),
            "steps_timed": steps, "utterances_timed": utterances}


# ------------------------------------------------------------------ the plain loop


def plain_batches(cfg, featurize, epoch: int, pin: bool) -> list:
    """sertk's own batches of epoch index ``epoch`` (its sampler, its items, its collation), in memory."""
    from ser_toolkit.training.data import Collate, EpochBatches
    from ser_toolkit.training.loop import prepare_data

    data = prepare_data(cfg, featurize, None)
    items = data.train
    sampler = EpochBatches(items, cfg.batch_size, cfg.seed, cfg.bucket, 0, 1, cfg.batch_seconds,
                           data.reader.sample_rate)
    items.set_epoch(epoch)
    sampler.set_epoch(epoch)
    collate = Collate("wave")
    out = []
    for b in sampler.batches:
        x, m, y, _ = collate([items[(epoch, k)] for k in b])
        out.append((x.pin_memory() if pin else x, m.pin_memory() if pin else m, y))
    return out


def plain_loop(model, forward, batches: list, cfg, warm: int, counted: int, device) -> dict:
    """A Hugging Face Trainer-style loop over preloaded ``batches``: bf16 autocast on CUDA (fp32 on CPU),
    cross-entropy on float logits, backward, ``clip_grad_norm_(1.0)``, (fused on CUDA) AdamW, a linear
    schedule, the loss read back every 50 steps. Warm-up, sync counting and timing as :class:`StepClock`."""
    import torch

    from ser_toolkit.training.syncs import SyncCounter

    cuda = device.type == "cuda"
    if len(batches) <= warm + counted:
        raise SystemExit(f"only {len(batches)} batches per epoch: need more than --warmup-steps + --sync-steps "
                         f"= {warm + counted} (raise --utterances)")
    if cuda:  # as sertk's loop sets it (and a Trainer with tf32=True)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=cuda)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / len(batches)))
    running = torch.zeros((), device=device)
    losses = []

    def step(x, m, y):
        x, m, y = x.to(device, non_blocking=True), m.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            logits = forward(x, m)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    reset_peak(cuda)
    for x, m, y in batches[:warm]:
        losses.append(step(x, m, y))
    counter = SyncCounter(device.type)
    with counter:
        for x, m, y in batches[warm:warm + counted]:
            losses.append(step(x, m, y))
    timed = batches[warm + counted:]
    _sync(cuda)
    t = time.perf_counter()
    for i, (x, m, y) in enumerate(timed):
        loss = step(x, m, y)
        running += loss
        losses.append(loss)
        if (i + 1) % 50 == 0:
            running.item()  # the Trainer's logging read-back
    _sync(cuda)
    seconds = time.perf_counter() - t
    sizes = [int(y.numel()) for _, _, y in timed]
    real = [int(m.sum()) for _, m, _ in timed]
    out = _rates(sum(sizes), sum(real), sum(m.numel() for _, m, _ in timed), seconds, len(timed))
    out.update(precision="bf16" if cuda else "fp32", peak_memory_gib=peak_gib(cuda),
               syncs_per_step=round(counter.total / max(counted, 1), 2),
               syncs_by_kind={k: v / max(counted, 1) for k, v in counter.by_kind.items()}, sync_steps=counted,
               loss_quarters=[round(v, 4) for v in quarters(torch.stack(losses).float().cpu().tolist())],
               batches=[[s, r] for s, r in zip(sizes, real)])
    return out


# ------------------------------------------------------------------ main


def main() -> None:
    import torch

    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=shared_data_default(),
                    help="folder holding ravdess/ (default $SERTK_SHARED_DATA or shared/data); without it, or "
                         "without soundfile/soxr, sertk's synthetic corpus is used")
    ap.add_argument("--size", choices=("tiny", "large"), default="large" if cuda else "tiny")
    ap.add_argument("--utterances", type=int, default=998, help="training utterances (default: RAVDESS's 998)")
    ap.add_argument("--epochs", type=int, default=2, help="sertk's epochs; the last one is measured")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batch-seconds", type=float, default=None,
                    help="sertk's --batch-seconds: batches filled up to this much padded audio (both loops)")
    ap.add_argument("--compile", action="store_true", help="sertk's --compile (the plain loop stays eager)")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1) if cuda else 0,
                    help="sertk's loader workers (default 0 on CPU, where workers compete with torch for cores)")
    ap.add_argument("--warmup-steps", type=int, default=5 if cuda else 2, help="untimed steps, each loop")
    ap.add_argument("--sync-steps", type=int, default=3 if cuda else 1,
                    help="untimed steps after the warm-up whose host-device syncs are counted, each loop")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--bare-config", action="store_true",
                    help="HubertConfig's defaults instead of superb/hubert-large-superb-er's shipped options "
                         "(weighted layer sum, mask_time_prob 0.05, layerdrop 0.1)")
    ap.add_argument("--no-plain-sertk-forward", action="store_true",
                    help="skip the plain loop with sertk's forward")
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default under benchmarks/results/)")
    ap.add_argument("--norm", choices=("group", "layer"), default="group",
                    help="tiny only: feature-encoder norm (layer: large's, which takes the attention mask)")
    ap.add_argument("--syncs-only", action="store_true", help="only count host-device syncs per step (no epochs)")
    ap.add_argument("--compile-probe", choices=("eager", "inductor"), default=None,
                    help="only count torch.compile graphs, breaks and compilations with this backend (tiny model)")
    args = ap.parse_args()
    if args.compile_probe:
        result = compile_probe(args.compile_probe)
        print(json.dumps({k: v for k, v in result.items() if k != "shapes"}, indent=1))
        write_result(args.out or REPO / "benchmarks" / "results" / f"compile-tiny-{args.compile_probe}.json", result)
        return
    from ser_toolkit.cache.reader import CacheReader
    from ser_toolkit.plugins.hubert import Hubert
    from ser_toolkit.training.loop import TrainConfig

    device = torch.device("cuda" if cuda else "cpu")
    device_name = torch.cuda.get_device_name(0) if cuda else "cpu"
    host = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_average_start": [round(v, 2) for v in os.getloadavg()]}  # other load on the host skews CPU runs
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        tmp = Path(tmp)
        data = make_data(args.data, 8 if args.syncs_only else args.utterances, tmp, args.seed,
                         min(8, os.cpu_count() or 1))
        folder = tmp / "model"
        t = time.perf_counter()
        make_model_folder(args.size, folder, args.norm, reference=not args.bare_config)
        made = time.perf_counter() - t
        reader = CacheReader(Path(data["cache"]))
        train_rows = [reader.index(line.split(",")[0]) for line in Path(data["split"]).read_text().split()[1:]
                      if line.endswith(",train")]
        print(f"device {device_name}, model {args.size}, data {data['source']} ({data['why']}): "
              f"{data['utterances']} utterances, mean {data['mean_s']:.2f} s, longest {data['longest_s']:.2f} s",
              flush=True)
        syncs = sync_counts(folder, [reader.wave(i) for i in train_rows[:8]], reader.labels[train_rows[:8]])
        print("model syncs per step:", json.dumps(syncs), flush=True)
        if args.syncs_only:
            norm = "-" + args.norm if args.size == "tiny" else ""
            write_result(args.out or REPO / "benchmarks" / "results" / f"syncs-{args.size}{norm}-{syncs['device']}.json",
                         {"model": args.size, **syncs})
            return
        cfg = TrainConfig.from_settings({
            "dataset": data["cache"], "split": f"file:{data['split']}", "model": "hubert",
            "model_options": {"checkpoint": str(folder)}, "epochs": args.epochs, "batch_size": args.batch_size,
            "batch_seconds": args.batch_seconds, "lr": 1e-5, "seed": args.seed, "workers": args.workers,
            "compile": args.compile, "valid": 0.0, "log_every": 10**9})
        warm, counted = args.warmup_steps, args.sync_steps
        ours = sertk_loop(cfg, tmp / "run", warm, counted)
        print("sertk:", _brief(ours), flush=True)
        plain: dict = {}
        for name in ("plain_hf", "plain_sertk_forward")[: 1 if args.no_plain_sertk_forward else 2]:
            torch.manual_seed(cfg.seed)
            model = Hubert(checkpoint=str(folder)).build(7)  # what train() builds: re-headed, regularisers off
            parameters = sum(p.numel() for p in model.parameters())
            batches = plain_batches(cfg, model.featurizer(), cfg.epochs - 1, cuda)
            forward = hf_forward(model.hf) if name == "plain_hf" else model
            plain[name] = plain_loop(forward, forward, batches, cfg, warm, counted, device)
            print(f"{name}:", _brief(plain[name]), flush=True)
            del model, forward, batches
            gc.collect()
    same = all(ours["batches"] == p["batches"] for p in plain.values())
    host["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    result = {"device": device_name, "host": host, "model": args.size, "shipped_config": not args.bare_config,
              "parameters": parameters, "data": {k: v for k, v in data.items() if k not in ("cache", "split")},
              "settings": {"epochs": args.epochs, "measured_epoch": args.epochs, "batch_size": args.batch_size,
                           "batch_seconds": args.batch_seconds, "compile": args.compile, "workers": args.workers,
                           "warmup_steps": warm, "sync_steps": counted, "seed": args.seed,
                           "model_folder_s": round(made, 1)},
              "peak_memory": "GPU peak allocated (GiB)" if cuda else "process peak RSS during the loop (GiB)",
              "sertk": ours, **plain, "same_batches": same,
              "ratio": round(ours["utterances_per_s"] / plain["plain_hf"]["utterances_per_s"], 3),
              "syncs_per_step": syncs}
    if "plain_sertk_forward" in plain:
        result["ratio_vs_plain_sertk_forward"] = round(
            ours["utterances_per_s"] / plain["plain_sertk_forward"]["utterances_per_s"], 3)
    for block in (ours, *plain.values()):
        block["batches_digest"] = hash_batches(block.pop("batches"))
    print(f"ratio sertk / plain_hf: {result['ratio']:.2f}x"
          + (f", sertk / plain_sertk_forward: {result['ratio_vs_plain_sertk_forward']:.2f}x"
             if "ratio_vs_plain_sertk_forward" in result else "") + f"; same batches: {same}")
    if not same:
        print("WARNING: the loops timed different batches; the ratio is not a like-for-like comparison",
              file=sys.stderr)
    write_result(args.out or REPO / "benchmarks" / "results" /
                 f"train-{args.size}-{'gpu' if cuda else 'cpu'}.json", result)


def hash_batches(batches: list) -> str:
    import hashlib

    return hashlib.sha1(json.dumps(batches).encode()).hexdigest()[:16]


def _brief(row: dict) -> str:
    keys = ("utterances_per_s", "audio_s_per_s", "padding_efficiency", "peak_memory_gib", "syncs_per_step",
            "steps_timed", "seconds")
    return json.dumps({k: row[k] for k in keys if k in row})


def write_result(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
