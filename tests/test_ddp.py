"""Distributed training on CPU (2 gloo processes under torchrun) and the precision choice.

Every rank must take the same epochs (validation gathered on rank 0, which decides
and broadcasts), keep its weights in step with the others (gradients all-reduced on
the micro-batch an optimizer step follows), and leave a sealed run holding only the
best weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import REPO, synthetic_cache

torch = pytest.importorskip("torch")

SUBPROCESS_TIMEOUT = 300  # a hang (a rank waiting for a collective the others never reach) fails here
TEST_TIMEOUT = SUBPROCESS_TIMEOUT + 120
TINY = {"model": "tiny", "model_options": {"hidden_size": 16}, "batch_size": 4, "workers": 0,
        "split": "speaker:test=0.25", "valid": 0.2, "grad_accum": 2, "seed": 7}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return synthetic_cache(tmp_path_factory.mktemp("cache"), per_emotion=1)  # 56 short utterances


def torchrun(*args: str, timeout: float = SUBPROCESS_TIMEOUT) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 ARGS`` (a free port); on timeout every rank is killed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s (a rank hangs?): {err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def sealed_with_best_only(run: Path) -> dict:
    from ser_toolkit.training import runs

    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [runs.BEST]
    runs.check_run(run)
    return json.loads((run / "train_summary.json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(TEST_TIMEOUT)
def test_validation_early_stopping_and_accumulation_agree_on_every_rank(cache_dir, tmp_path):
    """Rank 0 used to validate and stop alone while rank 1 waited in the next epoch's all-reduce forever."""
    specs = {
        # lr 1e-12 leaves the weights as they are: validation never improves after epoch 1, so patience 1 stops
        # the run after epoch 2 of 4 (the case that deadlocked)
        "stop": {**TINY, "lr": 1e-12, "epochs": 4, "early_stopping": 1},
        "learn": {**TINY, "lr": 1e-3, "epochs": 2, "early_stopping": 1},
    }
    r = torchrun(REPO / "tests" / "ddp_worker.py", cache_dir, tmp_path, json.dumps(specs))
    assert r.returncode == 0, r.stderr[-4000:]
    for name in specs:
        run = tmp_path / name
        summary = sealed_with_best_only(run)
        seen = [json.loads((tmp_path / f"{name}.rank{k}.json").read_text()) for k in range(2)]
        for rank in seen:  # every rank ran the same epochs and took the same decisions as the run records
            assert rank["summary"]["history"] == summary["history"]
            assert rank["summary"]["epochs_run"] == summary["epochs_run"] == len(rank["validations"])
            assert rank["summary"]["best"] == summary["best"]
        n_valid = summary["valid_utterances"]
        for v0, v1 in zip(seen[0]["validations"], seen[1]["validations"]):  # validation sharded across ranks
            assert v0["rows"] + v1["rows"] == n_valid and min(v0["rows"], v1["rows"]) >= n_valid // 2
            assert v0["weights"] == v1["weights"]  # the ranks' models stay identical
        assert summary["processes"] == 2 and summary["precision"] == "fp32"
        steps = (run / "steps.csv").read_text().splitlines()[1:]
        assert len(steps) >= summary["epochs_run"] and all(np.isfinite(float(s.split(",")[2])) for s in steps)
    from safetensors import safe_open

    stop = json.loads((tmp_path / "stop" / "train_summary.json").read_text())
    assert stop["epochs_run"] == 2
    with safe_open(str(tmp_path / "stop" / "checkpoints" / "best.safetensors"), framework="pt") as fh:
        assert fh.metadata()["epoch"] == "1"
    learn = [v["weights"] for v in seen[0]["validations"]]
    assert len(set(learn)) == len(learn)  # the "learn" run did change its weights every epoch


@pytest.mark.slow
@pytest.mark.timeout(TEST_TIMEOUT)
def test_gradient_checkpointing_and_layerdrop_under_ddp(cache_dir, tmp_path):
    """Non-reentrant checkpointing under DDP, with layerdrop (different layers skipped on each rank: DDP searches
    for unused parameters because the model says so)."""
    run = tmp_path / "ckpt"
    r = torchrun("-m", "ser_toolkit", "train", "--cache-dir", cache_dir, "--out", run, "--model", "tiny",
                 "--model-set", "hidden_size=16", "--model-set", "layerdrop=0.5", "--gradient-checkpointing",
                 "--epochs", "2", "--batch-size", "4", "--grad-accum", "2", "--workers", "0",
                 "--split", "speaker:test=0.25", "-q")
    assert r.returncode == 0, r.stderr[-4000:]
    summary = sealed_with_best_only(run)
    assert summary["epochs_run"] == 2 and summary["processes"] == 2
    assert all(np.isfinite(h["train_loss"]) for h in summary["history"])
    options = json.loads((run / "config.json").read_text())["train"]["model_options"]
    assert options["gradient_checkpointing"] is True and float(options["layerdrop"]) == 0.5


def test_checkpointing_is_non_reentrant_and_unused_parameter_search_is_declared():
    from ser_toolkit.plugins.hubert import Tiny

    model = Tiny(hidden_size=16, gradient_checkpointing=True).build(7)
    funcs = [m._gradient_checkpointing_func for m in model.modules() if hasattr(m, "_gradient_checkpointing_func")]
    assert funcs and all(f.keywords.get("use_reentrant") is False for f in funcs)
    assert model.find_unused_parameters is False  # every parameter gets a gradient: DDP need not search
    assert Tiny(hidden_size=16, layerdrop=0.1).build(7).find_unused_parameters is True
    assert Tiny(hidden_size=16, mask_feature_prob=0.1).build(7).find_unused_parameters is True


@pytest.mark.parametrize("device, mixed, native, expected", [
    ("cuda", True, True, "bf16"),     # Ampere and later
    ("cuda", True, False, "fp16"),    # V100, T4: bf16 would only be emulated
    ("cuda", False, True, "fp32"),    # --no-bf16
    ("cpu", True, True, "fp32"),
    ("mps", True, False, "fp32"),
])
def test_precision_choice(device, mixed, native, expected):
    from ser_toolkit.training.loop import precision_for

    assert precision_for(device, mixed, native) == expected


def test_schedule_skips_the_steps_the_fp16_scaler_skipped():
    torch = pytest.importorskip("torch")
    from ser_toolkit.training.loop import optimizer_step

    w = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([w], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)  # the CUDA scaler's logic, runnable on CPU
    for grad, taken in [(1.0, True), (float("inf"), False), (float("nan"), False), (1.0, True)]:
        optimizer.zero_grad()
        scaler.scale((w * torch.full((3,), grad)).sum()).backward()
        before = w.detach().clone()
        assert optimizer_step(scaler, optimizer, scheduler) is taken
        assert torch.equal(w.detach(), before) is not taken
    assert scheduler.last_epoch == 2, "the schedule advanced on a skipped step"
    plain = torch.amp.GradScaler("cpu", enabled=False)  # bf16 and fp32: every step is taken
    w.grad = torch.ones(3)
    assert optimizer_step(plain, optimizer, scheduler) and scheduler.last_epoch == 3


def test_epoch_seeds_differ_by_rank_and_rank_zero_keeps_the_single_process_seed():
    from ser_toolkit.training.loop import epoch_seed

    assert epoch_seed(42, 3) == epoch_seed(42, 3, 0) == (42 * 1_000_003 + 3 * 7919 + 17) % 2**31
    assert len({epoch_seed(42, e, r) for e in range(5) for r in range(8)}) == 40
