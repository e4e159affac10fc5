"""Checkpoint bytes of a fine-tuning run (issue 12): sertk's bounded checkpoints vs the reference approach.

Run from the repository root (CPU is enough: bytes do not depend on the device):

    python benchmarks/bench_checkpoints.py --size large --epochs 3     # HuBERT-Large (superb/hubert-large-superb-er's
                                                                       # architecture, random weights): ~15 GB free disk
    python benchmarks/bench_checkpoints.py --size tiny --epochs 3      # seconds

The run trains ``--epochs`` epochs on the 42 utterances of a small synthetic corpus (2 speakers) with a validation share, so that
best weights are written when validation improves. A thread samples the run folder's size every 50 ms
(the peak on disk, temporaries included). Reported: bytes of one epoch-save (the resumable state: model +
AdamW moments + scheduler), bytes written in all (``checkpoint_bytes_written``), the peak on disk, and the
finished run's size against the weights' size (safetensors). The reference approach (every epoch saves
model + optimizer, none removed, and ``best.pt`` rewritten every epoch) writes ``epochs x (state + weights)``
bytes and keeps all of them: computed from the sizes measured here, in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from dataclasses import asdict
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=("tiny", "large"), default="tiny")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = ap.parse_args()

    import torch

    from bench_train import make_model_folder
    from ser_toolkit.cache.build import build_cache, preprocess_for
    from ser_toolkit.plugins.synthetic import Synthetic
    from ser_toolkit.training.loop import TrainConfig, train
    from ser_toolkit.training.runs import STATE_GLOB, write_json

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        tmp = Path(tmp)
        make_model_folder(args.size, tmp / "model", norm="layer")
        ds = Synthetic(speakers=1, per_emotion=3)
        cache = tmp / "synthetic.h5"
        build_cache(ds, None, cache, preprocess_for(ds), workers=1, quiet=True)
        run = tmp / "run"
        peak, states, stop = [0], [0], threading.Event()

        def watch() -> None:
            while not stop.is_set():
                if run.exists():
                    peak[0] = max(peak[0], folder_bytes(run))
                    for p in (run / "checkpoints").glob(STATE_GLOB) if (run / "checkpoints").exists() else ():
                        try:
                            states[0] = max(states[0], p.stat().st_size)
                        except OSError:
                            pass
                time.sleep(0.05)

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        cfg = TrainConfig(dataset=str(cache), split="stratified:test=0.25,seed=42", model="hubert",
                          model_options={"checkpoint": str(tmp / "model")}, epochs=args.epochs, batch_size=4,
                          lr=1e-3, valid=0.3, seed=0, workers=0, device="cpu", log_every=10**9)
        write_json(run / "config.json", {"train": asdict(cfg)})  # as sertk train writes it
        t0 = time.perf_counter()
        summary = train(cfg, run, quiet=True)
        seconds = time.perf_counter() - t0
        stop.set()
        t.join()
        weights = (run / "checkpoints" / "best.safetensors").stat().st_size
        finished = folder_bytes(run)
        state = states[0]
        reference = args.epochs * (state + weights)
        out = {
            "size": args.size, "epochs": args.epochs, "parameters": summary["parameters"]["total"],
            "weights_bytes": weights, "epoch_save_bytes": state,
            "sertk": {"bytes_written": summary["checkpoint_bytes_written"], "peak_on_disk": peak[0],
                      "finished_run_bytes": finished, "finished_over_weights": finished / weights},
            "reference": {"bytes_written": reference, "kept_on_disk": reference,
                          "finished_over_weights": reference / weights},
            "written_ratio_sertk_over_reference": summary["checkpoint_bytes_written"] / reference,
            "valid_history": [h.get("valid_uar") for h in summary["history"]],
            "seconds": seconds, "device": "cpu", "torch": torch.__version__,
        }
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
