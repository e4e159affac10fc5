"""One declaration of the training and study settings: CLI options, TOML checks, defaults, --resume, --save-config."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, fields
from importlib import resources
from pathlib import Path

import pytest

from helpers import REPO
from ser_toolkit import settings
from ser_toolkit.settings import RUNTIME, TRAIN_SETTINGS, TRAINING

tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")


def one_line_error(r, *needles):
    assert r.code == 2, (r.out, r.err)
    lines = [line for line in r.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def study_error(cli, tmp_path, toml: str, preset: str | None = "demo"):
    cfg = tmp_path / "study.toml"
    cfg.write_text(toml)
    args = ["--preset", preset] if preset else []
    return cli("study", *args, "--config", cfg, "--save-config", tmp_path / "out.toml")


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    from ser_toolkit.cache.build import build_cache
    from ser_toolkit.plugins.synthetic import Synthetic

    path = tmp_path_factory.mktemp("schema-cache") / "synthetic.h5"
    build_cache(Synthetic(per_emotion=1), None, path, quiet=True)
    return path


@pytest.fixture
def fake_training(monkeypatch, tmp_path, small_cache):
    """``sertk train`` without training (in ``tmp_path``, with a synthetic cache in ``cache/`` and ``c/``):
    records the TrainConfig it would train with."""
    import shutil

    for folder in ("cache", "c"):
        (tmp_path / folder).mkdir()
        shutil.copy(small_cache, tmp_path / folder / "synthetic.h5")
    monkeypatch.chdir(tmp_path)
    calls = []

    def fake(cfg, run_dir, resume=False, quiet=False, **_):
        calls.append((cfg, resume))
        return {"history": [], "epochs_run": 0}

    monkeypatch.setattr("ser_toolkit.training.loop.train", fake)
    return calls


# ----------------------------------------------------------------------------- study TOML

@pytest.mark.parametrize("toml, message", [
    ('[training]\nepochs = "ten"\n', "[training] epochs must be an int >= 1 (got 'ten')"),
    ("[data]\nsplit = 42\n", "[data] split must be a string (got 42)"),
    ("[training]\nepochs = 7.0\n", "[training] epochs must be an int >= 1 (got 7.0)"),
    ('[training]\nlr = "1e-5"\n', "[training] lr must be a number > 0 (got '1e-5')"),
    ("[training]\nwarmup = 1.0\n", "[training] warmup must be a number >= 0 and < 1 (got 1.0)"),
    ('[training]\ndevice = "tpu"\n', "[training] device must be auto, cpu, mps, cuda or cuda:N (got 'tpu')"),
    ("[training]\nbucket = 1\n", "[training] bucket must be true or false (got 1)"),
    ("[study]\nseeds = 0\n", "[study] seeds must be an int >= 1 (got 0)"),
    ("[augmentations]\ntop_k = [0]\n", "[augmentations] top_k must be a list of ints >= 1 (got [0])"),
    ('[augmentations]\nmethods = "noise"\n', "[augmentations] methods must be a list of strings (got 'noise')"),
    ("[augmentations]\nmethods = []\n", "[augmentations] methods must not be empty"),
    ('[data]\ncross = "savee"\n', "[data] cross must be a list of tables (got 'savee')"),
    ('[data]\nmono = "left"\n', "[data] mono must be one of mean, first, loudest (got 'left')"),
    ('[data]\ncross = [{ dataset = "synthetic-shifted", dtype = "int8" }]\n',
     "[data] cross[0] dtype must be one of float32, int16 (got 'int8')"),
    ('[data]\nresampler = "linear"\n', "[data] resampler must be one of soxr-hq, soxr-vhq (got 'linear')"),
    ('[training]\ndataset = "x"\n', "[training] dataset is set by the study itself"),
    ("[training]\nearly_stopping = 2\n", "[training] early_stopping needs a validation share"),
    ("name = 3\n", "name must be a string (got 3)"),
    ("data = 3\n", "[data] must be a table (got 3)"),
])
def test_study_config_wrong_values_are_one_line(cli, tmp_path, toml, message):
    one_line_error(study_error(cli, tmp_path, toml), message)


@pytest.mark.parametrize("toml, message", [
    ('nmae = "x"\n', "unknown key 'nmae' at the top level; did you mean 'name'?"),
    ('[trainig]\nepochs = 3\n', "unknown section [trainig]; did you mean [training]?"),
    ('[data]\nsplt = "speaker"\n', "unknown key 'splt' in [data]; did you mean 'split'?"),
    ('[data]\ncross = [{ dataset = "synthetic-shifted", optons = {} }]\n',
     "unknown key 'optons' in [data] cross[0]; did you mean 'options'?"),
    ("[model]\noptins = {}\n", "unknown key 'optins' in [model]; did you mean 'options'?"),
    ("[training]\nepochz = 3\n", "unknown key 'epochz' in [training]; did you mean 'epochs'?"),
    ('[augmentations]\ncontrl = "duplicate"\n', "unknown key 'contrl' in [augmentations]; did you mean 'control'?"),
    ("[augmentations]\noptions = { nosie = {} }\n",
     "unknown key 'nosie' in [augmentations] options; did you mean 'noise'?"),
    ("[study]\nseed = 2\n", "unknown key 'seed' in [study]; did you mean 'seeds'?"),
])
def test_study_config_typos_name_the_closest_key(cli, tmp_path, toml, message):
    one_line_error(study_error(cli, tmp_path, toml), message)


def test_study_config_missing_parts(cli, tmp_path):
    one_line_error(study_error(cli, tmp_path, '[data]\ndataset = "ravdess"\n'),
                   "[data] dataset 'ravdess' needs a root", 'add root = "PATH" to [data]')
    one_line_error(study_error(cli, tmp_path, '[data]\ncross = [{ dataset = "savee" }]\n'),
                   "[data] cross[0] dataset 'savee' needs a root")
    one_line_error(study_error(cli, tmp_path, '[model]\nname = "acoustic"\n', preset=None),
                   "study config lacks the [data] section")
    one_line_error(study_error(cli, tmp_path, '[data]\nsplit = "speaker"\n[model]\nname = "acoustic"\n'
                                              '[augmentations]\nmethods = ["noise"]\n', preset=None),
                   "[data] lacks 'dataset'")
    one_line_error(study_error(cli, tmp_path, "[augmentations]\noptions = { noise = { colour = 1 } }\n"),
                   "augmentation 'noise': unknown parameter 'colour'")
    one_line_error(cli("study", "--preset", "demo", "--epochs", "0", "--save-config", tmp_path / "x.toml"),
                   "--epochs must be an int >= 1 (got 0)", "see 'sertk study --help'")  # the option, not the key


def test_cache_options_are_declared_and_accepted(cli, tmp_path):
    out = tmp_path / "out.toml"
    cfg = tmp_path / "c.toml"
    cfg.write_text('[data]\nmono = "first"\ndtype = "int16"\nresampler = "soxr-vhq"\nmax_seconds = 30.0\n'
                   'cross = [{ dataset = "synthetic-shifted", mono = "loudest" }]\n')
    assert cli("study", "--preset", "demo", "--config", cfg, "--save-config", out).code == 0
    data = tomllib.loads(out.read_text())["data"]
    assert (data["mono"], data["dtype"], data["resampler"], data["max_seconds"]) == ("first", "int16", "soxr-vhq", 30.0)
    assert data["cross"] == [{"dataset": "synthetic-shifted", "options": {}, "mono": "loudest"}]


@pytest.mark.parametrize("args", [
    ("--preset", "demo"),
    ("--preset", "reference"),
    ("--preset", "demo", "--model", "tiny", "--split", "speaker:test=0.2", "--epochs", "2", "--seeds", "2",
     "--workers", "1", "-o", "reports/x.md", "--runs-dir", "runs/x"),
])
def test_save_config_round_trip(cli, tmp_path, args):
    from ser_toolkit.study import check, load_config

    first, second = tmp_path / "a.toml", tmp_path / "b.toml"
    assert cli("study", *args, "--save-config", first).code == 0
    assert cli("study", "--config", first, "--save-config", second).code == 0
    assert first.read_text() == second.read_text()
    written = tomllib.loads(first.read_text())
    assert load_config(None, first) == written == check(written)  # already resolved: loading adds nothing
    assert set(written) == {"name", "data", "model", "training", "training_sources", "augmentations", "study"}
    assert {"split", "cross", "cache_dir", "options"} <= set(written["data"])
    assert {"seeds", "runs_dir", "report"} <= set(written["study"])


def test_save_config_applies_the_flags(cli, tmp_path):
    out = tmp_path / "a.toml"
    assert cli("study", "--preset", "demo", "--model", "tiny", "--epochs", "2", "--save-config", out).code == 0
    text = out.read_text()
    cfg = tomllib.loads(text)
    assert cfg["model"] == {"name": "tiny", "options": {}} and cfg["training"]["epochs"] == 2
    # the training values left to the model are listed as comments, not pinned
    assert "#   batch_size = 16" in text and "batch_size" not in cfg["training"]


# ----------------------------------------------------------------------------- sertk train

def test_train_help_lists_every_declared_setting(cli):
    r = cli("train", "--help")
    assert r.code == 0
    flat = "".join(r.out.split())
    for s in TRAIN_SETTINGS:
        assert s.option in r.out, s.name
        if s.generated:
            assert "".join(s.help.split()) in flat, s.name
    assert "--no-bucket" in flat and "[default:themodel's,else7]" in flat


def test_train_device_and_ranges_are_one_line(cli, tmp_path):
    one_line_error(cli("train", "--device", "tpu", "--out", tmp_path / "r"),
                   "--device must be auto, cpu, mps, cuda or cuda:N (got 'tpu')")
    one_line_error(cli("train", "--epochs", "0", "--out", tmp_path / "r"), "--epochs must be an int >= 1 (got 0)")
    one_line_error(cli("train", "--schedule", "cyclic", "--out", tmp_path / "r"),
                   "--schedule must be one of constant, linear, cosine (got 'cyclic')")
    assert not (tmp_path / "r").exists()


def test_train_flags_map_to_settings(cli, tmp_path, fake_training):
    run = tmp_path / "r"
    r = cli("train", "--model", "acoustic", "--no-bucket", "--no-bf16", "--compile", "--lr", "0.01",
            "--cache-dir", tmp_path / "c/", "--max-seconds", "4", "--device", "cuda:1", "--out", run, "-q")
    assert r.code == 0, r.err
    stored = json.loads((run / "config.json").read_text())["train"]
    assert stored["bucket"] is False and stored["bf16"] is False and stored["compile"] is True
    assert stored["lr"] == 0.01 and stored["epochs"] == 60 and stored["batch_size"] == 32  # the model's defaults
    assert stored["cache_dir"] == str(tmp_path / "c") and stored["max_seconds"] == 4.0
    assert stored["device"] == "cuda:1" and set(stored) == {s.name for s in TRAIN_SETTINGS}


def test_resume_refuses_changed_settings_and_names_them(cli, tmp_path, fake_training):
    run = tmp_path / "r"
    base = ("--model", "acoustic", "--epochs", "3", "--split", "speaker:test=0.25", "--out", run, "-q")
    assert cli("train", *base).code == 0
    line = one_line_error(cli("train", "--out", run, "--resume", "--epochs", "5", "--lr", "0.01", "-q"),
                          "epochs: 3 -> 5", "lr: 0.001 -> 0.01", "--resume")
    assert "split" not in line and "model" not in line
    one_line_error(cli("train", "--out", run, "--resume", "--plugins", "noise", "-q"), 'plugins: [] -> ["noise"]')
    one_line_error(cli("train", "--out", run, "--resume", "--model", "tiny", "-q"), "model: acoustic -> tiny")
    one_line_error(cli("train", "--out", run, "--resume", "--no-bucket", "-q"), "bucket: true -> false")
    # the same flags again, and runtime settings, are allowed; the stored settings are kept
    r = cli("train", *base, "--resume", "--workers", "0", "--device", "cpu", "--log-every", "5")
    assert r.code == 0, r.err
    cfg, resumed = fake_training[-1]
    assert resumed and (cfg.epochs, cfg.lr, cfg.split, cfg.model) == (3, 0.001, "speaker:test=0.25", "acoustic")
    assert (cfg.workers, cfg.device, cfg.log_every) == (0, "cpu", 5)


# ----------------------------------------------------------------------------- one place for defaults

def test_train_config_is_the_declaration():
    from ser_toolkit.training.loop import TrainConfig

    assert [f.name for f in fields(TrainConfig)] == [s.name for s in TRAIN_SETTINGS]
    assert asdict(TrainConfig()) == settings.defaults()
    TrainConfig().validate()
    assert RUNTIME == {"workers", "device", "log_every", "compile", "cross", "checkpoint_every"}


def test_precedence_declaration_model_config_command_line():
    assert settings.resolve()["epochs"] == settings.SETTINGS["epochs"].default
    assert settings.resolve({"model": "acoustic"})["epochs"] == 60  # acoustic's train_defaults
    assert settings.resolve({"model": "acoustic", "epochs": 3})["epochs"] == 3
    assert settings.resolve({"model": "acoustic", "epochs": 3}, {"epochs": 4})["epochs"] == 4


@pytest.mark.parametrize("model", ["acoustic", "tiny", "hubert"])
def test_train_and_study_resolve_the_same_settings(cli, tmp_path, fake_training, model):
    from ser_toolkit.study import _train_config, check

    assert cli("train", "--model", model, "--out", tmp_path / "r", "-q").code == 0
    trained = json.loads((tmp_path / "r" / "config.json").read_text())["train"]
    cfg = check({"data": {"dataset": "synthetic"}, "model": {"name": model}, "augmentations": {"methods": ["noise"]}})
    studied = asdict(_train_config(cfg, tmp_path / "cache.h5", [], None, 42))
    for s in TRAINING:
        if s.name not in RUNTIME:
            assert trained[s.name] == studied[s.name], s.name


def test_presets_and_readme_agree_with_the_declaration():
    from ser_toolkit.study import PRESETS, load_config

    for preset in PRESETS:
        load_config(preset, None)  # every key declared, every value allowed
    reference = tomllib.loads(resources.files("ser_toolkit.presets").joinpath("reference.toml").read_text())
    defaults = settings.resolve({"model": "hubert"})
    for key, value in reference["training"].items():
        if key in ("epochs", "batch_size", "lr", "seed"):
            assert value == defaults[key], key  # the reference protocol is the default
    readme = " ".join((REPO / "README.md").read_text().split())
    lr = re.sub(r"e-0*", "e-", f"{defaults['lr']:g}")
    claim = f"AdamW lr {lr}, {defaults['epochs']} epochs, batch {defaults['batch_size']}, seed {defaults['seed']}"
    assert claim in readme
    assert "sertk train --help" in readme


def test_cli_train_module_has_no_hand_written_defaults():
    source = (REPO / "ser_toolkit" / "cli.py").read_text() + (REPO / "ser_toolkit" / "study.py").read_text()
    assert not re.search(r'"(epochs|batch_size|lr|weight_decay)": *[0-9]', source)
    assert Path(settings.__file__).name == "settings.py"
