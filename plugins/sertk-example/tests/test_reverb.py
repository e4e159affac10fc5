"""The example augmentation: sertk's conformance suite plus its own behaviour."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from ser_toolkit.errors import ParameterError
from ser_toolkit.registry import build_registry
from ser_toolkit.testing import check_augmentation, speechlike
from sertk_example.reverb import Reverb


def test_conformance():
    check_augmentation(Reverb)


def test_registered_through_the_entry_point():
    assert build_registry().get("augmentation", "reverb").provider.distribution == "sertk-example"


def test_decay_grows_with_rt60():
    """Energy after the end of a burst lasts longer with a longer reverberation time."""
    x = np.zeros(16000, np.float32)
    x[:800] = speechlike(0.05)
    tails = []
    for rt60 in (0.2, 0.8):
        y, p = Reverb(rt60=rt60, wet=1.0)(x, np.random.default_rng(0))
        assert p == {"rt60": rt60, "wet": 1.0}
        tails.append(np.sum(y[4000:] ** 2))
    assert tails[1] > 10 * tails[0]


def test_invalid_parameters():
    with pytest.raises(ParameterError, match="'wet'"):
        Reverb(wet=2)
    with pytest.raises(ParameterError, match="'rt60_range'"):
        Reverb(rt60_range=[0.9, 0.1])


def test_sertk_augment_accepts_it(tmp_path):
    import soundfile as sf

    sf.write(str(tmp_path / "in.wav"), speechlike(1.0), 16000)
    r = subprocess.run([sys.executable, "-m", "ser_toolkit", "augment", "reverb", str(tmp_path / "in.wav"),
                        str(tmp_path / "out.wav"), "--set", "rt60=0.5", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"augmentation": "reverb", "params": {"rt60": 0.5, "wet": 0.5}}


def test_two_steps_are_the_one_step_call():
    """randomize samples everything (the impulse response too) before any audio; the log leaves it out."""
    x = speechlike(0.7)
    aug = Reverb()
    plan = aug.randomize(x.size, np.random.default_rng(4))
    assert set(plan) == {"rt60", "wet", "_ir"} and plan["_ir"].size == int(plan["rt60"] * 16000)
    y, p = aug.render(x, plan)
    ref, ref_p = aug(x, np.random.default_rng(4))
    assert np.array_equal(y, ref) and p == ref_p == {"rt60": plan["rt60"], "wet": 0.5}
    assert aug.planned_length(x.size, plan) == x.size == y.size
