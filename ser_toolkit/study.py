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
from dataclasses import asdict, fields
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from ser_toolkit.errors import SertkError

PRESETS = ("demo", "reference")
IGNORED_FOR_REUSE = {"workers", "device", "log_every", "compile"}


def load_config(preset: str | None, config_file: Path | None) -> dict[str, Any]:
    """A preset and/or a TOML file (the file's values override the preset's)."""
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
        if "name" in model and model["name"] != base.get("model", {}).get("name"):
            base.pop("model", None)  # another model: its options replace the preset's, never mix with them
        base = merge(base, override)
    if not base:
        raise SertkError("no study described", "pass --preset demo|reference or --config FILE")
    check(base)
    return base


def merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(a))
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else copy.deepcopy(v)
    return out


def check(cfg: Mapping[str, Any]) -> None:
    from ser_toolkit.registry import get
    from ser_toolkit.training.loop import TrainConfig

    for section in ("data", "model", "augmentations", "study"):
        if section not in cfg:
            raise SertkError(f"study config lacks the [{section}] section", "start from a preset (sertk study --preset demo)")
    get("dataset", cfg["data"]["dataset"])
    for cross in cfg["data"].get("cross", []):
        get("dataset", cross["dataset"])
    get("model", cfg["model"]["name"]).obj(**cfg["model"].get("options", {}))  # validates the options
    for m in [*cfg["augmentations"]["methods"], cfg["augmentations"].get("control", "duplicate")]:
        get("augmentation", m)
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(cfg.get("training", {})) - known
    if unknown:
        raise SertkError(f"unknown [training] setting {sorted(unknown)[0]!r}", "see 'sertk train --help'")
    seeds = cfg["study"].get("seeds", 1)
    if not isinstance(seeds, int) or seeds < 1:
        raise SertkError(f"[study] seeds must be a positive integer (got {seeds!r})", "e.g. seeds = 3")


def _cache(dataset: str, options: Mapping[str, Any], root: str | None, cache_dir: Path, workers: int) -> Path:
    from ser_toolkit.cache.build import build_cache
    from ser_toolkit.datasets import check_root
    from ser_toolkit.registry import get

    ds = get("dataset", dataset).obj(**options)
    path = cache_dir / f"{ds.cache_name()}.h5"
    root_path = check_root(dataset, Path(root), allow_file=ds.root_may_be_file) if ds.needs_root else None
    if ds.needs_root and not root:
        raise SertkError(f"dataset '{dataset}' needs a root folder in the study config", "set data.root")
    build_cache(ds, root_path, path, workers=workers, quiet=True)
    return path.resolve()


def _seeds(cfg: Mapping[str, Any]) -> list[int]:
    first = int(cfg.get("training", {}).get("seed", 42))
    return [first + i for i in range(int(cfg["study"].get("seeds", 1)))]


def _train_config(cfg: Mapping[str, Any], cache: Path, plugins: list[str], weights: dict | None, seed: int):
    from ser_toolkit.registry import get
    from ser_toolkit.training.loop import TrainConfig

    plugin = get("model", cfg["model"]["name"]).obj
    training = dict(cfg.get("training", {}))
    defaults = {"epochs": 7, "batch_size": 8, "lr": 1e-5, "weight_decay": 0.01, **plugin.train_defaults}
    for k, v in defaults.items():
        training.setdefault(k, v)
    training["seed"] = seed
    options = cfg["augmentations"].get("options", {})
    return TrainConfig(dataset=str(cache), split=cfg["data"]["split"], plugins=plugins,
                       plugin_options={p: dict(options.get(p, {})) for p in plugins}, weights=weights,
                       model=cfg["model"]["name"], model_options=dict(cfg["model"].get("options", {})),
                       **training)


def _comparable(train_cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in train_cfg.items() if k not in IGNORED_FOR_REUSE}


def run_model(run_dir: Path, tcfg, log) -> str:
    """Train and evaluate one model unless already done; returns what happened."""
    from ser_toolkit.evaluation import evaluate_run
    from ser_toolkit.training import runs
    from ser_toolkit.training.loop import train

    wanted = asdict(tcfg)
    state = "trained"
    if (run_dir / "config.json").is_file():
        stored = runs.read_json(run_dir / "config.json")["train"]
        if _comparable(stored) != _comparable(wanted):
            shutil.rmtree(run_dir)
            state = "retrained (config changed)"
        elif (run_dir / "train_summary.json").is_file():
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
    if not (run_dir / "eval" / "summary.json").is_file() or state != "reused":
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
    runs_dir.mkdir(parents=True, exist_ok=True)
    log("caching corpora")
    cache = _cache(data["dataset"], data.get("options", {}), data.get("root"), cache_dir, workers)
    for cross in data.get("cross", []):
        _cache(cross["dataset"], cross.get("options", {}), cross.get("root"), cache_dir, workers)
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
            run_model(run_dir, _train_config(cfg, cache, plugins, None, seed), log)
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
            run_model(run_dir, _train_config(cfg, cache, list(weights), weights, seed), log)
            plan.append({"name": name, "role": "combination", "seed": seed, "run": str(run_dir),
                         "plugins": list(weights), "weights": weights})
    study = {"config": cfg, "runs": plan, "gains": gains, "combined_f1": f1s, "baseline_combined_f1": base_f1s,
             "weights": combos, "cache": str(cache), "split": data["split"],
             "commit": runs.git_commit(), "versions": runs.versions(), "hardware": runs.hardware(),
             "wall_seconds": time.perf_counter() - t0}
    runs.write_json(runs_dir / "study.json", study)
    report = Path(cfg["study"].get("report", f"reports/{cfg.get('name', 'study')}.md"))
    write_report([runs_dir], report)
    log(f"report: {report}")
    return report
