"""The train-corpus x test-corpus matrix of a study over several training corpora (as EmoBox reports it).

A study with ``[data] train = [...]`` (or ``sertk study --cross-matrix``) runs the
protocol on each training corpus in turn (:func:`ser_toolkit.study.corpus_studies`);
its ``study.json`` lists those per-corpus studies under ``matrix``. Row: the
training corpus; column: the test corpus; the diagonal is the training corpus's
own (in-corpus) test split, every other cell the whole other corpus. Each
per-corpus study is read (and checked) like any study (:func:`ser_toolkit.report.collect.collect`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ser_toolkit.errors import SertkError
from ser_toolkit.stats import benjamini_hochberg, sample_sd
from ser_toolkit.report.publish import publish
from ser_toolkit.report.analysis import ALPHA, CORRECTION, Comparison, compare, estimate
from ser_toolkit.report.collect import METRIC_NAMES, Model, Numbers, collect
from ser_toolkit.report.tables import selection_sentence


def is_matrix_study(path: Path) -> bool:
    """Whether ``path`` is the folder of a study over several training corpora."""
    from ser_toolkit.training.runs import read_json

    return (path / "study.json").is_file() and "matrix" in read_json(path / "study.json")


def _link(report: str, output: Path) -> str:
    """The per-corpus report's path relative to the matrix report (as recorded when it is elsewhere)."""
    try:
        return Path(os.path.relpath(report, output.resolve().parent)).as_posix()
    except ValueError:  # another drive
        return report


def _cell(model: Model | None, test: str, metric: str) -> list[float]:
    return [e[metric] for e in model.evals.get(test, [])] if model else []


def write_matrix_report(study_dir: Path, output: Path, allow_changed: bool = False,
                        allow_unfinished: bool = False) -> Path:
    """Write ``output`` (markdown) and ``<output stem>/numbers.{csv,json}`` for a study over several corpora."""
    from ser_toolkit.atomic import write_text
    from ser_toolkit.training.runs import read_json

    study = read_json(study_dir / "study.json")
    entries = study.get("matrix")
    if not isinstance(entries, list) or not entries:
        raise SertkError(f"{study_dir / 'study.json'} lists no per-corpus studies", "re-run the study")
    corpora = [e["corpus"] for e in entries]
    per: dict[str, tuple[dict[str, Model], dict[str, Any]]] = {}
    for e in entries:
        models, sub = collect([study_dir / e["corpus"]], allow_changed, allow_unfinished)
        per[e["corpus"]] = ({m.name: m for m in models}, sub)
    extra = sorted({t[6:] for ms, _ in per.values() for m in ms.values() for t in m.evals
                    if t.startswith("cross-") and t[6:] not in corpora})
    columns = corpora + extra  # training corpora first (the diagonal), then the cross-only corpora
    names = list(dict.fromkeys(n for ms, _ in per.values() for n in ms))
    multi = any(len(m.seeds) > 1 or any(f is not None for f in m.folds) for ms, _ in per.values() for m in ms.values())
    numbers = Numbers()

    def test_of(train: str, column: str) -> str:
        return "test" if column == train else f"cross-{column}"

    def fmt(vals: list[float]) -> str:
        if not vals:
            return "–"
        return f"{np.mean(vals):.3f}" + (f" ± {sample_sd(vals):.3f}" if multi and len(vals) > 1 else "")

    cfg = study.get("config", {})
    parts = [f"# sertk study report: {cfg.get('name', output.stem)} (train corpus × test corpus)", "",
             f"The protocol ran on {len(corpora)} training corpora in turn: " + ", ".join(
                 f"**{c}** ([report]({_link(e['report'], output)}))" for c, e in zip(corpora, entries)) + ". "
             "Rows: the training corpus; columns: the test corpus. The diagonal (bold) is the training corpus's "
             "own test split (in-corpus); every other cell is the whole other corpus (cross-corpus). Cells: mean"
             + (" ± sample SD over seeds (and folds)" if multi else "") + "; baseline tables: [95 % interval, "
             "hierarchical bootstrap over seeds and test speakers].", ""]
    sentences = {selection_sentence(sub) for _, sub in per.values()}
    parts += [*sorted(sentences), ""]
    missing: dict[str, set[str]] = {}
    for train, (ms, _) in per.items():
        for m in ms.values():
            for t, evals in m.evals.items():
                column = train if t == "test" else t[6:] if t.startswith("cross-") else None
                if column is not None:
                    for e in evals:
                        lacks = set(e.get("missing_emotions") or [])
                        missing[column] = missing[column] & lacks if column in missing else lacks
    notes = [f"{c} lacks {', '.join(sorted(missing[c]))}" for c in columns if missing.get(c)]
    if notes:
        parts += ["Metrics on a corpus that lacks some emotions are computed over the emotions it has: "
                  + "; ".join(notes) + ".", ""]
    for metric, title in METRIC_NAMES.items():
        parts += [f"## Baseline, {title}", "", "| train \\ test | " + " | ".join(columns) + " |",
                  "|---|" + "---|" * len(columns)]
        for train in corpora:
            base = per[train][0].get("baseline")
            cells = []
            for column in columns:
                vals = _cell(base, test_of(train, column), metric)
                e = estimate(base, test_of(train, column), metric) if vals else None
                cell = fmt(vals) + (f" [{e.lo:.2f}, {e.hi:.2f}]" if e is not None and not np.isnan(e.lo) else "")
                cells.append(f"**{cell}**" if column == train and vals else cell)
            parts.append(f"| {train} | " + " | ".join(cells) + " |")
        parts.append("")
    comps: dict[tuple[str, str, str], Comparison] = {}  # (model, train, column) -> paired test vs the baseline
    for name in names:
        for train in corpora:
            ms, _ = per[train]
            m, base = ms.get(name), ms.get("baseline")
            if m is not None and base is not None and m is not base:
                for column in columns:
                    c = compare(m, base, test_of(train, column), "weighted_f1")
                    if c is not None:
                        comps[(name, train, column)] = c
    for c, p in zip(comps.values(), benjamini_hochberg([c.p for c in comps.values()])):
        c.p_adj = float(p)
    parts += ["## Every model (weighted F1; in parentheses: the difference to that corpus's baseline)", "",
              "| model | train | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for name in names:
        for train in corpora:
            ms, _ = per[train]
            m, base = ms.get(name), ms.get("baseline")
            if m is None:
                continue
            cells = []
            for column in columns:
                test = test_of(train, column)
                for metric in METRIC_NAMES:
                    vals, bvals = _cell(m, test, metric), _cell(base, test, metric)
                    if vals:
                        numbers.add(section="matrix", model=name, train=train, test=column,
                                    in_corpus=column == train, metric=metric, mean=float(np.mean(vals)),
                                    sd=float(sample_sd(vals)), runs=len(vals),
                                    delta_to_baseline=float(np.mean(vals) - np.mean(bvals)) if bvals else None)
                vals, bvals = _cell(m, test, "weighted_f1"), _cell(base, test, "weighted_f1")
                cell = fmt(vals)
                c = comps.get((name, train, column))
                if c is not None:
                    mark = "\\*" if c.replicates > 1 and c.p_adj < ALPHA else ""
                    cell += f" ({c.delta:+.3f}{mark} [{c.lo:+.2f}, {c.hi:+.2f}])"
                    numbers.add(section="matrix_vs_baseline", model=name, train=train, test=column,
                                metric="weighted_f1", delta=c.delta, ci_low=c.lo, ci_high=c.hi,
                                p=c.p if c.replicates > 1 else None, p_adj=c.p_adj if c.replicates > 1 else None,
                                replicates=c.replicates)
                elif vals and bvals and m is not base:
                    cell += f" ({np.mean(vals) - np.mean(bvals):+.3f})"
                cells.append(f"**{cell}**" if column == train and vals else cell)
            weights = f" ({', '.join(f'{k} {v:.2f}' for k, v in m.weights.items())})" if m.weights else ""
            parts.append(f"| {name}{weights} | {train} | " + " | ".join(cells) + " |")
    parts += ["", "Differences are paired on the same utterances and seeds, with their 95 % interval (seeds and "
              f"test speakers); \\* marks a difference whose {CORRECTION}-adjusted p (over this table) is below "
              f"{ALPHA}" + ("" if multi else "; with one seed nothing is tested, training variance is unmeasured")
              + ". Top-k models are chosen per training corpus (their weights are in parentheses) and may combine "
              "different augmentations.", "",
              "## Reproducibility", "",
              f"- sertk commit: `{study.get('commit')}`",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in (study.get("versions") or {}).items()),
              *(f"- `sertk study` wall time (the invocation that trained): {study['wall_seconds']:.0f} s"
                for _ in [0] if study.get("wall_seconds")), ""]

    def render(folder: Path, prefix: str) -> str:
        write_text(folder / "numbers.csv", numbers.csv())
        write_text(folder / "numbers.json", json.dumps(numbers.rows, indent=2, default=float) + "\n")
        return "\n".join(parts + [f"Every number above is in `{prefix}/numbers.csv` and `{prefix}/numbers.json`; "
                                  "each corpus's report has the per-emotion, paired and control analyses.", ""])

    return publish(output, render)
