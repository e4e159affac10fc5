"""``sertk report``: put the sections together and publish the report atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from ser_toolkit.errors import SertkError
from ser_toolkit.report import analysis, tables
from ser_toolkit.report.collect import METRIC_NAMES, Numbers, _test_order, collect, label
from ser_toolkit.report.figures import _slug, figures
from ser_toolkit.report.publish import publish
from ser_toolkit.report.summary import data_section, summary_section


def write_report(paths: Sequence[Path], output: Path, allow_changed: bool = False,
                 allow_unfinished: bool = False) -> Path:
    """Write ``output`` (markdown) and, in the folder it links, the figures, ``numbers.csv`` and ``numbers.json``.

    A folder of a study over several training corpora is reported alone, as its
    train x test corpus matrix (:mod:`ser_toolkit.report.matrix`).
    """
    from ser_toolkit.atomic import destination
    from ser_toolkit.report.matrix import is_matrix_study, write_matrix_report

    destination(Path(output))  # a folder, socket... is refused before any work
    matrix = [p for p in map(Path, paths) if is_matrix_study(p)]
    if matrix:
        if len(paths) > 1:
            raise SertkError(f"{matrix[0]} is a study over several training corpora: it is reported alone",
                             f"run: sertk report {matrix[0]}")
        return write_matrix_report(matrix[0], output, allow_changed, allow_unfinished)
    models, study = collect(paths, allow_changed, allow_unfinished)
    tests = _test_order(models)
    comps = {metric: analysis.comparisons(models, tests, metric) for metric in ("uar", "weighted_f1")}
    selection = analysis.selection_comparisons(study) if study.get("gains") else {}

    def render(folder: Path, prefix: str) -> str:
        from ser_toolkit.atomic import write_text

        numbers = Numbers()
        figs = {k: f"{prefix}/{k}" for k in figures(models, tests, comps["uar"] + comps["weighted_f1"], study,
                                                      folder, selection=selection)}
        title = study.get("config", {}).get("name", output.stem)
        clean = "test" if "test" in tests else tests[0]
        cross = [t for t in tests if t.startswith("cross")]
        parts = [
            f"# sertk study report: {title}", "",
            f"{len(models)} models × {len(tests)} test sets: " + "; ".join(
                f"**{m.name}** ({m.role}" + (f": {', '.join(f'{k} {v:.2f}' for k, v in m.weights.items())}"
                                             if m.weights else "") + ")" for m in models) + ".", "",
            summary_section(models, tests, study, comps["uar"]),
            "## Results: test set × model", "",
            tables.headline(models, tests, numbers),
            "## Differences to the baseline and the control (paired, p adjusted)", "",
            *([f"![difference heatmap]({figs['difference.png']})", ""] if "difference.png" in figs else []),
            *(f"### {METRIC_NAMES[metric]}\n\n" + tables.comparison_table(comps[metric], metric, numbers)
              for metric in ("uar", "weighted_f1")),
            "## Emotion coverage of the test sets", "", tables.coverage(models, tests),
            "## Per emotion", "", f"![per-emotion F1]({figs['per_emotion.png']})", "",
            tables.per_emotion(models, tests, numbers),
            "## Best model per emotion", "",
            f"#### {label(clean)}", "", tables.pareto(models, clean, numbers),
            *([f"#### {label(cross[0])}", "", tables.pareto(models, cross[0], numbers)] if cross else []),
            "## Augmentation gains and weights", "",
            *([f"![gains and weights]({figs['gains.png']})", ""] if "gains.png" in figs else []),
            tables.gains_section(study, numbers, selection),
            "## The control: more steps or better data?", "", tables.control(models, numbers, comps["weighted_f1"]),
            "## Confusion matrices", "", "Rows: true emotion; colour normalised per row; numbers: counts.", "",
            *[f"![confusion {label(t)}]({figs[k]})\n" for t in tests
              for k in [f"confusion_{_slug(t)}.png"] if k in figs],
            *(["## Learning curves", "", f"![learning curves]({figs['learning_curves.png']})", ""]
              if "learning_curves.png" in figs else []),
            "## Data", "", data_section(models, tests),
            "## Reproducibility", "", tables.reproducibility(models, study),
            f"Every number above is in `{prefix}/numbers.csv` and `{prefix}/numbers.json`.", "",
        ]
        tables.fold_numbers(models, numbers)
        write_text(folder / "numbers.csv", numbers.csv())
        write_text(folder / "numbers.json", json.dumps(numbers.rows, indent=2, default=float) + "\n")
        return "\n".join(parts)

    return publish(output, render)
