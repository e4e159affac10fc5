"""The numbers behind a report: estimates with their uncertainty, corrected paired comparisons, chance levels.

Seeds (and folds) are replicates: a cell is the mean ± sample SD over runs, with
a 95 % interval from a hierarchical bootstrap over seeds and, within them, test
speakers (utterances when speakers are unknown; :mod:`ser_toolkit.stats`).
Every model is compared on the same utterances and seeds with the baseline and
with the control, on the sets the study asks about (:func:`primary_tests`); the
p-values of one table (one metric and reference, every model and set) are
adjusted together (:data:`CORRECTION`), and an effect is significant only when
the adjusted p is below :data:`ALPHA`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ser_toolkit.emotions import EMOTIONS
from ser_toolkit.report.collect import Model
from ser_toolkit.settings import MIN_GAIN

ROUNDS = 1000
"""Bootstrap rounds of every interval."""
TEST_ROUNDS = 4000
"""Bootstrap rounds of every paired test (p-values down to 1/4001 before adjustment)."""
ALPHA = 0.05
CORRECTION = "Benjamini–Hochberg"
"""How the p-values of a table are adjusted (false discovery rate ALPHA over the table's comparisons)."""
MIN_GAIN_FOR_SHARE = MIN_GAIN
"""Below this gain over the baseline, a share of the gain is noise over noise (the declared minimal effect)."""


@dataclass
class Estimate:
    """One model on one test set: mean and sample SD over runs, 95 % hierarchical interval."""

    mean: float
    sd: float  # nan with one run
    lo: float
    hi: float
    runs: int
    replicates: int  # seeds (a seed's folds pooled)
    unit: str  # "speakers" or "utterances"


@dataclass
class Comparison:
    """``model`` minus ``reference`` on one test set and metric, paired on utterances and seeds."""

    model: str
    reference: str
    test: str
    metric: str
    delta: float
    lo: float
    hi: float
    p: float
    p_adj: float = float("nan")  # adjusted over the comparisons of its table (CORRECTION)
    replicates: int = 1

    @property
    def significant(self) -> bool:
        """Adjusted p below ALPHA, with at least two seeds (one seed cannot tell an effect from seed luck)."""
        return bool(self.p_adj < ALPHA and self.replicates >= 2)


def statistic(metric: str):
    """The confusion-matrix form of a metric (vectorised over bootstrap rounds)."""
    from ser_toolkit.stats import CM_METRICS

    return CM_METRICS[metric]


def per_class(kind: str):
    """Per-emotion precision, recall or F1 from confusion matrices (B, 7, 7) -> (B, 7)."""
    from ser_toolkit.stats import _prf

    index = {"precision": 0, "recall": 1, "f1": 2}[kind]
    return lambda cm: _prf(cm)[index]


def _replicates(m: Model, test: str) -> tuple[np.ndarray, list[np.ndarray], np.ndarray | None] | None:
    preds = m.preds.get(test) or []
    if not preds or any(p[0] != preds[0][0] for p in preds):
        return None
    return preds[0][1], [p[2] for p in preds], m.groups(test)


def unit(m: Model, test: str) -> str:
    return "utterances" if m.groups(test) is None else "speakers"


def estimate(m: Model, test: str, metric: str, seed: int = 0) -> Estimate | None:
    """Mean ± sample SD over the runs' metrics, and the hierarchical 95 % interval."""
    from ser_toolkit.stats import hierarchical_ci, sample_sd

    vals = [e[metric] for e in m.evals.get(test, [])]
    if not vals:
        return None
    reps = _replicates(m, test)
    lo = hi = float("nan")
    if reps is not None:
        y, preds, groups = reps
        lo, hi = (float(np.clip(x, 0, 1)) for x in hierarchical_ci(y, preds, groups, statistic(metric), ROUNDS,
                                                                     seed))
    return Estimate(float(np.mean(vals)), float(sample_sd(vals)), lo, hi, len(vals),
                    len(m.preds.get(test) or []), unit(m, test))


def per_emotion_interval(m: Model, test: str, kind: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
    """95 % hierarchical intervals of every emotion's precision, recall or F1 (arrays of 7)."""
    from ser_toolkit.stats import hierarchical_ci

    reps = _replicates(m, test)
    if reps is None:
        return None
    y, preds, groups = reps
    lo, hi = hierarchical_ci(y, preds, groups, per_class(kind), ROUNDS, seed)
    return np.clip(np.asarray(lo), 0, 1), np.clip(np.asarray(hi), 0, 1)  # metrics live in [0, 1]


def compare(m: Model, ref: Model, test: str, metric: str, seed: int = 1) -> Comparison | None:
    """``m`` against ``ref`` on ``test``: paired on utterances and on replicates of the same seed (and fold)."""
    from ser_toolkit.stats import paired_test

    if not m.preds.get(test) or not ref.preds.get(test):
        return None
    common = [k for k in m.keys[test] if k in ref.keys[test]]
    if not common or m.preds[test][0][0] != ref.preds[test][0][0]:
        return None
    a = [ref.preds[test][ref.keys[test].index(k)][2] for k in common]
    b = [m.preds[test][m.keys[test].index(k)][2] for k in common]
    r = paired_test(ref.preds[test][0][1], a, b, m.groups(test), statistic(metric), TEST_ROUNDS, seed)
    return Comparison(m.name, ref.name, test, metric, float(r["delta"]), float(r["ci_low"]), float(r["ci_high"]),
                      float(r["p"]), replicates=int(r["n_replicates"]))


def references(models: list[Model]) -> list[Model]:
    """What every model is compared with: the baseline and the clean x2 control (when there is one)."""
    return [m for m in models if m.role == "baseline"] + [m for m in models if m.role == "control"][:1]


def primary_tests(m: Model, tests: list[str]) -> list[str]:
    """The sets a model is tested on: clean, its own augmented set (a single method), mixed, cross-corpus."""
    own = [f"test-{p}" for p in m.plugins] if m.role == "single" else []
    return [t for t in tests if t == "test" or t in own or t == "test-mixed" or t.startswith("cross-")]


def comparisons(models: list[Model], tests: list[str], metric: str) -> list[Comparison]:
    """Every model against the baseline and against the control on its :func:`primary_tests`; the p-values of
    each reference's comparisons are adjusted together (:data:`CORRECTION`)."""
    from ser_toolkit.stats import benjamini_hochberg

    out = []
    for ref in references(models):
        family = []
        for m in models:
            if m is ref or (ref.role == "control" and m.role == "baseline"):
                continue
            for t in primary_tests(m, tests):
                c = compare(m, ref, t, metric)
                if c is not None:
                    family.append(c)
        if family:
            for c, p in zip(family, benjamini_hochberg([c.p for c in family])):
                c.p_adj = float(p)
        out += family
    return out


def chance(y_true: np.ndarray, metric: str) -> float:
    """The expected metric of a guess drawn uniformly at random among the 7 emotions.

    Recall of every emotion is 1/7 (so accuracy and UAR are 1/7); the precision
    of an emotion is its share of the set; macro F1 averages over the emotions
    the set has, weighted F1 weights them by support.
    """
    k = len(EMOTIONS)
    counts = np.bincount(np.asarray(y_true), minlength=k).astype(float)
    share = counts / counts.sum()
    present = counts > 0
    f1 = np.where(present, 2 * share * (1 / k) / np.where(present, share + 1 / k, 1), 0.0)
    return {"accuracy": 1 / k, "uar": 1 / k, "macro_f1": float(f1[present].mean()),
            "weighted_f1": float((share * f1).sum())}[metric]


def control_share(model_gain: float, control_gain: float,
                  min_gain: float = MIN_GAIN_FOR_SHARE) -> tuple[float | None, str]:
    """The share of a model's gain over the baseline that the clean x2 control also gets (more steps).

    Only meaningful when the model gains (at least ``min_gain``) and the control
    gains something but less than the model; otherwise ``None`` and the reason.
    """
    if model_gain < min_gain:
        return None, f"no gain over the baseline (< {min_gain})"
    if control_gain <= 0:
        return None, "the control does not gain: more steps explain none of it"
    if control_gain >= model_gain:
        return None, "the control gains as much or more: more steps explain all of it"
    return control_gain / model_gain, ""


def same_table(models: list[Model], tests: list[str], a: str, b: str, tol: float = 5e-4) -> bool:
    """Whether metrics ``a`` and ``b`` give the same table (e.g. weighted and macro F1 on balanced sets)."""
    pairs = [(e[a], e[b]) for m in models for t in tests for e in m.evals.get(t, [])]
    return bool(pairs) and all(abs(x - y) <= tol for x, y in pairs)


def share_of_top_class(evaluation: dict[str, Any]) -> tuple[str, float]:
    """The emotion predicted most often on a set and its share of the predictions."""
    cm = np.asarray(evaluation["confusion"], float)
    predicted = cm.sum(0)
    j = int(predicted.argmax())
    return EMOTIONS[j], float(predicted[j] / max(predicted.sum(), 1))


def selection_comparisons(study: dict[str, Any]) -> dict[str, Comparison]:
    """Each single method's selection gain with its uncertainty: weighted F1 on clean + its augmented set of the
    selection part, against the study's reference model, paired on utterances and seeds.

    A seed's folds are pooled (they hold different utterances), so with folds the difference is that of the
    pooled selection parts; without folds it equals the study's gain. Methods whose selection predictions are
    missing are left out. The p-values are adjusted together (:data:`CORRECTION`).
    """
    from pathlib import Path

    from ser_toolkit.combination import PARTS
    from ser_toolkit.report.collect import _check_predictions, _read_eval
    from ser_toolkit.evaluation import read_predictions, read_speakers
    from ser_toolkit.stats import benjamini_hochberg, paired_test
    from ser_toolkit.training.runs import run_info

    sel = study.get("selection") or {}
    part = "valid" if sel.get("set") == "validation" else "test"
    ref = sel.get("reference_model", "baseline")
    plan = study.get("runs") or []
    run_ids: dict[str, str] = {}

    def pooled(name: str, method: str, seed: int) -> tuple[list[str], np.ndarray, np.ndarray, list[str]] | None:
        runs = sorted((r for r in plan if r.get("name") == name and r.get("seed") == seed),
                      key=lambda r: r.get("fold") or 0)
        ids: list[str] = []
        ys, ps, spk = [], [], []
        for r in runs:
            if r["run"] not in run_ids:
                run_ids[r["run"]] = run_info(Path(r["run"]))["run_id"]  # checked by collect()
            for set_name in (part, f"{part}-{method}"):
                csv_path = Path(r["run"]) / PARTS[part] / f"{set_name}.predictions.csv"
                json_path = csv_path.with_name(f"{set_name}.json")
                if not csv_path.is_file() or not json_path.is_file():
                    return None
                _check_predictions(csv_path, _read_eval(json_path, run_ids[r["run"]]))
                u, y, p = read_predictions(csv_path)
                s = read_speakers(csv_path)
                ids += [f"{set_name}/{x}" for x in u]
                ys.append(y)
                ps.append(p)
                spk += s if s is not None else [f"{set_name}/{x}" for x in u]  # unknown: one group per utterance
        if not runs:
            return None
        return ids, np.concatenate(ys), np.concatenate(ps), spk

    out: dict[str, Comparison] = {}
    seeds = sorted({r["seed"] for r in plan if r.get("name") == ref})
    for m in study.get("gains", {}):
        a, b = [], []
        for s in seeds:
            ra, rb = pooled(ref, m, s), pooled(m, m, s)
            if ra is None or rb is None or ra[0] != rb[0]:
                continue
            a.append(ra)
            b.append(rb)
        if not a or any(x[0] != a[0][0] for x in a):
            continue
        r = paired_test(a[0][1], [x[2] for x in a], [x[2] for x in b], np.asarray(a[0][3]),
                        statistic("weighted_f1"), TEST_ROUNDS, seed=2)
        out[m] = Comparison(m, ref, part, "weighted_f1", float(r["delta"]), float(r["ci_low"]),
                            float(r["ci_high"]), float(r["p"]), replicates=int(r["n_replicates"]))
    for c, p in zip(out.values(), benjamini_hochberg([c.p for c in out.values()])):
        c.p_adj = float(p)
    return out
