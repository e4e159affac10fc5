"""Running out of device memory: one line naming the batch and the settings that shrink it; a study retries
a run once with half the batch only when asked ([study] oom_retry), and reuses it afterwards.

No CI machine has a GPU, so the device is simulated where it fails: a model whose forward raises
``torch.OutOfMemoryError`` (what the CUDA allocator raises) on batches above a size.
"""

from __future__ import annotations

import json

import pytest

from helpers import synthetic_cache

torch = pytest.importorskip("torch")


@pytest.fixture
def greedy(monkeypatch):
    """A model plugin ``greedy``: the tiny HuBERT, out of memory on training batches of more than ``max_batch``
    utterances (inference: twice that)."""
    from ser_toolkit import hookimpl, registry as reg_mod
    from ser_toolkit.params import Param
    from ser_toolkit.plugins.hubert import Tiny

    class Greedy(Tiny):
        name = "greedy"
        params = (*Tiny.params, Param("max_batch", 4, "largest batch that fits", type="int", min=1))

        def build(self, num_labels, run_dir=None, **train_options):
            model = super().build(num_labels, run_dir)
            forward, limit = model.forward, self.options["max_batch"]

            def checked(inputs, attention_mask=None):  # inference keeps no activations: twice the batch fits
                if inputs.shape[0] > (limit if torch.is_grad_enabled() else 2 * limit):
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
                return forward(inputs, attention_mask)

            model.forward = checked
            return model

    class Plugin:
        @hookimpl
        def register_models(self, registry):
            registry.register(Greedy)

    real = reg_mod.build_plugin_manager

    def with_plugin():
        pm, providers = real()
        pm.register(Plugin(), name="greedy-test")
        return pm, providers

    monkeypatch.setattr(reg_mod, "build_plugin_manager", with_plugin)
    reg_mod.get_registry.cache_clear()
    yield
    reg_mod.get_registry.cache_clear()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return synthetic_cache(tmp_path_factory.mktemp("cache"), speakers=4, per_emotion=2)


def config(cache_dir, **over):
    from ser_toolkit.training.loop import TrainConfig

    return TrainConfig.from_settings({}, {"dataset": "synthetic", "cache_dir": str(cache_dir), "model": "greedy",
                                         "model_options": {"hidden_size": 16, "max_batch": 4}, "epochs": 1,
                                         "batch_size": 8, "workers": 0, "split": "speaker:test=0.25", **over})


def test_training_out_of_memory_is_one_line_with_the_fix(greedy, cache_dir, tmp_path, cli):
    r = cli("train", "--model", "greedy", "--model-set", "hidden_size=16", "--cache-dir", cache_dir,
            "--epochs", "1", "--batch-size", "8", "--workers", "0", "--out", tmp_path / "run", "-q")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1, r.err
    for needle in ("out of memory in epoch 1, step 1 on a batch of 8 utterances", "s of padded audio",
                   "set --batch-seconds (e.g. 30)", "--batch-size (now 8)", "--gradient-checkpointing", "--oom-retry"):
        assert needle in r.err, (needle, r.err)
    r = cli("train", "--model", "greedy", "--model-set", "hidden_size=16", "--model-set", "max_batch=3",
            "--cache-dir", cache_dir, "--epochs", "1", "--batch-size", "3", "--workers", "0", "--out",
            tmp_path / "fits", "-q")
    assert r.code == 0, r.err
    r = cli("evaluate", tmp_path / "fits", "--batch-size", "16")  # inference batches too large for the device
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1, r.err
    assert "out of memory while predicting" in r.err and "sertk evaluate --batch-seconds (now 160)" in r.err
    assert "--batch-size (now 16)" in r.err
    assert cli("evaluate", tmp_path / "fits", "--batch-size", "4").code == 0
    from helpers import write_audio

    audio = [write_audio(tmp_path / f"a{k}.wav", 0.5) for k in range(9)]  # predict batches hold 8: more than 6
    r = cli("predict", tmp_path / "fits", *audio)
    assert r.code == 2 and "CUDA_VISIBLE_DEVICES= sertk predict" in r.err and "--batch" not in r.err, r.err
    # validation inside training: predicted in training batches, so --batch-size is what shrinks them
    r = cli("train", "--model", "greedy", "--model-set", "hidden_size=16", "--model-set", "max_batch=2",
            "--cache-dir", cache_dir, "--epochs", "1", "--batch-size", "8", "--valid", "0.25", "--workers", "0",
            "--out", tmp_path / "valid", "-q", "--batch-seconds", "2")  # training batches of 1-2, validation 8
    assert r.code == 2 and "while predicting" in r.err and "lower --batch-size (now 8)" in r.err, r.err
    assert "sertk evaluate" not in r.err


def test_out_of_memory_before_the_first_step_is_one_line(greedy, cache_dir, tmp_path, cli, monkeypatch):
    import torch.nn

    real = torch.nn.Module.to

    def full(self, *a, **k):
        if any(str(x).startswith("cpu") for x in a):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.26 GiB")
        return real(self, *a, **k)

    monkeypatch.setattr(torch.nn.Module, "to", full)
    r = cli("train", "--model", "greedy", "--model-set", "hidden_size=16", "--cache-dir", cache_dir,
            "--epochs", "1", "--workers", "0", "--out", tmp_path / "run", "-q")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1, r.err
    assert "out of memory while setting up training" in r.err and "--gradient-checkpointing" in r.err
    r = cli("train", "--model", "acoustic", "--cache-dir", cache_dir, "--epochs", "1", "--workers", "0",
            "--out", tmp_path / "acoustic", "-q", "--aug-mode", "online", "--max-seconds", "2")
    assert r.code == 2 and "out of memory" in r.err and "--gradient-checkpointing" not in r.err, r.err


def test_a_study_retries_once_with_half_the_batch_only_when_asked(greedy, cache_dir, tmp_path):
    from dataclasses import asdict

    from ser_toolkit.cache.reader import CacheReader
    from ser_toolkit.errors import OutOfMemory
    from ser_toolkit.study import halved, run_model

    digest = CacheReader(cache_dir / "synthetic.h5").digest
    lines = []
    with pytest.raises(OutOfMemory, match="batch of 8 utterances"):
        run_model(tmp_path / "plain", config(cache_dir), lines.append, digest)
    cfg = config(cache_dir)
    state = run_model(tmp_path / "retried", cfg, lines.append, digest, oom_retry=True)
    assert state == "trained (retried with half the batch)"
    assert any("retrying once with batch_size 8 -> 4" in line for line in lines), lines
    record = json.loads((tmp_path / "retried" / "config.json").read_text())
    assert record["train"]["batch_size"] == 4 and record["planned"] == asdict(cfg)
    assert json.loads((tmp_path / "retried" / "eval" / "test.json").read_text())["n"] > 0
    assert run_model(tmp_path / "retried", cfg, lines.append, digest, oom_retry=True) == "reused"  # no retraining
    with pytest.raises(OutOfMemory, match="batch of 8 utterances"):  # 16 failed, then 8: one retry, never two
        run_model(tmp_path / "twice", config(cache_dir, batch_size=16), lines.append, digest, oom_retry=True)
    assert json.loads((tmp_path / "twice" / "config.json").read_text())["train"]["batch_size"] == 8
    by_seconds = halved(config(cache_dir, batch_seconds=30.0, batch_size=64))  # batches by seconds: half those
    assert (by_seconds.batch_seconds, by_seconds.batch_size) == (15.0, 64)
    assert halved(config(cache_dir, batch_size=1)) is None  # nothing left to halve: the error stands


def test_jobs_beyond_the_gpus_are_refused_and_shares_are_set():
    from ser_toolkit.errors import SertkError
    from ser_toolkit.executors import gpu_slots

    assert gpu_slots(4, ["0", "1"], 2) == ["0", "0", "1", "1"]
    assert gpu_slots(3, [], 1) == [None, None, None]
    with pytest.raises(SertkError, match="--jobs 3 runs at a time need 3 GPUs") as err:
        gpu_slots(3, ["0"], 1)
    assert "--runs-per-gpu 3" in str(err.value) and "--jobs 1" in str(err.value)
