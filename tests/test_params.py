"""Parameter declaration and validation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ser_toolkit.errors import ParameterError
from ser_toolkit.params import Param, parse_assignments, validate

PARAMS = (
    Param("rate", 1.0, "tempo", type="float", min=0.5, max=2.0, unit="x"),
    Param("n", 3, "count", type="int", min=1),
    Param("mode", "a", "mode", choices=("a", "b")),
    Param("flag", False, "switch", type="bool"),
    Param("rates", [0.9, 1.1], "choices", type="list[float]", min=0.5, max=2.0),
    Param("file", None, "optional path", type="path"),
)


def test_defaults_filled_and_strings_converted():
    out = validate(PARAMS, {"rate": "1.5", "n": "7", "flag": "yes", "rates": "0.8,1.2"}, "t")
    assert out == {"rate": 1.5, "n": 7, "mode": "a", "flag": True, "rates": [0.8, 1.2], "file": None}


@pytest.mark.parametrize("values, needle", [
    ({"rate": "3"}, "'rate' must be a float between 0.5 and 2.0"),
    ({"rate": "fast"}, "'rate'"),
    ({"rate": "nan"}, "'rate'"),
    ({"n": "1.5"}, "'n' must be an int"),
    ({"n": "0"}, ">= 1"),
    ({"mode": "c"}, "one of a, b"),
    ({"flag": "perhaps"}, "'flag'"),
    ({"rates": "0.8,9"}, "'rates'"),
    ({"rates": ""}, "must not be empty"),
    ({"speed": 1}, "unknown parameter 'speed'"),
])
def test_invalid_values_name_the_parameter(values, needle):
    with pytest.raises(ParameterError) as info:
        validate(PARAMS, values, "augmentation 'x'")
    assert needle in str(info.value) and "augmentation 'x'" in str(info.value)


@given(st.floats(min_value=0.5, max_value=2.0, allow_nan=False))
def test_any_in_range_float_round_trips_through_text(x):
    assert validate(PARAMS, {"rate": repr(x)}, "t")["rate"] == x


@given(st.floats(allow_nan=False, allow_infinity=False).filter(lambda v: v < 0.5 or v > 2.0))
def test_any_out_of_range_float_is_rejected(x):
    with pytest.raises(ParameterError):
        validate(PARAMS, {"rate": x}, "t")


def test_parse_assignments():
    assert parse_assignments(["a=1", " b = x=y "]) == {"a": "1", "b": "x=y"}
    with pytest.raises(ParameterError):
        parse_assignments(["novalue"])
