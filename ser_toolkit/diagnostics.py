"""Flags for models that did not learn: a training loss at chance, predictions collapsed onto one class.

:func:`learning_flags` judges one run from its training summary and its
evaluations; :func:`run_flags` reads them from a run folder (``sertk evaluate``
prints them), :func:`report_warnings` lists them for every run of a report.
No heavy imports: numbers only.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from ser_toolkit.emotions import EMOTIONS

CHANCE_MARGIN = 0.02
"""A final training loss above ``(1 - CHANCE_MARGIN) * chance`` did not learn."""
DEGENERATE_SHARE = 0.90
"""A test set on which one class gets more than this share of the predictions is degenerate."""


def _class_counts(train_summary: Mapping[str, Any]) -> Optional[list[float]]:
    """Training label counts, when the summary has them (``train_emotions``: {emotion: n}, or
    ``class_counts``: a list in EMOTIONS order or a mapping)."""
    for key in ("train_emotions", "class_counts"):
        counts = train_summary.get(key)
        if isinstance(counts, Mapping):
            counts = list(counts.values())
        if isinstance(counts, (list, tuple)) and counts and all(
                isinstance(c, (int, float)) and not isinstance(c, bool) and c >= 0 for c in counts) and sum(counts):
            return [float(c) for c in counts]
    return None


def chance_loss(train_summary: Mapping[str, Any]) -> tuple[float, str]:
    """The cross-entropy of a model that learned only the class prior, and how it was obtained.

    The entropy of the training labels when the summary records their counts,
    else ln(number of classes) (``num_classes`` of the summary, else the 7 emotions).
    """
    counts = _class_counts(train_summary)
    if counts is not None:
        total = sum(counts)
        return -sum(c / total * math.log(c / total) for c in counts if c), "the entropy of the training labels"
    n = train_summary.get("num_classes")
    n = n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else len(EMOTIONS)
    return math.log(n), f"ln {n}"


def _final_loss(train_summary: Mapping[str, Any]) -> Optional[float]:
    history = train_summary.get("history")
    if not isinstance(history, list) or not history or not isinstance(history[-1], Mapping):
        return None
    loss = history[-1].get("train_loss")
    return float(loss) if isinstance(loss, (int, float)) and not isinstance(loss, bool) else None


def learning_flags(train_summary: Mapping[str, Any] | None, eval_metrics: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """What looks wrong with a trained model; empty when nothing does.

    - ``did not learn``: the final training loss (``history[-1]["train_loss"]``) is
      within 2 % of chance (:func:`chance_loss`) or above it;
    - ``degenerate on SET: predicts 'EMOTION' for NN % of it``: one class gets more
      than 90 % of the predictions on a test set (``eval_metrics``: set name ->
      eval JSON with its ``confusion`` matrix, rows true, columns predicted, in
      :data:`ser_toolkit.emotions.EMOTIONS` order).
    """
    flags: list[str] = []
    loss = _final_loss(train_summary or {})
    if loss is not None:
        chance, how = chance_loss(train_summary or {})
        if math.isnan(loss):
            flags.append("did not learn: the final training loss is nan")
        elif loss >= chance * (1 - CHANCE_MARGIN):
            where = "within 2 % of" if loss <= chance * (1 + CHANCE_MARGIN) else "above"
            flags.append(f"did not learn: final training loss {loss:.3f} is {where} chance ({chance:.3f}, {how})")
    for name, metrics in eval_metrics.items():
        confusion = metrics.get("confusion") if isinstance(metrics, Mapping) else None
        if not isinstance(confusion, list) or not all(isinstance(row, list) for row in confusion):
            continue
        predicted = [sum(row[k] for row in confusion if k < len(row)) for k in range(max(map(len, confusion),
                                                                                         default=0))]
        total = sum(predicted)
        if not total:
            continue
        top = max(range(len(predicted)), key=predicted.__getitem__)
        share = predicted[top] / total
        if share > DEGENERATE_SHARE:
            emotion = EMOTIONS[top] if top < len(EMOTIONS) else f"class {top}"
            flags.append(f"degenerate on {name}: predicts '{emotion}' for {100 * share:.0f} % of it")
    return flags


def run_flags(run_dir: Path, names: Optional[Iterable[str]] = None, folder: str = "eval") -> list[str]:
    """:func:`learning_flags` of a run folder: ``train_summary.json`` and ``FOLDER/NAME.json`` of each
    evaluated set (``names``, default: those of ``FOLDER/summary.json``). Unreadable files are skipped."""
    import json

    run_dir = Path(run_dir)

    def read(path: Path) -> Any:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    summary = read(run_dir / "train_summary.json")
    if names is None:
        listed = read(run_dir / folder / "summary.json")
        names = list(listed) if isinstance(listed, dict) else []
    evals = {}
    for name in names:
        metrics = read(run_dir / folder / f"{name}.json")
        if isinstance(metrics, dict):
            evals[name] = metrics
    return learning_flags(summary if isinstance(summary, dict) else None, evals)


def report_warnings(models: Iterable[Any]) -> list[str]:
    """Markdown lines of a report's warnings (a heading and one item per flagged run; none if no run is
    flagged). ``models``: :class:`ser_toolkit.report.Model` objects (``name``, ``runs``, ``seeds``)."""
    items = []
    for m in models:
        for run, seed in zip(m.runs, m.seeds):
            flags = run_flags(run)
            if flags:
                items.append(f"- **{m.name}** (seed {seed}, `{Path(run).name}`): " + "; ".join(flags) + ".")
    if not items:
        return []
    return ["## Warnings", "", "Models that did not learn or that predict one class for nearly everything; "
            "their numbers below are not evidence about the augmentations.", "", *items, ""]
