"""Metrics checked against scikit-learn on known predictions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score

from ser_toolkit.emotions import EMOTIONS
from ser_toolkit.evaluation import compute_metrics


def test_known_case():
    y_true = [0, 0, 1, 1, 2, 2, 2, 3]
    y_pred = [0, 1, 1, 1, 2, 0, 2, 3]
    m = compute_metrics(y_true, y_pred)
    assert m["accuracy"] == 6 / 8
    assert m["uar"] == np.mean([1 / 2, 1, 2 / 3, 1])
    assert m["per_emotion"]["neutral"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert m["per_emotion"]["fear"]["support"] == 0
    assert m["missing_emotions"] == ["fear", "disgust", "surprise"]
    assert m["confusion"][2] == [1, 0, 2, 0, 0, 0, 0]
    assert m["macro_f1"] == f1_score(y_true, y_pred, average="macro")


@pytest.mark.filterwarnings("ignore:A single label was found")
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=1, max_size=200))
@settings(max_examples=200, deadline=None)
def test_against_sklearn(pairs):
    y_true, y_pred = map(list, zip(*pairs))
    m = compute_metrics(y_true, y_pred)
    labels = list(range(len(EMOTIONS)))
    assert np.isclose(m["weighted_f1"], f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0))
    present = sorted(set(y_true))
    assert np.isclose(m["macro_f1"], f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0))
    if set(y_pred) <= set(y_true):
        assert np.isclose(m["uar"], balanced_accuracy_score(y_true, y_pred))
    assert m["confusion"] == confusion_matrix(y_true, y_pred, labels=labels).tolist()
    assert np.isclose(m["accuracy"], accuracy_score(y_true, y_pred))
    assert sum(v["support"] for v in m["per_emotion"].values()) == len(y_true) == m["n"]
