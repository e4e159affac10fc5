"""Checkpoint policy: states every --checkpoint-every epochs or when interrupted, best weights kept in memory,
snapshot buffers reused; a study evaluates the model it has just trained without rebuilding it."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import synthetic_cache

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return synthetic_cache(tmp_path_factory.mktemp("cache"), speakers=4, per_emotion=2)


def config(cache_dir, **over):
    from ser_toolkit.training.loop import TrainConfig

    return TrainConfig.from_settings({}, {"dataset": "synthetic", "cache_dir": str(cache_dir), "model": "tiny",
                                         "model_options": {"hidden_size": 16}, "epochs": 5, "batch_size": 8,
                                         "workers": 0, "split": "speaker:test=0.25", "valid": 0.25, "lr": 0.3,
                                         **over})


def test_states_follow_checkpoint_every_and_best_weights_are_written_with_them(cache_dir, tmp_path):
    from ser_toolkit.training import checkpoints, runs
    from ser_toolkit.training.loop import train

    written: list[tuple[str, int]] = []
    real_state, real_best, real_model = runs.save_checkpoint, runs.save_weights_dict, runs.save_weights

    def state(path, st):
        written.append(("state", st["epoch"] + 1))
        return real_state(path, st)

    def best(path, tensors, meta):  # from the buffer of the best weights
        written.append(("best", int(meta["epoch"])))
        return real_best(path, tensors, meta)

    def from_model(path, model, meta):  # the last epoch's weights are the best: from the model itself
        written.append(("best", int(meta["epoch"])))
        return real_model(path, model, meta)

    run = tmp_path / "run"
    try:
        runs.save_checkpoint, runs.save_weights_dict, runs.save_weights = state, best, from_model
        summary = train(config(cache_dir, checkpoint_every=2), run, quiet=True)
    finally:
        runs.save_checkpoint, runs.save_weights_dict, runs.save_weights = real_state, real_best, real_model
    assert [e for kind, e in written if kind == "state"] == [2, 4]  # never after the last epoch (5)
    scores = [h["valid_uar"] for h in summary["history"]]
    best_epochs = [1 + max(range(k), key=lambda i: (scores[i], -i)) for k in (2, 4, 5)]
    expected = [best_epochs[0]] + [b for a, b in zip(best_epochs, best_epochs[1:]) if b != a]
    assert [e for kind, e in written if kind == "best"] == expected  # once per change, before its state
    assert written.index(("best", best_epochs[0])) < written.index(("state", 2))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [runs.BEST]
    # bytes: two states (weights + moments, each larger than the weights) and the best weights as often as written
    assert summary["checkpoint_bytes_written"] > (2 * 3 + len(expected)) * (run / "checkpoints" / runs.BEST).stat().st_size * 0.9
    assert not checkpoints._POOL  # pageable buffers are freed at the end (only pinned ones wait for the next run)


def test_no_state_is_written_unless_interrupted(cache_dir, tmp_path):
    from ser_toolkit.training import runs
    from ser_toolkit.training.loop import train

    run = tmp_path / "run"
    summary = train(config(cache_dir, checkpoint_every=0, valid=0.0, epochs=3), run, quiet=True)
    best = (run / "checkpoints" / runs.BEST).stat().st_size
    assert summary["checkpoint_bytes_written"] == best  # the weights, once
    final = json.loads((run / "final.json").read_text())
    assert final["checkpoints"][runs.BEST] == runs.file_digest(run / "checkpoints" / runs.BEST)


def test_an_interrupted_run_writes_its_last_epoch_and_resumes_exactly(cache_dir, tmp_path):
    from safetensors.torch import load_file

    from ser_toolkit.training import runs
    from ser_toolkit.training.checkpoints import TrainingStopped
    from ser_toolkit.training.loop import train

    cfg = config(cache_dir, checkpoint_every=0)
    ref = tmp_path / "ref"
    train(cfg, ref, quiet=True)

    def stop_after_two(row):
        if row["epoch"] == 2:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)  # handled: training stops at the next step

    run = tmp_path / "run"
    with pytest.raises(TrainingStopped) as stopped:
        train(cfg, run, quiet=True, on_epoch=stop_after_two)
    assert stopped.value.epochs_done == 2 and stopped.value.exit_code == 143
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [runs.BEST, "epoch-002.pt"]
    state = runs.load_checkpoint(run / "checkpoints" / "epoch-002.pt")
    assert state["best"] == max(h["valid_uar"] for h in state["history"])
    from safetensors import safe_open

    with safe_open(str(run / "checkpoints" / runs.BEST), framework="pt") as fh:  # the best of the 2 epochs
        assert float(fh.metadata()["score"]) == state["best"]
    train(cfg, run, resume=True, quiet=True)
    a, b = load_file(str(ref / "checkpoints" / runs.BEST)), load_file(str(run / "checkpoints" / runs.BEST))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_snapshot_buffers_are_allocated_once(tmp_path):
    from ser_toolkit.training.checkpoints import Buffers, release_pool

    release_pool()
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    buffers = Buffers(pin=False)
    first = buffers.copy({"model": model.state_dict(), "optimizer": opt.state_dict()})
    ptrs = [first["model"]["weight"].data_ptr(), first["optimizer"]["state"][0]["exp_avg"].data_ptr()]
    with torch.no_grad():
        model.weight.add_(1.0)
    second = buffers.copy({"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert [second["model"]["weight"].data_ptr(), second["optimizer"]["state"][0]["exp_avg"].data_ptr()] == ptrs
    assert torch.equal(second["model"]["weight"], model.weight) and second["model"]["weight"] is not model.weight
    buffers.release()
    from ser_toolkit.training.checkpoints import _POOL

    assert not _POOL  # pageable: freed; pinned ones (CUDA) would wait in the pool for the next run


def test_a_study_evaluates_the_trained_model_without_rebuilding_it(cache_dir, tmp_path, monkeypatch):
    from ser_toolkit import evaluation, study
    from ser_toolkit.cache.reader import CacheReader
    from ser_toolkit.plugins.hubert import Tiny
    from ser_toolkit.training import runs

    reader = CacheReader(cache_dir / "synthetic.h5")
    split, _ = study._study_split(reader, "speaker:test=0.25", {"valid": 0.25}, tmp_path)  # train, valid, test
    cfg = config(cache_dir, epochs=2, split=split, valid=0.0)
    run = tmp_path / "run"
    calls = []
    real_check = runs.check_run

    def no_rebuild(self, *a, **k):
        raise AssertionError("rebuilt")

    def counted(*a, **k):
        calls.append(a[0])
        return real_check(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(Tiny, "rebuild", no_rebuild)
        m.setattr(runs, "check_run", counted)
        assert study.run_model(run, cfg, lambda *_: None, reader.digest, selection=True, command=["t"]) == "trained"
    assert not calls  # no seal check, no hash of the weights just written
    trained = {p.name: p.read_bytes() for folder in ("eval", "selection") for p in (run / folder).glob("*.csv")}
    assert "test.predictions.csv" in trained and "valid.predictions.csv" in trained
    for folder in ("eval", "selection"):
        shutil.rmtree(run / folder)
    evaluation.evaluate_run(run, workers=1)  # from disk: rebuilt, weights loaded
    evaluation.evaluate_run(run, ["valid", "valid-augmented"], workers=1, cross=[], folder="selection")
    loaded = {p.name: p.read_bytes() for folder in ("eval", "selection") for p in (run / folder).glob("*.csv")}
    assert loaded == trained
    loads = []
    real_load = evaluation.load_run_model
    monkeypatch.setattr(evaluation, "load_run_model", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    for folder in ("eval", "selection"):
        shutil.rmtree(run / folder)
    assert study.run_model(run, cfg, lambda *_: None, reader.digest, selection=True, command=["t"]) == "reused"
    assert len(loads) == 1  # a reused run is loaded once for its test and validation sets


def _sigterm_after(epoch: int):
    def on_epoch(row):
        if row["epoch"] == epoch:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)

    return on_epoch


def test_a_state_that_cannot_be_written_is_the_news(cache_dir, tmp_path, monkeypatch):
    """Stopped by SIGTERM on a full disk: the disk error is raised (one line from the CLI), never a claim that
    the state was kept."""
    import errno

    from ser_toolkit.training import runs
    from ser_toolkit.training.loop import train

    def full(path, state):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(runs, "save_checkpoint", full)
    with pytest.raises(OSError, match="No space left"):
        train(config(cache_dir, checkpoint_every=0), tmp_path / "run", quiet=True, on_epoch=_sigterm_after(1))
    assert not list((tmp_path / "run" / "checkpoints").glob("epoch-*"))


def test_a_signal_while_the_run_is_sealed_waits_for_the_seal(cache_dir, tmp_path, monkeypatch):
    """SIGTERM after the last epoch, while the weights are being written: the run is sealed first, then
    stopped (finished, nothing lost)."""
    import os
    import signal

    from ser_toolkit.training import runs
    from ser_toolkit.training.checkpoints import TrainingStopped
    from ser_toolkit.training.loop import train

    real = runs.save_weights

    def signalled(path, model, meta):
        os.kill(os.getpid(), signal.SIGTERM)  # mid-write, as Slurm's time limit would
        return real(path, model, meta)

    monkeypatch.setattr(runs, "save_weights", signalled)
    run = tmp_path / "run"
    with pytest.raises(TrainingStopped) as stopped:
        train(config(cache_dir, checkpoint_every=0, valid=0.0, epochs=2), run, quiet=True)
    assert stopped.value.finished and stopped.value.exit_code == 143
    assert runs.check_run(run)["run_id"]  # sealed, intact


def test_a_state_that_does_not_fit_the_model_is_one_line(cache_dir, tmp_path):
    from ser_toolkit.errors import SertkError
    from ser_toolkit.training import runs
    from ser_toolkit.training.checkpoints import TrainingStopped
    from ser_toolkit.training.loop import train

    cfg = config(cache_dir, checkpoint_every=0)
    run = tmp_path / "run"
    with pytest.raises(TrainingStopped):
        train(cfg, run, quiet=True, on_epoch=_sigterm_after(1))
    path = run / "checkpoints" / "epoch-001.pt"
    state = runs.load_checkpoint(path)
    state["model"].pop(next(iter(state["model"])))
    runs.save_checkpoint(path, state)
    with pytest.raises(SertkError, match="does not fit this run's model .*Missing key"):
        train(cfg, run, resume=True, quiet=True)
