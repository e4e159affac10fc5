"""Training throughput (issue 4): sertk's loop vs the reference loop, one epoch each, same data and weights.

Run from the repository root:

    python benchmarks/bench_train.py                      # GPU: HuBERT-Large-sized; CPU: the tiny preset
    python benchmarks/bench_train.py --size large --workers 12       # the issue's GPU setting

Both loops start from the same randomly initialised model saved to a folder
(speed depends on the architecture, not the weights) and see the same RAVDESS
utterances (the reference split's training files, first --utterances of them).

- reference: the reference study's loop: fp32, every clip padded to the longest
  clip of the whole set (with an attention mask), batch 8, AdamW lr 1e-5,
  shuffled, audio preloaded in memory;
- sertk: ``sertk train``'s own loop (``ser_toolkit.training.loop.train``):
  length bucketing, bf16 autocast + TF32 + fused AdamW on CUDA, pinned memory,
  loader workers reading the cache, no per-step host sync.

Reports utterances/s, peak GPU memory (or peak RSS on CPU) and the loss curve
over the epoch (mean loss per quarter), and host-device syncs per training step
(:mod:`ser_toolkit.training.syncs`; on CPU the same op kinds, as a proxy) of
sertk's model path against HF's ``HubertForSequenceClassification`` forward
with the attention mask, on the same padded batch of 8 unequal utterances.
``--syncs-only`` measures only those (seconds on CPU). ``--compile-probe`` counts
``torch.compile`` graphs, graph breaks and compilations of a training step over
batches of varying sizes and lengths (no data needed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def make_model_folder(size: str, folder: Path, norm: str = "group") -> None:
    import torch
    from transformers import HubertConfig, HubertForSequenceClassification, Wav2Vec2FeatureExtractor

    if size == "large":  # the architecture of superb/hubert-large-superb-er
        cfg = HubertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                           feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True,
                           classifier_proj_size=256, num_labels=4)
    else:
        cfg = HubertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                           conv_dim=(32, 32, 32, 32), conv_stride=(5, 4, 4, 2), conv_kernel=(10, 8, 4, 4),
                           num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, classifier_proj_size=64,
                           num_labels=4, feat_extract_norm=norm, do_stable_layer_norm=norm == "layer")
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


def reference_loop(folder: Path, waves: list[np.ndarray], labels: np.ndarray, seed: int) -> dict:
    import torch

    from ser_toolkit.plugins.hubert import Hubert

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    wrapped = Hubert(checkpoint=str(folder)).build(7)  # the re-headed checkpoint, run through HF's forward
    model = hf_forward(wrapped.hf).to(device)
    norm = wrapped.featurizer()
    feats = [norm(w) for w in waves]
    longest = max(f.size for f in feats)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    order = torch.randperm(len(feats), generator=torch.Generator().manual_seed(seed)).tolist()
    loss_fn = torch.nn.CrossEntropyLoss()
    losses = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    t = time.perf_counter()
    model.train()
    for start in range(0, len(order), 8):
        idx = order[start:start + 8]
        x = torch.zeros(len(idx), longest)
        mask = torch.zeros(len(idx), longest, dtype=torch.long)
        for j, i in enumerate(idx):
            x[j, :feats[i].size] = torch.from_numpy(feats[i])
            mask[j, :feats[i].size] = 1
        y = torch.as_tensor(labels[idx])
        logits = model(x.to(device), mask.to(device))
        loss = loss_fn(logits, y.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())  # the reference logged every step
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    out = {"utterances_per_s": len(order) / seconds, "seconds": seconds, "loss_quarters": quarters(losses)}
    out["peak_memory_gib"] = (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
                              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return out


def sertk_loop(folder: Path, cache: Path, split_file: Path, run_dir: Path, seed: int, workers: int) -> dict:
    import torch

    from ser_toolkit.training.loop import TrainConfig, train

    cfg = TrainConfig(dataset=str(cache), split=f"file:{split_file}", model="hubert",
                      model_options={"checkpoint": str(folder)}, epochs=1, batch_size=8, lr=1e-5, seed=seed,
                      workers=workers, log_every=10**9)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    summary = train(cfg, run_dir, quiet=True)
    row = summary["history"][0]
    steps = [float(line.split(",")[2]) for line in (run_dir / "steps.csv").read_text().splitlines()[1:]]
    out = {"utterances_per_s": row["utterances_per_s"], "seconds": row["seconds"], "loss_quarters": quarters(steps)}
    out["peak_memory_gib"] = (torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available()
                              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return out


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("SERTK_SHARED_DATA", REPO.parent / "shared" / "data")))
    ap.add_argument("--size", choices=("tiny", "large"), default="large" if torch.cuda.is_available() else "tiny")
    ap.add_argument("--utterances", type=int, default=998)
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1) if torch.cuda.is_available() else 0,
                    help="sertk loader workers (default 0 on CPU, where workers compete with torch for cores)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--norm", choices=("group", "layer"), default="group",
                    help="tiny only: feature-encoder norm (layer: large's, which takes the attention mask)")
    ap.add_argument("--syncs-only", action="store_true", help="only count host-device syncs per step (no epochs)")
    ap.add_argument("--compile-probe", choices=("eager", "inductor"), default=None,
                    help="only count torch.compile graphs, breaks and compilations with this backend (tiny model)")
    args = ap.parse_args()
    if args.compile_probe:
        result = compile_probe(args.compile_probe)
        print(json.dumps({k: v for k, v in result.items() if k != "shapes"}, indent=1))
        out = args.out or REPO / "benchmarks" / "results" / f"compile-tiny-{args.compile_probe}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
        return
    if not (args.data / "ravdess" / "seed_split.csv").is_file():
        sys.exit(f"RAVDESS not found under {args.data}; pass --data")
    from ser_toolkit.cache.build import build_cache
    from ser_toolkit.cache.reader import CacheReader
    from ser_toolkit.plugins.ravdess import Ravdess

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = tmp / "ravdess.h5"
        build_cache(Ravdess(), args.data / "ravdess", cache, workers=2, quiet=True)
        reader = CacheReader(cache)
        rows = [r.split(",") for r in (args.data / "ravdess" / "seed_split.csv").read_text().split()[1:]]
        train_ids = [u for u, s in rows if s == "train"][: args.utterances]
        keep = set(train_ids)
        split_file = tmp / "split.csv"
        split_file.write_text("utterance,split\n" + "".join(f"{u},{'train' if u in keep else 'test'}\n"
                                                           for u in reader.ids))
        idx = [reader.index(u) for u in train_ids]
        waves = [reader.wave(i) for i in idx]
        labels = reader.labels[idx]
        folder = tmp / "model"
        make_model_folder(args.size, folder, args.norm)
        print(f"device {device}, model {args.size}, {len(waves)} utterances "
              f"(mean {np.mean([w.size for w in waves]) / 16000:.2f} s, longest {max(w.size for w in waves) / 16000:.2f} s)",
              flush=True)
        syncs = sync_counts(folder, waves, labels)
        print("syncs per step:", json.dumps(syncs), flush=True)
        if args.syncs_only:
            out = args.out or REPO / "benchmarks" / "results" / f"syncs-{args.size}{'-' + args.norm if args.size == 'tiny' else ''}-{syncs['device']}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"model": args.size, **syncs}, indent=2) + "\n")
            print(f"wrote {out}")
            return
        ours = sertk_loop(folder, cache, split_file, tmp / "run", args.seed, args.workers)
        print("sertk:", ours, flush=True)
        ref = reference_loop(folder, waves, labels, args.seed)
        print("reference:", ref, flush=True)
    result = {"device": device, "model": args.size, "utterances": len(train_ids), "sertk": ours, "reference": ref,
              "syncs_per_step": syncs, "speedup": ours["utterances_per_s"] / ref["utterances_per_s"]}
    print(f"speedup {result['speedup']:.2f}x")
    out = args.out or REPO / "benchmarks" / "results" / f"train-{args.size}-{'gpu' if torch.cuda.is_available() else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
