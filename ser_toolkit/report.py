"""``sertk report``: a markdown report of a study (or of runs), with figures and every number as CSV/JSON.

Sections: headline matrix (test set x model; weighted F1, macro F1, UAR; best per
row in bold; delta to the baseline; mean +- std over seeds and 95 % bootstrap
intervals), per-emotion F1 per test set, the best model per emotion (Pareto set),
augmentation gains and weights, confusion matrices, paired tests against the
baseline, the clean x2 control, and reproducibility.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ser_toolkit.emotions import EMOTIONS
from ser_toolkit.errors import SertkError
from ser_toolkit.evaluation import read_predictions

METRIC_NAMES = {"weighted_f1": "weighted F1", "macro_f1": "macro F1", "uar": "UAR"}
BOOTSTRAP_ROUNDS = 1000
MIN_GAIN_FOR_SHARE = 0.01  # below this a share of the gain is noise over noise


@dataclass
class Model:
    """One model of the study: its runs (one per seed) and their evaluations."""

    name: str
    role: str
    plugins: list[str]
    weights: dict[str, float] | None = None
    runs: list[Path] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    folds: list[int | None] = field(default_factory=list)
    evals: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # test set -> per seed metrics
    preds: dict[str, list[tuple[list[str], np.ndarray, np.ndarray]]] = field(default_factory=dict)


def _read_eval(path: Path, run_id: str) -> dict[str, Any]:
    """One eval JSON, checked: well-formed, from this run, with the digest of its data."""
    from ser_toolkit.training.runs import read_json

    metrics = read_json(path)
    ok = isinstance(metrics, dict) and isinstance(metrics.get("data"), dict) and \
        isinstance(metrics["data"].get("digest"), str) and all(k in metrics for k in ("n", "per_emotion", "confusion"))
    if not ok:
        raise SertkError(f"{path} is malformed or from an older sertk (no data digest)",
                         "re-evaluate the run (sertk evaluate RUN)")
    if metrics.get("run_id") != run_id:
        raise SertkError(f"{path} was computed for another run", "re-evaluate the run (sertk evaluate RUN)")
    return metrics


def _check_predictions(path: Path, metrics: dict[str, Any]) -> None:
    """The predictions CSV must be the one its eval JSON was written with."""
    import hashlib

    expected = metrics.get("predictions_sha256")
    try:
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        actual = None
    if expected is None or actual != expected:
        raise SertkError(f"{path} is not the predictions its evaluation recorded", "re-evaluate the run "
                         "(sertk evaluate RUN)")


def _check_data(models: list["Model"], allow_changed: bool) -> list[str]:
    """Every test set must be the same data for every run, and in-corpus sets the data each run trained on."""
    from ser_toolkit.cache.identity import short

    notes: list[str] = []
    seen: dict[tuple[str, int | None], dict[str, str]] = {}  # per test set and fold (folds hold other data)
    for m in models:
        for test, evals in m.evals.items():
            for run, fold, e in zip(m.runs, m.folds, evals):
                seen.setdefault((test, fold), {}).setdefault(e["data"]["digest"], str(run))
                trained, source = e["data"].get("trained_digest"), e["data"].get("source_digest")
                if e["data"].get("changed") or (trained and source and trained != source):
                    problem = (f"run {run} was evaluated on '{test}' after its data changed (trained on "
                               f"{short(e['data'].get('trained_digest'))}, evaluated on "
                               f"{short(e['data'].get('source_digest'))})")
                    if not allow_changed:
                        raise SertkError(problem, "retrain and re-evaluate it, or pass --allow-changed-data")
                    notes.append(problem)
    for (test, _), digests in seen.items():
        if len(digests) > 1:
            (d1, r1), (d2, r2) = list(digests.items())[:2]
            problem = (f"test set '{test}' is different data in different runs ({short(d1)} in {r1}, "
                       f"{short(d2)} in {r2})")
            if not allow_changed:
                raise SertkError(problem, "re-evaluate the runs on the same data (sertk evaluate RUN), "
                                          "or pass --allow-changed-data")
            notes.append(problem)
    return notes


def _role(plugins: list[str], weights: Any) -> str:
    if not plugins:
        return "baseline"
    if plugins == ["duplicate"]:
        return "control"
    return "combination" if weights or len(plugins) > 1 else "single"


def collect(paths: Sequence[Path], allow_changed: bool = False,
            allow_unfinished: bool = False) -> tuple[list[Model], dict[str, Any]]:
    """Models (runs grouped by name over seeds) from study folders or run folders.

    Every run must be finished (sealed) and every evaluation must carry the
    digest of its data; a test set that is different data in different runs,
    or in-corpus data that changed after training, is refused unless
    ``allow_changed`` (the report then lists it).
    """
    from ser_toolkit.training.runs import check_run, read_json

    entries: list[dict[str, Any]] = []
    study: dict[str, Any] = {}
    for p in map(Path, paths):
        if (p / "study.json").is_file():
            study = read_json(p / "study.json")
            entries += study["runs"]
        elif (p / "config.json").is_file():
            check_run(p, allow_unfinished=True)  # a malformed config.json is one line, not a KeyError
            cfg = read_json(p / "config.json")["train"]
            name = p.name.rsplit("-s", 1)[0] if p.name.rsplit("-s", 1)[-1].isdigit() else p.name
            entries.append({"name": name, "role": _role(cfg["plugins"], cfg.get("weights")), "seed": cfg["seed"],
                            "run": str(p), "plugins": cfg["plugins"], "weights": cfg.get("weights")})
        else:
            raise SertkError(f"{p} is neither a study folder (study.json) nor a run folder (config.json)",
                             "pass folders written by 'sertk study' or 'sertk train'")
    models: dict[str, Model] = {}
    for e in entries:
        m = models.setdefault(e["name"], Model(e["name"], e["role"], e["plugins"], e.get("weights")))
        run = Path(e["run"])
        info = check_run(run, allow_unfinished)
        summary = run / "eval" / "summary.json"
        if not summary.is_file():
            raise SertkError(f"run {run} has not been evaluated", f"run: sertk evaluate {run}")
        m.runs.append(run)
        m.seeds.append(e["seed"])
        m.folds.append(e.get("fold"))
        tests = read_json(summary)
        if not isinstance(tests, dict):
            raise SertkError(f"{summary} is malformed", f"re-evaluate the run: sertk evaluate {run}")
        for test in tests:
            e = _read_eval(run / "eval" / f"{test}.json", info["run_id"])
            m.evals.setdefault(test, []).append(e)
            _check_predictions(run / "eval" / f"{test}.predictions.csv", e)
            m.preds.setdefault(test, []).append(read_predictions(run / "eval" / f"{test}.predictions.csv"))
    order = {"baseline": 0, "control": 1, "single": 2, "combination": 3}
    ordered = sorted(models.values(), key=lambda m: (order[m.role], m.name))
    if not any(m.role == "baseline" for m in ordered):
        raise SertkError("no baseline run (trained without augmentation) among the inputs",
                         "include the baseline run or the study folder")
    study = {**study, "data_notes": _check_data(ordered, allow_changed)}
    for m in ordered:
        _pool_folds(m)
    return ordered, study


def _pool_folds(m: Model) -> None:
    """Cross-validation: a test set holds other utterances in each fold, so each seed's folds are pooled
    into one set of predictions (every utterance once, fold order) for intervals and paired tests. Sets with
    the same utterances in every fold (cross-corpus) stay one replicate per run, like seeds. Metrics (the
    table cells) stay per run: mean ± SD over seeds and folds."""
    if all(f is None for f in m.folds):
        return
    for test, preds in m.preds.items():
        if all(p[0] == preds[0][0] for p in preds):
            continue
        by_seed: dict[int, list] = {}
        for seed, _, p in sorted(zip(m.seeds, m.folds, preds), key=lambda x: (x[0], x[1] or 0)):
            by_seed.setdefault(seed, []).append(p)
        m.preds[test] = [([uid for p in ps for uid in p[0]], np.concatenate([p[1] for p in ps]),
                          np.concatenate([p[2] for p in ps])) for _, ps in sorted(by_seed.items())]


def fold_numbers(models: list[Model], numbers: Numbers) -> None:
    """Every run's metrics with its fold and seed (the per-fold numbers of a cross-validated study)."""
    for m in models:
        for test, evals in m.evals.items():
            for seed, fold, e in zip(m.seeds, m.folds, evals):
                numbers.add(section="per_run", model=m.name, test=test, seed=seed, fold=fold,
                            **{k: e[k] for k in ("n", "accuracy", "weighted_f1", "macro_f1", "uar")})


def _test_order(models: list[Model]) -> list[str]:
    tests = list(dict.fromkeys(t for m in models for t in m.evals))

    def key(t: str) -> tuple[int, str]:
        return (0 if t == "test" else 2 if t == "test-mixed" else 3 if t.startswith("cross") else 1, t)

    return sorted(tests, key=key)


def label(test: str) -> str:
    if test == "test":
        return "clean"
    if test.startswith("test-"):
        return test[5:]
    if test.startswith("cross-"):
        return f"cross-corpus: {test[6:]}"
    return test


def absent_emotions(models: list[Model], tests: list[str]) -> list[str]:
    """A sentence naming the emotions each test set lacks (its metrics are over the emotions it has)."""
    notes = []
    for t in tests:
        evals = [ev for m in models for ev in m.evals.get(t, [])]
        lacks = sorted(set.intersection(*(set(ev.get("missing_emotions") or []) for ev in evals))) if evals else []
        if lacks:
            notes.append(f"{label(t)} lacks {', '.join(lacks)}")
    if not notes:
        return []
    return ["Metrics on a test set that lacks some emotions are computed over the emotions it has: "
            + "; ".join(notes) + ".", ""]


def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _delta(x: float) -> str:
    return f"{x:+.3f}"


class Numbers:
    """Every number of the report, for CSV/JSON export."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, **row: Any) -> None:
        self.rows.append(row)

    def csv(self) -> str:
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(self.rows)
        return buf.getvalue()


def headline(models: list[Model], tests: list[str], numbers: Numbers) -> str:
    from ser_toolkit.stats import METRICS, bootstrap_ci

    base = next(m for m in models if m.role == "baseline")
    multi = max(len(m.seeds) for m in models) > 1
    out = []
    for metric, title in METRIC_NAMES.items():
        lines = [f"### {title}", "",
                 "| test set | " + " | ".join(m.name for m in models) + " |",
                 "|---|" + "---|" * len(models)]
        details = ["| test set | " + " | ".join(m.name for m in models) + " |", "|---|" + "---|" * len(models)]
        for t in tests:
            means: dict[str, float] = {}
            cells, ci_cells = [], []
            for m in models:
                vals = [e[metric] for e in m.evals.get(t, [])]
                if not vals:
                    cells.append("–")
                    ci_cells.append("–")
                    continue
                mean, std = float(np.mean(vals)), float(np.std(vals))
                means[m.name] = mean
                y = m.preds[t][0][1]
                lo, hi = bootstrap_ci(y, [p[2] for p in m.preds[t]], METRICS[metric], BOOTSTRAP_ROUNDS, seed=0)
                base_vals = [e[metric] for e in base.evals.get(t, [])]
                delta = mean - float(np.mean(base_vals)) if base_vals else None
                numbers.add(section="headline", metric=metric, test=t, model=m.name, mean=mean, std=std,
                            ci_low=lo, ci_high=hi, delta_to_baseline=delta, seeds=len(vals))
                cell = _fmt(mean) + (f" ± {std:.3f}" if multi else "")
                if delta is not None and m is not base:
                    cell += f" ({_delta(delta)})"
                cells.append(cell)
                ci_cells.append(f"[{lo:.3f}, {hi:.3f}]")
            if means:
                best = max(means.values())
                cells = [f"**{c}**" if means.get(m.name) == best else c for c, m in zip(cells, models)]
            lines.append(f"| {label(t)} | " + " | ".join(cells) + " |")
            details.append(f"| {label(t)} | " + " | ".join(ci_cells) + " |")
        out += lines + ["", "<details><summary>95 % bootstrap intervals (resampling test utterances"
                        + (", seeds averaged" if multi else "") + ")</summary>", "", *details, "", "</details>", ""]
    return "\n".join(out)


def per_emotion(models: list[Model], tests: list[str], numbers: Numbers) -> str:
    base = next(m for m in models if m.role == "baseline")
    out = []
    for i, t in enumerate(tests):
        lines = ["| emotion | " + " | ".join(m.name for m in models) + " |", "|---|" + "---|" * len(models)]
        for e in EMOTIONS:
            cells = []
            b = [ev["per_emotion"][e]["f1"] for ev in base.evals.get(t, [])]
            support = base.evals[t][0]["per_emotion"][e]["support"] if base.evals.get(t) else 0
            if support == 0:
                lines.append(f"| {e} | " + " | ".join("n/a (absent)" for _ in models) + " |")
                continue
            for m in models:
                vals = [ev["per_emotion"][e]["f1"] for ev in m.evals.get(t, [])]
                if not vals:
                    cells.append("–")
                    continue
                f = float(np.mean(vals))
                d = f - float(np.mean(b)) if b else None
                numbers.add(section="per_emotion", test=t, emotion=e, model=m.name, f1=f, delta_to_baseline=d)
                cells.append(_fmt(f) + (f" ({_delta(d)})" if d is not None and m is not base else ""))
            lines.append(f"| {e} | " + " | ".join(cells) + " |")
        body = "\n".join(lines)
        if i == 0:
            out.append(f"#### {label(t)}\n\n{body}\n")
        else:
            out.append(f"<details><summary>{label(t)}</summary>\n\n{body}\n\n</details>\n")
    return "\n".join(out)


def pareto(models: list[Model], test: str, numbers: Numbers) -> str:
    present = [e for e in EMOTIONS if models[0].evals.get(test) and
               models[0].evals[test][0]["per_emotion"][e]["support"] > 0]
    f1 = {m.name: np.array([np.mean([ev["per_emotion"][e]["f1"] for ev in m.evals[test]]) for e in present])
          for m in models if m.evals.get(test)}
    lines = ["| emotion | best model | F1 |", "|---|---|---|"]
    for j, e in enumerate(present):
        best = max(f1, key=lambda n: f1[n][j])
        numbers.add(section="best_per_emotion", test=test, emotion=e, model=best, f1=float(f1[best][j]))
        lines.append(f"| {e} | {best} | {f1[best][j]:.3f} |")
    front = [n for n in f1 if not any(np.all(f1[o] >= f1[n]) and np.any(f1[o] > f1[n]) for o in f1 if o != n)]
    return "\n".join(lines) + "\n\nPareto set (no other model is at least as good on every emotion and better on one): " \
        + ", ".join(f"**{n}**" for n in front) + "\n"


def selection_sentence(study: dict[str, Any]) -> str:
    """One sentence saying where the weights were chosen (and a warning when that was the test set)."""
    sel = study.get("selection") or {"set": "test", "reference_model": "baseline"}
    ref = sel.get("reference_model", "baseline")
    ref_text = "the clean x2 control (as many steps)" if sel.get("reference") == "control" else f"the {ref} model"
    if sel.get("set") == "validation":
        return (f"Gains, weights and the Top-k choice were chosen on the validation part (carved from the "
                f"training data, share {sel.get('valid_share')}) against {ref_text}; the test sets were used for "
                "nothing but the results below.")
    return (f"**Warning: gains, weights and the Top-k choice were chosen on the test sets** (against {ref_text}), "
            "as the reference study did, and the Top-k models are reported on those same sets: their results "
            "are biased upwards (selection on test).")


def gains_section(study: dict[str, Any], numbers: Numbers) -> str:
    if "gains" not in study:
        return "_No study file: gains and weights are only reported for `sertk study` folders._\n"
    sentence = selection_sentence(study) + "\n\n"
    if not study["gains"]:
        return sentence + "_No method could be compared (no held-out results for the augmented sets)._\n"
    sel = study.get("selection") or {"set": "test", "reference_model": "baseline"}
    part = "validation" if sel.get("set") == "validation" else "test"
    ref = sel.get("reference_model", "baseline")
    combos = study.get("weights", {})
    columns = [f"F1 (clean + its augmented {part} set)", f"{ref} F1 (same set)", "gain",
               *(f"weight in {c}" for c in combos)]
    lines = ["| method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for m, g in sorted(study["gains"].items(), key=lambda kv: -kv[1]):
        f1, b = study["combined_f1"][m], study["baseline_combined_f1"][m]
        ws = [combos[c].get(m) for c in combos]
        numbers.add(section="gains", method=m, f1=f1, baseline_f1=b, gain=g, reference=ref, selection_set=part,
                    **{f"weight_{c}": w for c, w in zip(combos, ws)})
        lines.append("| " + " | ".join([m, f"{f1:.3f}", f"{b:.3f}", _delta(g), *(_fmt(w) for w in ws)]) + " |")
    note = (f"\nGain = weighted F1 on the clean {part} set plus the {part} set augmented by that method, minus "
            f"the {ref} model's on the same utterances (seed-averaged); weights = gains normalised over the k "
            "largest positive gains (the reference study's rule). Methods with no gain get no weight.\n")
    return sentence + "\n".join(lines) + "\n" + note


def paired(models: list[Model], tests: list[str], numbers: Numbers) -> str:
    from ser_toolkit.stats import mcnemar, paired_bootstrap, weighted_f1

    base = next(m for m in models if m.role == "baseline")
    lines = ["| model | " + " | ".join(label(t) for t in tests) + " |", "|---|" + "---|" * len(tests)]
    for m in models:
        if m is base:
            continue
        cells = []
        for t in tests:
            if not m.preds.get(t) or not base.preds.get(t):
                cells.append("–")
                continue
            ids_b, y, _ = base.preds[t][0]
            ids_m = m.preds[t][0][0]
            if ids_b != ids_m:
                cells.append("different utterances")
                continue
            pb = paired_bootstrap(y, [p[2] for p in base.preds[t]], [p[2] for p in m.preds[t]], weighted_f1,
                                  BOOTSTRAP_ROUNDS, seed=1)
            mc = mcnemar(base.preds[t][0][2] == y, m.preds[t][0][2] == y)
            numbers.add(section="paired", model=m.name, test=t, delta_weighted_f1=pb["delta"], ci_low=pb["ci_low"],
                        ci_high=pb["ci_high"], bootstrap_p=pb["p"], mcnemar_p=mc["p"], only_baseline_right=mc["only_a"],
                        only_model_right=mc["only_b"])
            mark = " ✱" if pb["p"] < 0.05 else ""
            cells.append(f"{_delta(pb['delta'])} [{pb['ci_low']:+.3f}, {pb['ci_high']:+.3f}] p={pb['p']:.3f}{mark}")
        lines.append(f"| {m.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + ("\n\nΔ weighted F1 against the baseline on the same test utterances, 95 % paired "
                               "bootstrap interval and two-sided p (✱: p < 0.05). McNemar's exact test on the same "
                               "pairs is in the CSV/JSON (`paired` rows).\n")


def control(models: list[Model], numbers: Numbers) -> str:
    base = next(m for m in models if m.role == "baseline")
    ctrl = next((m for m in models if m.role == "control"), None)
    if ctrl is None:
        return "_No clean ×2 control run (`duplicate`) among the inputs._\n"

    def f(m: Model, t: str) -> float | None:
        v = [e["weighted_f1"] for e in m.evals.get(t, [])]
        return float(np.mean(v)) if v else None

    lines = ["| model | test set | model F1 | baseline F1 | control F1 | gain vs baseline | gain vs control | "
             "share of the gain that more steps explain |", "|---|---|---|---|---|---|---|---|"]
    for m in models:
        if m.role not in ("single", "combination"):
            continue
        tests = ["test"] + [t for t in (f"test-{m.name}",) if t in m.evals]
        for t in tests:
            fm, fb, fc = f(m, t), f(base, t), f(ctrl, t)
            if None in (fm, fb, fc):
                continue
            gain, over = fm - fb, fm - fc
            share = (fc - fb) / gain if gain >= MIN_GAIN_FOR_SHARE else None
            numbers.add(section="control", model=m.name, test=t, model_f1=fm, baseline_f1=fb, control_f1=fc,
                        gain_vs_baseline=gain, gain_vs_control=over, share_explained_by_steps=share)
            lines.append(f"| {m.name} | {label(t)} | {fm:.3f} | {fb:.3f} | {fc:.3f} | {_delta(gain)} | {_delta(over)} | "
                         + ("–" if share is None else f"{100 * share:.0f} %") + " |")
    return "\n".join(lines) + ("\n\nThe control trains on clean + an identical copy of every file: as many utterances "
                               "and optimizer steps as an augmented model (the reference study's flaw 2). The part of "
                               "an augmentation's gain that the control also gets is the gain of training longer "
                               f"(shown for gains of at least {MIN_GAIN_FOR_SHARE}).\n")


def figures(models: list[Model], tests: list[str], folder: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ser_toolkit.atomic import atomic_path

    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, str] = {}

    def save(fig, name: str) -> None:
        with atomic_path(folder / name) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        out[name] = f"{folder.name}/{name}"

    grid = np.array([[np.mean([e["weighted_f1"] for e in m.evals[t]]) if m.evals.get(t) else np.nan
                      for m in models] for t in tests])
    fig, ax = plt.subplots(figsize=(1.1 * len(models) + 2.5, 0.5 * len(tests) + 1.5))
    im = ax.imshow(grid, cmap="viridis", vmin=np.nanmin(grid), vmax=np.nanmax(grid), aspect="auto")
    ax.set_xticks(range(len(models)), [m.name for m in models], rotation=35, ha="right")
    ax.set_yticks(range(len(tests)), [label(t) for t in tests])
    for i in range(len(tests)):
        for j in range(len(models)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center",
                        color="white" if grid[i, j] < np.nanmean(grid) else "black", fontsize=8)
    fig.colorbar(im, ax=ax, label="weighted F1")
    ax.set_title("Weighted F1: test set × model")
    save(fig, "headline.png")

    present = [e for e in EMOTIONS if models[0].evals.get("test") and
               models[0].evals["test"][0]["per_emotion"][e]["support"] > 0]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(present)), 3.5))
    width = 0.8 / len(models)
    for j, m in enumerate(models):
        vals = [np.mean([ev["per_emotion"][e]["f1"] for ev in m.evals["test"]]) for e in present]
        ax.bar(np.arange(len(present)) + j * width, vals, width, label=m.name)
    ax.set_xticks(np.arange(len(present)) + 0.4 - width / 2, present)
    ax.set_ylabel("F1 (clean test)")
    ax.legend(fontsize=7, ncol=3)
    save(fig, "per_emotion_clean.png")

    for m in models:
        shown = [t for t in ("test", *[t for t in tests if t.startswith("cross")]) if m.evals.get(t)]
        fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.8), squeeze=False)
        for ax, t in zip(axes[0], shown):
            cm = np.sum([np.array(e["confusion"], float) for e in m.evals[t]], axis=0)
            rows = cm.sum(1, keepdims=True)
            norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
            ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
            ax.set_xticks(range(len(EMOTIONS)), [e[:3] for e in EMOTIONS], rotation=45)
            ax.set_yticks(range(len(EMOTIONS)), EMOTIONS)
            for i in range(len(EMOTIONS)):
                for k in range(len(EMOTIONS)):
                    if rows[i, 0] > 0:
                        ax.text(k, i, f"{norm[i, k]:.2f}", ha="center", va="center", fontsize=6,
                                color="white" if norm[i, k] > 0.5 else "black")
            ax.set_title(f"{m.name}: {label(t)}")
            ax.set_xlabel("predicted")
        save(fig, f"confusion_{m.name}.png")
    return out


def reproducibility(models: list[Model], study: dict[str, Any]) -> str:
    from ser_toolkit.training.runs import read_json

    first = read_json(models[0].runs[0] / "config.json")
    lines = [f"- sertk commit: `{study.get('commit') or first.get('commit')}`",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in (study.get("versions") or first.get("versions", {})).items()),
             "- hardware: " + ", ".join(f"{k}: {v}" for k, v in (study.get("hardware") or first.get("hardware", {})).items()),
             "- seeds: " + ", ".join(f"{m.name} {m.seeds}" for m in models)]
    sets: dict[tuple[str, str], dict[str, Any]] = {}
    for m in models:
        for test, evals in m.evals.items():
            for e in evals:
                sets.setdefault((test, e["data"]["digest"]), e)
    for (test, digest), e in sorted(sets.items()):
        lines.append(f"- {label(test)}: `{e.get('cache')}`, {e['n']} utterances, data digest `{digest[:16]}`")
    for note in study.get("data_notes", []):
        lines.append(f"- **data changed (accepted with --allow-changed-data)**: {note}")
    walls = []
    for m in models:
        secs = [read_json(r / "wall_time.json")["train_seconds"] for r in m.runs if (r / "wall_time.json").is_file()]
        if secs:
            walls.append(f"{m.name} {sum(secs):.0f} s")
    if walls:
        lines.append("- training wall time: " + ", ".join(walls))
    if study.get("wall_seconds"):
        lines.append(f"- last `sertk study` invocation: {study['wall_seconds']:.0f} s")
    cfg = study.get("config") or first.get("train")
    lines += ["", "<details><summary>resolved configuration</summary>", "", "```json",
              json.dumps(cfg, indent=2, default=str), "```", "", "</details>"]
    return "\n".join(lines) + "\n"


def write_report(paths: Sequence[Path], output: Path, allow_changed: bool = False,
                 allow_unfinished: bool = False) -> Path:
    """Write ``output`` (markdown), ``<output stem>/`` (figures, numbers.csv, numbers.json)."""
    from ser_toolkit.atomic import write_text
    from ser_toolkit.diagnostics import report_warnings

    from ser_toolkit.cross_matrix import is_matrix_study, write_matrix_report

    matrix = [p for p in map(Path, paths) if is_matrix_study(p)]
    if matrix:
        if len(paths) > 1:
            raise SertkError(f"{matrix[0]} is a study over several training corpora: it is reported alone",
                             f"run: sertk report {matrix[0]}")
        return write_matrix_report(matrix[0], output, allow_changed, allow_unfinished)
    models, study = collect(paths, allow_changed, allow_unfinished)
    tests = _test_order(models)
    numbers = Numbers()
    folder = output.with_suffix("")
    figs = figures(models, tests, folder)
    clean = "test" if any("test" in m.evals for m in models) else tests[0]
    cross = [t for t in tests if t.startswith("cross")]
    base = next(m for m in models if m.role == "baseline")
    n_test = base.evals[clean][0]["n"]
    title = study.get("config", {}).get("name", output.stem)
    parts = [
        f"# sertk study report: {title}", "",
        f"{len(models)} models × {len(tests)} test sets; seeds per model: "
        f"{', '.join(sorted({str(len(set(m.seeds))) for m in models}))}"
        + (f"; folds: {len(set(base.folds))}, clean test set: {sum(e['n'] for sd, e in zip(base.seeds, base.evals[clean]) if sd == base.seeds[0])}"
           " utterances over all folds" if base.folds and base.folds[0] is not None
           else f"; clean test set: {n_test} utterances")
        + (f"; split `{study['split']}`" if study.get("split") else "") + ".", "",
        "Models: " + "; ".join(f"**{m.name}** ({m.role}" + (f": {', '.join(f'{k} {v:.2f}' for k, v in m.weights.items())}"
                                                            if m.weights else "") + ")" for m in models) + ".", "",
        *report_warnings(models),
        *absent_emotions(models, tests),
        "## Headline: test set × model", "",
        f"![weighted F1 heatmap]({figs['headline.png']})", "",
        "Cells: mean over " + ("seeds and folds" if any(f is not None for m in models for f in m.folds)
                               else "seeds") + (" ± std" if max(len(m.seeds) for m in models) > 1 else "")
        + ", and (in parentheses) the difference to the baseline. Best per row in bold.", "",
        headline(models, tests, numbers),
        "## Per-emotion F1", "", f"![per-emotion F1]({figs['per_emotion_clean.png']})", "",
        per_emotion(models, tests, numbers),
        "## Best model per emotion", "",
        f"#### {label(clean)}", "", pareto(models, clean, numbers),
        *([f"#### {label(cross[0])}", "", pareto(models, cross[0], numbers)] if cross else []),
        "## Augmentation gains and weights", "", gains_section(study, numbers),
        "## Confusion matrices", "", "Rows: true emotion, normalised per row (summed over seeds).", "",
        *[f"![confusion {m.name}]({figs[f'confusion_{m.name}.png']})" for m in models], "",
        "## Each model against the baseline (paired)", "", paired(models, tests, numbers),
        "## The control: more steps or better data?", "", control(models, numbers),
        "## Reproducibility", "", reproducibility(models, study),
        f"Every number above is in `{folder.name}/numbers.csv` and `{folder.name}/numbers.json`.", "",
    ]
    fold_numbers(models, numbers)
    write_text(folder / "numbers.csv", numbers.csv())
    write_text(folder / "numbers.json", json.dumps(numbers.rows, indent=2, default=float) + "\n")
    write_text(output, "\n".join(parts))
    return output
