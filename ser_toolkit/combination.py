"""Combination weights from finished runs, the reference study's formula.

gain_i = F1(model_i) - F1(reference), both on the combined clean + augmented-by-i
held-out set (weighted F1, from the stored per-utterance predictions), then
normalised over the methods with positive gain
(:func:`ser_toolkit.augmentations.weights_from_gains`). A study takes them on
its validation part (``part="valid"``, results in ``RUN/selection/``) against
the clean x2 control; the reference study took them on test against the
baseline (``part="test"``, ``RUN/eval/``), which selects on test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ser_toolkit.augmentations import weights_from_gains
from ser_toolkit.errors import SertkError


PARTS = {"test": "eval", "valid": "selection"}
"""Held-out part -> the run subfolder its evaluations are in."""


def _predictions(run: Path, name: str, part: str) -> tuple[list[int], list[int]]:
    from ser_toolkit.evaluation import read_predictions
    from ser_toolkit.training.runs import check_run

    check_run(run)  # a finished, intact run
    _, y_true, y_pred = read_predictions(run / PARTS[part] / f"{name}.predictions.csv")
    return y_true.tolist(), y_pred.tolist()


def combined_f1(run: Path, method: str, part: str = "test") -> float:
    """Weighted F1 of a run on its clean held-out ``part`` plus that part augmented by ``method``."""
    from sklearn.metrics import f1_score

    t1, p1 = _predictions(run, part, part)
    t2, p2 = _predictions(run, f"{part}-{method}", part)
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


def check_run_folders(baseline: Path, runs: Sequence[Path]) -> None:
    """``--weights-from`` folders: each an existing run folder, the baseline and at least one method run."""
    for run in (baseline, *runs):
        run = Path(run)
        if not run.is_dir():
            where = f" ({run.resolve()})" if not run.is_absolute() else ""
            what = "does not exist" if not run.exists() else "is not a folder"
            raise SertkError(f"--weights-from {run}: the run folder{where} {what}",
                             "pass folders of finished 'sertk train' runs: the baseline first, then one run per "
                             "augmentation")
    if not runs:
        raise SertkError(f"--weights-from names only the baseline run {baseline}",
                         "repeat --weights-from with one run per augmentation after the baseline")


def gains_from_runs(baseline: Path, runs: Sequence[Path],
                    part: str = "test") -> tuple[dict[str, float], dict[str, float], float]:
    """(F1 per method, the reference run's F1 on each method's set, mean reference F1), on held-out ``part``."""
    f1, base = {}, {}
    for run in runs:
        m = run_method(run)
        f1[m] = combined_f1(run, m, part)
        base[m] = combined_f1(baseline, m, part)
    return f1, base, sum(base.values()) / max(len(base), 1)


def weights_from_runs(baseline: Path, runs: Sequence[Path], top_k: int | None = None) -> dict[str, float]:
    """Weights over the methods of ``runs`` from their gains over ``baseline`` (paired per method)."""
    check_run_folders(baseline, runs)
    f1, base, _ = gains_from_runs(baseline, runs)
    return weights_from_gains(0.0, {m: f1[m] - base[m] for m in f1}, top_k)
