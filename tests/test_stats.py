"""Statistics on constructed cases."""

from __future__ import annotations

import numpy as np
import pytest

from ser_toolkit.stats import accuracy, bootstrap_ci, mcnemar, paired_bootstrap, uar, weighted_f1


def test_mcnemar_exact():
    a = np.array([1] * 10 + [0] * 10, bool)
    b = np.array([1] * 10 + [1] * 10, bool)  # B right on 10 where A is wrong, never the reverse
    r = mcnemar(a, b)
    assert (r["only_a"], r["only_b"]) == (0, 10) and r["p"] == pytest.approx(2 * 0.5 ** 10)
    assert mcnemar(a, a)["p"] == 1.0
    r = mcnemar(np.array([1, 0] * 5, bool), np.array([0, 1] * 5, bool))
    assert r["p"] == pytest.approx(1.0)


def test_bootstrap_interval_contains_the_value_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (100, 1600):
        y = rng.integers(0, 7, n)
        p = np.where(rng.random(n) < 0.7, y, rng.integers(0, 7, n))
        lo, hi = bootstrap_ci(y, [p], accuracy, rounds=500, seed=1)
        assert lo <= accuracy(y, p) <= hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2.5  # ~ 1/sqrt(n)


def test_paired_bootstrap_tells_effect_from_noise():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 7, 400)
    base = np.where(rng.random(400) < 0.6, y, (y + 1) % 7)
    better = np.where(rng.random(400) < 0.5, y, base)  # fixes about half of the errors
    r = paired_bootstrap(y, [base], [better], weighted_f1, rounds=500)
    assert r["delta"] > 0.1 and r["ci_low"] > 0 and r["p"] < 0.01
    same = paired_bootstrap(y, [base], [base.copy()], weighted_f1, rounds=200)
    assert same["delta"] == 0 and same["ci_low"] <= 0 <= same["ci_high"]


def test_uar_is_mean_recall_over_present_classes():
    y = np.array([0, 0, 0, 0, 1, 1])
    p = np.array([0, 0, 0, 0, 0, 1])
    assert uar(y, p) == pytest.approx((1 + 0.5) / 2) and accuracy(y, p) == pytest.approx(5 / 6)


@pytest.mark.filterwarnings("ignore:A single label was found")
def test_vectorised_metrics_match_sklearn():
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    from ser_toolkit.stats import macro_f1

    rng = np.random.default_rng(5)
    for n in (1, 7, 50, 300):
        y = rng.integers(0, 7, n)
        p = np.where(rng.random(n) < 0.5, y, rng.integers(0, 7, n))
        assert weighted_f1(y, p) == pytest.approx(f1_score(y, p, average="weighted", zero_division=0))
        assert macro_f1(y, p) == pytest.approx(f1_score(y, p, labels=np.unique(y), average="macro", zero_division=0))
        assert accuracy(y, p) == pytest.approx(accuracy_score(y, p))
        if set(p) <= set(y):
            assert uar(y, p) == pytest.approx(balanced_accuracy_score(y, p))
