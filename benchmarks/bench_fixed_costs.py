"""Seconds a study spends on one model outside its training epochs, on a HuBERT-Large-shaped model (issue 22).

Run from the repository root (CPU; ~2 minutes on 2 cores for ``--size large``):

    python benchmarks/bench_fixed_costs.py --size large --out benchmarks/results/fixed-costs-large-cpu.json
    python benchmarks/bench_fixed_costs.py --size tiny           # seconds

One study run (``ser_toolkit.study.run_model`` with selection on, as the study's first wave calls it) of a
random-weight model with the architecture of ``superb/hubert-large-superb-er`` (4 labels re-headed to 7,
weighted layer sum, ``mask_time_prob`` 0.05, layerdrop 0.1, saved with ``save_pretrained``), 1 epoch on 8
short synthetic utterances, evaluated on 4 test and 4 validation utterances. Every phase is timed by
wrapping the function that does it (a phase a sertk version lacks reads 0):

- ``epochs``: the training epochs themselves (``history[].seconds``, forward/backward/step);
- ``predict``: the model's forward passes over the validation part during training and over the evaluation
  sets, measured alone (a sertk that writes the weights while it evaluates is timed again evaluating the
  same sets with nothing beside it);
- everything else, ``outside`` = wall - epochs - predict: loading the checkpoint, building and rebuilding
  models, hashing weights, writing and sealing checkpoints, loader start-up, reading caches.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

TIMERS: Counter = Counter()
CALLS: Counter = Counter()


def timed(module, name: str, label: str) -> None:
    """Wrap ``module.name`` so its seconds add to ``TIMERS[label]`` (outermost call only)."""
    fn = getattr(module, name, None)
    if fn is None:
        return
    depth = [0]

    @functools.wraps(fn)
    def wrapper(*a, **k):
        depth[0] += 1
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            depth[0] -= 1
            if depth[0] == 0:
                TIMERS[label] += time.perf_counter() - t
                CALLS[label] += 1

    setattr(module, name, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=("tiny", "large"), default="large")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-mask", action="store_true", help="save the checkpoint with mask_time_prob 0 (sertk "
                    "versions that cannot evaluate runs of masked checkpoints)")
    args = ap.parse_args()

    import torch

    from bench_train import make_model_folder
    from ser_toolkit import evaluation, study
    from ser_toolkit.cache.build import build_cache, preprocess_for
    from ser_toolkit.cache.reader import CacheReader
    from ser_toolkit.plugins import hubert
    from ser_toolkit.plugins.synthetic import Synthetic
    from ser_toolkit.training import loop, runs

    try:
        from ser_toolkit.training import checkpoints
        timed(checkpoints.Checkpoints, "snapshot", "snapshot (training thread)")
        timed(checkpoints.Checkpoints, "finish", "finish checkpoints")
    except ImportError:  # before the checkpoint policy
        timed(runs, "cpu_copy", "snapshot (training thread)")
        timed(runs.CheckpointWriter, "wait", "wait for the writer")
    from ser_toolkit.training.loop import TrainConfig

    torch.set_num_threads(2)
    for module, name, label in [
        (hubert.Hubert, "build", "build (load checkpoint)"), (hubert.Hubert, "rebuild", "rebuild for evaluation"),
        (runs, "file_digest", "hash files"), (runs, "load_weights", "load weights"),
        (loop, "prepare_data", "prepare data"), (runs, "seal", "seal"),
        (evaluation, "predict_rows", "predict"), (evaluation, "predict_features", "predict"),
        (evaluation, "test_sets", "open test sets"), (evaluation, "evaluate_run", "evaluate (all)"),
        (runs, "save_weights", "write best weights"), (runs, "save_weights_dict", "write best weights"),
        (runs, "save_checkpoint", "write states"), (runs, "write_run_config", "write config.json"),
        (study, "_evaluated", "check evaluations"), (loop, "validate", "validate (in training)"),
    ]:
        timed(module, name, label)
    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        make_model_folder(args.size, tmp / "model", norm="layer", reference=True,
                          **({"mask_time_prob": 0.0} if args.no_mask else {}))
        made = time.perf_counter() - t
        ds = Synthetic(speakers=2, per_emotion=1)
        cache = tmp / "synthetic.h5"
        build_cache(ds, None, cache, preprocess_for(ds), workers=1, quiet=True)
        reader = CacheReader(cache)
        order = sorted(range(len(reader)), key=lambda i: reader.lengths[i])[:16]  # the shortest clips
        part = {reader.ids[i]: s for i, s in zip(order, ["train"] * 8 + ["valid"] * 4 + ["test"] * 4)}
        split = tmp / "split.csv"
        split.write_text("utterance,split\n" + "".join(f"{u},{part.get(u, 'unused')}\n" for u in reader.ids))
        cfg = TrainConfig.from_settings({"dataset": str(cache), "split": f"file:{split}", "model": "hubert",
                                         "model_options": {"checkpoint": str(tmp / "model")}, "epochs": 1,
                                         "batch_size": 8, "workers": 0, "seed": 0})
        run = tmp / "run"
        t = time.perf_counter()
        state = study.run_model(run, cfg, lambda *_: None, reader.digest, selection=True, command=["bench"])
        wall = time.perf_counter() - t
        summary = json.loads((run / "train_summary.json").read_text())
        epochs = sum(h["seconds"] for h in summary["history"])
        phases, predict = dict(TIMERS), TIMERS["predict"]
        import inspect

        if "loaded" in inspect.signature(inspect.unwrap(evaluation.evaluate_run)).parameters:
            # the evaluation overlapped the writing of the weights: its predictions alone, with nothing beside
            loaded = evaluation.load_run_model(run)
            TIMERS.clear()
            evaluation.evaluate_run(run, workers=1, cross=[], loaded=loaded)
            evaluation.evaluate_run(run, ["valid", "valid-augmented"], workers=1, cross=[], folder="selection",
                                    loaded=loaded)
            predict = phases.get("validate (in training)", 0) + TIMERS["predict"]
        result = {"size": args.size, "state": state, "model_folder_seconds": round(made, 1),
                  "parameters": summary.get("parameters"), "wall_seconds": round(wall, 2),
                  "epochs_seconds": round(epochs, 2), "predict_seconds_in_run": round(phases.get("predict", 0), 2),
                  "predict_seconds_alone": round(predict, 2),
                  "outside_seconds": round(wall - epochs - predict, 2),
                  "phases": {k: round(v, 2) for k, v in phases.items()}, "calls": dict(CALLS),
                  "checkpoint_bytes_written": summary.get("checkpoint_bytes_written"),
                  "torch": torch.__version__, "commit": runs.git_commit()}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
