"""The augmentation plugin contract, partner pools and weighted combinations.

An augmentation takes a 16 kHz mono float32 waveform, an explicit
``numpy.random.Generator`` and an :class:`AugmentContext`, and returns
``(new_wave, params)``: ``params`` are the values it actually sampled
(JSON-serialisable), so every augmented utterance can be logged and
reproduced. Augmentations keep the label of their input. Parameters are
declared and validated at construction; objects pickle (DataLoader workers).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
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

    def __post_init__(self) -> None:
        self._by_emotion: dict[str, list[str]] = {}
        for uid, emo in zip(self.ids, self.emotions):
            self._by_emotion.setdefault(emo, []).append(uid)

    def candidates(self, emotion: str, exclude: str | None = None) -> list[str]:
        return [u for u in self._by_emotion.get(emotion, []) if u != exclude]

    def draw(self, rng: np.random.Generator, emotion: str, exclude: str | None = None) -> tuple[str, np.ndarray]:
        """A random partner of ``emotion`` (not ``exclude``): its id and waveform."""
        pool = self.candidates(emotion, exclude)
        if not pool:
            raise SertkError(f"no {emotion} partner utterance available in the {self.split} split",
                             "N-CP needs neutral and emotional utterances in the training data")
        uid = pool[int(rng.integers(len(pool)))]
        self.drawn.append(uid)
        return uid, self.load(uid)

    @classmethod
    def from_split(cls, reader, assignment: Mapping[str, str], split: str = "train") -> "PartnerPool":
        """Partners from one split of a cache (``assignment``: id -> split name)."""
        ids = [uid for uid in reader.ids if assignment.get(uid) == split]
        emotions = [reader.column("emotion")[reader.index(uid)] for uid in ids]
        return cls(ids, emotions, reader.wave, split)


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

    def __init__(self, **options: Any) -> None:
        self.options = validate(self.params, options, f"augmentation '{self.name}'")
        self.check_options()

    def check_options(self) -> None:
        """Cross-parameter checks (override; raise :class:`ParameterError`)."""

    def apply(self, wave: np.ndarray, rng: np.random.Generator,
              context: AugmentContext | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Return the augmented waveform and the parameters sampled for it."""
        raise NotImplementedError

    def __call__(self, wave: np.ndarray, rng: np.random.Generator,
                 context: AugmentContext | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Checked :meth:`apply`: float32 1-D in, its raw output checked (:func:`check_output`).

        ``apply`` gets a read-only view of the input; an exception other than
        :class:`SertkError` raised inside it becomes a :class:`PluginError`.
        """
        wave = np.ascontiguousarray(wave, dtype=np.float32)
        if wave.ndim != 1:
            raise SertkError(f"augmentation '{self.name}' takes a mono 1-D waveform (got shape {wave.shape})",
                             "down-mix to mono first")
        context = context or AugmentContext()
        view = read_only(wave)
        try:
            result = self.apply(view, rng, context)
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

    def pick(self, rng: np.random.Generator) -> str:
        """The method for one utterance, drawn with the weights."""
        return self.names[int(rng.choice(len(self.names), p=self.probabilities))]

    def apply(self, wave, rng, context=None):
        name = self.pick(rng)
        out, params = self.methods[name](wave, rng, context)
        return out, {"method": name, **params}

    def __repr__(self) -> str:
        return f"Weighted({dict(zip(self.names, self.probabilities.round(3)))})"


def weights_from_gains(baseline: float, results: Mapping[str, float], top_k: int | None = None) -> dict[str, float]:
    """The reference study's weights: gain = F1 - baseline F1, normalised over positive gains.

    A method with zero or negative gain is left out with a warning; ``top_k``
    keeps the k largest gains. Raises :class:`ParameterError` if none is left.
    """
    gains = {m: float(f1) - float(baseline) for m, f1 in results.items()}
    for m, g in gains.items():
        if g <= 0:
            warnings.warn(f"augmentation '{m}' has no gain over the baseline ({g:+.3f}); left out of the weights",
                          stacklevel=2)
    positive = sorted(((g, m) for m, g in gains.items() if g > 0), reverse=True)
    if top_k is not None:
        if top_k < 1:
            raise ParameterError(f"top-k must be at least 1 (got {top_k})", "e.g. top_k=2")
        positive = positive[:top_k]
    if not positive:
        raise ParameterError("no augmentation improves on the baseline, so no weights can be computed",
                             "give weights explicitly")
    total = sum(g for g, _ in positive)
    return {m: g / total for g, m in positive}

