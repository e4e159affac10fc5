"""DDP plumbing (issue 12): sertk's hand-written DDP step vs HF accelerate and Lightning Fabric, same run.

Run from the repository root (2 gloo processes on CPU; accelerate and lightning are optional):

    python benchmarks/bench_ddp.py                           # launches itself under torchrun --nproc_per_node 2
    PYTHONPATH=/path/to/accelerate:/path/to/lightning python benchmarks/bench_ddp.py --rounds 5

Every variant trains the same ``tiny`` model (sertk's model plugin, same initial
weights, same per-rank dropout seeds) on the same padded batches of random
audio with gradient accumulation, inside one process group: only the plumbing
differs.

- hand: what ``ser_toolkit.training.loop`` does: ``DistributedDataParallel``
  (unused-parameter search only when the model asks), ``no_sync`` on the
  micro-batches before the last of each accumulation, a (disabled on CPU)
  ``GradScaler``, AdamW;
- accelerate: ``Accelerator(gradient_accumulation_steps=k)``, ``prepare``,
  ``accumulate``, ``backward``;
- fabric: ``Fabric(strategy=DDPStrategy)``, ``setup``, ``no_backward_sync``,
  ``backward``.

After an untimed round, rounds run every variant in a rotating order (machine noise hits each alike);
reported: optimizer steps/s per variant (median over rounds), each library's
ratio to hand-written per round (median, min, max), and whether its weights after
the run equal the hand-written ones bit for bit.
"""

from __future__ import annotations

import argparse
import copy
import contextlib
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def batches(n: int, batch_size: int, seed: int, rank: int):
    """``n`` padded batches of random audio (1.5-3 s at 16 kHz) with an attention mask; each rank its own."""
    import torch

    g = torch.Generator().manual_seed(seed * 1000 + rank)
    out = []
    for _ in range(n):
        lengths = torch.randint(24_000, 48_000, (batch_size,), generator=g)
        x = torch.zeros(batch_size, int(lengths.max()))
        mask = torch.zeros_like(x, dtype=torch.long)
        for j, length in enumerate(lengths.tolist()):
            x[j, :length] = torch.randn(length, generator=g) * 0.1
            mask[j, :length] = 1
        out.append((x, mask, torch.randint(0, 7, (batch_size,), generator=g)))
    return out


def digest(model) -> str:
    return hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()[:16]


def hand(model, data, accum: int, lr: float):
    """sertk's loop (ser_toolkit/training/loop.py), reduced to its DDP plumbing."""
    import torch

    from ser_toolkit.training.loop import _grad_scaler

    ddp = torch.nn.parallel.DistributedDataParallel(
        model, find_unused_parameters=bool(getattr(model, "find_unused_parameters", False)))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    scaler = _grad_scaler(False)
    loss_fn = torch.nn.CrossEntropyLoss()

    def run():
        ddp.train()
        for step, (x, mask, y) in enumerate(data):
            update = (step + 1) % accum == 0 or step + 1 == len(data)
            with ddp.no_sync() if not update else contextlib.nullcontext():
                loss = loss_fn(ddp(x, mask).float(), y)
                scaler.scale(loss / accum).backward()
            if update:
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)

    return run


def accelerate_variant(model, data, accum: int, lr: float):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    acc = Accelerator(cpu=True, mixed_precision="no", gradient_accumulation_steps=accum, kwargs_handlers=[
        DistributedDataParallelKwargs(find_unused_parameters=bool(getattr(model, "find_unused_parameters", False)))])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    net, opt = acc.prepare(model, opt)
    loss_fn = torch.nn.CrossEntropyLoss()

    def run():
        net.train()
        for x, mask, y in data:  # len(data) is a multiple of accum: accumulate's step counter syncs on time
            with acc.accumulate(net):
                loss = loss_fn(net(x, mask).float(), y)
                acc.backward(loss)
                opt.step()
                opt.zero_grad(set_to_none=True)

    return run


def fabric_variant(model, data, accum: int, lr: float):
    import torch
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy

    fabric = Fabric(accelerator="cpu", devices=int(os.environ["WORLD_SIZE"]), precision="32-true",
                    strategy=DDPStrategy(find_unused_parameters=bool(getattr(model, "find_unused_parameters", False)),
                                         process_group_backend="gloo"))
    fabric.launch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    net, opt = fabric.setup(model, opt)
    loss_fn = torch.nn.CrossEntropyLoss()

    def run():
        net.train()
        for step, (x, mask, y) in enumerate(data):
            update = (step + 1) % accum == 0 or step + 1 == len(data)
            with fabric.no_backward_sync(net, enabled=not update):
                loss = loss_fn(net(x, mask).float(), y)
                fabric.backward(loss / accum)
            if update:
                opt.step()
                opt.zero_grad(set_to_none=True)

    return run


VARIANTS = {"hand": hand, "accelerate": accelerate_variant, "fabric": fabric_variant}


def available() -> list[str]:
    names = ["hand"]
    for name, module in (("accelerate", "accelerate"), ("fabric", "lightning.fabric")):
        try:
            __import__(module)
            names.append(name)
        except ImportError:
            print(f"{name}: not installed ({module}), skipped", file=sys.stderr)
    return names


def worker(args) -> None:
    """One rank: every round runs every variant in turn; rank 0 writes the result."""
    import torch

    from ser_toolkit.plugins.hubert import Tiny
    from ser_toolkit.training.loop import epoch_seed

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    names = available()
    base = Tiny(hidden_size=args.hidden_size, layers=args.layers).build(7)
    data = batches(args.steps * args.accum, args.batch_size, args.seed, rank)
    warm = data[: args.accum * 2]
    times: dict[str, list[float]] = {n: [] for n in names}
    weights: dict[str, str] = {}
    for round_ in range(-1, args.rounds):  # round -1: untimed (the process's first-use costs)
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        for name in order:
            model = copy.deepcopy(base)
            run = VARIANTS[name](model, data, args.accum, 1e-4)
            torch.manual_seed(epoch_seed(args.seed, 0, rank))
            VARIANTS[name](copy.deepcopy(base), warm, args.accum, 1e-4)()  # first-call costs outside the timing
            torch.manual_seed(epoch_seed(args.seed, 1, rank))
            torch.distributed.barrier()
            t0 = time.perf_counter()
            run()
            torch.distributed.barrier()
            if round_ >= 0:
                times[name].append(time.perf_counter() - t0)
            weights[name] = digest(model)
    if rank == 0:
        steps, utts = args.steps, args.steps * args.accum * args.batch_size * world
        result = {"world": world, "threads_per_rank": 1, "model": f"tiny hidden {args.hidden_size}, {args.layers} "
                  "layers", "batch_size": args.batch_size, "accum": args.accum, "optimizer_steps": steps,
                  "rounds": args.rounds,
                  "steps_per_s": {n: statistics.median(steps / t for t in ts) for n, ts in times.items()},
                  "utterances_per_s": {n: statistics.median(utts / t for t in ts) for n, ts in times.items()},
                  "ratio_to_hand": {n: {"median": statistics.median(h / t for h, t in zip(times["hand"], ts)),
                                        "min": min(h / t for h, t in zip(times["hand"], ts)),
                                        "max": max(h / t for h, t in zip(times["hand"], ts))}
                                    for n, ts in times.items() if n != "hand"},
                  "same_weights_as_hand": {n: weights[n] == weights["hand"] for n in names if n != "hand"},
                  "seconds": times}
        versions = {}
        for mod in ("torch", "accelerate", "lightning"):
            m = sys.modules.get(mod)
            if m is not None:
                versions[mod] = m.__version__
        result["versions"] = versions
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: result[k] for k in ("steps_per_s", "ratio_to_hand", "same_weights_as_hand")}, indent=2))
        print(f"wrote {args.out}")
    torch.distributed.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per timed run")
    ap.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--hidden-size", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ddp-cpu.json")
    args = ap.parse_args()
    if "RANK" in os.environ:
        worker(args)
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           __file__, *sys.argv[1:]]
    sys.exit(subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode)


if __name__ == "__main__":
    main()
