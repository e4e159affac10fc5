"""The shipped conformance suite, run against every registered augmentation (third-party ones too)."""

from __future__ import annotations

import pytest

from ser_toolkit.registry import get_registry
from ser_toolkit.testing import check_augmentation

AUGMENTATIONS = get_registry().entries("augmentation")


@pytest.mark.parametrize("entry", AUGMENTATIONS, ids=[e.name for e in AUGMENTATIONS])
def test_conformance(entry):
    check_augmentation(entry.obj)


def test_all_builtins_registered():
    assert {"timestretch", "noise", "specaugment", "ncp", "duplicate"} <= {e.name for e in AUGMENTATIONS}


@pytest.mark.slow
@pytest.mark.parametrize("entry", [e for e in AUGMENTATIONS if e.provider.distribution == "sertk"],
                         ids=lambda e: e.name)
def test_ten_minute_input(entry):
    check_augmentation(entry.obj, long_seconds=600)
