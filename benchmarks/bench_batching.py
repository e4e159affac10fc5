"""Padding efficiency of training batches (issue 12): real samples / padded samples, per augmentation.

Run from the repository root:

    python benchmarks/bench_batching.py [--data ../shared/data] [--cache-dir cache] [--epochs 3]

The RAVDESS cache (built into ``--cache-dir`` if missing) and its seed split's
training part, clean + one online copy per utterance (the reference 1:1), as
``sertk train`` forms them. *fixed 8*: the old batches, 8 utterances bucketed on
the stored (pre-augmentation) lengths. *N s*: ``--batch-seconds N`` (``--batch-size``
64 as the cap), bucketed on the lengths each epoch's augmentation produces. Every
efficiency is measured on the lengths the items really have in that epoch
(predicted from the plans, which the training tests check against the rendered
audio) and averaged over ``--epochs`` epochs. No audio is augmented: only plans
are sampled, so this is a count, not a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
METHODS = ("none", "timestretch", "noise", "specaugment", "ncp", "duplicate", "mixture")
"""``mixture``: the five built-ins with equal weights (a Top-k combination)."""


def ravdess_cache(data: Path, cache_dir: Path) -> Path:
    path = cache_dir / "ravdess.h5"
    if not path.is_file():
        r = subprocess.run([sys.executable, "-m", "ser_toolkit", "cache", "ravdess", "--root", str(data / "ravdess"),
                            "--cache-dir", str(cache_dir), "-q"])
        if r.returncode:
            sys.exit(f"could not cache RAVDESS from {data / 'ravdess'}; pass --data")
    return path


def efficiencies(method: str, cache: Path, split: str, epochs: int, budgets: list[float], cap: int,
                 seed: int = 42) -> dict[str, float]:
    """Mean padding efficiency over ``epochs`` of the old batches and of each budget, for one method."""
    from ser_toolkit.training.data import EpochBatches, bucket_batches, padding_efficiency
    from ser_toolkit.training.loop import TrainConfig, prepare_data

    plugins = [] if method == "none" else (["timestretch", "noise", "specaugment", "ncp", "duplicate"]
                                           if method == "mixture" else [method])
    cfg = TrainConfig.from_settings({}, {"dataset": str(cache), "model": "tiny", "split": split,
                                         "plugins": plugins, "seed": seed})
    items = prepare_data(cfg, None, None).train
    out: dict[str, list[float]] = {"fixed 8": []}
    for epoch in range(epochs):
        real = items.epoch_lengths(epoch)
        old = bucket_batches(items.lengths(), 8, seed, epoch)  # as before --batch-seconds
        out["fixed 8"].append(padding_efficiency(real, old))
        for b in budgets:
            sampler = EpochBatches(items, cap, seed, batch_seconds=b)
            sampler.set_epoch(epoch)
            batches = sampler.batches
            assert np.array_equal(sampler.lengths, real)  # formed on the lengths the epoch produces
            out.setdefault(f"{b:g} s", []).append(padding_efficiency(real, batches))
            out.setdefault(f"{b:g} s mean batch", []).append(float(np.mean([len(x) for x in batches])))
    return {k: float(np.mean(v)) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path,
                    default=Path(os.environ.get("SERTK_SHARED_DATA", REPO.parent / "shared" / "data")))
    ap.add_argument("--cache-dir", type=Path, default=REPO / "cache")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-seconds", type=float, nargs="+", default=[30.0, 60.0, 120.0])
    ap.add_argument("--cap", type=int, default=64, help="--batch-size with --batch-seconds")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "batching.json")
    args = ap.parse_args()
    cache = ravdess_cache(args.data, args.cache_dir)
    split = f"file:{args.data / 'ravdess' / 'seed_split.csv'}"
    shown = lambda path: str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)  # noqa: E731
    shown_split = f"file:{shown((args.data / 'ravdess' / 'seed_split.csv').resolve())}"
    results = {"cache": shown(cache.resolve()), "split": shown_split, "epochs": args.epochs, "cap": args.cap,
               "methods": {}}
    cols = ["fixed 8"] + [f"{b:g} s" for b in args.batch_seconds]
    print("| augmentation | " + " | ".join(cols) + " |\n|---|" + "---:|" * len(cols))
    for method in METHODS:
        row = efficiencies(method, cache, split, args.epochs, args.batch_seconds, args.cap)
        results["methods"][method] = row
        cells = [f"{row['fixed 8']:.3f}"] + [f"{row[f'{b:g} s']:.3f} ({row[f'{b:g} s mean batch']:.1f})"
                                              for b in args.batch_seconds]
        print(f"| {method} | " + " | ".join(cells) + " |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
