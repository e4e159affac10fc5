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


def test_plugins_json_lists_the_five_augmentations_with_parameters(cli):
    import json

    listed = {e["name"]: e for e in json.loads(cli("plugins", "--json", "--kind", "augmentation").out)}
    assert {"timestretch", "noise", "specaugment", "ncp", "duplicate"} <= set(listed)
    ts = {p["name"]: p for p in listed["timestretch"]["params"]}
    assert ts["rates"]["default"] == [0.8, 0.9, 1.0, 1.1, 1.2] and ts["rate"]["range"] == [0.25, 4.0]
    noise = {p["name"]: p for p in listed["noise"]["params"]}
    assert noise["levels"]["default"] == [0.001, 0.005, 0.01] and noise["snr_db"]["unit"] == "dB"
    spec = {p["name"]: p for p in listed["specaugment"]["params"]}
    assert spec["time_mask"]["default"] == [10, 20, 30] and spec["scale"]["choices"] == ["mel", "linear"]
    assert {p["name"] for p in listed["ncp"]["params"]} == {"mode", "crossfade_ms"}
    assert all(e["distribution"] == "sertk" for n, e in listed.items() if n != "reverb")
