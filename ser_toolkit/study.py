"""``sertk study``: the whole augmentation study from one config, resumable.

Steps: cache the corpora; materialise the augmented test sets (one per method
and one mixed); train and evaluate the baseline, one model per augmentation and
the clean x2 control (``duplicate``: as many steps as an augmented model); turn
the single-method gains into weights (the reference way, seed-averaged); train
and evaluate the Top-k weighted models; write the report. ``seeds = N`` repeats
every model with N seeds.

Resumable: a finished run whose config is unchanged is reused, an unfinished
one is resumed from its last checkpoint, a changed one is trained again.
"""

from __future__ import annotations

import copy
import shutil
import sys
import time
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from ser_toolkit.errors import SertkError
from ser_toolkit.settings import RUNTIME

PRESETS = ("demo", "reference")
IGNORED_FOR_REUSE = RUNTIME  # declared in ser_toolkit.settings


def load_config(preset: str | None, config_file: Path | None) -> dict[str, Any]:
    """A preset and/or a TOML file (the file's values override the preset's), checked by :func:`check`."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    base: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise SertkError(f"unknown preset {preset!r}", f"use one of {', '.join(PRESETS)} or --config FILE")
        base = tomllib.loads(resources.files("ser_toolkit.presets").joinpath(f"{preset}.toml").read_text())
    if config_file is not None:
        try:
            text = Path(config_file).read_text()
        except OSError as exc:
            raise SertkError(f"cannot read config {config_file}: {exc.strerror}", "check the --config path") from None
        try:
            override = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise SertkError(f"{config_file} is not valid TOML ({exc})", "fix the file") from None
        model = override.get("model", {})
        if isinstance(model, Mapping) and "name" in model and model["name"] != base.get("model", {}).get("name"):
            base.pop("model", None)  # another model: its options replace the preset's, never mix with them
        base = merge(base, override)
    if not base:
        raise SertkError("no study described", "pass --preset demo|reference or --config FILE")
    return check(base)


def merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """``b`` over ``a``: tables merge key by key, other values (lists included) replace."""
    out = copy.deepcopy(dict(a))
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else copy.deepcopy(v)
    return out


def check(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Check a study config against the declared schema and the plugins; return it normalised.

    The schema (:func:`ser_toolkit.settings.study_schema`) refuses unknown keys
    (naming the closest known one), wrong types and values; absent keys get their
    defaults, except in ``[training]``, whose defaults depend on the model (see
    :func:`ser_toolkit.settings.resolve`). Every error is one line.
    """
    from ser_toolkit.params import validate
    from ser_toolkit.registry import get
    from ser_toolkit.settings import check_study, resolve, unknown_key

    out = check_study(cfg)
    data, aug = out["data"], out["augmentations"]
    for where, entry in [("[data]", data), *((f"[data] cross[{i}]", c) for i, c in enumerate(data["cross"]))]:
        ds = get("dataset", entry["dataset"]).obj(**entry["options"])  # validates the options
        if ds.needs_root and "root" not in entry:
            raise SertkError(f"{where} dataset '{entry['dataset']}' needs a root (the corpus folder)",
                             f'add root = "PATH" to {where}')
    get("model", out["model"]["name"]).obj(**out["model"]["options"])  # validates the options
    used = [*aug["methods"], aug["control"]]
    for m in used:
        get("augmentation", m)
    for m, options in aug["options"].items():
        if m not in used:
            raise unknown_key(m, used, "[augmentations] options", "options are per method or control")
        if not isinstance(options, Mapping):
            raise SertkError(f"[augmentations] options.{m} must be a table (got {options!r})",
                             f"e.g. {m} = {{ key = value }}")
        validate(get("augmentation", m).obj.params, options, f"augmentation '{m}'")
    training = resolve(out["training"], {"model": out["model"]["name"]})
    if training["early_stopping"] and not training["valid"]:
        raise SertkError("[training] early_stopping needs a validation share", "set valid = 0.1 in [training]")
    out["study"].setdefault("runs_dir", f"runs/{out['name']}")
    out["study"].setdefault("report", f"reports/{out['name']}.md")
    return out


def dump_config(cfg: Mapping[str, Any]) -> str:
    """A study config as TOML (checked first); ``load_config(None, file)`` gives it back equal.

    A comment block lists the ``[training]`` values the config leaves to the
    model's or the declared defaults.
    """
    import tomli_w

    from ser_toolkit.settings import TRAINING, resolve

    cfg = check(cfg)
    resolved = resolve(cfg["training"], {"model": cfg["model"]["name"]})
    implied = {s.name: resolved[s.name] for s in TRAINING if s.name not in cfg["training"]
               and resolved[s.name] is not None}
    head = (f"# sertk study config (sertk study --config FILE); keys: ser_toolkit/settings.py.\n"
            f"# [training] settings not given here take the model's ({cfg['model']['name']}) or the declared "
            f"defaults:\n" + "".join(f"#   {line}\n" for line in tomli_w.dumps(implied).splitlines()))
    return head + "\n" + tomli_w.dumps(cfg)


def _cache(entry: Mapping[str, Any], cache_dir: Path, workers: int) -> Path:
    """Build (or find unchanged) the cache of one corpus entry of the study config ([data] or a cross entry).

    The entry's ``mono``/``dtype``/``resampler``/``max_seconds`` are its cache
    options (unset: the dataset's own defaults); an existing cache built with
    other options is refused, never silently rebuilt.
    """
    from ser_toolkit.cache.build import build_cache, cache_file, preprocess_for
    from ser_toolkit.datasets import check_root
    from ser_toolkit.registry import get

    dataset, root = entry["dataset"], entry.get("root")
    ds = get("dataset", dataset).obj(**entry.get("options", {}))
    if ds.needs_root and not root:
        raise SertkError(f"dataset '{dataset}' needs a root folder in the study config", "set its root")
    path = cache_file(cache_dir, ds.cache_name())
    root_path = check_root(dataset, Path(root), allow_file=ds.root_may_be_file) if ds.needs_root else None
    pre = preprocess_for(ds, entry.get("mono"), entry.get("dtype"), entry.get("resampler"), entry.get("max_seconds"))
    build_cache(ds, root_path, path, pre, workers=workers, quiet=True)
    return path.resolve()


def _seeds(cfg: Mapping[str, Any]) -> list[int]:
    first = int(cfg.get("training", {}).get("seed", 42))
    return [first + i for i in range(int(cfg["study"].get("seeds", 1)))]


def _train_config(cfg: Mapping[str, Any], cache: Path, plugins: list[str], weights: dict | None, seed: int):
    """The run's TrainConfig, resolved like ``sertk train``'s (see :func:`ser_toolkit.settings.resolve`)."""
    from ser_toolkit.training.loop import TrainConfig

    options = cfg["augmentations"].get("options", {})
    return TrainConfig.from_settings(cfg.get("training", {}), {
        "dataset": str(cache), "split": cfg["data"]["split"], "plugins": plugins,
        "plugin_options": {p: dict(options.get(p, {})) for p in plugins}, "weights": weights,
        "model": cfg["model"]["name"], "model_options": dict(cfg["model"].get("options", {})), "seed": seed})


def _comparable(train_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A run's settings without those that do not change what is trained (declared ``runtime``)."""
    return {k: v for k, v in train_cfg.items() if k not in IGNORED_FOR_REUSE}


def _trained_on(run_dir: Path) -> str | None:
    """The content digest of the cache a run trains on (None if it never started)."""
    from ser_toolkit.training import runs

    try:
        return runs.run_info(run_dir)["data"]["cache"]["digest"]
    except (SertkError, KeyError, TypeError):
        return None


def _evaluated(run_dir: Path) -> bool:
    """Whether every default test set has an evaluation of this run on its current data."""
    from ser_toolkit.evaluation import test_sets
    from ser_toolkit.training import runs

    try:
        info = runs.run_info(run_dir)
        for name, reader, _, _ in test_sets(run_dir, None, info):
            e = runs.read_json(run_dir / "eval" / f"{name}.json")
            if e.get("run_id") != info["run_id"] or e.get("data", {}).get("digest") != reader.digest:
                return False
        return (run_dir / "eval" / "summary.json").is_file()
    except (SertkError, AttributeError, KeyError, TypeError):
        return False


def run_model(run_dir: Path, tcfg, log, digest: str) -> str:
    """Train and evaluate one model unless already done on this data (``digest``); returns what happened."""
    from ser_toolkit.evaluation import evaluate_run
    from ser_toolkit.training import runs
    from ser_toolkit.training.loop import train

    wanted = asdict(tcfg)
    state = "trained"
    if (run_dir / "config.json").is_file():
        stored = runs.read_json(run_dir / "config.json").get("train")
        if _comparable(stored or {}) != _comparable(wanted):
            shutil.rmtree(run_dir)
            state = "retrained (config changed)"
        elif _trained_on(run_dir) not in (None, digest):
            shutil.rmtree(run_dir)
            state = "retrained (data changed)"
        elif runs.is_sealed(run_dir):
            state = "reused"
        else:
            state = "resumed"
    if state != "reused":
        resume = state == "resumed" and runs.last_epoch_checkpoint(run_dir) is not None
        if not resume:
            shutil.rmtree(run_dir, ignore_errors=True)
            runs.write_json(run_dir / "config.json", {
                "train": wanted, "commit": runs.git_commit(), "versions": runs.versions(),
                "hardware": runs.hardware(), "command": ["sertk", *sys.argv[1:]],
                "seeds": {"seed": tcfg.seed, "split": tcfg.split},
                "data": {"cache": tcfg.dataset}})
        t = time.perf_counter()
        train(tcfg, run_dir, resume=resume, quiet=True)
        runs.write_json(run_dir / "wall_time.json", {"train_seconds": time.perf_counter() - t})
    if state != "reused" or not _evaluated(run_dir):
        evaluate_run(run_dir, workers=max(1, tcfg.workers))
    log(f"{run_dir.name}: {state}")
    return state


def run_study(cfg: dict[str, Any], log=print) -> Path:
    """Run (or resume) the study described by ``cfg``; returns the report path."""
    from ser_toolkit.augment_sets import build_augmentation, materialize
    from ser_toolkit.augmentations import weights_from_gains
    from ser_toolkit.cache.reader import CacheReader
    from ser_toolkit.combination import gains_from_runs
    from ser_toolkit.report import write_report
    from ser_toolkit.splits import make_split
    from ser_toolkit.training import runs

    t0 = time.perf_counter()
    data, aug = cfg["data"], cfg["augmentations"]
    cache_dir = Path(data.get("cache_dir", "cache"))
    workers = int(cfg.get("training", {}).get("workers", 2))
    runs_dir = Path(cfg["study"].get("runs_dir", f"runs/{cfg.get('name', 'study')}"))
    log("caching corpora")
    cache = _cache(data, cache_dir, workers)
    for cross in data.get("cross", []):
        _cache(cross, cache_dir, workers)
    runs_dir.mkdir(parents=True, exist_ok=True)
    reader = CacheReader(cache)
    assignment = make_split(reader.utterances, data["split"])
    methods = list(aug["methods"])
    options = aug.get("options", {})
    log("materialising augmented test sets")
    for m in methods:
        materialize(reader, assignment, "test", m, build_augmentation([m], options), seed=0,
                    aug_config={"methods": {m: options.get(m, {})}})
    if len(methods) > 1:
        materialize(reader, assignment, "test", "mixed", build_augmentation(methods, options), seed=0,
                    aug_config={"methods": {m: options.get(m, {}) for m in methods}, "weights": "equal"})
    plan: list[dict[str, Any]] = []
    for seed in _seeds(cfg):
        for role, plugins in [("baseline", []), *[("single", [m]) for m in methods],
                              ("control", [aug.get("control", "duplicate")])]:
            name = "baseline" if role == "baseline" else plugins[0]
            run_dir = runs_dir / f"{name}-s{seed}"
            run_model(run_dir, _train_config(cfg, cache, plugins, None, seed), log, reader.digest)
            plan.append({"name": name, "role": role, "seed": seed, "run": str(run_dir), "plugins": plugins})
    # gains -> weights, seed-averaged (gain per method = combined-set F1 minus the baseline's on the same set)
    seeds = _seeds(cfg)
    gains: dict[str, float] = {}
    f1s: dict[str, float] = {}
    base_f1s: dict[str, float] = {}
    for m in methods:
        per_seed = [gains_from_runs(runs_dir / f"baseline-s{s}", [runs_dir / f"{m}-s{s}"]) for s in seeds]
        f1s[m] = sum(p[0][m] for p in per_seed) / len(seeds)
        base_f1s[m] = sum(p[1][m] for p in per_seed) / len(seeds)
        gains[m] = f1s[m] - base_f1s[m]
    combos: dict[str, dict[str, float]] = {}
    positive = [m for m in methods if gains[m] > 0]
    import warnings

    for k in aug.get("top_k", []):
        if k > len(positive):
            log(f"top-{k}: skipped, only {len(positive)} augmentations improve on the baseline")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            combos[f"top{k}"] = weights_from_gains(0.0, gains, top_k=k)
    for name, weights in combos.items():
        for seed in seeds:
            run_dir = runs_dir / f"{name}-s{seed}"
            run_model(run_dir, _train_config(cfg, cache, list(weights), weights, seed), log, reader.digest)
            plan.append({"name": name, "role": "combination", "seed": seed, "run": str(run_dir),
                         "plugins": list(weights), "weights": weights})
    study = {"config": cfg, "runs": plan, "gains": gains, "combined_f1": f1s, "baseline_combined_f1": base_f1s,
             "weights": combos, "cache": str(cache), "split": data["split"], "digest": reader.digest,
             "commit": runs.git_commit(), "versions": runs.versions(), "hardware": runs.hardware(),
             "wall_seconds": time.perf_counter() - t0}
    runs.write_json(runs_dir / "study.json", study)
    report = Path(cfg["study"].get("report", f"reports/{cfg.get('name', 'study')}.md"))
    write_report([runs_dir], report)
    log(f"report: {report}")
    return report
