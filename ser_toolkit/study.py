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

import contextlib
import copy
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from ser_toolkit.errors import SertkError
from ser_toolkit.settings import MIN_GAIN, RUNTIME

PRESETS = ("demo", "reference", "reference-cpu")
IGNORED_FOR_REUSE = RUNTIME  # declared in ser_toolkit.settings


def load_config(preset: str | None, config_file: Path | None,
                overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A study config from layers: a preset < a TOML file < ``overrides`` (the command line); see :func:`check`.

    Tables merge key by key (:func:`merge`). A layer whose ``[model]`` names another
    model replaces the model table (options never mix); the ``overrides``' ``[model]``
    always replaces it. The preset's model-dependent ``[training]`` values (declared
    ``model_default``: epochs, batch_size, lr, weight_decay, schedule, warmup) belong
    to the preset's model: when the model in effect is another one they are dropped,
    so that model's ``train_defaults`` apply unless the user set them (in the file or
    on the command line). The result's ``training_sources`` says where each training
    value comes from (:func:`training_sources`).
    """
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    layers: list[tuple[str, Mapping[str, Any]]] = []
    if preset is not None:
        if preset not in PRESETS:
            raise SertkError(f"unknown preset {preset!r}", f"use one of {', '.join(PRESETS)} or --config FILE")
        layers.append(("preset", tomllib.loads(
            resources.files("ser_toolkit.presets").joinpath(f"{preset}.toml").read_text())))
    if config_file is not None:
        try:
            text = Path(config_file).read_text()
        except OSError as exc:
            raise SertkError(f"cannot read config {config_file}: {exc.strerror}", "check the --config path") from None
        try:
            layers.append(("file", tomllib.loads(text)))
        except tomllib.TOMLDecodeError as exc:
            raise SertkError(f"{config_file} is not valid TOML ({exc})", "fix the file") from None
    if overrides:
        layers.append(("command line", overrides))
    if not any(layer for kind, layer in layers if kind != "command line"):
        raise SertkError("no study described", f"pass --preset {'|'.join(PRESETS)} or --config FILE")
    return check(_layered(layers))


def _layered(layers: list[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """The layers of :func:`load_config` merged, the preset's model-bound training values of another model
    dropped, and ``training_sources`` marking each given training value ``preset`` or ``user``."""
    from ser_toolkit.settings import MODEL_BOUND, SOURCE_ENTRIES, check_table

    def model_name(cfg: Mapping[str, Any]) -> Any:
        model = cfg.get("model")
        return model.get("name") if isinstance(model, Mapping) else None

    cfg: dict[str, Any] = {}
    given: dict[str, str] = {}  # training key -> "preset" | "user"
    bound: dict[str, Any] = {}  # preset training key -> the model it was set for
    for kind, layer in layers:
        layer = dict(layer)
        stored = layer.pop("training_sources", None)  # a saved config's record of its preset values
        if kind != "file" or stored is None:
            stored = {}
        elif isinstance(stored, Mapping):
            stored = check_table(stored, SOURCE_ENTRIES, "[training_sources]", fill=False)
        else:
            raise SertkError(f"[training_sources] must be a table (got {stored!r})",
                             "drop it (sertk writes it with --save-config)")
        model = layer.get("model")
        if isinstance(model, Mapping) and (kind == "command line" or ("name" in model and
                                                                     model["name"] != model_name(cfg))):
            cfg.pop("model", None)  # another model: its options replace the earlier ones, never mix with them
        cfg = merge(cfg, layer)
        training = layer.get("training")
        for key in training if isinstance(training, Mapping) else ():
            if kind == "preset" or stored.get(key) == "preset":
                given[key], bound[key] = "preset", model_name(cfg)
            else:
                given[key] = "user"
                bound.pop(key, None)
    training = cfg.get("training")
    if isinstance(training, dict):
        for key, source in list(given.items()):
            if source == "preset" and key in MODEL_BOUND and bound[key] != model_name(cfg):
                training.pop(key, None)  # the preset's value for its own model: the model in effect brings its own
                del given[key]
    if cfg and given:
        cfg["training_sources"] = given
    return cfg


def training_sources(cfg: Mapping[str, Any]) -> dict[str, str]:
    """Where each ``[training]`` value of a study config comes from, for every study training setting.

    ``"user"`` (the config file or the command line), ``"preset"`` (kept from the
    preset, for its model: the config's ``training_sources`` marks it), ``"model"``
    (the model's ``train_defaults``) or ``"default"`` (the declaration). :func:`check`
    stores it as ``cfg["training_sources"]`` (so study.json records it).
    """
    from ser_toolkit.settings import TRAINING, sources

    stored = cfg.get("training_sources") or {}
    given = {k: "preset" if stored.get(k) == "preset" else "user" for k in cfg.get("training", {})}
    return sources(cfg["model"]["name"], given, [s.name for s in TRAINING])


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
    :func:`ser_toolkit.settings.resolve`); ``training_sources`` is filled in for
    every training setting (:func:`training_sources`). Every error is one line.
    """
    from ser_toolkit.params import validate
    from ser_toolkit.registry import get
    from ser_toolkit.settings import check_study, resolve, unknown_key

    out = check_study(cfg)
    data, aug = out["data"], out["augmentations"]
    for where, entry in [("[data]", data), *((f"[data] cross[{i}]", c) for i, c in enumerate(data["cross"])),
                         *((f"[data] train[{i}]", c) for i, c in enumerate(data["train"]))]:
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
    out["training_sources"] = training_sources(out)
    out["study"].setdefault("runs_dir", f"runs/{out['name']}")
    out["study"].setdefault("report", f"reports/{out['name']}.md")
    return out


def dump_config(cfg: Mapping[str, Any]) -> str:
    """A study config as TOML (checked first); ``load_config(None, file)`` gives it back equal.

    A comment block lists the ``[training]`` values the config leaves to the
    model's or the declared defaults; ``[training_sources]`` keeps which values
    came from the preset (they follow the model: another one drops them).
    """
    import tomli_w

    from ser_toolkit.settings import TRAINING, resolve

    cfg = check(cfg)
    resolved = resolve(cfg["training"], {"model": cfg["model"]["name"]})
    sources = cfg["training_sources"]
    implied = [tomli_w.dumps({s.name: resolved[s.name]}).strip() + ("  (the model's)" if sources[s.name] == "model"
                                                                    else "  (declared)")
               for s in TRAINING if s.name not in cfg["training"] and resolved[s.name] is not None]
    head = (f"# sertk study config (sertk study --config FILE); keys: ser_toolkit/settings.py.\n"
            f"# [training] settings not given here take the model's ({cfg['model']['name']}) or the declared "
            f"defaults:\n" + "".join(f"#   {line}\n" for line in implied)
            + "# [training_sources]: where each value comes from (user, preset, model, default). Values\n"
              "# marked \"preset\" belong to the [model]: another model drops them (\"user\" keeps them).\n")
    return head + "\n" + tomli_w.dumps(cfg)


def _cache(entry: Mapping[str, Any], cache_dir: Path, workers: int, runs_dir: Path) -> Path:
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
    path = cache_file(cache_dir, _cache_name(entry))
    root_path = check_root(dataset, Path(root), allow_file=ds.root_may_be_file) if ds.needs_root else None
    pre = preprocess_for(ds, entry.get("mono"), entry.get("dtype"), entry.get("resampler"), entry.get("max_seconds"))
    build_cache(ds, root_path, path, pre, workers=workers, quiet=True, protect_runs=True, own_runs=runs_dir)
    return path.resolve()


CORPUS_KEYS = ("dataset", "root", "options", "name", "mono", "dtype", "resampler", "max_seconds")
"""The keys of a corpus entry that say which cache it is (a cross entry has these only)."""


def _cache_name(entry: Mapping[str, Any]) -> str:
    """The entry's ``name``, else its dataset's cache name (e.g. savee-reference)."""
    from ser_toolkit.cache.identity import check_name
    from ser_toolkit.registry import get

    if entry.get("name"):
        return check_name(entry["name"])
    return get("dataset", entry["dataset"]).obj(**entry.get("options", {})).cache_name()


def _check_cache_names(data: Mapping[str, Any]) -> None:
    """Two corpus entries of other settings never share a cache (nor a result file): one line naming both."""
    seen: dict[str, tuple[str, dict[str, Any]]] = {}
    for where, entry in [("[data]", data), *((f"[data] cross[{i}]", c) for i, c in enumerate(data.get("cross", [])))]:
        name, keys = _cache_name(entry), {k: entry.get(k) for k in CORPUS_KEYS}
        if name in seen and seen[name][1] != keys:
            raise SertkError(f"{seen[name][0]} and {where} would share the cache '{name}' with other settings",
                             f"give one a name of its own in the study config (name = \"{name}-2\")")
        if name in seen and where != "[data]":
            raise SertkError(f"{where} repeats {seen[name][0]} (cache '{name}')", "list each corpus once")
        seen.setdefault(name, (where, keys))


def corpus_studies(cfg: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """One study config per training corpus: ``[data]`` and each ``[data] train`` entry, in turn.

    Empty when the study trains on ``[data]`` only. Each study's cross-corpus sets
    are the other training corpora (whole) and the declared ``cross`` entries; its
    runs go to ``RUNS_DIR/<cache name>/`` and its report next to the study's
    (``<report stem>-<cache name>.md``). An entry naming the same cache as an
    earlier one is the same corpus (listed once). A ``train`` entry without
    ``split``/``folds`` takes ``[data]``'s, except a ``file:`` split, which names one
    corpus's files: it takes the declared default split.
    """
    from ser_toolkit.settings import SETTINGS

    data = cfg["data"]
    if not data.get("train"):
        return []
    corpora: dict[str, dict[str, Any]] = {}
    for i, entry in enumerate([data, *data["train"]]):
        name = _cache_name(entry)
        if name in corpora:
            if i and {k: entry.get(k) for k in CORPUS_KEYS} != {k: corpora[name].get(k) for k in CORPUS_KEYS}:
                raise SertkError(f"[data] train[{i - 1}] names the cache '{name}' of another training corpus "
                                 "with other settings", "list each corpus once")
            continue
        split = entry.get("split") or (data["split"] if not str(data["split"]).startswith("file:")
                                       else SETTINGS["split"].default)
        corpora[name] = {**{k: entry[k] for k in CORPUS_KEYS if k in entry}, "split": split,
                         "folds": entry.get("folds") or data["folds"]}
    if len(corpora) == 1:
        return []
    cross_only = [c for c in data["cross"] if _cache_name(c) not in corpora]
    runs_dir = Path(cfg["study"]["runs_dir"])
    report = Path(cfg["study"]["report"])
    out = []
    for name, entry in corpora.items():
        sub = copy.deepcopy(dict(cfg))
        others = [{k: v for k, v in e.items() if k in CORPUS_KEYS} for n, e in corpora.items() if n != name]
        sub["name"] = f"{cfg['name']}-{name}"
        sub["data"] = {**entry, "cross": others + copy.deepcopy(cross_only), "train": [],
                       "cache_dir": data["cache_dir"]}
        sub["study"] = {**cfg["study"], "runs_dir": str(runs_dir / name),
                        "report": str(report.with_name(f"{report.stem}-{name}{report.suffix}"))}
        out.append((name, sub))
    return out


def with_cross_matrix(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``cfg`` training on every corpus in turn: each ``[data] cross`` entry becomes a ``train`` entry too
    (``sertk study --cross-matrix``)."""
    out = copy.deepcopy(dict(cfg))
    data = out["data"]
    if not data["cross"] and not data["train"]:
        raise SertkError("--cross-matrix needs more corpora than [data]",
                         "declare them in [data] cross (or train) in the study config")
    data["train"] = [*data["train"], *(copy.deepcopy(c) for c in data["cross"])]
    return check(out)


def _seeds(cfg: Mapping[str, Any]) -> list[int]:
    """The seeds of every model: ``seeds`` of them from the resolved ``[training]`` seed on."""
    from ser_toolkit.settings import resolve

    first = int(resolve(cfg.get("training", {}), {"model": cfg["model"]["name"]})["seed"])
    return [first + i for i in range(int(cfg["study"].get("seeds", 1)))]


def _train_config(cfg: Mapping[str, Any], cache: Path, plugins: list[str], weights: dict | None, seed: int):
    """The run's TrainConfig, resolved like ``sertk train``'s (see :func:`ser_toolkit.settings.resolve`)."""
    from ser_toolkit.training.loop import TrainConfig

    options = cfg["augmentations"].get("options", {})
    return TrainConfig.from_settings(cfg.get("training", {}), {
        "dataset": str(cache), "split": cfg["data"]["split"], "plugins": plugins,
        "plugin_options": {p: dict(options.get(p, {})) for p in plugins}, "weights": weights,
        "model": cfg["model"]["name"], "model_options": dict(cfg["model"].get("options", {})), "seed": seed})


LOCATED = ("dataset", "split")
"""Settings that say where a run's data is: compared by content (the cache's and the split's digests), so a
study moved or copied elsewhere reuses its runs."""


def _comparable(train_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A run's settings without those that do not change what is trained (declared ``runtime``) and without
    the locations of its data (:data:`LOCATED`, compared by digest: :func:`_same_split`, :func:`_trained_on`)."""
    return {k: v for k, v in train_cfg.items() if k not in IGNORED_FOR_REUSE and k not in LOCATED}


def _same_split(run_dir: Path, stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """Whether the run was trained on the parts ``wanted``'s split gives (the same spec, or a split file of the
    same assignment wherever it is now: by the digest the run recorded)."""
    from ser_toolkit.cache.identity import assignment_digest
    from ser_toolkit.cache.reader import CacheReader
    from ser_toolkit.splits import make_split
    from ser_toolkit.training import runs

    if stored.get("split") == wanted.get("split"):
        return True
    try:
        recorded = runs.run_info(run_dir)["data"]["split"]["digest"]
        return assignment_digest(make_split(CacheReader(wanted["dataset"]).utterances, wanted["split"])) == recorded
    except (SertkError, KeyError, TypeError, OSError):
        return False


def _trained_on(run_dir: Path) -> str | None:
    """The content digest of the cache a run trains on (None if it never started)."""
    from ser_toolkit.training import runs

    try:
        return runs.run_info(run_dir)["data"]["cache"]["digest"]
    except (SertkError, KeyError, TypeError):
        return None


def _elsewhere(run_dir: Path) -> list[Path]:
    """Where an earlier study may have placed the run ``run_dir`` will hold: one level up (a study over one
    training corpus, now run with --cross-matrix: RUNS_DIR/<corpus>/RUN) and in the per-corpus folders of a
    study over several (RUNS_DIR/<corpus>/RUN, now run over one)."""
    here = run_dir.parent
    found = [here.parent / run_dir.name]
    if here.is_dir():
        found += [d / run_dir.name for d in sorted(here.iterdir()) if (d / "study.json").is_file()]
    return [p for p in found if p.resolve() != run_dir.resolve()]


def _adopt(run_dir: Path, wanted: Mapping[str, Any], digest: str) -> Path | None:
    """Link (hard links: no bytes copied) a finished run of the same settings, data and split found where an
    earlier study placed it (:func:`_elsewhere`) into ``run_dir``; its folder there stays as it was (every
    file of a run is replaced by rename, never rewritten in place). Returns where it came from, or None."""
    import os

    from ser_toolkit.atomic import remove_stale_tmp, tmp_name
    from ser_toolkit.training import runs

    for other in _elsewhere(run_dir):
        try:
            stored = runs.read_json(other / "config.json").get("train") or {}
            if not runs.is_sealed(other) or _trained_on(other) != digest or \
                    _comparable(stored) != _comparable(wanted) or not _same_split(other, stored, wanted):
                continue
            runs.check_run(other)  # intact: its seal vouches for its weights and records
        except (SertkError, OSError, AttributeError, TypeError):
            continue
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(run_dir.parent, f"{run_dir.name}.adopt")
        tmp = tmp_name(run_dir.with_name(f"{run_dir.name}.adopt"))

        def link(src: str, dst: str) -> None:
            try:
                os.link(src, dst)
            except OSError:  # another file system: a copy
                shutil.copy2(src, dst)

        shutil.copytree(other, tmp, copy_function=link,
                        ignore=shutil.ignore_patterns("*.tmp-*", runs.STATE_GLOB))
        os.replace(tmp, run_dir)
        return other
    return None


def _evaluated(run_dir: Path, specs: list[str] | None, cross: list[str], folder: str = "eval") -> bool:
    """Whether every set of ``specs`` has an evaluation of this run on its current data in ``folder``."""
    from ser_toolkit.evaluation import check_evaluation, test_sets
    from ser_toolkit.training import runs

    try:
        info = runs.run_info(run_dir)
        sealed = set(check_evaluation(run_dir / folder, info["run_id"]))  # intact, as the evaluation wrote it
        for name, reader, _, _ in test_sets(run_dir, specs, info, cross=cross):
            e = runs.read_json(run_dir / folder / f"{name}.json")
            if name not in sealed or e.get("run_id") != info["run_id"] or \
                    e.get("data", {}).get("digest") != reader.digest:
                return False
        return True
    except (SertkError, AttributeError, KeyError, TypeError):
        return False


def run_model(run_dir: Path, tcfg, log, digest: str, selection: bool = False,
              command: list[str] | None = None, oom_retry: bool = False) -> str:
    """Train and evaluate one model unless already done on this data (``digest``); returns what happened.

    Test and the declared cross sets go to ``RUN/eval/``; with ``selection`` the validation part and its
    augmented versions go to ``RUN/selection/`` (used for gains and weights, never reported as test).
    ``log``: a :class:`ser_toolkit.progress.StudyProgress` (it gets the epochs and the evaluation; its
    ``model_end`` says what happened), or a plain function (it gets ``RUN: STATE``). ``command``: the
    command line recorded in the run's config (default: this process's). ``oom_retry``: after an
    out-of-memory error, train the run again once with half the batch (:func:`halved`); its ``config.json``
    records the settings it trained with and, as ``planned``, those the study asked for, so a rerun reuses it.
    The model just trained is evaluated in memory; a reused run is loaded once for all its sets.
    """
    from ser_toolkit.errors import OutOfMemory
    from ser_toolkit.evaluation import evaluate_run, load_run_model
    from ser_toolkit.memory import STUDY_EVAL_FIX
    from ser_toolkit.progress import StudyProgress, as_reporter
    from ser_toolkit.training import runs
    from ser_toolkit.training.loop import TrainConfig

    progress = as_reporter(log)
    wanted = asdict(tcfg)
    state = "trained"
    adopted = None if (run_dir / "config.json").is_file() else _adopt(run_dir, wanted, digest)
    if (run_dir / "config.json").is_file():
        record = runs.read_json(run_dir / "config.json")
        stored = record.get("train") if isinstance(record, dict) else None
        planned = record.get("planned") if isinstance(record, dict) else None
        same = (_comparable(stored or {}) == _comparable(wanted) or _comparable(planned or {}) == _comparable(wanted))
        if not same or not _same_split(run_dir, planned or stored or {}, wanted):
            shutil.rmtree(run_dir)
            state = "retrained (config changed)"
        elif _trained_on(run_dir) not in (None, digest):
            shutil.rmtree(run_dir)
            state = "retrained (data changed)"
        elif runs.is_sealed(run_dir):
            state = "reused"
        else:
            state = "resumed"
        if state in ("reused", "resumed") and planned is not None:  # retried after running out of memory
            tcfg = TrainConfig(**{**stored, **{k: v for k, v in wanted.items()
                                               if k in IGNORED_FOR_REUSE or k in LOCATED}})
    trained = None
    if state != "reused":
        resume = state == "resumed" and runs.last_epoch_checkpoint(run_dir) is not None
        retry = None
        t = time.perf_counter()
        try:
            trained = _train_run(run_dir, tcfg, resume, command, progress)
        except OutOfMemory as exc:
            retry = halved(tcfg) if oom_retry else None
            if retry is None:
                raise
            message = exc.message
        if retry is not None:  # outside the handler: the failed attempt's model and optimizer are freed first
            _release_device_memory()
            progress(f"{run_dir.name}: {message}; retrying once with "
                     + ", ".join(f"{k} {getattr(tcfg, k)} -> {getattr(retry, k)}" for k in ("batch_seconds",
                                 "batch_size") if getattr(tcfg, k) != getattr(retry, k)))
            try:
                trained = _train_run(run_dir, retry, False, command, progress, planned=wanted)
            except OutOfMemory as exc:  # once only: the study stops at this run
                from ser_toolkit.memory import TRAIN_FIX_RETRY

                again = OutOfMemory(f"{exc.message} (after the retry with half the batch)",
                                    (exc.hint or "").replace(TRAIN_FIX_RETRY, ""), exc.batch)
            else:
                again = None
            if again is not None:
                raise again
            state += " (retried with half the batch)"
        train_seconds = time.perf_counter() - t
    selection_sets = ["valid", "valid-augmented"]
    todo = [(specs, cross, folder) for specs, cross, folder, asked in [
        (None, tcfg.cross, "eval", True), (selection_sets, [], "selection", selection)]
        if asked and (state != "reused" or not _evaluated(run_dir, specs, cross, folder))]
    try:
        # the model trained just now, in memory (no rebuild, no second hash), evaluated while its weights are
        # written and the run sealed; a reused run: loaded (seal checked, weights hashed) once for every set
        loaded = trained.loaded if trained is not None else load_run_model(run_dir) if todo else None
        for specs, cross, folder in todo:
            if folder == "eval":
                progress.evaluating()
            evaluate_run(run_dir, specs, workers=max(1, tcfg.workers), cross=cross, folder=folder, loaded=loaded,
                         fix=STUDY_EVAL_FIX.replace("{run}", str(run_dir)))
    except BaseException:
        if trained is not None:  # the seal is still written; the first error is the one shown
            with contextlib.suppress(BaseException):
                trained.sealed()
        raise
    if trained is not None:
        trained.sealed()  # the run is finished only now (an error of the write is raised here)
        runs.write_json(run_dir / "wall_time.json", {"train_seconds": train_seconds})
    if state == "reused" and adopted is not None:
        state = f"reused (from {adopted})"
    if not isinstance(log, StudyProgress):
        log(f"{run_dir.name}: {state}")
    return state


def _train_run(run_dir: Path, tcfg, resume: bool, command: list[str] | None, progress,
               planned: dict[str, Any] | None = None):
    """Start (config.json first) or resume the run; the trained model in memory, as evaluation loads it, its
    seal still being written (:class:`ser_toolkit.training.loop.Trained`)."""
    from ser_toolkit.training import runs
    from ser_toolkit.training.loop import train_model

    if not resume:
        shutil.rmtree(run_dir, ignore_errors=True)
        runs.write_run_config(run_dir, tcfg, tcfg.dataset, command or ["sertk", *sys.argv[1:]],
                              extra={"planned": planned} if planned is not None else None)
    return train_model(tcfg, run_dir, resume=resume, quiet=True, on_epoch=progress.epoch, keep=True)


def halved(tcfg):
    """``tcfg`` with half the batch: half ``batch_seconds`` when batches are formed by seconds, else half
    ``batch_size``; None when the batch is a single utterance already."""
    import dataclasses

    if tcfg.batch_seconds:
        return dataclasses.replace(tcfg, batch_seconds=tcfg.batch_seconds / 2)
    if tcfg.batch_size > 1:
        return dataclasses.replace(tcfg, batch_size=tcfg.batch_size // 2)
    return None


def _release_device_memory() -> None:
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _study_split(reader, split: str, study: Mapping[str, Any], runs_dir: Path,
                 tag: str = "") -> tuple[str, dict[str, str]]:
    """The split every run of the study (of one fold) uses: the declared split, plus (selection on
    validation) a validation part carved from its training part, written to ``RUNS_DIR/split<tag>.csv``
    and used as ``file:`` so that every model, seed and evaluation sees the same parts."""
    from ser_toolkit import atomic
    from ser_toolkit.splits import make_split, parse_spec
    from ser_toolkit.training.loop import carve_validation

    assignment = make_split(reader.utterances, split)
    if study.get("selection", "validation") != "validation":
        return split, assignment
    train = [u for u in reader.utterances if assignment[u.id] == "train"]
    seed = int(parse_spec(split)[1].get("seed", 42)) if not split.startswith("file:") else 42
    assignment.update(carve_validation(train, float(study.get("valid", 0.2)), seed))
    path = runs_dir / f"split{tag}.csv"
    text = "utterance,split\n" + "".join(f"{u.id},{assignment[u.id]}\n" for u in reader.utterances)
    if not path.is_file() or path.read_text() != text:
        atomic.write_text(path, text)
    return f"file:{path.resolve()}", assignment


def _wall_times(study_json: Path, seconds: float, counts: Mapping[str, int]) -> dict[str, Any]:
    """study.json's wall-time keys for this invocation (``seconds``, ``counts`` of its runs by state),
    keeping what an earlier invocation recorded in ``study_json``.

    ``wall_seconds``: the latest invocation that trained (trained, resumed or retrained a run); one that
    reused every run keeps the recorded value. ``wall_seconds_first``: the first recorded invocation's;
    ``wall_seconds_last``: this one's; ``invocations``: every invocation (finished, seconds, counts).
    """
    import datetime
    import json

    try:
        old = json.loads(study_json.read_text())
        old = old if isinstance(old, dict) else {}
    except (OSError, ValueError):
        old = {}
    history = [i for i in old.get("invocations") or [] if isinstance(i, dict)]
    if not history and isinstance(old.get("wall_seconds"), (int, float)):
        history = [{"finished": None, "seconds": old["wall_seconds"]}]  # a study.json from before the history
    history.append({"finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "seconds": seconds, **counts})
    trained = counts.get("runs", 0) > counts.get("reused", 0)
    wall = old.get("wall_seconds")
    return {"wall_seconds": seconds if trained or not isinstance(wall, (int, float)) else wall,
            "wall_seconds_first": history[0]["seconds"], "wall_seconds_last": seconds, "invocations": history}


def run_study(cfg: dict[str, Any], log=print) -> Path:
    """Run (or resume) the study described by ``cfg``; returns the report path.

    With more training corpora (``[data] train``) the protocol of :func:`run_protocol`
    runs on each in turn (:func:`corpus_studies`), and the report is the train x test
    corpus matrix (:mod:`ser_toolkit.report.matrix`) with a link to each corpus's report.
    Every corpus is cached and its held-out sets made first, so that the number of runs
    is known before the first one trains.

    ``log``: a :class:`ser_toolkit.progress.StudyProgress` (``sertk study``'s), or a plain
    function that gets one line per event (default: print); a table of every model ends it.
    """
    from ser_toolkit.progress import as_reporter

    from ser_toolkit.atomic import destination

    progress = as_reporter(log)
    destination(Path(cfg["study"]["report"]))  # a report path that cannot be written is refused before any run
    try:
        report = _run_study(cfg, progress)
    except BaseException:
        progress.close()
        raise
    progress.print_table()
    return report


def _run_study(cfg: dict[str, Any], progress) -> Path:
    from ser_toolkit.report.matrix import write_matrix_report
    from ser_toolkit.training import runs

    t0 = time.perf_counter()
    studies = corpus_studies(cfg)
    if not studies:
        prepared = _prepare(cfg, progress)
        _phase_train(progress)
        return _execute(prepared, progress)
    preps = []
    for i, (name, sub) in enumerate(studies):
        progress.training_corpus(name, i + 1, len(studies), announce=False)
        preps.append(_prepare(sub, progress))
    progress.training_corpus(None, 0, len(studies), announce=False)
    _phase_train(progress)
    done = []
    for i, ((name, sub), prepared) in enumerate(zip(studies, preps)):
        progress.training_corpus(name, i + 1, len(studies))
        done.append({"corpus": name, "runs_dir": sub["study"]["runs_dir"],
                     "report": str(_execute(prepared, progress).resolve())})
    progress.training_corpus(None, 0, len(studies), announce=False)
    runs_dir = Path(cfg["study"]["runs_dir"])
    runs_dir.mkdir(parents=True, exist_ok=True)
    runs.write_json(runs_dir / "study.json", {
        "config": cfg, "matrix": done, "commit": runs.git_commit(), "versions": runs.versions(),
        "hardware": runs.hardware(),
        **_wall_times(runs_dir / "study.json", time.perf_counter() - t0, progress.counts())})
    progress.phase("report", f"writing the matrix report {cfg['study']['report']}")
    report = write_matrix_report(runs_dir, Path(cfg["study"]["report"]))
    progress.report(report)
    return report


def _phase_train(progress) -> None:
    progress.phase("train", f"{progress.planned} models planned" + (
        " (+ the top-k models, chosen after the single-method gains)" if progress.pending_topk else ""))


def run_protocol(cfg: dict[str, Any], log=print) -> Path:
    """Run (or resume) the protocol on the one training corpus ``[data]``; returns the report path.

    Selection never touches test (unless ``[study] selection = "test"``, the
    reference study's biased choice, flagged in the report): gains, weights and
    the Top-k choice come from the validation part, each method's model against
    the reference model (``control`` by default: the clean x2 model with as many
    steps) on clean + its own augmented validation set. Test and the declared
    cross-corpus sets are evaluated for every model and used for nothing else.
    ``log``: as for :func:`run_study`.
    """
    from ser_toolkit.progress import as_reporter

    progress = as_reporter(log)
    prepared = _prepare(cfg, progress)
    _phase_train(progress)
    return _execute(prepared, progress)


@dataclass
class _Prepared:
    """A training corpus's protocol, ready to train: its caches, held-out sets and folds (:func:`_prepare`)."""

    cfg: dict[str, Any]
    corpus: str | None  # the training corpus's name when the study has several
    cache: Path
    cross: list[str]
    reader: Any
    runs_dir: Path
    part: str  # the selection part: valid or test
    folds: list[tuple[str, int | None, str]]  # (tag for run names, fold index or None, the fold's split)
    seeds: list[int]
    seconds: float  # spent preparing


def _prepare(cfg: dict[str, Any], progress) -> _Prepared:
    """Cache the corpora and materialise the held-out sets of one training corpus; plan its runs."""
    from ser_toolkit.augment_sets import materialize_heldout
    from ser_toolkit.cache.reader import CacheReader
    from ser_toolkit.splits import fold_specs

    t0 = time.perf_counter()
    data, aug, study_cfg = cfg["data"], cfg["augmentations"], cfg["study"]
    cache_dir = Path(data.get("cache_dir", "cache"))
    workers = int(cfg.get("training", {}).get("workers", 2))
    runs_dir = Path(study_cfg.get("runs_dir") or f"runs/{cfg.get('name', 'study')}")
    selection = study_cfg.get("selection", "validation")
    _check_cache_names(data)
    progress.phase("cache", "caching corpora (" + ", ".join(
        _cache_name(e) for e in [data, *data.get("cross", [])]) + ")")
    cache = _cache(data, cache_dir, workers, runs_dir)
    cross = [str(_cache(c, cache_dir, workers, runs_dir)) for c in data.get("cross", [])]
    runs_dir.mkdir(parents=True, exist_ok=True)
    reader = CacheReader(cache)
    methods = list(aug["methods"])
    options = aug.get("options", {})
    part = "valid" if selection == "validation" else "test"
    specs = fold_specs(data["split"], reader.utterances) if data.get("folds") == "all" else [data["split"]]
    folds = []
    for f, spec in enumerate(specs):
        tag = f"-f{f}" if len(specs) > 1 else ""
        split, assignment = _study_split(reader, spec, study_cfg, runs_dir, tag)
        progress.phase("materialise", f"augmented held-out sets{f' (fold {f})' if tag else ''}")
        materialize_heldout(reader, assignment, "test", methods, options, seed=0, log=progress)
        if part == "valid":
            materialize_heldout(reader, assignment, "valid", methods, options, seed=0, log=progress)
        folds.append((tag, f if tag else None, split))
    seeds = _seeds(cfg)
    progress.plan(len(folds) * len(seeds) * (len(methods) + 2), topk_pending=bool(aug.get("top_k")))
    return _Prepared(cfg, progress.corpus if progress.corpora > 1 else None, cache, cross, reader, runs_dir,
                     part, folds, seeds, time.perf_counter() - t0)


def _execute(prepared: _Prepared, progress) -> Path:
    """Train and evaluate a prepared training corpus's models, choose its Top-k, write its study.json and report."""
    import dataclasses
    import warnings

    from ser_toolkit.augmentations import weights_from_gains
    from ser_toolkit.combination import PARTS, gains_from_runs
    from ser_toolkit.executors import RunTask, describe, run_tasks
    from ser_toolkit.report import write_report
    from ser_toolkit.training import runs

    t0 = time.perf_counter() - prepared.seconds
    cfg, cache, cross, reader, runs_dir, part, folds, seeds = (
        prepared.cfg, prepared.cache, prepared.cross, prepared.reader, prepared.runs_dir, prepared.part,
        prepared.folds, prepared.seeds)
    data, aug, study_cfg = cfg["data"], cfg["augmentations"], cfg["study"]
    methods = list(aug["methods"])
    reference = study_cfg.get("reference", "control")

    command = ["sertk", *sys.argv[1:]]

    def task(name: str, role: str, plugins: list[str], weights: dict | None, seed: int, fold) -> RunTask:
        tag, index, split = fold
        run_dir = (runs_dir / f"{name}{tag}-s{seed}").resolve()
        tcfg = dataclasses.replace(_train_config(cfg, cache, plugins, weights, seed), split=split, cross=cross)
        plan.append({"name": name, "role": role, "seed": seed, "run": str(runs_dir / run_dir.name),
                     "plugins": plugins, **({"weights": weights} if weights else {}),
                     **({"fold": index} if index is not None else {})})
        return RunTask(str(run_dir), asdict(tcfg), reader.digest, part == "valid" and role != "combination",
                       name, seed, index, tuple(command), bool(study_cfg.get("oom_retry", False)))

    plan: list[dict[str, Any]] = []
    control = aug.get("control", "duplicate")
    first_wave = [task("baseline" if role == "baseline" else plugins[0], role, plugins, None, seed, fold)
                  for fold in folds for seed in seeds
                  for role, plugins in [("baseline", []), *[("single", [m]) for m in methods], ("control", [control])]]
    if study_cfg.get("executor", "local") != "local" or int(study_cfg.get("jobs", 1)) > 1:
        progress(f"runs: {describe(study_cfg)}")
    run_tasks(first_wave, study_cfg, runs_dir, progress)
    # gains -> weights, averaged over seeds and folds: each method's model against the reference model of the
    # same seed and fold, on clean + that method's augmented set of the selection part (validation unless the
    # reference mode is asked)
    ref_name = "baseline" if reference == "baseline" else control
    pairs = [(f"{tag}-s{s}") for tag, _, _ in folds for s in seeds]
    gains: dict[str, float] = {}
    f1s: dict[str, float] = {}
    base_f1s: dict[str, float] = {}
    progress.phase("gains", f"single-method gains against the {ref_name} model on the "
                            f"{'validation' if part == 'valid' else 'test'} part")
    usable = [m for m in methods if all((runs_dir / f"{m}{p}" / PARTS[part] / f"{part}-{m}.predictions.csv")
                                        .is_file() for p in pairs)]
    for m in usable:
        each = [gains_from_runs(runs_dir / f"{ref_name}{p}", [runs_dir / f"{m}{p}"], part) for p in pairs]
        f1s[m] = sum(e[0][m] for e in each) / len(pairs)
        base_f1s[m] = sum(e[1][m] for e in each) / len(pairs)
        gains[m] = f1s[m] - base_f1s[m]
    combos: dict[str, dict[str, float]] = {}
    min_gain = float(aug.get("min_gain", MIN_GAIN))
    positive = [m for m in usable if gains[m] > 0 and gains[m] >= min_gain]
    for k in aug.get("top_k", []):
        if k > len(positive):
            n = len(positive)
            progress(f"top-{k}: skipped, {'only ' if n else ''}{n or 'no'} augmentation{'' if n == 1 else 's'} "
                     f"gain{'s' if n == 1 else ''} at least {min_gain:g} (min_gain) over the {ref_name} model")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            combos[f"top{k}"] = weights_from_gains(0.0, gains, top_k=k, min_gain=min_gain)
    if aug.get("top_k"):
        progress.topk_known(len(combos) * len(folds) * len(seeds))
        more = len(combos) * len(folds) * len(seeds)
        progress(f"top-k models: {', '.join(combos) or 'none'}; {more} more run{'' if more == 1 else 's'}, "
                 f"{progress.planned} planned")
    run_tasks([task(name, "combination", list(weights), weights, seed, fold)
               for name, weights in combos.items() for fold in folds for seed in seeds], study_cfg, runs_dir, progress)
    study = {"config": cfg, "runs": plan, "gains": gains, "combined_f1": f1s, "baseline_combined_f1": base_f1s,
             "weights": combos, "cache": str(cache), "split": data["split"], "digest": reader.digest,
             "cross": cross, "folds": [{"fold": i, "split": s} for _, i, s in folds] if len(folds) > 1 else None,
             "selection": {"set": "validation" if part == "valid" else "test", "reference": reference,
                           "reference_model": ref_name, "metric": "weighted F1 on clean + the method's own "
                           "augmented " + ("validation" if part == "valid" else "test") + " set",
                           "min_gain": min_gain,
                           "valid_share": study_cfg.get("valid") if part == "valid" else None,
                           "split_files": [s for _, _, s in folds] if part == "valid" else None},
             "commit": runs.git_commit(), "versions": runs.versions(), "hardware": runs.hardware(),
             **_wall_times(runs_dir / "study.json", time.perf_counter() - t0, progress.counts(prepared.corpus))}
    runs.write_json(runs_dir / "study.json", study)
    report = Path(study_cfg.get("report") or f"reports/{cfg.get('name', 'study')}.md")
    progress.phase("report", f"writing {report}")
    write_report([runs_dir], report)
    progress.report(report)
    return report
