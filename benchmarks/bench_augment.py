"""On-the-fly augmentation throughput (issue 3): utterances/s on one core, per method.

Run from the repository root:

    python benchmarks/bench_augment.py [--data ../shared/data] [--clips 200]

Clips are real RAVDESS utterances (mean 3.7 s). The process is pinned to one
core with one BLAS/FFT thread. Where the reference study had an
implementation of the same operation (time stretch: ``librosa.effects.time_stretch``
with a random rate; noise: ``y + np.random.normal(0, std, len(y))``) it is timed
in the same run; the reference's "SpecAugment" and N-CP were not comparable
operations (see docs/reference-study.md, flaws 1 and 4).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def rate(fn, waves, repeats: int = 2) -> float:
    fn(waves[0])  # warm up (imports, FFT plans)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        for w in waves:
            fn(w)
        best = max(best, len(waves) / (time.perf_counter() - t))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("SERTK_SHARED_DATA", REPO.parent / "shared" / "data")))
    ap.add_argument("--clips", type=int, default=200)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "augment.json")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    from ser_toolkit.audio import load
    from ser_toolkit.augmentations import AugmentContext, PartnerPool
    from ser_toolkit.registry import get_registry

    files = sorted((args.data / "ravdess").rglob("*.flac"))
    if not files:
        sys.exit(f"RAVDESS not found under {args.data}; pass --data")
    pick = np.random.default_rng(0).choice(len(files), size=min(args.clips, len(files)), replace=False)
    waves = [load(files[i]) for i in sorted(pick)]
    neutral = [w for i, w in zip(sorted(pick), waves) if files[i].name.split("-")[2] == "01"] or waves[:5]
    pool = PartnerPool([f"n{i}" for i in range(len(neutral))], ["neutral"] * len(neutral),
                       lambda uid: neutral[int(uid[1:])])
    ctx = AugmentContext(utterance_id="x", emotion="angry", partners=pool)
    rng = np.random.default_rng(0)
    results: dict = {"clips": len(waves), "mean_seconds": float(np.mean([w.size for w in waves]) / 16000),
                     "sertk": {}, "reference": {}}
    for entry in get_registry().entries("augmentation"):
        if entry.provider.distribution != "sertk":
            continue
        aug = entry.obj()
        results["sertk"][entry.name] = rate(lambda w, a=aug: a(w, rng, ctx), waves)
        print(f"{entry.name:12s} {results['sertk'][entry.name]:8.1f} utterances/s", flush=True)
    import librosa

    results["reference"]["timestretch"] = rate(
        lambda w: librosa.effects.time_stretch(w, rate=float(rng.choice([0.8, 0.9, 1.0, 1.1, 1.2]))), waves)
    results["reference"]["noise"] = rate(
        lambda w: w + np.random.normal(0, float(rng.choice([0.001, 0.005, 0.01])), len(w)), waves)
    print("reference:", results["reference"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
