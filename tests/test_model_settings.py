"""Training settings that belong to the model (issue 9, item 5), their provenance, and degenerate-model flags."""

from __future__ import annotations

import json
import math
import sys
from types import SimpleNamespace

import pytest

from ser_toolkit import settings
from ser_toolkit.diagnostics import learning_flags, report_warnings, run_flags
from ser_toolkit.emotions import EMOTIONS

tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")

ACOUSTIC = settings.model_defaults("acoustic")
HUBERT = settings.model_defaults("hubert")


def saved(cli, tmp_path, *args, name="cfg.toml"):
    """``sertk study ARGS --save-config``: (the resolved values of every training setting, the config)."""
    from ser_toolkit.study import load_config

    out = tmp_path / name
    r = cli("study", *args, "--save-config", out)
    assert r.code == 0, r.err
    cfg = tomllib.loads(out.read_text())
    assert load_config(None, out) == cfg
    return settings.resolve(cfg["training"], {"model": cfg["model"]["name"]}), cfg


# ----------------------------------------------------------------------------- the model's settings in a study

def test_another_model_drops_the_presets_model_settings(cli, tmp_path):
    values, cfg = saved(cli, tmp_path, "--preset", "reference")
    assert (values["lr"], values["epochs"], values["batch_size"]) == (1e-5, 7, 8)
    assert cfg["training_sources"]["lr"] == "preset"

    values, cfg = saved(cli, tmp_path, "--preset", "reference", "--model", "acoustic")
    assert (values["lr"], values["epochs"], values["batch_size"]) == (ACOUSTIC["lr"], ACOUSTIC["epochs"],
                                                                      ACOUSTIC["batch_size"]) != (1e-5, 7, 8)
    assert not {"lr", "epochs", "batch_size"} & set(cfg["training"])
    sources = cfg["training_sources"]
    assert sources["lr"] == sources["epochs"] == sources["batch_size"] == "model"
    assert sources["workers"] == sources["aug_mode"] == "preset"  # not the model's: kept
    assert sources["select_metric"] == "default"
    assert set(sources) == {s.name for s in settings.TRAINING} and set(sources.values()) <= set(settings.SOURCES)


def test_the_users_values_win_and_are_marked_user(cli, tmp_path):
    values, cfg = saved(cli, tmp_path, "--preset", "reference", "--model", "acoustic", "--lr", "0.01",
                        "--batch-size", "4", "--warmup", "0.1", "--schedule", "linear", "--max-seconds", "3")
    assert (values["lr"], values["batch_size"], values["epochs"]) == (0.01, 4, ACOUSTIC["epochs"])
    assert (values["warmup"], values["schedule"], values["max_seconds"]) == (0.1, "linear", 3.0)
    sources = cfg["training_sources"]
    assert sources["lr"] == sources["batch_size"] == sources["schedule"] == sources["max_seconds"] == "user"
    assert sources["epochs"] == "model"
    # the user's config file counts as the user's too
    user = tmp_path / "user.toml"
    user.write_text('[model]\nname = "acoustic"\n[training]\nepochs = 5\n')
    values, cfg = saved(cli, tmp_path, "--preset", "reference", "--config", user)
    assert (values["epochs"], values["lr"]) == (5, ACOUSTIC["lr"])
    assert (cfg["training_sources"]["epochs"], cfg["training_sources"]["lr"]) == ("user", "model")
    # the command line over the file
    values, cfg = saved(cli, tmp_path, "--preset", "reference", "--config", user, "--epochs", "9")
    assert values["epochs"] == 9 and cfg["training_sources"]["epochs"] == "user"


def test_the_same_model_keeps_the_presets_settings(cli, tmp_path):
    for model in ("hubert", "org/another-hubert-checkpoint"):  # a hub id is a hubert checkpoint: hubert's settings
        values, cfg = saved(cli, tmp_path, "--preset", "reference", "--model", model)
        assert (values["lr"], values["epochs"], values["batch_size"]) == (1e-5, 7, 8)
        assert cfg["training_sources"]["lr"] == "preset"


def test_save_config_keeps_the_provenance(cli, tmp_path):
    first = tmp_path / "a.toml"
    second = tmp_path / "b.toml"
    assert cli("study", "--preset", "reference", "--lr", "2e-5", "--save-config", first).code == 0
    assert cli("study", "--config", first, "--save-config", second).code == 0
    assert first.read_text() == second.read_text()
    sources = tomllib.loads(first.read_text())["training_sources"]
    assert (sources["lr"], sources["epochs"]) == ("user", "preset")
    # a saved config remembers which values came with the preset's model: another model drops those only
    values, cfg = saved(cli, tmp_path, "--config", first, "--model", "acoustic")
    assert (values["lr"], values["epochs"], values["batch_size"]) == (2e-5, ACOUSTIC["epochs"],
                                                                      ACOUSTIC["batch_size"])
    assert (cfg["training_sources"]["lr"], cfg["training_sources"]["epochs"]) == ("user", "model")


def test_training_sources_are_checked(cli, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[training_sources]\nlr = "mine"\n')
    r = cli("study", "--preset", "demo", "--config", bad, "--save-config", tmp_path / "x.toml")
    assert r.code == 2 and "[training_sources] lr must be one of user, preset, model, default (got 'mine')" in r.err
    bad.write_text('[training_sources]\nlrr = "user"\n')
    r = cli("study", "--preset", "demo", "--config", bad, "--save-config", tmp_path / "x.toml")
    assert r.code == 2 and "unknown key 'lrr' in [training_sources]; did you mean 'lr'?" in r.err


def test_load_config_returns_the_sources():
    from ser_toolkit.study import check, load_config, training_sources

    cfg = load_config("reference", None, {"model": {"name": "tiny", "options": {}}, "training": {"seed": 7}})
    assert cfg["training_sources"] == training_sources(cfg)
    assert (cfg["training_sources"]["lr"], cfg["training_sources"]["seed"]) == ("model", "user")
    assert check(cfg) == cfg
    assert check({"data": {"dataset": "synthetic"}, "model": {"name": "acoustic"},
                  "augmentations": {"methods": ["noise"]}, "training": {"lr": 0.1}})["training_sources"]["lr"] == "user"


def test_reference_cpu_preset(cli, tmp_path):
    values, cfg = saved(cli, tmp_path, "--preset", "reference-cpu")
    from importlib import resources

    reference = tomllib.loads(resources.files("ser_toolkit.presets").joinpath("reference.toml").read_text())
    assert cfg["model"] == {"name": "rbf-svm", "options": {"features": "acoustic"}} and cfg["study"]["seeds"] == 3
    assert {k: cfg["data"][k] for k in reference["data"]} == reference["data"]  # the same corpora and split
    assert (values["normalize"], values["aug_mode"]) == ("speaker-train", "offline")
    assert cfg["training_sources"]["normalize"] == "preset"
    # the MLP of earlier versions brings its own settings
    values, cfg = saved(cli, tmp_path, "--preset", "reference-cpu", "--model", "acoustic")
    assert (values["epochs"], values["batch_size"], values["lr"]) == (60, 32, 1e-3)
    assert cfg["training_sources"]["lr"] == "model"
    values, _ = saved(cli, tmp_path, "--preset", "reference-cpu", "--model", "tiny")
    tiny = settings.model_defaults("tiny")
    assert (values["epochs"], values["batch_size"], values["lr"]) == (tiny["epochs"], tiny["batch_size"], tiny["lr"])
    assert values["normalize"] == "none"  # the preset's normalisation belongs to its feature model


def test_study_help_lists_the_training_settings(cli):
    r = cli("study", "--help")
    assert r.code == 0
    for option in ("--lr", "--batch-size", "--epochs", "--weight-decay", "--schedule", "--warmup", "--valid",
                   "--max-seconds", "--workers", "--device", "--seed", "--seeds", "--split", "--model", "--config",
                   "--preset", "--save-config", "--runs-dir", "reference-cpu"):
        assert option in r.out, option
    assert "--dataset" not in r.out and "--cache-dir" not in r.out  # set by the study itself
    r = cli("study", "--preset", "demo", "--device", "tpu", "--save-config", "x.toml")
    assert r.code == 2 and "--device must be auto, cpu, mps, cuda or cuda:N (got 'tpu')" in r.err


def test_model_bound_settings_are_declared():
    assert {"epochs", "batch_size", "lr", "weight_decay", "schedule", "warmup"} <= settings.MODEL_BOUND
    for model in ("acoustic", "tiny", "hubert", "svm", "logreg"):
        # aug_mode: feature models default to materialised copies, but it is a protocol choice, so a preset's
        # value is kept for any model (an online value with a feature model is refused at train time)
        assert set(settings.model_defaults(model)) - {"aug_mode"} <= settings.MODEL_BOUND, model
    assert settings.model_defaults("svm")["aug_mode"] == settings.model_defaults("acoustic")["aug_mode"] == "offline"
    assert "aug_mode" not in settings.MODEL_BOUND
    assert settings.sources("acoustic", {"lr": "user"}, ["lr", "epochs", "seed"]) == \
        {"lr": "user", "epochs": "model", "seed": "default"}


def test_train_records_where_each_value_comes_from(cli, tmp_path, monkeypatch):
    monkeypatch.setattr("ser_toolkit.training.loop.train", lambda *a, **k: {"history": [], "epochs_run": 0})
    cache = tmp_path / "cache"
    assert cli("cache", "synthetic", "--set", "per_emotion=1", "--cache-dir", cache, "-q").code == 0
    run = tmp_path / "r"
    r = cli("train", "--model", "acoustic", "--cache-dir", cache, "--lr", "0.01", "--plugins", "noise",
            "--out", run, "-q")
    assert r.code == 0, r.err
    stored = json.loads((run / "config.json").read_text())
    sources = stored["sources"]
    assert set(sources) == set(stored["train"]) == set(settings.SETTINGS)
    assert (sources["lr"], sources["model"], sources["plugins"], sources["cache_dir"]) == ("user",) * 4
    assert (sources["epochs"], sources["batch_size"]) == ("model", "model")
    assert (sources["seed"], sources["split"], sources["schedule"]) == ("default",) * 3


# ----------------------------------------------------------------------------- degenerate models

def confusion(diagonal: float, n: int = 100) -> list[list[int]]:
    """Rows true, columns predicted: ``diagonal`` of each class right, the rest spread."""
    rows = []
    for t in range(len(EMOTIONS)):
        row = [0] * len(EMOTIONS)
        row[t] = round(n * diagonal)
        row[(t + 1) % len(EMOTIONS)] = n - row[t]
        rows.append(row)
    return rows


def collapsed(column: int, share: float, n: int = 700) -> list[list[int]]:
    """Rows true (balanced), ``share`` of all predictions in ``column``, the rest on the diagonal."""
    per = n // len(EMOTIONS)
    rows = [[0] * len(EMOTIONS) for _ in EMOTIONS]
    to_column = round(n * share)
    for t in range(len(EMOTIONS)):
        rows[t][column] += min(per, to_column)
        rows[t][t] += per - min(per, to_column)
        to_column -= min(per, to_column)
    return rows


def summary(*losses: float, **extra) -> dict:
    return {"history": [{"epoch": i + 1, "train_loss": x} for i, x in enumerate(losses)], **extra}


def test_a_loss_at_chance_did_not_learn():
    flags = learning_flags(summary(2.3, math.log(7)), {"test": {"confusion": confusion(0.8)}})
    assert len(flags) == 1 and flags[0].startswith("did not learn") and "ln 7" in flags[0]
    assert learning_flags(summary(math.log(7) * 0.985), {})[0].startswith("did not learn")  # within 2 %
    assert learning_flags(summary(2.5), {})[0].startswith("did not learn")  # above chance: diverged
    assert learning_flags(summary(float("nan")), {})[0].startswith("did not learn")
    assert learning_flags(summary(math.log(7) * 0.95), {}) == []
    # the class-prior entropy of the training labels when the summary has them
    prior = [60, 10, 10, 10, 5, 3, 2]
    entropy = -sum(c / 100 * math.log(c / 100) for c in prior)
    assert entropy < 0.9 * math.log(7) and learning_flags(summary(entropy), {}) == []  # below ln 7
    flags = learning_flags(summary(entropy, train_emotions=dict(zip(EMOTIONS, prior))), {})
    assert flags and "entropy of the training labels" in flags[0]
    assert learning_flags(summary(math.log(4), num_classes=4), {})[0].startswith("did not learn")
    assert learning_flags({"history": []}, {}) == [] and learning_flags(None, {}) == []


def test_one_class_for_nearly_everything_is_degenerate():
    flags = learning_flags(summary(0.3), {"test": {"confusion": collapsed(EMOTIONS.index("neutral"), 0.95)},
                                          "cross-savee": {"confusion": confusion(0.6)}})
    assert flags == ["degenerate on test: predicts 'neutral' for 95 % of it"]
    assert learning_flags(summary(0.3), {"test": {"confusion": collapsed(2, 0.90)}}) == []  # not more than 90 %
    assert learning_flags(summary(0.3), {"test": {"confusion": [[0] * 7] * 7}}) == []  # empty set


def test_a_healthy_model_has_no_flags():
    assert learning_flags(summary(1.9, 1.2, 0.4), {"test": {"confusion": confusion(0.7)},
                                                   "cross-savee": {"confusion": confusion(0.4)}}) == []


def write_run(run, loss: float, test_confusion) -> None:
    (run / "eval").mkdir(parents=True)
    (run / "train_summary.json").write_text(json.dumps(summary(loss)))
    (run / "eval" / "test.json").write_text(json.dumps({"n": 700, "confusion": test_confusion}))
    (run / "eval" / "summary.json").write_text(json.dumps({"test": {"n": 700}}))


def test_run_flags_and_report_warnings(tmp_path):
    bad, good = tmp_path / "baseline-s42", tmp_path / "noise-s42"
    write_run(bad, math.log(7), collapsed(0, 1.0))
    write_run(good, 0.2, confusion(0.9))
    flags = run_flags(bad)
    assert flags[0].startswith("did not learn") and flags[1] == "degenerate on test: predicts 'neutral' for 100 % of it"
    assert run_flags(good) == [] and run_flags(tmp_path / "missing") == []
    models = [SimpleNamespace(name="baseline", runs=[bad], seeds=[42]), SimpleNamespace(name="noise", runs=[good],
                                                                                       seeds=[42])]
    lines = report_warnings(models)
    assert lines[0] == "## Warnings" and len([x for x in lines if x.startswith("- ")]) == 1
    assert "**baseline** (seed 42, `baseline-s42`): did not learn" in lines[-2]
    assert report_warnings(models[1:]) == []


def test_evaluate_prints_the_flags(cli, tmp_path, monkeypatch):
    run = tmp_path / "run"
    write_run(run, math.log(7), collapsed(EMOTIONS.index("sad"), 0.97))
    fake = {"test": {"n": 700, "accuracy": 0.1, "weighted_f1": 0.1, "macro_f1": 0.1, "uar": 0.14,
                     "missing_emotions": []}}
    monkeypatch.setattr("ser_toolkit.evaluation.evaluate_run", lambda *a, **k: fake)
    r = cli("evaluate", run)
    assert r.code == 0, r.err
    assert "warning: did not learn" in r.out and "warning: degenerate on test: predicts 'sad' for 97 % of it" in r.out
    r = cli("evaluate", run, "--json")
    assert r.code == 0 and json.loads(r.out) == fake and "warning: degenerate on test" in r.err
