"""Combination weights from finished runs, the reference study's way.

gain_i = F1(model_i) - F1(baseline), both on the combined clean + augmented-by-i
test set (weighted F1, from the stored per-utterance predictions), then
normalised over the methods with positive gain
(:func:`ser_toolkit.augmentations.weights_from_gains`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ser_toolkit.augmentations import weights_from_gains
from ser_toolkit.errors import SertkError


def _predictions(run: Path, name: str) -> tuple[list[int], list[int]]:
    from ser_toolkit.evaluation import read_predictions
    from ser_toolkit.training.runs import check_run

    check_run(run)  # a finished, intact run
    _, y_true, y_pred = read_predictions(run / "eval" / f"{name}.predictions.csv")
    return y_true.tolist(), y_pred.tolist()


def combined_f1(run: Path, method: str) -> float:
    """Weighted F1 of a run on its clean test set plus the test set augmented by ``method``."""
    from sklearn.metrics import f1_score

    t1, p1 = _predictions(run, "test")
    t2, p2 = _predictions(run, f"test-{method}")
    return float(f1_score(t1 + t2, p1 + p2, average="weighted", zero_division=0))


def run_method(run: Path) -> str:
    from ser_toolkit.training.runs import read_json

    plugins = read_json(run / "config.json").get("train", {}).get("plugins")
    if not isinstance(plugins, list):
        raise SertkError(f"{run / 'config.json'} is malformed (no train.plugins)", "pass a folder of 'sertk train'")
    if len(plugins) != 1:
        raise SertkError(f"run {run} trained with {plugins or 'no augmentation'}, not one method",
                         "--weights-from takes the baseline run, then one run per single augmentation")
    return plugins[0]


def gains_from_runs(baseline: Path, runs: Sequence[Path]) -> tuple[dict[str, float], dict[str, float], float]:
    """(F1 per method, the baseline's F1 per method's test set, mean baseline F1)."""
    f1, base = {}, {}
    for run in runs:
        m = run_method(run)
        f1[m] = combined_f1(run, m)
        base[m] = combined_f1(baseline, m)
    return f1, base, sum(base.values()) / max(len(base), 1)


def weights_from_runs(baseline: Path, runs: Sequence[Path], top_k: int | None = None) -> dict[str, float]:
    """Weights over the methods of ``runs`` from their gains over ``baseline`` (paired per method)."""
    f1, base, _ = gains_from_runs(baseline, runs)
    return weights_from_gains(0.0, {m: f1[m] - base[m] for m in f1}, top_k)
