"""The report's figures (matplotlib, PNG): titled, labelled axes, colour bars.

- ``difference.png``: model − control (or baseline) per test set, significance marked (adjusted p);
- ``per_emotion.png``: per-emotion F1 on the clean test set with 95 % intervals;
- ``confusion_<set>.png``: one grid per test set, a panel per model, counts, row-normalised colour;
- ``learning_curves.png``: training loss and validation metric per epoch of every run;
- ``gains.png``: each method's selection gain and its weight in every Top-k model.
"""

from __future__ import annotations

import csv
import re
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ser_toolkit.emotions import EMOTIONS
from ser_toolkit.report.analysis import Comparison, per_emotion_interval
from ser_toolkit.settings import MIN_GAIN
from ser_toolkit.report.collect import METRIC_NAMES, Model, label


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _slug(test: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", test)


def _draw(task: int) -> list[str]:
    from ser_toolkit.workers import state

    return state("figure_tasks")[task]()


def _run(tasks: list[Callable[[], list[str]]]) -> list[str]:
    """Run the drawing tasks, in forked worker processes when there are several CPUs (savefig is most of a
    report's time); the names of the files written, in task order."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    from ser_toolkit.workers import default_workers, start_worker

    workers = min(default_workers(), len(tasks))
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return [name for task in tasks for name in task()]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                             initializer=partial(start_worker, os.getpid(), figure_tasks=tasks)) as pool:
        return [name for names in pool.map(_draw, range(len(tasks))) for name in names]


def figures(models: list[Model], tests: list[str], comps: list[Comparison], study: dict[str, Any],
            folder: Path, metric: str = "uar", selection: dict[str, Comparison] | None = None) -> dict[str, str]:
    """Draw every figure into ``folder``; returns {name: path relative to the report}."""
    plt = _plt()
    folder.mkdir(parents=True, exist_ok=True)
    tasks: list[Callable[[], list[str]]] = []

    def task(draw: Callable[[], list[str]]) -> Callable[[], list[str]]:
        tasks.append(draw)
        return draw

    def save(fig, name: str) -> list[str]:
        fig.savefig(folder / name, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        return [name]

    @task
    def difference() -> list[str]:
        return _difference(plt, save, models, tests, comps, metric)

    @task
    def per_emotion() -> list[str]:
        return _per_emotion(plt, save, models, tests)

    for t in tests:
        task(partial(_confusion, plt, save, models, t))

    @task
    def learning_curves() -> list[str]:
        return _learning_curves(plt, save, models, metric)

    @task
    def gains() -> list[str]:
        return _gains(plt, save, study, selection or {})

    return {name: f"{folder.name}/{name}" for name in _run(tasks)}


def _difference(plt, save, models, tests, comps, metric) -> list[str]:
    """Difference heatmap against the control (the baseline when there is none)."""
    refs = [m for m in models if m.role == "control"] or [m for m in models if m.role == "baseline"]
    ref = refs[0]
    others = [m for m in models if m is not ref and any(c.model == m.name and c.reference == ref.name
                                                         and c.metric == metric for c in comps)]
    grid = np.full((len(tests), len(others)), np.nan)
    marks = np.zeros_like(grid, dtype=bool)
    for j, m in enumerate(others):
        for i, t in enumerate(tests):
            c = next((c for c in comps if c.model == m.name and c.reference == ref.name and c.test == t
                      and c.metric == metric), None)
            if c is not None:
                grid[i, j], marks[i, j] = c.delta, c.significant
    if np.isfinite(grid).any():
        lim = float(np.nanmax(np.abs(grid))) or 0.01
        fig, ax = plt.subplots(figsize=(1.1 * len(others) + 3, 0.5 * len(tests) + 2))
        im = ax.imshow(grid, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
        ax.set_xticks(range(len(others)), [m.name for m in others], rotation=35, ha="right")
        ax.set_yticks(range(len(tests)), [label(t) for t in tests])
        for i in range(len(tests)):
            for j in range(len(others)):
                if np.isfinite(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:+.3f}" + ("*" if marks[i, j] else ""), ha="center", va="center",
                            fontsize=8, color="white" if abs(grid[i, j]) > 0.6 * lim else "black")
        fig.colorbar(im, ax=ax, label=f"Δ {METRIC_NAMES[metric]} (model − {ref.name})")
        ax.set_xlabel("model")
        ax.set_ylabel("test set")
        ax.set_title(f"{METRIC_NAMES[metric]} difference to the {ref.role} ({ref.name}); * significant (adjusted p)")
        return save(fig, "difference.png")
    return []


def _per_emotion(plt, save, models, tests) -> list[str]:
    """Per-emotion F1 with intervals on the clean test set."""
    clean = "test" if "test" in tests else tests[0]
    base = next(m for m in models if m.role == "baseline")
    present = [e for e in EMOTIONS if base.evals.get(clean) and base.evals[clean][0]["per_emotion"][e]["support"]]
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(present)), 4))
    width = 0.8 / len(models)
    for j, m in enumerate(models):
        if not m.evals.get(clean):
            continue
        idx = [EMOTIONS.index(e) for e in present]
        vals = np.array([np.mean([ev["per_emotion"][e]["f1"] for ev in m.evals[clean]]) for e in present])
        iv = per_emotion_interval(m, clean, "f1")
        err = None
        if iv is not None:
            lo, hi = iv[0][idx], iv[1][idx]
            err = np.vstack([np.clip(vals - lo, 0, None), np.clip(hi - vals, 0, None)])
        ax.bar(np.arange(len(present)) + j * width, vals, width, yerr=err, capsize=2, label=m.name)
    ax.set_xticks(np.arange(len(present)) + 0.4 - width / 2, present)
    ax.set_xlabel("emotion")
    ax.set_ylabel("F1")
    ax.set_ylim(0, 1)
    ax.set_title(f"Per-emotion F1 on the {label(clean)} test set (95 % hierarchical intervals)")
    ax.legend(fontsize=7, ncol=3)
    return save(fig, "per_emotion.png")


def _confusion(plt, save, models, t) -> list[str]:
    """One confusion grid per test set: a panel per model."""
    shown = [m for m in models if m.evals.get(t)]
    if not shown:
        return []
    cols = min(len(shown), 3)
    rows_n = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.3 * cols + 1, 4.1 * rows_n), squeeze=False)
    im = None
    for ax, m in zip(axes.flat, shown):
        cm = np.sum([np.array(e["confusion"], float) for e in m.evals[t]], axis=0)
        rows = cm.sum(1, keepdims=True)
        norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
        im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(EMOTIONS)), [e[:3] for e in EMOTIONS], rotation=45)
        ax.set_yticks(range(len(EMOTIONS)), [e[:3] for e in EMOTIONS])
        for i in range(len(EMOTIONS)):
            for k in range(len(EMOTIONS)):
                if rows[i, 0] > 0 and cm[i, k] > 0:
                    ax.text(k, i, f"{int(cm[i, k])}", ha="center", va="center", fontsize=6,
                            color="white" if norm[i, k] > 0.5 else "black")
        ax.set_title(m.name, fontsize=9)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true", labelpad=1)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.subplots_adjust(wspace=0.45, hspace=0.45)
    fig.colorbar(im, ax=axes.ravel().tolist(), label="share of the true emotion (row-normalised)", shrink=0.8)
    fig.suptitle(f"Confusion matrices, {label(t)} (counts summed over runs)")
    return save(fig, f"confusion_{_slug(t)}.png")


def _learning_curves(plt, save, models, metric) -> list[str]:
    """Per model, the mean over its runs and (several runs) their range."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    valid_key = None
    several = False
    for j, m in enumerate(models):
        curves = []
        for run in m.runs:
            try:
                with open(run / "curves.csv", newline="") as fh:
                    curves.append(list(csv.DictReader(fh)))
            except OSError:
                continue
        curves = [c for c in curves if c]
        if not curves:
            continue
        length = min(len(c) for c in curves)  # early stopping: the epochs every run has
        epochs = [int(r["epoch"]) for r in curves[0][:length]]
        key = f"valid_{metric}"
        panels = [(ax1, "train_loss")] + ([(ax2, key)] if all(r.get(key) for c in curves for r in c[:length]) else [])
        for ax, column in panels:
            values = np.array([[float(r[column]) for r in c[:length]] for c in curves])
            ax.plot(epochs, values.mean(0), color=colors[j % len(colors)], label=m.name)
            if len(values) > 1:
                several = True
                ax.fill_between(epochs, values.min(0), values.max(0), color=colors[j % len(colors)], alpha=0.15)
            if column == key:
                valid_key = key
    spread = " (line: mean over runs; band: their range)" if several else ""
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training loss")
    ax1.set_title("Training loss" + spread, fontsize=10)
    if ax1.get_legend_handles_labels()[0]:
        ax1.legend(fontsize=7, ncol=2)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel(f"validation {METRIC_NAMES[metric]}" if valid_key else "")
    ax2.set_title(("Validation " + METRIC_NAMES[metric] + spread) if valid_key else "No validation part in these runs",
                  fontsize=10)
    if ax1.get_legend_handles_labels()[0]:
        return save(fig, "learning_curves.png")
    plt.close(fig)  # models fitted once (feature classifiers) have no epochs
    return []


def _gains(plt, save, study, selection: dict[str, Comparison]) -> list[str]:
    """Each method's selection gain with its 95 % interval (paired test), the declared minimal gain, and its
    weight in every Top-k model."""
    gains = study.get("gains") or {}
    if gains:
        sel = study.get("selection") or {}
        min_gain = float(sel.get("min_gain", MIN_GAIN))
        methods = sorted(gains, key=lambda m: -gains[m])
        combos = study.get("weights") or {}
        fig, axes = plt.subplots(1, 1 + bool(combos), figsize=(5 + 4 * bool(combos), 3.5), squeeze=False)
        ax = axes[0][0]
        counts = [gains[m] > 0 and gains[m] >= min_gain for m in methods]
        ax.bar(methods, [gains[m] for m in methods],
               color=["tab:green" if c else "tab:gray" if gains[m] > 0 else "tab:red" for m, c in zip(methods, counts)])
        tested = [(i, selection[m]) for i, m in enumerate(methods) if m in selection]
        if tested:
            x, c = zip(*tested)
            ax.errorbar(x, [gains[methods[i]] for i in x],
                        yerr=[[max(gains[methods[i]] - t.lo, 0) for i, t in tested],
                              [max(t.hi - gains[methods[i]], 0) for i, t in tested]],
                        fmt="none", ecolor="black", capsize=3, lw=1, label="95 % interval")
        ax.axhline(0, color="black", lw=0.8)
        ax.axhline(min_gain, color="tab:green", lw=0.8, ls="--", label=f"min_gain {min_gain:g}")
        ax.legend(fontsize=7)
        ax.set_xlabel("augmentation")
        ax.set_ylabel(f"gain in weighted F1 vs {sel.get('reference_model', 'baseline')}")
        ax.set_title(f"Selection gains ({sel.get('set', 'test')} set)")
        ax.tick_params(axis="x", rotation=30)
        if combos:
            ax = axes[0][1]
            bottom = np.zeros(len(combos))
            for m in methods:
                w = np.array([combos[c].get(m, 0.0) for c in combos])
                ax.bar(list(combos), w, bottom=bottom, label=m)
                bottom += w
            ax.set_xlabel("combination")
            ax.set_ylabel("weight")
            ax.set_title("Weights of the Top-k models")
            ax.legend(fontsize=7)
        return save(fig, "gains.png")
    return []
