"""One rank of a DDP test run (``torchrun --nproc_per_node 2 tests/ddp_worker.py CACHE_DIR OUT RUNS_JSON``).

Trains each run of RUNS_JSON ({name: training settings}) in ``OUT/<name>`` with
:func:`ser_toolkit.training.loop.train` and writes what this rank saw to
``OUT/<name>.rank<R>.json``: the summary ``train`` returned and, per validation,
how many rows this rank predicted and a digest of its model's weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path


def main() -> None:
    import torch

    import ser_toolkit.evaluation as evaluation
    from ser_toolkit.training import runs
    from ser_toolkit.training.loop import TrainConfig, train

    cache_dir, out, specs = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
    rank = int(os.environ["RANK"])
    torch.distributed.init_process_group("gloo")  # train() joins it and leaves it to its creator
    seen: list[dict] = []
    predict_rows = evaluation.predict_rows

    def recording(model, featurize, reader, rows, *args, **kwargs):
        digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in model.parameters()))
        seen.append({"rows": len(rows), "weights": digest.hexdigest()})
        return predict_rows(model, featurize, reader, rows, *args, **kwargs)

    evaluation.predict_rows = recording
    for name, settings in specs.items():
        seen.clear()
        run = out / name
        cfg = TrainConfig.from_settings({}, {"dataset": "synthetic", "cache_dir": str(cache_dir), **settings})
        if rank == 0:
            runs.write_json(run / "config.json", {"train": asdict(cfg)})
        summary = train(cfg, run, quiet=True)
        (out / f"{name}.rank{rank}.json").write_text(json.dumps({"summary": summary, "validations": seen},
                                                                default=str))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
