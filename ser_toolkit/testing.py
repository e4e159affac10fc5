"""Conformance checks for plugins, shipped so plugin authors can run them on theirs.

In a plugin's test suite::

    from ser_toolkit.testing import check_augmentation
    from my_plugin import MyAugmentation

    def test_conformance():
        check_augmentation(MyAugmentation)

:func:`check_augmentation` asserts the augmentation contract: parameters
declared and validated at construction, the same seed gives bit-identical
output, different seeds differ (for stochastic augmentations), sampled
parameters are JSON-serialisable, output is finite float32 1-D audio, the
object pickles, the input is not modified, and 10 ms and long inputs work.
For a two-step augmentation (``randomize``/``apply_params``) it also checks that
the plan draws what ``apply`` draws, in the same order, pickles, and renders to
``apply``'s very output, of ``output_length`` samples; with ``keeps_length``, that
every output has the input's length.
The output checks run on what ``apply`` itself returns, by the rules sertk
enforces when it calls a plugin (:func:`ser_toolkit.augmentations.check_output`).
"""

from __future__ import annotations

import json
import pickle
from typing import Any, Mapping

import numpy as np

from ser_toolkit.augmentations import AugmentContext, Augmentation, PartnerPool, apply_error, check_output, read_only
from ser_toolkit.errors import ParameterError, PluginError, SertkError
from ser_toolkit.params import Param

RATE = 16000


def speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    """A deterministic voiced, syllabic test signal (harmonics on a moving F0, with pauses)."""
    rng = np.random.default_rng(seed)
    n = max(1, int(seconds * RATE))
    t = np.arange(n) / RATE
    f0 = 140 * (1 + 0.1 * np.sin(2 * np.pi * 0.7 * t))
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    voice = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = np.clip(np.sin(2 * np.pi * 3.0 * t), 0, None) ** 0.5
    x = 0.1 * voice * envelope + 0.003 * rng.standard_normal(n)
    return x.astype(np.float32)


def conformance_pool(seed: int = 0) -> PartnerPool:
    """A small partner pool (two utterances per emotion) for augmentations that need partners."""
    from ser_toolkit.emotions import EMOTIONS

    waves = {f"{e}_{k}": speechlike(1.0 + 0.5 * k, seed + 10 * i + k) for i, e in enumerate(EMOTIONS)
             for k in range(2)}
    return PartnerPool(list(waves), [k.rsplit("_", 1)[0] for k in waves], waves.__getitem__, "train")


def _context(emotion: str = "happy") -> AugmentContext:
    return AugmentContext(utterance_id="input", emotion=emotion, partners=conformance_pool())


def _invalid_value(p: Param) -> Any:
    if p.choices is not None:
        bad = "__not_a_choice__" if p.base_type == "str" else -12345
        return [bad] if p.is_list else bad
    if p.min is not None:
        bad = p.min - 1
    elif p.max is not None:
        bad = p.max + 1
    else:
        return None
    bad = int(bad) if p.base_type == "int" else float(bad)
    return [bad] if p.is_list else bad


def check_augmentation(cls: type[Augmentation], options: Mapping[str, Any] | None = None,
                       long_seconds: float = 60.0) -> None:
    """Assert that ``cls`` (built with ``options``) follows the augmentation contract."""
    options = dict(options or {})
    assert isinstance(cls.name, str) and cls.name, "an augmentation needs a non-empty 'name'"
    assert isinstance(cls.description, str) and cls.description, f"{cls.name}: needs a 'description'"
    assert all(isinstance(p, Param) for p in cls.params), f"{cls.name}: params must be Param objects"
    aug = cls(**options)
    # invalid values are rejected at construction, naming the parameter
    for p in cls.params:
        bad = _invalid_value(p)
        if bad is None or p.name in options:
            continue
        try:
            cls(**{**options, p.name: bad})
        except ParameterError as exc:
            assert p.name in str(exc), f"{cls.name}: the error for {p.name}={bad!r} does not name it: {exc}"
        else:
            raise AssertionError(f"{cls.name}: {p.name}={bad!r} was accepted ({p.allowed()} is allowed)")
    wave = speechlike(1.5)
    before = wave.copy()
    out1, params1 = _apply(aug, wave, 0)
    assert np.array_equal(wave, before), f"{cls.name}: modified its input in place"
    out2, params2 = _apply(aug, wave, 0)
    assert out1.dtype == np.float32 and out1.ndim == 1 and out1.size > 0, f"{cls.name}: output must be float32 1-D"
    assert np.isfinite(out1).all(), f"{cls.name}: output has NaN/inf"
    assert np.array_equal(out1, out2) and params1 == params2, f"{cls.name}: the same seed gave different output"
    json.dumps(params1)  # sampled parameters must be JSON-serialisable
    out_c, params_c = aug(wave, np.random.default_rng(0), _context())
    assert np.array_equal(out1, out_c) and params1 == params_c, f"{cls.name}: calling it differs from its apply"
    if cls.stochastic:
        outs = [_apply(aug, wave, s)[0] for s in range(1, 6)]
        assert any(not np.array_equal(o, out1) for o in outs), f"{cls.name}: output ignores the seed"
    clone = pickle.loads(pickle.dumps(aug))
    out3, _ = _apply(clone, wave, 0)
    assert np.array_equal(out1, out3), f"{cls.name}: a pickled copy gives different output"
    for seconds in (0.01, long_seconds):
        x = speechlike(seconds, seed=3)
        y, p = _apply(aug, x, 7, f" (on a {seconds} s input)")
        assert y.ndim == 1 and y.size > 0 and np.isfinite(y).all(), f"{cls.name}: failed on a {seconds} s input"
        json.dumps(p)
        _check_two_step(aug, x, 7, y, p, f" (on a {seconds} s input)")
    _check_two_step(aug, wave, 0, out1, params1)


def _check_two_step(aug: Augmentation, wave: np.ndarray, seed: int, out: np.ndarray, params: dict[str, Any],
                    where: str = "") -> None:
    """randomize + apply_params against apply's ``(out, params)`` for ``seed`` (see the module doc)."""
    name = aug.name
    if aug.keeps_length:
        assert out.size == wave.size, f"{name}: keeps_length, but returned {out.size} of {wave.size} samples{where}"
    if not aug.two_step():
        return
    rng, after_apply = np.random.default_rng(seed), np.random.default_rng(seed)
    aug.apply(read_only(wave), after_apply, _context())
    plan = aug.randomize(wave.size, rng, _context())
    assert isinstance(plan, dict), f"{name}: randomize must return a dict{where}"
    assert rng.integers(1 << 62) == after_apply.integers(1 << 62), \
        f"{name}: randomize draws differently from apply{where}"
    plan = pickle.loads(pickle.dumps(plan))  # plans travel to DataLoader workers
    for _ in range(2):  # rendering a plan twice gives the same: apply_params neither draws nor changes it
        context = _context()
        try:
            result = aug.apply_params(read_only(wave), plan, context)
        except SertkError:
            raise
        except Exception as exc:
            raise AssertionError(f"{apply_error(name, exc, context.utterance_id)}{where}") from exc
        y, p = check_output(name, result, context.utterance_id)
        assert np.array_equal(y, out) and p == params, f"{name}: apply_params(randomize(...)) differs from apply{where}"
    length = aug.output_length(wave.size, plan)
    assert length == out.size, f"{name}: output_length said {length}, apply_params returned {out.size} samples{where}"


def _apply(aug: Augmentation, wave: np.ndarray, seed: int, where: str = "") -> tuple[np.ndarray, dict[str, Any]]:
    """``aug.apply`` on a read-only view of ``wave``, its raw result checked as sertk checks it (no cast)."""
    context = _context()
    view = read_only(wave)
    try:
        try:
            result = aug.apply(view, np.random.default_rng(seed), context)
        except SertkError:
            raise
        except Exception as exc:
            raise apply_error(aug.name, exc, context.utterance_id) from exc
        return check_output(aug.name, result, context.utterance_id)
    except PluginError as exc:
        raise AssertionError(f"{exc}{where}") from exc
