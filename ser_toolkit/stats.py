"""Statistics for comparing models on the same test utterances.

- :func:`bootstrap_ci`: a 95 % interval of a metric by resampling test
  utterances (the same resample for every seed; seeds averaged inside).
- :func:`paired_bootstrap`: the difference of a metric between two models on
  the same utterances, its interval and a two-sided p-value.
- :func:`mcnemar`: the exact McNemar test on paired correct/incorrect outcomes.

All take an explicit seed.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

Metric = Callable[[np.ndarray, np.ndarray], float]


N_CLASSES = 7


def confusions(y_true: np.ndarray, y_pred: np.ndarray, resamples: np.ndarray | None = None) -> np.ndarray:
    """Confusion matrices (R, C, C) of ``resamples`` (R, n) index sets (one matrix when None)."""
    codes = np.asarray(y_true) * N_CLASSES + np.asarray(y_pred)
    idx = np.arange(codes.size)[None, :] if resamples is None else resamples
    flat = codes[idx] + (N_CLASSES * N_CLASSES) * np.arange(idx.shape[0])[:, None]
    counts = np.bincount(flat.ravel(), minlength=idx.shape[0] * N_CLASSES * N_CLASSES)
    return counts.reshape(idx.shape[0], N_CLASSES, N_CLASSES).astype(np.float64)


def _prf(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    diag = np.diagonal(cm, axis1=1, axis2=2)
    support = cm.sum(2)
    predicted = cm.sum(1)
    recall = np.divide(diag, support, out=np.zeros_like(diag), where=support > 0)
    precision = np.divide(diag, predicted, out=np.zeros_like(diag), where=predicted > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(diag), where=denom > 0)
    return precision, recall, f1, support


def cm_weighted_f1(cm: np.ndarray) -> np.ndarray:
    _, _, f1, support = _prf(cm)
    return (f1 * support).sum(1) / support.sum(1)


def cm_macro_f1(cm: np.ndarray) -> np.ndarray:
    """Macro F1 over the classes present in the true labels."""
    _, _, f1, support = _prf(cm)
    present = support > 0
    return (f1 * present).sum(1) / present.sum(1)


def cm_uar(cm: np.ndarray) -> np.ndarray:
    """Unweighted average recall over the classes present in the true labels."""
    _, recall, _, support = _prf(cm)
    present = support > 0
    return (recall * present).sum(1) / present.sum(1)


def cm_accuracy(cm: np.ndarray) -> np.ndarray:
    return np.trace(cm, axis1=1, axis2=2) / cm.sum((1, 2))


CM_METRICS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "weighted_f1": cm_weighted_f1, "macro_f1": cm_macro_f1, "uar": cm_uar, "accuracy": cm_accuracy}


def _scalar(cm_metric: Callable[[np.ndarray], np.ndarray]) -> Metric:
    def metric(y_true: np.ndarray, y_pred: np.ndarray) -> float:
        return float(cm_metric(confusions(y_true, y_pred))[0])

    metric.cm = cm_metric  # type: ignore[attr-defined]
    return metric


weighted_f1 = _scalar(cm_weighted_f1)
macro_f1 = _scalar(cm_macro_f1)
uar = _scalar(cm_uar)
accuracy = _scalar(cm_accuracy)

METRICS: dict[str, Metric] = {"weighted_f1": weighted_f1, "macro_f1": macro_f1, "uar": uar, "accuracy": accuracy}


def _resamples(n: int, rounds: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(rounds, n))


def _seed_mean(metric: Metric, y_true: np.ndarray, preds: Sequence[np.ndarray], idx: np.ndarray) -> np.ndarray:
    """Seed-averaged metric for every resample (vectorised over resamples)."""
    cm_metric = getattr(metric, "cm", None)
    if cm_metric is not None:
        return np.mean([cm_metric(confusions(y_true, p, idx)) for p in preds], axis=0)
    return np.array([np.mean([metric(y_true[i], p[i]) for p in preds]) for i in idx])


def bootstrap_ci(y_true: np.ndarray, preds: Sequence[np.ndarray], metric: Metric, rounds: int = 1000,
                 seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Interval of the seed-averaged metric, resampling utterances."""
    y_true = np.asarray(y_true)
    preds = [np.asarray(p) for p in preds]
    values = _seed_mean(metric, y_true, preds, _resamples(y_true.size, rounds, seed))
    lo, hi = np.percentile(values, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def paired_bootstrap(y_true: np.ndarray, preds_a: Sequence[np.ndarray], preds_b: Sequence[np.ndarray],
                     metric: Metric, rounds: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Difference metric(b) - metric(a) on the same utterances: observed, interval, two-sided p."""
    y_true = np.asarray(y_true)
    a = [np.asarray(p) for p in preds_a]
    b = [np.asarray(p) for p in preds_b]
    full = np.arange(y_true.size)[None, :]
    observed = float(_seed_mean(metric, y_true, b, full)[0] - _seed_mean(metric, y_true, a, full)[0])
    idx = _resamples(y_true.size, rounds, seed)
    diffs = _seed_mean(metric, y_true, b, idx) - _seed_mean(metric, y_true, a, idx)
    lo, hi = np.percentile(diffs, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    p = min(1.0, 2 * min(np.mean(diffs <= 0), np.mean(diffs >= 0)))
    return {"delta": observed, "ci_low": float(lo), "ci_high": float(hi), "p": float(max(p, 1 / rounds))}


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> dict[str, float]:
    """Exact McNemar test: b = only A right, c = only B right; p from Binomial(b + c, 1/2)."""
    from scipy.stats import binomtest

    a, b_ = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    only_a, only_b = int(np.sum(a & ~b_)), int(np.sum(~a & b_))
    n = only_a + only_b
    p = 1.0 if n == 0 else float(binomtest(min(only_a, only_b), n, 0.5).pvalue)
    return {"only_a": only_a, "only_b": only_b, "p": p}
