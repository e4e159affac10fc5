"""Every training and study setting, declared once: type, default, allowed values, help.

- :data:`TRAIN_SETTINGS` declares the fields of
  :class:`ser_toolkit.training.loop.TrainConfig` (saved in ``RUN/config.json``);
  ``sertk train`` generates its options from it and a study's ``[training]``
  section accepts the settings marked ``study``.
- :func:`study_schema` declares every section and key of a study config.
- :func:`resolve` is the one place defaults are applied: declaration < the
  model plugin's ``train_defaults`` < each given layer (config file, command line);
  :func:`sources` says where each resolved value came from (:data:`SOURCES`).
- :data:`MODEL_BOUND`: the settings that belong to the model (``model_default``);
  a study preset's values of these are dropped when another model is chosen.

No heavy imports here: ``sertk --help`` builds the ``train`` options from this module.
"""

from __future__ import annotations

import copy
import difflib
import functools
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from ser_toolkit.errors import ParameterError, PluginError, SertkError
from ser_toolkit.params import Param

_KIND = {"int": "an int", "float": "a number", "str": "a string", "path": "a path", "bool": "true or false",
         "table": "a table"}
_PLURAL = {"int": "ints", "float": "numbers", "str": "strings", "path": "paths", "bool": "booleans",
           "table": "tables"}


def _is(base: str, value: Any) -> bool:
    """Whether ``value`` already has the declared type (config files: ``"7"`` is not an int)."""
    if isinstance(value, bool):
        return base == "bool"
    return isinstance(value, {"int": int, "float": (int, float), "str": str, "path": str, "bool": bool,
                              "table": Mapping}[base])


@dataclass(frozen=True)
class Setting(Param):
    """A :class:`Param` with the few extra facts a training or study setting needs.

    ``type`` may also be ``table`` (a dict / TOML table, its keys checked against
    ``entries`` when given) or ``list[table]``. ``min_exclusive``/``max_exclusive``
    make the bounds strict; ``pattern`` (a regex, described by ``allowed_text``)
    restricts strings; ``required``: a config must give it. ``flag``: the
    ``sertk train`` option ('' = ``--name-with-dashes``); ``generated``: ``sertk train``
    builds that option from this declaration (else it is hand-written); ``study``:
    allowed in a study's ``[training]``; ``runtime``: does not change the result
    (may differ on ``--resume``, ignored when a study reuses a run); ``model_default``:
    model plugins commonly replace the default (``train_defaults``), and a study
    preset's value belongs to the preset's model (:data:`MODEL_BOUND`); ``fill``: a
    table's absent keys get their defaults.
    """

    min_exclusive: bool = False
    max_exclusive: bool = False
    pattern: Optional[str] = None
    allowed_text: Optional[str] = None
    required: bool = False
    entries: Optional[tuple] = None
    flag: str = ""
    generated: bool = True
    study: bool = True
    runtime: bool = False
    model_default: bool = False
    fill: bool = True

    @property
    def option(self) -> str:
        """The ``sertk train`` flag of this setting."""
        return self.flag or "--" + self.name.replace("_", "-")

    def allowed(self) -> str:
        """Human description of the allowed values, e.g. ``an int >= 1``."""
        if self.allowed_text:
            return self.allowed_text
        if self.choices is not None:
            text = "one of " + ", ".join(str(c) for c in self.choices)
            return f"a list of {_PLURAL[self.base_type]}, each {text}" if self.is_list else text
        kind = f"a list of {_PLURAL[self.base_type]}" if self.is_list else _KIND[self.base_type]
        bounds = []
        if self.min is not None:
            bounds.append(f"{'>' if self.min_exclusive else '>='} {self.min:g}")
        if self.max is not None:
            bounds.append(f"{'<' if self.max_exclusive else '<='} {self.max:g}")
        return kind + (" " + " and ".join(bounds) if bounds else "")

    def _check(self, value: Any, owner: str) -> Any:
        super()._check(value, owner)
        bad = (self.min_exclusive and self.min is not None and value <= self.min) or (
            self.max_exclusive and self.max is not None and value >= self.max) or (
            self.pattern is not None and re.fullmatch(self.pattern, str(value)) is None)
        if bad:
            raise ParameterError(f"{owner}: parameter '{self.name}' must be {self.allowed()} (got {value!r})",
                                 "fix the value")
        return value

    def check(self, value: Any, label: str, strict: bool = False, hint: str = "fix the value") -> Any:
        """``value`` converted and checked, or a one-line error ``{label} must be {allowed} (got ...)``.

        ``strict`` (config files): no conversion between types, so ``epochs = "7"`` is refused.
        """

        def fail(what: str = "") -> ParameterError:
            return ParameterError(what or f"{label} must be {self.allowed()} (got {value!r})", hint)

        if value is None:
            if self.nullable or self.default is None:
                return None
            raise fail()
        base = self.base_type
        if self.is_list:
            if isinstance(value, str) and not strict and base != "table":
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)) or not all(_is(base, v) or not strict for v in value):
                raise fail()
            if not value:
                if self.default == []:
                    return []
                raise fail(f"{label} must not be empty")
        elif strict and not _is(base, value):
            raise fail()
        if base == "table":
            if self.is_list:
                if not all(isinstance(v, Mapping) for v in value):
                    raise fail()
                return [check_table(v, self.entries, f"{label}[{i}]", hint) if self.entries is not None
                        else copy.deepcopy(dict(v)) for i, v in enumerate(value)]
            if not isinstance(value, Mapping):
                raise fail()
            if self.entries is None:
                return copy.deepcopy(dict(value))
            return check_table(value, self.entries, label, hint, fill=self.fill)
        try:
            return Param.validate(self, value, label)
        except ParameterError:
            raise fail() from None


def unknown_key(key: str, known: Iterable[str], where: str, hint: str = "") -> SertkError:
    """``unknown key 'splt' in [data]; did you mean 'split'?`` (or the known keys)."""
    known = list(known)
    close = difflib.get_close_matches(key, known, n=1)
    fix = f"did you mean {close[0]!r}?" if close else "known keys: " + (", ".join(known) or "none")
    place = where if where.startswith("at ") else f"in {where}"
    return SertkError(f"unknown key {key!r} {place}", fix + (f" ({hint})" if hint else ""))


def check_table(values: Mapping[str, Any], keys: Sequence[Setting], where: str, hint: str = "fix the config",
                fill: bool = True) -> dict[str, Any]:
    """A config table checked against its declared ``keys`` (strict types), in declaration order.

    Unknown keys are refused with the closest known one; absent keys take their
    defaults when ``fill`` (absent ``None`` defaults stay absent: TOML has no null).
    """
    known = {k.name: k for k in keys}
    for key in values:
        if key not in known:
            raise unknown_key(key, known, where)
    out: dict[str, Any] = {}
    for s in keys:
        label = f"{where} {s.name}"
        if s.name in values:
            value = s.check(values[s.name], label, strict=True, hint=hint)
        elif s.required:
            raise SertkError(f"{where} lacks {s.name!r}", f"add {s.name} = ... ({s.help})")
        elif fill and s.default is not None:
            value = s.check(copy.deepcopy(s.default), label, strict=True, hint=hint)
        else:
            continue
        if value is not None:
            out[s.name] = value
    return out


def available_cpus(most: int = 8) -> int:
    """The CPUs this process may use (its affinity, not the machine's count), at most ``most``."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(most, n))


SCHEDULES = ("constant", "linear", "cosine")
EVAL_BATCH_SECONDS = 160.0
"""Evaluation batches of waveforms hold at most this much padded audio (``sertk evaluate --batch-seconds``)."""
GPU_EVAL_BATCH = 64
"""Default cap on utterances per evaluation batch on CUDA (inference keeps no activations for backward)."""
METRICS = ("uar", "weighted_f1", "macro_f1", "accuracy")
MIN_GAIN = 0.01
"""The smallest selection gain (weighted F1) that counts as an improvement (``[augmentations] min_gain``)."""

TRAIN_SETTINGS: tuple[Setting, ...] = (
    Setting("dataset", "synthetic", "Cache name in --cache-dir, or a cache path.", study=False),
    Setting("cache_dir", "cache", "Folder of cache files.", type="path", study=False),
    Setting("split", "stratified:test=0.2,seed=42", "Split spec: stratified|speaker|kfold|loso[:opts] or file:PATH "
            "(see 'sertk split').", study=False),
    Setting("valid", 0.0, "Share of the training data held out for validation and early stopping.",
            type="float", min=0, max=1, max_exclusive=True),
    Setting("plugins", [], "Augmentations, comma-separated.", type="list[str]", flag="--plugins",
            generated=False, study=False),
    Setting("plugin_options", {}, "Augmentation parameters (METHOD.key=value).", type="table", flag="--set",
            generated=False, study=False),
    Setting("weights", None, "Probabilities of a combination (NAME=W,...).", type="table", nullable=True,
            flag="--weights", generated=False, study=False),
    Setting("weights_from", None, "Runs the --weights came from, their gains and k.", type="table",
            nullable=True, flag="--weights-from", generated=False, study=False),
    Setting("aug_mode", "online", "online: new augmentation parameters each epoch; offline: materialised "
            "copies.", choices=("online", "offline")),
    Setting("aug_copies", 1, "Augmented copies per utterance (1 = the reference 1:1).", type="int", min=1),
    Setting("normalize", "none", "Feature normalisation of feature models: none, speaker (each speaker's own "
            "utterances in the same set and part; transductive over unlabelled test audio), speaker-train (as "
            "speaker, but speakers seen in training keep their training statistics in every set) or corpus.",
            choices=("none", "speaker", "speaker-train", "corpus"), model_default=True),
    Setting("model", "hubert", "Model plugin (tiny, acoustic, hubert), hub id or folder.", flag="--model",
            generated=False, study=False),
    Setting("model_options", {}, "Model parameters (key=value).", type="table", flag="--model-set",
            generated=False, study=False),
    Setting("cross", [], "Cross-corpus test sets evaluated after training: cache names (in --cache-dir) or cache "
            "paths, repeat --cross; recorded as paths.", type="list[str]", flag="--cross", generated=False,
            study=False, runtime=True),
    Setting("epochs", 7, "Epochs.", type="int", min=1, model_default=True),
    Setting("batch_size", 8, "Batch size (with --batch-seconds: the most utterances in a batch).", type="int",
            min=1, unit="utterances", model_default=True),
    Setting("batch_seconds", None, "Fill batches up to this much padded audio (longest clip x count, on the "
            "lengths each epoch's augmentation produces); default: fixed --batch-size batches.", type="float",
            min=0, min_exclusive=True, unit="seconds", nullable=True, model_default=True),
    Setting("lr", 1e-5, "AdamW learning rate.", type="float", min=0, min_exclusive=True, model_default=True),
    Setting("weight_decay", 0.01, "AdamW weight decay.", type="float", min=0, model_default=True),
    Setting("schedule", "constant", "Learning-rate decay after the warm-up.", choices=SCHEDULES,
            model_default=True),
    Setting("warmup", 0.0, "Warm-up share of the optimizer steps.", type="float", min=0, max=1,
            max_exclusive=True, model_default=True),
    Setting("grad_accum", 1, "Gradient accumulation steps.", type="int", min=1),
    Setting("max_seconds", None, "Random crop of longer training clips (default: no crop).", type="float",
            min=0, min_exclusive=True, unit="seconds", nullable=True),
    Setting("class_weights", "none", "Weights per class: none or balanced (inverse frequency), in the loss of "
            "trained models and in the fit of feature classifiers.",
            choices=("none", "balanced")),
    Setting("early_stopping", 0, "Patience in epochs, 0 = off (needs --valid).", type="int", min=0),
    Setting("select_metric", "uar", "Best-checkpoint metric on the validation split.", choices=METRICS),
    Setting("seed", 42, "Seed of every random choice.", type="int", min=0),
    Setting("checkpoint_every", 1, "Write the resumable state (weights + optimizer) every N epochs; 0: only when "
            "training is interrupted (SIGTERM, which Slurm sends, or Ctrl-C). The best weights are written at the "
            "end and with each state.", type="int", min=0, unit="epochs", runtime=True, model_default=True),
    Setting("workers", available_cpus(), "DataLoader workers, started once per run (0: load in the training process; "
            "default: the CPUs this process may use, at most 8).",
            type="int", min=0, runtime=True),
    Setting("bucket", True, "Batch utterances of similar lengths (--no-bucket: plain shuffle).", type="bool"),
    Setting("bf16", True, "Mixed precision on GPUs: bf16 autocast where native (Ampere and later), else fp16 "
            "with loss scaling; --no-bf16: fp32.", type="bool"),
    Setting("compile", False, "torch.compile the model, batches padded to whole seconds (one graph per "
            "length bucket).", type="bool", runtime=True),
    Setting("device", "auto", "Where to train: auto, cpu, mps, cuda or cuda:N.", pattern=r"auto|cpu|mps|cuda(:\d+)?",
            allowed_text="auto, cpu, mps, cuda or cuda:N", runtime=True),
    Setting("log_every", 20, "Refresh the progress line every N steps.", type="int", min=1, unit="steps",
            runtime=True),
)
SETTINGS: dict[str, Setting] = {s.name: s for s in TRAIN_SETTINGS}
TRAINING: tuple[Setting, ...] = tuple(s for s in TRAIN_SETTINGS if s.study)
"""The settings a study's ``[training]`` section accepts (the others come from its structure)."""
RUNTIME: frozenset[str] = frozenset(s.name for s in TRAIN_SETTINGS if s.runtime)
"""Settings that do not change what is trained."""
MODEL_BOUND: frozenset[str] = frozenset(s.name for s in TRAIN_SETTINGS if s.model_default)
"""Settings that belong to the model (declared ``model_default``): a study preset's values of these are
dropped when another model is chosen, so that model's ``train_defaults`` apply."""
SOURCES = ("user", "preset", "model", "default")
"""Where a training value comes from: the user (config file, command line), a study preset, the model's
``train_defaults``, or the declaration."""
SOURCE_ENTRIES: tuple[Setting, ...] = tuple(
    Setting(s.name, None, f"where [training] {s.name} comes from", choices=SOURCES) for s in TRAINING)
"""The keys of a study config's ``[training_sources]`` (one per ``[training]`` setting)."""


def defaults() -> dict[str, Any]:
    """The declared default of every training setting (fresh copies)."""
    return {s.name: copy.deepcopy(s.default) for s in TRAIN_SETTINGS}


def flag_label(s: Setting) -> str:
    return s.option


def check_settings(values: Mapping[str, Any], label: Callable[[Setting], str] = flag_label,
                   strict: bool = False, hint: str = "see 'sertk train --help'") -> dict[str, Any]:
    """Training settings converted and checked against the declaration; errors name ``label(setting)``."""
    out = {}
    for name, value in values.items():
        if name not in SETTINGS:
            raise unknown_key(name, SETTINGS, "the training settings", "see 'sertk train --help'")
        out[name] = SETTINGS[name].check(value, label(SETTINGS[name]), strict=strict, hint=hint)
    return out


def model_defaults(model: str) -> dict[str, Any]:
    """The model plugin's ``train_defaults``, checked against the declaration."""
    from ser_toolkit.registry import get

    given = dict(get("model", model).obj.train_defaults)
    for name in given:
        if name not in SETTINGS or not SETTINGS[name].study:
            raise PluginError(f"model '{model}' declares train_defaults for unknown setting {name!r}",
                              "fix the plugin (settings: see 'sertk train --help')")
    return check_settings(given, lambda s: f"model '{model}' train_defaults {s.name}", hint="fix the plugin")


def resolve(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Every training setting: declared default < the model's ``train_defaults`` < each layer in turn.

    The model is the layers' ``model`` (else the declared default). The one place
    defaults are applied, for ``sertk train`` and ``sertk study`` alike; layers are
    checked by their callers (they know how to name a bad value).
    """
    given: dict[str, Any] = {}
    for layer in layers:
        given.update(layer)
    for name in given:
        if name not in SETTINGS:
            raise unknown_key(name, SETTINGS, "the training settings", "see 'sertk train --help'")
    values = defaults()
    values.update(model_defaults(given.get("model", values["model"])))
    values.update(copy.deepcopy(given))
    return values


def sources(model: str, given: Mapping[str, str], names: Optional[Iterable[str]] = None) -> dict[str, str]:
    """Where each training value comes from, the provenance of :func:`resolve`'s result.

    ``given`` maps the settings a layer set to their source (``"user"``, ``"preset"``);
    the others are ``"model"`` (in ``model``'s ``train_defaults``) or ``"default"``
    (the declaration). ``names``: the settings to describe (default: all, in
    declaration order).
    """
    bound = model_defaults(model)
    for name, source in given.items():
        if source not in SOURCES:
            raise ValueError(f"unknown source {source!r} of {name!r}")
    return {n: given[n] if n in given else "model" if n in bound else "default"
            for n in (SETTINGS if names is None else names)}


def dataclass_of(settings: Sequence[Setting]) -> Callable[[type], type]:
    """Class decorator: a dataclass whose fields (names, types, defaults) are ``settings``."""
    from dataclasses import dataclass as make

    kinds = {"int": int, "float": float, "str": str, "path": str, "bool": bool, "table": dict,
             "list[str]": list}

    def wrap(cls: type) -> type:
        annotations = {}
        for s in settings:
            kind = kinds[s.type]
            annotations[s.name] = Optional[kind] if s.nullable or s.default is None else kind
            if isinstance(s.default, (list, dict)):
                setattr(cls, s.name, field(default_factory=functools.partial(copy.deepcopy, s.default)))
            else:
                setattr(cls, s.name, s.default)
        cls.__annotations__ = annotations
        return make(cls)

    return wrap


# ----------------------------------------------------------------------------- study config

EXECUTORS = ("local", "slurm", "submitit-local")
SLURM = (
    Setting("partition", None, "Slurm partition (default: the cluster's)"),
    Setting("account", None, "Slurm account to charge"),
    Setting("qos", None, "Slurm quality of service"),
    Setting("constraint", None, "Slurm node constraint (e.g. a GPU model)"),
    Setting("gpus", 1, "GPUs per run", type="int", min=0),
    Setting("cpus", 8, "CPUs per run (data loading, features)", type="int", min=1),
    Setting("mem_gb", 64.0, "memory per run", type="float", min=0, min_exclusive=True, unit="GiB"),
    Setting("time_min", 240, "time limit per run (a run cut off resumes from its last epoch when resubmitted)",
            type="int", min=1, unit="minutes"),
    Setting("setup", [], "shell lines each job runs first (e.g. module load, activating the environment)",
            type="list[str]"),
    Setting("sbatch", {}, "more #SBATCH options, e.g. { mail-type = \"END\" }", type="table"),
)
"""``[study] slurm``: the resources of each run's Slurm job (``executor = "slurm"``; submitit)."""
EXECUTION = (
    Setting("executor", "local", "where the runs execute: local (this machine, jobs at a time), slurm (one "
            "Slurm job per run, via submitit) or submitit-local (submitit's subprocess jobs on this machine: the "
            "Slurm path without Slurm)", choices=EXECUTORS),
    Setting("jobs", 1, "runs at a time (local: worker processes, each on one visible GPU in turn, runs_per_gpu "
            "of them per GPU; slurm: jobs queued at once, 0 = all)", type="int", min=0),
    Setting("runs_per_gpu", 1, "local jobs that share one GPU, each limited to that share of its memory (jobs may "
            "then be up to GPUs x runs_per_gpu)", type="int", min=1, max=16),
    Setting("oom_retry", False, "after a GPU out-of-memory error, train the run once more with half the batch "
            "(half batch_seconds, or half batch_size without it), recorded in the run's config.json",
            type="bool"),
    Setting("slurm", {}, "Slurm resources per run: " + ", ".join(s.name for s in SLURM), type="table",
            entries=SLURM),
)
"""How a study's runs are executed (``[study]`` keys; ``sertk study --executor/--jobs``): they never change a
result, so a study may be resumed with other values."""


@functools.lru_cache(maxsize=None)
def study_schema() -> tuple[Setting, ...]:
    """Every section and key of a study config (top-level keys; sections are tables)."""
    from ser_toolkit.audio import MONO_RULES, RESAMPLERS
    from ser_toolkit.cache.build import DTYPES

    cache_options = (
        Setting("mono", None, "down-mix rule of the cache (default: the dataset's own)", choices=MONO_RULES),
        Setting("dtype", None, "stored sample type of the cache (default: float32)", choices=DTYPES),
        Setting("resampler", None, "resampler of the cache (default: soxr-hq)", choices=tuple(RESAMPLERS)),
        Setting("max_seconds", None, "skip longer files when caching (default: 600)", type="float", min=0,
                max=6 * 3600, min_exclusive=True, unit="seconds"),
    )
    corpus = (
        Setting("dataset", None, "dataset plugin name (see 'sertk plugins')", required=True),
        Setting("root", None, "corpus folder (corpora read from disk need one)", type="path"),
        Setting("options", {}, "dataset parameters", type="table"),
        Setting("name", None, "cache name, which also names its results (default: the dataset's own, e.g. "
                "savee-reference); two sources of one corpus need two names"),
    )
    data = (*corpus,
            Setting("split", SETTINGS["split"].default, SETTINGS["split"].help),
            Setting("folds", "one", "one: the split as given; all: every fold of a kfold or loso split (mean "
                    "± SD over folds in the report)", choices=("one", "all")),
            Setting("cross", [], "cross-corpus test sets: tables of dataset, root, options and cache options",
                    type="list[table]", entries=corpus + cache_options),
            Setting("train", [], "more training corpora (tables like a cross entry, plus split and folds): the "
                    "study runs on [data] and on each of these in turn, every training corpus is a cross-corpus "
                    "set of the others, and the report gives the train x test corpus matrix; an entry without "
                    "split/folds takes [data]'s (a file: split is the declared default's: it names one corpus's "
                    "files)", type="list[table]", entries=corpus + (
                        Setting("split", None, SETTINGS["split"].help),
                        Setting("folds", None, "one or all (see [data] folds)", choices=("one", "all")),
                    ) + cache_options),
            Setting("cache_dir", SETTINGS["cache_dir"].default, "folder of cache files", type="path"),
            *cache_options)
    model = (Setting("name", None, "model plugin name, or hubert with options.checkpoint", required=True),
             Setting("options", {}, "model parameters", type="table"))
    augmentations = (
        Setting("methods", None, "augmentation plugin names", type="list[str]", required=True),
        Setting("control", "duplicate", "the clean control (as many steps as an augmented model)"),
        Setting("top_k", [], "Top-k weighted combinations to train", type="list[int]", min=1),
        Setting("min_gain", MIN_GAIN, "smallest selection gain (weighted F1) that counts as an improvement: a "
                "method that gains less gets no weight in a Top-k model", type="float", min=0),
        Setting("options", {}, "parameters per augmentation: { METHOD = { key = value } }", type="table"),
    )
    study = (
        Setting("seeds", 1, "repeat every model with this many seeds (from [training] seed on)", type="int",
                min=1),
        Setting("runs_dir", None, "where the runs go (default: runs/<name>)", type="path"),
        Setting("report", None, "report path (default: reports/<name>.md)", type="path"),
        Setting("selection", "validation", "where gains, weights and the Top-k choice come from: validation "
                "(carved from the training data) or test (the reference study's choice: biased, flagged in the "
                "report)", choices=("validation", "test")),
        Setting("reference", "control", "what a gain is measured against: control (the clean x2 model, same "
                "number of steps) or baseline (the reference study's choice)", choices=("control", "baseline")),
        Setting("valid", 0.2, "share of the training data carved out for validation (speaker-disjoint with >= 4 "
                "training speakers, else stratified)", type="float", min=0, max=1, min_exclusive=True,
                max_exclusive=True),
        *EXECUTION,
    )
    return (
        Setting("name", "study", "study name (default folders: runs/<name>, reports/<name>.md)"),
        Setting("data", None, "the corpora and the split", type="table", entries=data, required=True),
        Setting("model", None, "the model", type="table", entries=model, required=True),
        Setting("training", {}, "training settings (see 'sertk train --help'); the model's defaults otherwise",
                type="table", entries=TRAINING, fill=False),
        Setting("training_sources", {}, "where each training value comes from (user, preset, model, default); "
                "written by sertk: a [training] value marked preset belongs to the [model] and is dropped when "
                "another model is chosen", type="table", entries=SOURCE_ENTRIES, fill=False),
        Setting("augmentations", None, "the augmentations studied", type="table", entries=augmentations,
                required=True),
        Setting("study", {}, "seeds and output places", type="table", entries=study),
    )


def check_study(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A study config checked against :func:`study_schema`: one-line errors, defaults filled in."""
    schema = study_schema()
    sections = {s.name for s in schema if s.type == "table"}
    if not isinstance(cfg, Mapping):
        raise SertkError("a study config is a TOML table", "start from a preset (sertk study --preset demo)")
    for key, value in cfg.items():
        if key not in {s.name for s in schema}:
            if isinstance(value, Mapping):
                close = difflib.get_close_matches(key, sorted(sections), n=1)
                raise SertkError(f"unknown section [{key}]", f"did you mean [{close[0]}]?" if close else
                                 "sections: " + ", ".join(f"[{s}]" for s in sorted(sections)))
            raise unknown_key(key, [s.name for s in schema if s.type != "table"], "at the top level")
    for s in schema:
        if s.required and s.name not in cfg:
            raise SertkError(f"study config lacks the [{s.name}] section",
                             "start from a preset (sertk study --preset demo)")
    training = cfg.get("training")
    for key in training if isinstance(training, Mapping) else ():
        if key in SETTINGS and not SETTINGS[key].study:
            raise SertkError(f"[training] {key} is set by the study itself",
                             "drop it: a study takes it from [data], [model] and [augmentations]")
    out: dict[str, Any] = {}
    for s in schema:
        label = f"[{s.name}]" if s.type == "table" else s.name
        value = cfg.get(s.name, copy.deepcopy(s.default))
        if s.type == "table":
            if not isinstance(value, Mapping):
                raise SertkError(f"{label} must be a table (got {value!r})", f"write it as a [{s.name}] section")
            out[s.name] = check_table(value, s.entries, label, fill=s.fill)
        else:
            out[s.name] = s.check(value, label, strict=True, hint="fix the config")
    return out
