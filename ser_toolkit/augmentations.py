"""The augmentation plugin contract, partner pools and weighted combinations.

An augmentation takes a 16 kHz mono float32 waveform, an explicit
``numpy.random.Generator`` and an :class:`AugmentContext`, and returns
``(new_wave, params)``: ``params`` are the values it actually sampled
(JSON-serialisable), so every augmented utterance can be logged and
reproduced. Augmentations keep the label of their input. Parameters are
declared and validated at construction; objects pickle (DataLoader workers).

Two-step plugins (as in audiomentations) split that call: ``randomize(n, rng,
context) -> plan`` samples every parameter for an ``n``-sample input before any
audio is processed, ``apply_params(wave, plan, context) -> (new_wave, params)``
renders it, and ``output_length(n, plan)`` says how long the output will be, so
training can bucket an epoch on the lengths it will really produce. One-step
plugins (``apply`` only) keep working: their plan defers every draw to ``apply``
and their output length is learnt by processing the audio.
"""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np

from ser_toolkit.errors import ParameterError, PluginError, SertkError
from ser_toolkit.params import Param, validate

SAMPLE_RATE = 16000
MAX_PEAK = 100.0
"""Largest |sample| an augmentation may return. Audio is nominally in [-1, 1] and gain, negative-SNR noise
or reverb may legitimately exceed that (white noise at -20 dB SNR on full-scale speech peaks near 50), but
samples beyond 40 dB over full scale mean a broken plugin: int16-scale values or a runaway filter."""
BROKEN_HINT = "report it to the plugin's author or leave it out of --plugins"


def read_only(wave: np.ndarray) -> np.ndarray:
    """A read-only view of ``wave``: what :meth:`Augmentation.apply` gets, so in-place writes raise.

    Unlike ``view.flags.writeable = False`` this view cannot be made writeable again.
    """
    return np.lib.stride_tricks.as_strided(wave, writeable=False)


def _where(name: str, utterance_id: str | None) -> str:
    return f"augmentation '{name}'" + (f" (utterance {utterance_id})" if utterance_id is not None else "")


DEFERRED = "_deferred_rng"
"""Plan key of a one-step plugin's plan: a copy of the generator, every draw left to ``apply``."""


def output_problem(result: Any) -> str | None:
    """What is wrong with ``result``, the raw return value of ``apply``; None if nothing.

    The rules: a (wave, params) pair, the wave a non-empty 1-D float32 ndarray of finite samples with
    peak at most :data:`MAX_PEAK`, params a dict that ``json.dumps`` accepts. (The input is left
    untouched because ``apply`` gets a :func:`read_only` view: see :func:`apply_error`.)
    """
    if not isinstance(result, tuple) or len(result) != 2:
        return f"returned {type(result).__name__}, not a (wave, params) pair"
    out, params = result
    if not isinstance(out, np.ndarray):
        return f"returned {type(out).__name__} audio, not a numpy array"
    if out.dtype != np.float32:
        return f"returned {out.dtype} audio, not float32"
    if out.ndim != 1:
        return f"returned audio of shape {out.shape}, not 1-D"
    if out.size == 0:
        return "returned empty audio"
    peak = float(np.abs(out).max())
    if not np.isfinite(peak):
        return "returned NaN or inf samples"
    if peak > MAX_PEAK:
        return f"returned samples up to |x| = {peak:.4g} (more than {MAX_PEAK:g})"
    if not isinstance(params, dict):
        return f"returned params of type {type(params).__name__}, not a dict"
    try:
        json.dumps(params)
    except (TypeError, ValueError) as exc:
        return f"returned params that are not JSON-serialisable ({exc})"
    return None


def check_output(name: str, result: Any, utterance_id: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """``result`` (what augmentation ``name``'s ``apply`` returned) as (wave, params), else a :class:`PluginError`."""
    problem = output_problem(result)
    if problem is not None:
        raise PluginError(f"{_where(name, utterance_id)} {problem}", BROKEN_HINT)
    return result


def apply_error(name: str, exc: Exception, utterance_id: str | None = None) -> PluginError:
    """The one-line :class:`PluginError` for an exception raised inside ``apply``."""
    text = " ".join(str(exc).split())
    if isinstance(exc, ValueError) and ("read-only" in text or "WRITEABLE" in text):
        return PluginError(f"{_where(name, utterance_id)} modified its input in place ({text})", BROKEN_HINT)
    return PluginError(f"{_where(name, utterance_id)} failed: {type(exc).__name__}: {text[:300]}", BROKEN_HINT)


@dataclass
class PartnerPool:
    """Utterances an augmentation may draw as partners (N-CP), by emotion.

    Build it from the *training* split only (:meth:`from_split`): test
    utterances must never be pasted into training audio.
    """

    ids: Sequence[str]
    emotions: Sequence[str]
    load: Callable[[str], np.ndarray]
    split: str = "train"
    drawn: list[str] = field(default_factory=list)
    """Ids drawn so far (a materialised set clears it per row and records the partners of each row)."""
    sizes: Mapping[str, int] | None = None
    """Length in samples of each utterance, if known: output lengths are then known without loading audio."""

    def __post_init__(self) -> None:
        self._by_emotion: dict[str, list[str]] = {}
        for uid, emo in zip(self.ids, self.emotions):
            self._by_emotion.setdefault(emo, []).append(uid)

    def candidates(self, emotion: str, exclude: str | None = None) -> list[str]:
        return [u for u in self._by_emotion.get(emotion, []) if u != exclude]

    def pick(self, rng: np.random.Generator, emotion: str, exclude: str | None = None) -> str:
        """The id of a random partner of ``emotion`` (not ``exclude``), audio not loaded (for ``randomize``)."""
        pool = self.candidates(emotion, exclude)
        if not pool:
            raise SertkError(f"no {emotion} partner utterance available in the {self.split} split",
                             "N-CP needs neutral and emotional utterances in the training data")
        uid = pool[int(rng.integers(len(pool)))]
        self.drawn.append(uid)
        return uid

    def draw(self, rng: np.random.Generator, emotion: str, exclude: str | None = None) -> tuple[str, np.ndarray]:
        """A random partner of ``emotion`` (not ``exclude``): its id and waveform (the same draw as :meth:`pick`)."""
        uid = self.pick(rng, emotion, exclude)
        return uid, self.load(uid)

    def size(self, uid: str) -> int:
        """Length in samples of partner ``uid``: from ``sizes`` when known, else by loading it."""
        if self.sizes is not None and uid in self.sizes:
            return int(self.sizes[uid])
        return int(np.asarray(self.load(uid)).size)

    @classmethod
    def from_split(cls, reader, assignment: Mapping[str, str], split: str = "train") -> "PartnerPool":
        """Partners from one split of a cache (``assignment``: id -> split name)."""
        rows = [i for i, uid in enumerate(reader.ids) if assignment.get(uid) == split]
        emotions = reader.column("emotion")
        return cls([reader.ids[i] for i in rows], [emotions[i] for i in rows], reader.wave, split,
                   sizes={reader.ids[i]: int(reader.lengths[i]) for i in rows})


@dataclass
class AugmentContext:
    """What an augmentation may know besides the waveform.

    ``utterance_id`` and ``emotion`` describe the input; ``partners`` draws
    partner utterances (training split only); new fields may be added later.
    """

    sample_rate: int = SAMPLE_RATE
    utterance_id: str | None = None
    emotion: str | None = None
    partners: PartnerPool | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Augmentation:
    """Base class for augmentation plugins (see ``register_augmentations``)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = ()
    stochastic: ClassVar[bool] = True
    """False for augmentations whose output does not depend on the seed (e.g. ``duplicate``)."""
    needs_partners: ClassVar[bool] = False
    partner_emotions: ClassVar[tuple[str, ...]] = ()
    """Emotions of the partners it draws (e.g. ``("neutral",)`` for N-CP); checked before a set is made."""
    identity: ClassVar[bool] = False
    """True if the output always equals the input (training then reuses the clean rows)."""
    keeps_length: ClassVar[bool] = False
    """True if the output always has the input's length: training then buckets without a randomise pass."""

    def __init__(self, **options: Any) -> None:
        self.options = validate(self.params, options, f"augmentation '{self.name}'")
        self.check_options()

    def check_options(self) -> None:
        """Cross-parameter checks (override; raise :class:`ParameterError`)."""

    # --- what a plugin implements: apply (one step), or randomize + apply_params (+ output_length) -----------

    def apply(self, wave: np.ndarray, rng: np.random.Generator,
              context: AugmentContext | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Return the augmented waveform and the parameters sampled for it.

        Two-step plugins leave it alone: it is then :meth:`randomize` followed by :meth:`apply_params`.
        """
        if not self.two_step():
            raise NotImplementedError(f"{type(self).__name__} implements neither apply nor randomize/apply_params")
        context = context or AugmentContext()
        return self.apply_params(wave, self.randomize(wave.size, rng, context), context)

    def randomize(self, n: int, rng: np.random.Generator, context: AugmentContext | None = None) -> dict[str, Any]:
        """The plan for an ``n``-sample input: every parameter sampled, before any audio is processed.

        A plan is a picklable dict, usually the params to be logged (keys starting with ``_`` may hold
        more, e.g. a generator state). It draws from ``rng`` exactly what the one-step call would, in the same
        order, so ``apply_params(wave, randomize(wave.size, rng, ctx), ctx)`` equals ``apply(wave, rng, ctx)``.
        The default (one-step plugins) defers every draw: the plan keeps a copy of ``rng``, which this call
        then does not advance.
        """
        return {DEFERRED: copy.deepcopy(rng)}

    def apply_params(self, wave: np.ndarray, plan: Mapping[str, Any],
                     context: AugmentContext | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Render ``plan`` (from :meth:`randomize`) on ``wave``: ``(new_wave, params)``, no random draw."""
        if DEFERRED in plan:
            return self.apply(wave, copy.deepcopy(plan[DEFERRED]), context)
        raise NotImplementedError(f"{type(self).__name__} implements randomize but not apply_params")

    def output_length(self, n: int, plan: Mapping[str, Any]) -> int | None:
        """Samples :meth:`apply_params` returns for an ``n``-sample input and ``plan``, without processing audio.

        Default: ``n`` (override when the length changes); None for a one-step plugin (only ``apply`` knows).
        """
        return None if DEFERRED in plan else n

    @classmethod
    def two_step(cls) -> bool:
        """Whether the class implements randomize/apply_params (and no later ``apply`` overrides them)."""

        def owner(name: str) -> type:
            return next(k for k in cls.__mro__ if name in vars(k))

        randomize, apply = owner("randomize"), owner("apply")
        return randomize is not Augmentation and issubclass(randomize, apply)

    # --- what sertk calls: checked --------------------------------------------------------------------------

    def __call__(self, wave: np.ndarray, rng: np.random.Generator,
                 context: AugmentContext | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Checked :meth:`apply`: float32 1-D in, its raw output checked (:func:`check_output`).

        ``apply`` gets a read-only view of the input; an exception other than
        :class:`SertkError` raised inside it becomes a :class:`PluginError`.
        """
        context = context or AugmentContext()
        return self._checked(wave, context, lambda view: self.apply(view, rng, context))

    def plan(self, n: int, rng: np.random.Generator, context: AugmentContext | None = None) -> dict[str, Any]:
        """Checked :meth:`randomize` (the deferring default for one-step plugins)."""
        context = context or AugmentContext()
        try:
            plan = (self.randomize if self.two_step() else partial(Augmentation.randomize, self))(int(n), rng,
                                                                                                 context)
        except SertkError:
            raise
        except Exception as exc:
            raise apply_error(self.name, exc, context.utterance_id) from exc
        if not isinstance(plan, dict):
            raise PluginError(f"{_where(self.name, context.utterance_id)} randomize returned "
                              f"{type(plan).__name__}, not a dict", BROKEN_HINT)
        return plan

    def planned_length(self, n: int, plan: Mapping[str, Any]) -> int | None:
        """Checked :meth:`output_length`: the output's samples, or None when only processing the audio tells."""
        if self.keeps_length:
            return int(n)
        if not self.two_step() or DEFERRED in plan:
            return None
        length = self.output_length(int(n), plan)
        if length is not None and (isinstance(length, bool) or not isinstance(length, (int, np.integer))
                                   or length < 1):
            raise PluginError(f"augmentation '{self.name}' output_length returned {length!r}, not an int >= 1",
                              BROKEN_HINT)
        return None if length is None else int(length)

    def render(self, wave: np.ndarray, plan: Mapping[str, Any],
               context: AugmentContext | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Checked :meth:`apply_params`, like :meth:`__call__`; the output must have :meth:`planned_length`."""
        context = context or AugmentContext()
        apply = self.apply_params if self.two_step() else partial(Augmentation.apply_params, self)
        out, params = self._checked(wave, context, lambda view: apply(view, plan, context))
        expected = self.planned_length(wave.size, plan)
        if expected is not None and out.size != expected:
            raise PluginError(f"{_where(self.name, context.utterance_id)} returned {out.size} samples where "
                              f"{'it keeps the length' if self.keeps_length else 'output_length said'} "
                              f"{expected}", BROKEN_HINT)
        return out, params

    def _checked(self, wave: np.ndarray, context: AugmentContext,
                 run: Callable[[np.ndarray], Any]) -> tuple[np.ndarray, dict[str, Any]]:
        """``run`` on a read-only float32 1-D view of ``wave``: errors made one-line, its output checked."""
        wave = np.ascontiguousarray(wave, dtype=np.float32)
        if wave.ndim != 1:
            raise SertkError(f"augmentation '{self.name}' takes a mono 1-D waveform (got shape {wave.shape})",
                             "down-mix to mono first")
        view = read_only(wave)
        try:
            result = run(view)
        except SertkError:
            raise
        except Exception as exc:
            raise apply_error(self.name, exc, context.utterance_id) from exc
        out, params = check_output(self.name, result, context.utterance_id)
        if not out.flags.writeable or not out.flags.c_contiguous:  # e.g. the input (or a slice of it) itself
            out = np.array(out, dtype=np.float32, order="C")
        return out, params

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options.items())})"


def pick(rng: np.random.Generator, fixed: Any, values: Sequence[float] | None,
         value_range: Sequence[float] | None) -> float:
    """A fixed value, else uniform in ``value_range``, else one of ``values``."""
    if fixed is not None:
        return float(fixed)
    if value_range is not None:
        return float(rng.uniform(value_range[0], value_range[1]))
    return float(values[int(rng.integers(len(values)))])


def check_range(owner: str, name: str, value: Sequence[float] | None) -> None:
    if value is not None and (len(value) != 2 or value[0] > value[1]):
        raise ParameterError(f"{owner}: parameter '{name}' must be two numbers low,high with low <= high "
                             f"(got {value})", "e.g. --set " + name + "=0.8,1.2")


def utterance_seed(seed: int, utterance_id: str, *salt: int | str) -> np.random.Generator:
    """A generator seeded by (seed, utterance id, salt...): the same audio for the same id, in any order."""
    digest = hashlib.sha256("\x1f".join([str(seed), utterance_id, *map(str, salt)]).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


class Weighted(Augmentation):
    """Picks one method per utterance with given probabilities, then samples its parameters."""

    name = "weighted"
    description = "one of several augmentations per utterance, with given probabilities"

    def __init__(self, methods: Mapping[str, Augmentation], weights: Mapping[str, float]) -> None:
        self.options = {}
        missing = set(weights) - set(methods)
        if missing or not weights:
            raise ParameterError(f"weights name unknown methods {sorted(missing)}" if missing
                                 else "weighted combination needs at least one method", "check the weights")
        total = float(sum(weights.values()))
        if any(w < 0 for w in weights.values()) or total <= 0:
            raise ParameterError(f"weights must be non-negative with a positive sum (got {dict(weights)})",
                                 "fix the weights")
        self.methods = dict(methods)
        self.names = list(weights)
        self.probabilities = np.array([weights[n] / total for n in self.names])
        self.needs_partners = any(m.needs_partners for m in methods.values())
        self.partner_emotions = tuple(sorted({e for m in methods.values() for e in m.partner_emotions}))
        self.keeps_length = all(self.methods[n].keeps_length for n in self.names)

    def pick(self, rng: np.random.Generator) -> str:
        """The method for one utterance, drawn with the weights."""
        return self.names[int(rng.choice(len(self.names), p=self.probabilities))]

    def apply(self, wave, rng, context=None):
        name = self.pick(rng)
        out, params = self.methods[name](wave, rng, context)
        return out, {"method": name, **params}

    def randomize(self, n, rng, context=None):
        name = self.pick(rng)
        return {"method": name, "_plan": self.methods[name].plan(n, rng, context)}

    def apply_params(self, wave, plan, context=None):
        out, params = self.methods[plan["method"]].render(wave, plan["_plan"], context)
        return out, {"method": plan["method"], **params}

    def output_length(self, n, plan):
        return self.methods[plan["method"]].planned_length(n, plan["_plan"])

    def __repr__(self) -> str:
        return f"Weighted({dict(zip(self.names, self.probabilities.round(3)))})"


def weights_from_gains(baseline: float, results: Mapping[str, float], top_k: int | None = None,
                       min_gain: float = 0.0) -> dict[str, float]:
    """The reference study's weights: gain = F1 - baseline F1, normalised over the gains that count.

    A gain counts when it is positive and at least ``min_gain`` (a declared minimal effect); a method whose gain
    does not count is left out with a warning; ``top_k`` keeps the k largest gains. Raises
    :class:`ParameterError` if none is left.
    """
    gains = {m: float(f1) - float(baseline) for m, f1 in results.items()}
    for m, g in gains.items():
        if g <= 0 or g < min_gain:
            warnings.warn(f"augmentation '{m}' gains {g:+.3f} over the baseline, less than "
                          f"{max(min_gain, 0.0):g}; left out of the weights", stacklevel=2)
    positive = sorted(((g, m) for m, g in gains.items() if g > 0 and g >= min_gain), reverse=True)
    if top_k is not None:
        if top_k < 1:
            raise ParameterError(f"top-k must be at least 1 (got {top_k})", "e.g. top_k=2")
        positive = positive[:top_k]
    if not positive:
        raise ParameterError("no augmentation improves on the baseline, so no weights can be computed",
                             "give weights explicitly")
    total = sum(g for g, _ in positive)
    return {m: g / total for g, m in positive}

