"""Checkpoint bytes and host memory of a fine-tuning run (issue 22): the checkpoint policy vs the reference
approach, on HuBERT-Large's shape.

Run from the repository root (CPU is enough: bytes and host memory do not depend on the device; ~5 minutes
on 2 cores for ``--size large --epochs 7``, ~15 GB free disk):

    python benchmarks/bench_checkpoints.py --size large --epochs 7 --out benchmarks/results/checkpoints-large-cpu.json
    python benchmarks/bench_checkpoints.py --size large --epochs 7 --checkpoint-every 1 --out ...   # every epoch
    python benchmarks/bench_checkpoints.py --size tiny --epochs 3      # seconds

A random-weight model with the architecture and shipped options of ``superb/hubert-large-superb-er``
(``--size large``) trains ``--epochs`` epochs on 1-s crops of a small synthetic corpus with a validation
share (so best weights are selected), batch 4. ``--checkpoint-every`` (default: the model's) is passed only
to sertk versions that have it, so the same script measures older ones. A thread samples every 50 ms the
run folder's size (the peak on disk, temporaries included) and this process's resident memory; the
resident memory just before training starts (the model and its optimizer's first state are not yet
there) is the baseline, and the peak until the first snapshot is training's own (on a CPU the weights,
gradients and AdamW moments live in host memory too): what checkpoints add is the peak over it. Reported: one resumable state's bytes, bytes written in all
(``checkpoint_bytes_written``), the peak on disk and in host memory, the finished run's size, and the
reference approach (every epoch saves model + optimizer and rewrites ``best.pt``, none removed:
``epochs x (state + weights)``, from the sizes measured here).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def folder_bytes(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_size
        except OSError:  # renamed or removed while we looked
            pass
    return total


def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=("tiny", "large"), default="tiny")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--checkpoint-every", type=int, default=None, help="default: the model's (sertk versions "
                    "without the setting ignore it)")
    ap.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = ap.parse_args()

    import torch

    from bench_train import make_model_folder
    from ser_toolkit.cache.build import build_cache, preprocess_for
    from ser_toolkit.plugins.synthetic import Synthetic
    from ser_toolkit.training import loop
    from ser_toolkit.training.loop import TrainConfig, train
    from ser_toolkit.training.runs import STATE_GLOB, write_json

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        tmp = Path(tmp)
        make_model_folder(args.size, tmp / "model", norm="layer", reference=True)
        ds = Synthetic(speakers=1, per_emotion=3)
        cache = tmp / "synthetic.h5"
        build_cache(ds, None, cache, preprocess_for(ds), workers=1, quiet=True)
        run = tmp / "run"
        peak, states, rss, stop = [0], [0], [0], threading.Event()

        def watch() -> None:
            while not stop.is_set():
                rss[0] = max(rss[0], rss_bytes())
                if run.exists():
                    peak[0] = max(peak[0], folder_bytes(run))
                    for p in (run / "checkpoints").glob(STATE_GLOB) if (run / "checkpoints").exists() else ():
                        try:
                            states[0] = max(states[0], p.stat().st_size)
                        except OSError:
                            pass
                time.sleep(0.05)

        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        settings = dict(dataset=str(cache), split="stratified:test=0.25,seed=42", model="hubert",
                        model_options={"checkpoint": str(tmp / "model")}, epochs=args.epochs, batch_size=4,
                        lr=1e-3, valid=0.3, seed=0, workers=0, device="cpu", log_every=10**9, max_seconds=1.0)
        if args.checkpoint_every is not None and "checkpoint_every" in fields:
            settings["checkpoint_every"] = args.checkpoint_every
        cfg = TrainConfig.from_settings(settings)
        run.mkdir()
        write_json(run / "config.json", {"train": dataclasses.asdict(cfg)})  # older versions need it
        baseline, training = [0], [0]
        real_start = loop._start_run

        def started(*a, **k):  # the data is ready, the model built: training begins
            baseline[0] = rss_bytes()
            return real_start(*a, **k)

        loop._start_run = started
        try:  # the first snapshot: the peak so far is training's own (weights, gradients, AdamW moments...)
            from ser_toolkit.training import checkpoints
            owner, name = checkpoints.Checkpoints, "snapshot"
        except ImportError:  # sertk before the checkpoint policy: a CPU copy of the state, every epoch
            from ser_toolkit.training import runs as owner
            name = "cpu_copy"
        real_snapshot = getattr(owner, name)

        def first_snapshot(*a, **k):
            if not training[0]:
                training[0] = max(rss[0], rss_bytes())
            return real_snapshot(*a, **k)

        setattr(owner, name, first_snapshot)
        t = threading.Thread(target=watch, daemon=True)
        t.start()
        t0 = time.perf_counter()
        summary = train(cfg, run, quiet=True)
        seconds = time.perf_counter() - t0
        stop.set()
        t.join()
        weights = (run / "checkpoints" / "best.safetensors").stat().st_size
        finished = folder_bytes(run)
        state = states[0] or 3 * weights  # no state written: a state is weights + two AdamW moments
        reference = args.epochs * (state + weights)
        written = summary["checkpoint_bytes_written"]
        out = {
            "size": args.size, "epochs": args.epochs, "checkpoint_every": getattr(cfg, "checkpoint_every", None),
            "parameters": summary["parameters"]["total"], "weights_bytes": weights, "state_bytes": state,
            "state_measured": bool(states[0]),
            "sertk": {"bytes_written": written, "written_over_weights": written / weights,
                      "per_epoch_over_weights": written / weights / args.epochs, "peak_on_disk": peak[0],
                      "finished_run_bytes": finished, "finished_over_weights": finished / weights,
                      "host_rss_before_training": baseline[0], "host_rss_training_peak": training[0],
                      "host_rss_peak": rss[0],
                      "host_rss_peak_over_baseline_in_weights": (rss[0] - baseline[0]) / weights,
                      "checkpoint_host_memory": rss[0] - training[0],
                      "checkpoint_host_memory_in_weights": (rss[0] - training[0]) / weights},
            "reference": {"bytes_written": reference, "kept_on_disk": reference,
                          "finished_over_weights": reference / weights},
            "written_ratio_sertk_over_reference": written / reference,
            "valid_history": [h.get("valid_uar") for h in summary["history"]],
            "seconds": seconds, "device": "cpu", "torch": torch.__version__,
        }
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
