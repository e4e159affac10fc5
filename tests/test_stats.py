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


# ---------------------------------------------------------------------------
# Hierarchical (seed x speaker) statistics
# ---------------------------------------------------------------------------

_BASE_LOGIT = np.array([1.2, 0.8, 0.5, 0.3, 0.0, -0.2, 0.6])  # per-class ease; UAR != accuracy


def _truth_uar(sd_seed: float, sd_spk: float, sd_utt: float, shift: float = 0.0) -> float:
    """Expected UAR over seeds, speakers and utterances (Monte Carlo, 10^6 draws)."""
    from scipy.special import expit

    z = np.random.default_rng(12345).normal(0, np.sqrt(sd_seed ** 2 + sd_spk ** 2 + sd_utt ** 2), 1_000_000)
    return float(np.mean([expit(b + shift + z).mean() for b in _BASE_LOGIT]))


def _study(rng, n_seeds, sd_seed, sd_spk, sd_utt=0.5, n_spk=20, n_utt=40, shift=0.0, test=None):
    """One simulated study: 7 classes, n_spk test speakers with n_utt utterances each; seed r of the model
    is right with probability expit(class ease + seed shift + speaker ease + utterance ease) (utterance and
    speaker ease are shared by every seed and model); wrong answers are uniform over the other classes."""
    from scipy.special import expit

    if test is None:
        g = np.repeat(np.arange(n_spk), n_utt)
        test = (rng.integers(0, 7, g.size), g, rng.normal(0, sd_spk, n_spk)[g] + rng.normal(0, sd_utt, g.size))
    y, g, ease = test
    preds = []
    for _ in range(n_seeds):
        right = rng.random(y.size) < expit(_BASE_LOGIT[y] + shift + rng.normal(0, sd_seed) + ease)
        preds.append(np.where(right, y, (y + rng.integers(1, 7, y.size)) % 7))
    return y, preds, g, test


@pytest.mark.parametrize("n_seeds, sd_seed, sd_spk, sd_utt",
                         [(5, 0.15, 0.6, 0.5), (3, 0.4, 0.2, 0.5), (3, 0.05, 0.05, 0.0)],
                         ids=["5 seeds, speakers dominate", "3 seeds, seeds dominate",
                              "3 seeds, seed x utterance interaction dominates"])
def test_hierarchical_interval_covers_the_population_value(n_seeds, sd_seed, sd_spk, sd_utt):
    from ser_toolkit.stats import cm_uar, hierarchical_ci

    truth = _truth_uar(sd_seed, sd_spk, sd_utt)
    rng = np.random.default_rng(2024)
    studies, new, old = 400, 0, 0
    for i in range(studies):
        y, preds, g, _ = _study(rng, n_seeds, sd_seed, sd_spk, sd_utt)
        lo, hi = hierarchical_ci(y, preds, g, cm_uar, rounds=400, seed=i)
        new += lo <= truth <= hi
        lo, hi = bootstrap_ci(y, preds, uar, rounds=400, seed=i)
        old += lo <= truth <= hi
    assert 0.93 <= new / studies <= 0.99, new / studies
    if sd_seed >= 0.15:  # utterance-only resampling, seed variance ignored: far too narrow
        assert old / studies < 0.75, old / studies


def test_paired_test_type_one_error_and_power():
    from ser_toolkit.stats import cm_uar, paired_test

    rng = np.random.default_rng(7)
    studies, rejected, rejected_old = 300, 0, 0
    for i in range(studies):  # null: two models trained the same way (independent seeds) on the same test set
        y, a, g, test = _study(rng, 3, 0.2, 0.6)
        _, b, _, _ = _study(rng, 3, 0.2, 0.6, test=test)
        rejected += paired_test(y, a, b, g, cm_uar, rounds=400, seed=i)["p"] < 0.05
        rejected_old += paired_bootstrap(y, a, b, uar, rounds=400, seed=i)["p"] < 0.05
    assert 0.01 <= rejected / studies <= 0.06, rejected / studies
    assert rejected_old / studies > 0.2, rejected_old / studies  # utterance-only: seed noise read as an effect

    rejected = 0
    for i in range(studies):  # null, tiny per-seed effects: b is a with 12 utterances per seed predicted anew
        y, a, g, test = _study(rng, 3, 0.2, 0.6)
        _, fresh, _, _ = _study(rng, 3, 0.2, 0.6, test=test)
        b = []
        for p, q in zip(a, fresh):
            idx = rng.choice(y.size, 12, replace=False)
            b.append(p.copy())
            b[-1][idx] = q[idx]
        rejected += paired_test(y, a, b, g, cm_uar, rounds=400, seed=i)["p"] < 0.05
    assert rejected / studies <= 0.06, rejected / studies

    hits = 0
    for i in range(100):  # b is better by 0.6 logits (about +0.1 UAR)
        y, a, g, test = _study(rng, 5, 0.15, 0.6)
        _, b, _, _ = _study(rng, 5, 0.15, 0.6, shift=0.6, test=test)
        r = paired_test(y, a, b, g, cm_uar, rounds=400, seed=i)
        hits += r["p"] < 0.05 and r["ci_low"] > 0
    assert hits >= 80, hits


def test_paired_test_pairs_and_reports():
    from ser_toolkit.stats import _prf, cm_uar, paired_test

    rng = np.random.default_rng(11)
    y, a, g, test = _study(rng, 4, 0.1, 0.5)
    same = paired_test(y, a, [p.copy() for p in a], g, cm_uar, rounds=200)
    assert same["delta"] == 0 and same["p"] == 1 and same["ci_low"] == same["ci_high"] == 0
    assert (same["n_replicates"], same["n_groups"]) == (4, 20)
    _, b, _, _ = _study(rng, 3, 0.1, 0.5, shift=1.0, test=test)
    r = paired_test(y, a, b, g, cm_uar, rounds=200, seed=3)  # 4 vs 3 replicates: the first 3 of a are paired
    assert r["n_replicates"] == 3
    assert r["delta"] == pytest.approx(np.mean([uar(y, q) - uar(y, p) for p, q in zip(a[:3], b)]))
    assert r["ci_low"] < r["delta"] < r["ci_high"] and r["p"] >= 1 / 201
    per_class = paired_test(y, a, b, g, lambda cm: _prf(cm)[2], rounds=200)
    assert all(np.shape(per_class[k]) == (7,) for k in ("delta", "ci_low", "ci_high", "p"))
    ungrouped = paired_test(y, a, b, None, uar, rounds=200)  # a METRICS metric works too
    assert ungrouped["n_groups"] == y.size and ungrouped["delta"] == pytest.approx(r["delta"])


def test_replicate_bootstrap_one_replicate_no_groups_is_the_utterance_bootstrap():
    from ser_toolkit.stats import _resamples, _seed_mean, cm_accuracy, hierarchical_ci, interval, replicate_bootstrap

    rng = np.random.default_rng(4)
    n = 300
    y = rng.integers(0, 7, n)
    p = np.where(rng.random(n) < 0.6, y, rng.integers(0, 7, n))
    values = replicate_bootstrap(y, [p], None, cm_accuracy, rounds=500, seed=9)
    plain = _seed_mean(accuracy, y, [p], _resamples(n, 500, 9))
    assert values.shape == plain.shape == (500,)
    # same utterance draws; deviations from the full-data value scaled by the few-cluster factor sqrt(n/(n-1))
    full = accuracy(y, p)
    np.testing.assert_allclose(values, full + np.sqrt(n / (n - 1)) * (plain - full))
    lo, hi = interval(values)
    assert isinstance(lo, float) and lo < full < hi
    assert hierarchical_ci(y, [p], None, cm_accuracy, rounds=500, seed=9) == (lo, hi)


def test_replicate_bootstrap_per_class_shapes_and_speed():
    import time

    from ser_toolkit.stats import _prf, cm_uar, hierarchical_ci, replicate_bootstrap

    rng = np.random.default_rng(5)
    n = 2000
    y = rng.integers(0, 7, n)
    speakers = np.array([f"spk{i:02d}" for i in range(20)])[rng.integers(0, 20, n)]  # any labels
    preds = [np.where(rng.random(n) < 0.6 + 0.02 * r, y, rng.integers(0, 7, n)) for r in range(5)]
    f1 = replicate_bootstrap(y, preds, speakers, lambda cm: _prf(cm)[2], rounds=300, seed=1)
    assert f1.shape == (300, 7) and np.all((f1 > 0) & (f1 < 1))
    lo, hi = hierarchical_ci(y, preds, speakers, lambda cm: _prf(cm)[2], rounds=300, seed=1)
    assert lo.shape == hi.shape == (7,) and np.all(lo < hi)
    start = time.perf_counter()
    values = replicate_bootstrap(y, preds, speakers, cm_uar, rounds=1000, seed=0)
    assert time.perf_counter() - start < 1.0
    assert values.shape == (1000,)
    assert np.mean(values) == pytest.approx(np.mean([uar(y, p) for p in preds]), abs=0.01)


@pytest.mark.filterwarnings("ignore:A single label was found")
def test_weighted_confusions_match_sklearn_with_sample_weight():
    from sklearn.metrics import confusion_matrix

    from ser_toolkit.stats import _draw_groups, _replicate_stats, weighted_confusions

    rng = np.random.default_rng(6)
    n = 250
    y = rng.integers(0, 7, n)
    p = np.where(rng.random(n) < 0.5, y, rng.integers(0, 7, n))
    w = rng.integers(0, 4, size=(3, n)).astype(float)
    cms = weighted_confusions(y, p, w)
    for i in range(3):
        np.testing.assert_allclose(cms[i], confusion_matrix(y, p, labels=range(7), sample_weight=w[i]))
    # the per-speaker table used by the bootstrap gives the same matrices as per-utterance weights
    gid = rng.integers(0, 12, n)
    counts = _draw_groups(np.random.default_rng(0), 12, 5)
    tabled, _ = _replicate_stats(lambda cm: cm, y, [p], gid, 12, counts)
    np.testing.assert_allclose(tabled[0], weighted_confusions(y, p, counts[:, gid]))


def test_holm_adjusted_p_values():
    from ser_toolkit.stats import holm

    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    out = holm([0.01, np.nan, 0.04, 0.03, 0.005])  # NaN ignored: still m = 4
    assert np.isnan(out[1])
    np.testing.assert_allclose(out[[0, 2, 3, 4]], [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm([0.5, 0.6, 0.01]), [1.0, 1.0, 0.03])  # capped at 1, monotone
    assert np.isnan(holm([np.nan])).all() and holm([]).shape == (0,)


def test_benjamini_hochberg_adjusted_p_values():
    from ser_toolkit.stats import benjamini_hochberg

    # sorted 0.005, 0.01, 0.03, 0.04 -> p * 4 / rank = 0.02, 0.02, 0.04, 0.04 (running min from the top)
    np.testing.assert_allclose(benjamini_hochberg([0.01, 0.04, 0.03, 0.005]), [0.02, 0.04, 0.04, 0.02])
    out = benjamini_hochberg([np.nan, 0.01, 0.04, 0.03, 0.005, np.nan])
    assert np.isnan(out[[0, 5]]).all()
    np.testing.assert_allclose(out[1:5], [0.02, 0.04, 0.04, 0.02])
    np.testing.assert_allclose(benjamini_hochberg([0.2, 0.9]), [0.4, 0.9])


def test_sample_sd_is_the_ddof_1_standard_deviation():
    import statistics

    from ser_toolkit.stats import sample_sd

    values = [0.61, 0.64, 0.58, 0.66]
    assert sample_sd(values) == pytest.approx(np.std(values, ddof=1))
    assert sample_sd(values) == pytest.approx(statistics.stdev(values))
    assert sample_sd(values) > np.std(values)
    assert np.isnan(sample_sd([0.5])) and np.isnan(sample_sd([]))


def _one_utterance_gains(seed: int):
    """The collapsed case of a real study: 24 speakers x 14 utterances, 3 seeds; model b differs from model a
    on 26-40 utterances per seed (as many gains as losses plus one, on other utterances in every seed), so each
    seed's UAR gain is about one utterance (0.0033-0.0041) and the three gains are nearly equal."""
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(24), 14)
    y = rng.integers(0, 7, g.size)
    a, b = [], []
    for _ in range(3):
        ar = np.where(rng.random(y.size) < 0.6, y, (y + rng.integers(1, 7, y.size)) % 7)
        while True:
            k = int(rng.integers(13, 20))
            gain = rng.choice(np.flatnonzero(ar != y), k + 1, replace=False)
            loss = rng.choice(np.flatnonzero(ar == y), k, replace=False)
            br = ar.copy()
            br[gain] = y[gain]
            br[loss] = (y[loss] + rng.integers(1, 7, k)) % 7
            if 0.0033 <= uar(y, br) - uar(y, ar) <= 0.0041:
                break
        a.append(ar)
        b.append(br)
    return y, a, b, g


@pytest.mark.parametrize("case", [181, 183, 194])
def test_nearly_equal_seed_gains_of_one_utterance_are_not_significant(case):
    """The interval cannot collapse to the seeds' spread: with the seed x speaker interaction estimated larger
    than the speaker-bootstrap variance, the speaker part used to vanish (+0.004 [+0.003, +0.004], p < 0.05)."""
    from ser_toolkit.stats import cm_uar, paired_test

    y, a, b, g = _one_utterance_gains(case)
    gains = [uar(y, q) - uar(y, p) for p, q in zip(a, b)]
    assert max(gains) - min(gains) < 0.0008 and all(26 <= (p != q).sum() <= 40 for p, q in zip(a, b))
    r = paired_test(y, a, b, g, cm_uar, rounds=4000, seed=0)
    assert r["ci_low"] < 0 < r["ci_high"] and r["p"] > 0.2, r
    speakers_only = [paired_test(y, [p], [q], g, cm_uar, rounds=4000, seed=0) for p, q in zip(a, b)]
    # never narrower than the speaker resampling of the seed mean (each seed's own interval over sqrt(3))
    assert r["ci_high"] - r["ci_low"] >= np.mean([s["ci_high"] - s["ci_low"] for s in speakers_only]) / 3 ** 0.5 * 0.8
