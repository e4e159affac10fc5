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
over the epoch (mean loss per quarter).
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


def make_model_folder(size: str, folder: Path) -> None:
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
                           num_labels=4)
    torch.manual_seed(0)
    HubertForSequenceClassification(cfg).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, do_normalize=True,
                             return_attention_mask=True).save_pretrained(folder)


def quarters(losses: list[float]) -> list[float]:
    parts = np.array_split(np.asarray(losses), 4)
    return [float(p.mean()) for p in parts if p.size]


def reference_loop(folder: Path, waves: list[np.ndarray], labels: np.ndarray, seed: int) -> dict:
    import torch

    from ser_toolkit.plugins.hubert import Hubert

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    model = Hubert(checkpoint=str(folder)).build(7).to(device)
    norm = model.featurizer()
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
    args = ap.parse_args()
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
        make_model_folder(args.size, folder)
        print(f"device {device}, model {args.size}, {len(waves)} utterances "
              f"(mean {np.mean([w.size for w in waves]) / 16000:.2f} s, longest {max(w.size for w in waves) / 16000:.2f} s)",
              flush=True)
        ours = sertk_loop(folder, cache, split_file, tmp / "run", args.seed, args.workers)
        print("sertk:", ours, flush=True)
        ref = reference_loop(folder, waves, labels, args.seed)
        print("reference:", ref, flush=True)
    result = {"device": device, "model": args.size, "utterances": len(train_ids), "sertk": ours, "reference": ref,
              "speedup": ours["utterances_per_s"] / ref["utterances_per_s"]}
    print(f"speedup {result['speedup']:.2f}x")
    out = args.out or REPO / "benchmarks" / "results" / f"train-{args.size}-{'gpu' if torch.cuda.is_available() else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
