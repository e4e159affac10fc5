"""The report's tables (markdown), each adding its numbers to :class:`~ser_toolkit.report.collect.Numbers`."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from ser_toolkit.emotions import EMOTIONS
from ser_toolkit.report.analysis import (ALPHA, CORRECTION, MIN_GAIN_FOR_SHARE, Comparison, chance, control_share, estimate,
                                         per_emotion_interval, same_table)
from ser_toolkit.report.collect import METRIC_NAMES, Model, Numbers, _delta, _fmt, label
from ser_toolkit.settings import MIN_GAIN


def headline(models: list[Model], tests: list[str], numbers: Numbers) -> str:
    """Test set x model per metric: mean ± sample SD [95 % interval], chance, best per row in bold."""
    base = next(m for m in models if m.role == "baseline")
    shown = [k for k in METRIC_NAMES]
    said = []
    if same_table(models, tests, "weighted_f1", "macro_f1"):
        shown.remove("macro_f1")
        said.append("Macro F1 equals weighted F1 on every set here (balanced sets): its table is not repeated "
                    "(the numbers are in the CSV).")
    multi = max(len(m.runs) for m in models) > 1
    folds = any(f is not None for m in models for f in m.folds)
    out = []
    for metric in METRIC_NAMES:
        lines = [f"### {METRIC_NAMES[metric]}", "",
                 "| test set | chance | " + " | ".join(m.name for m in models) + " |",
                 "|---|---|" + "---|" * len(models)]
        for t in tests:
            means: dict[str, float] = {}
            cells = []
            ch = chance(base.preds[t][0][1], metric) if base.preds.get(t) else None
            for m in models:
                e = estimate(m, t, metric)
                if e is None:
                    cells.append("–")
                    continue
                means[m.name] = e.mean
                b = estimate(base, t, metric) if m is not base else None
                delta = e.mean - b.mean if b else None
                numbers.add(section="headline", metric=metric, test=t, model=m.name, mean=e.mean, sd=e.sd,
                            ci_low=e.lo, ci_high=e.hi, runs=e.runs, replicates=e.replicates, resampled=e.unit,
                            chance=ch, delta_to_baseline=delta)
                cell = _fmt(e.mean) + (f" ± {e.sd:.3f}" if multi and e.runs > 1 else "") + \
                    (f" [{e.lo:.2f}, {e.hi:.2f}]" if not np.isnan(e.lo) else "")
                cells.append(cell)
            if means:
                top = max(means.values())
                cells = [f"**{c}**" if means.get(m.name) == top else c for c, m in zip(cells, models)]
            lines.append(f"| {label(t)} | {_fmt(ch)} | " + " | ".join(cells) + " |")
        if metric in shown:
            out += lines + [""]
    return "\n".join(said + [""] * bool(said) + out) + (
        "\nCells: mean" + ((" ± sample SD over seeds and folds" if folds else " ± sample SD over seeds")
                          if multi else "") + " [95 % interval: hierarchical "
        "bootstrap over seeds and, within them, test speakers]. Chance: a guess uniformly at random among the 7 "
        "emotions. Differences and their tests are in the next section.\n")


def comparison_table(comps: list[Comparison], metric: str, numbers: Numbers) -> str:
    """Every model against the baseline, then against the control: one table per reference, its p-values
    adjusted together (:data:`~ser_toolkit.report.analysis.CORRECTION`)."""
    ours = [c for c in comps if c.metric == metric]
    if not ours:
        return "_No paired comparison possible (no common utterances)._\n"
    out = []
    for ref in dict.fromkeys(c.reference for c in ours):
        family = [c for c in ours if c.reference == ref]
        shared = list(dict.fromkeys(c.test for c in family if not c.test.startswith("test-") or
                                    c.test == "test-mixed"))
        own = any(c.test.startswith("test-") and c.test != "test-mixed" for c in family)
        columns = [label(t) for t in shared[:1]] + (["its own augmented set"] if own else []) + \
            [label(t) for t in shared[1:]]
        lines = [f"#### against {ref}", "", "| model | " + " | ".join(columns) + " |",
                 "|---|" + "---|" * len(columns)]
        for model in dict.fromkeys(c.model for c in family):
            mine = {c.test: c for c in family if c.model == model}
            order = shared[:1] + ([next((t for t in mine if t.startswith("test-") and t != "test-mixed"), None)]
                                  if own else []) + shared[1:]
            cells = []
            for t in order:
                c = mine.get(t) if t else None
                if c is None:
                    cells.append("–")
                    continue
                tested = c.replicates > 1  # one seed cannot tell an effect from seed luck: no p-value
                numbers.add(section="paired", metric=metric, model=model, reference=ref, test=t, delta=c.delta,
                            ci_low=c.lo, ci_high=c.hi, p=c.p if tested else None,
                            p_adjusted=c.p_adj if tested else None, correction=CORRECTION if tested else None,
                            significant=c.significant, replicates=c.replicates)
                cell = (f"{label(t)}: " if t not in shared else "") + \
                    f"{_delta(c.delta)} [{c.lo:+.3f}, {c.hi:+.3f}]" + (f" p={c.p_adj:.2g}" if tested else "")
                cells.append(f"**{cell}**" if c.significant else cell)
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        tested = max(c.replicates for c in family) > 1
        out.append("\n".join(lines) + (f"\n\n{len(family)} comparisons against {ref}, p adjusted together.\n"
                                       if tested else "\n\nOne seed: not tested (no p-value; seed-to-seed "
                                       "variation is unmeasured), the intervals cover test sampling only.\n"))
    return "\n".join(out) + (
        f"\nΔ {METRIC_NAMES[metric]} (model − reference) on the same utterances and seeds, 95 % interval, and the "
        f"{CORRECTION}-adjusted p (false discovery rate {ALPHA:.0%} over the table); bold: significant after "
        "adjustment. Each model is tested on the clean set, its own augmented set (a single method), the mixed "
        "set and the cross-corpus sets; unadjusted p-values are in the CSV.\n")


def coverage(models: list[Model], tests: list[str]) -> str:
    """Which emotions each test set has (metrics are computed over the emotions a set has)."""
    base = next(m for m in models if m.role == "baseline")
    lines = ["| test set | utterances | " + " | ".join(EMOTIONS) + " |", "|---|---|" + "---|" * len(EMOTIONS)]
    for t in tests:
        e = (base.evals.get(t) or [None])[0]
        if e is None:
            continue
        support = [e["per_emotion"][x]["support"] for x in EMOTIONS]
        lines.append(f"| {label(t)} | {e['n']} | " + " | ".join(str(s) if s else "**absent**" for s in support)
                     + " |")
    return "\n".join(lines) + "\n\nMacro F1 and UAR of a set are averaged over the emotions it has.\n"


def per_emotion(models: list[Model], tests: list[str], numbers: Numbers) -> str:
    """Per test set: every emotion's F1 per model with its interval; precision and recall folded below."""
    out = []
    for i, t in enumerate(tests):
        base = next(m for m in models if m.role == "baseline")
        if not base.evals.get(t):
            continue
        support = {e: base.evals[t][0]["per_emotion"][e]["support"] for e in EMOTIONS}
        blocks = []
        for kind in ("f1", "precision", "recall") if i == 0 else ("f1",):
            lines = ["| emotion | " + " | ".join(m.name for m in models) + " |", "|---|" + "---|" * len(models)]
            ivs = {m.name: per_emotion_interval(m, t, kind) for m in models}
            for j, e in enumerate(EMOTIONS):
                if support[e] == 0:
                    continue
                cells = []
                for m in models:
                    vals = [ev["per_emotion"][e][kind] for ev in m.evals.get(t, [])]
                    if not vals:
                        cells.append("–")
                        continue
                    mean = float(np.mean(vals))
                    iv = ivs[m.name]
                    lo, hi = (float(iv[0][j]), float(iv[1][j])) if iv is not None else (np.nan, np.nan)
                    numbers.add(section="per_emotion", test=t, emotion=e, model=m.name, kind=kind, mean=mean,
                                ci_low=lo, ci_high=hi)
                    cells.append(f"{mean:.2f}" + (f" [{lo:.2f}, {hi:.2f}]" if not np.isnan(lo) else ""))
                lines.append(f"| {e} ({support[e]}) | " + " | ".join(cells) + " |")
            blocks.append((kind, "\n".join(lines)))
        absent = [e for e in EMOTIONS if support[e] == 0]
        body = f"{blocks[0][1]}\n" + (f"\nAbsent from this set: {', '.join(absent)}.\n" if absent else "") + \
            "".join(f"\n<details><summary>{kind}</summary>\n\n{text}\n\n</details>\n" for kind, text in blocks[1:])
        out.append(f"#### {label(t)}\n\n{body}" if i == 0 else
                   f"<details><summary>{label(t)}</summary>\n\n{body}\n</details>\n")
    return "\n".join(out) + ("\nF1 per emotion (support in parentheses), mean over runs [95 % hierarchical interval]; "
                              "precision and recall for the clean set (all in the CSV).\n")


def pareto(models: list[Model], test: str, numbers: Numbers) -> str:
    """The best model per emotion, where some model has F1 > 0, and the Pareto set."""
    present = [e for e in EMOTIONS if models[0].evals.get(test) and
               models[0].evals[test][0]["per_emotion"][e]["support"] > 0]
    f1 = {m.name: np.array([np.mean([ev["per_emotion"][e]["f1"] for ev in m.evals[test]]) for e in present])
          for m in models if m.evals.get(test)}
    lines = ["| emotion | best model | F1 |", "|---|---|---|"]
    none = []
    for j, e in enumerate(present):
        best = max(f1, key=lambda n: f1[n][j])
        if f1[best][j] <= 0:
            none.append(e)
            continue
        numbers.add(section="best_per_emotion", test=test, emotion=e, model=best, f1=float(f1[best][j]))
        lines.append(f"| {e} | {best} | {f1[best][j]:.3f} |")
    front = [n for n in f1 if not any(np.all(f1[o] >= f1[n]) and np.any(f1[o] > f1[n]) for o in f1 if o != n)]
    return "\n".join(lines) + (f"\n\nNo model recognises {', '.join(none)} (F1 0 for every model)." if none else "") \
        + "\n\nPareto set (no other model is at least as good on every emotion and better on one): " \
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


def gains_section(study: dict[str, Any], numbers: Numbers, tested: dict[str, Comparison] | None = None) -> str:
    """Each method's selection gain, its interval and p (``tested``: :func:`analysis.selection_comparisons`),
    whether it counts as an improvement (the declared ``min_gain``) and its weight in every Top-k model."""
    if "gains" not in study:
        return "_No study file: gains and weights are only reported for `sertk study` folders._\n"
    sentence = selection_sentence(study) + "\n\n"
    if not study["gains"]:
        return sentence + "_No method could be compared (no held-out results for the augmented sets)._\n"
    sel = study.get("selection") or {"set": "test", "reference_model": "baseline"}
    part = "validation" if sel.get("set") == "validation" else "test"
    ref = sel.get("reference_model", "baseline")
    combos = study.get("weights", {})
    tested = tested or {}
    min_gain = float(sel.get("min_gain", MIN_GAIN))
    columns = [f"F1 (clean + its augmented {part} set)", f"{ref} F1 (same set)", "gain",
               "95 % interval", f"p ({CORRECTION})", f"counts (gain ≥ {min_gain:g})",
               *(f"weight in {c}" for c in combos)]
    lines = ["| method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for m, g in sorted(study["gains"].items(), key=lambda kv: -kv[1]):
        f1, b = study["combined_f1"][m], study["baseline_combined_f1"][m]
        ws = [combos[c].get(m) for c in combos]
        c = tested.get(m)
        counts = g > 0 and g >= min_gain
        numbers.add(section="gains", method=m, f1=f1, baseline_f1=b, gain=g, reference=ref, selection_set=part,
                    counts=counts, min_gain=min_gain,
                    **({"ci_low": c.lo, "ci_high": c.hi, "p": c.p, "p_adj": c.p_adj, "replicates": c.replicates}
                       if c else {}), **{f"weight_{cn}": w for cn, w in zip(combos, ws)})
        iv = f"[{_delta(c.lo)}, {_delta(c.hi)}]" if c else "—"
        pv = (f"{c.p_adj:.3g}" if c.replicates > 1 else "not tested (1 seed)") if c else "—"
        lines.append("| " + " | ".join([m, f"{f1:.3f}", f"{b:.3f}", _delta(g), iv, pv, "yes" if counts else "no",
                                        *(_fmt(w) for w in ws)])
                     + " |")
    note = (f"\nGain = weighted F1 on the clean {part} set plus the {part} set augmented by that method, minus "
            f"the {ref} model's on the same utterances (seed-averaged); weights = gains normalised over the k "
            "largest gains (the reference study's rule). A gain counts as an improvement only when it reaches the "
            f"declared minimal effect min_gain = {min_gain:g} ([augmentations] min_gain); smaller gains get no weight. "
            "The interval "
            "and p come from the paired test over seeds and speakers of the selection set"
            + (" (a seed's folds pooled, so the interval is of the pooled difference)" if study.get("folds") else "")
            + "; the rule itself uses the mean gain, as the reference study did.\n")
    return sentence + "\n".join(lines) + "\n" + note


def control(models: list[Model], numbers: Numbers, comps: list[Comparison] | None = None) -> str:
    """How much of each model's gain over the baseline the clean x2 control also gets (where meaningful)."""
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
        for t in ["test"] + [t for t in (f"test-{m.name}",) if t in m.evals]:
            fm, fb, fc = f(m, t), f(base, t), f(ctrl, t)
            if None in (fm, fb, fc):
                continue
            share, why = control_share(fm - fb, fc - fb)
            numbers.add(section="control", model=m.name, test=t, model_f1=fm, baseline_f1=fb, control_f1=fc,
                        gain_vs_baseline=fm - fb, gain_vs_control=fm - fc, share_explained_by_steps=share,
                        share_note=why)
            def gain(value: float, ref: Model) -> str:  # with the paired test's interval, when there is one
                c = next((c for c in comps or [] if c.model == m.name and c.reference == ref.name and c.test == t
                          and c.metric == "weighted_f1"), None)
                return _delta(value) + (f" [{c.lo:+.3f}, {c.hi:+.3f}]" if c else "")

            lines.append(f"| {m.name} | {label(t)} | {fm:.3f} | {fb:.3f} | {fc:.3f} | {gain(fm - fb, base)} | "
                         f"{gain(fm - fc, ctrl)} | " + (f"n/a: {why}" if share is None else f"{100 * share:.0f} %")
                         + " |")
    return "\n".join(lines) + (
        "\n\nThe control trains on clean + an identical copy of every file: as many utterances and optimizer "
        "steps as an augmented model (the reference study's flaw 2). The share is (control − baseline) / "
        f"(model − baseline), given only when the model gains at least {MIN_GAIN_FOR_SHARE} and the control "
        "gains less than the model. Gains carry the 95 % interval of the paired test (seeds and speakers); whether a "
        "difference is significant is in the paired tests above.\n")


def fold_numbers(models: list[Model], numbers: Numbers) -> None:
    """Every run's metrics with its fold and seed (the per-fold numbers of a cross-validated study)."""
    for m in models:
        for test, evals in m.evals.items():
            for seed, fold, e in zip(m.seeds, m.folds, evals):
                numbers.add(section="per_run", model=m.name, test=test, seed=seed, fold=fold,
                            **{k: e[k] for k in ("n", "accuracy", "weighted_f1", "macro_f1", "uar")})


def reproducibility(models: list[Model], study: dict[str, Any]) -> str:
    from ser_toolkit.training.runs import read_json

    first = read_json(models[0].runs[0] / "config.json")
    lines = [f"- sertk commit: `{study.get('commit') or first.get('commit')}`",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in (study.get("versions") or first.get("versions", {})).items()),
             "- hardware: " + ", ".join(f"{k}: {v}" for k, v in (study.get("hardware") or first.get("hardware", {})).items()),
             "- seeds: " + ", ".join(f"{m.name} {sorted(set(m.seeds))}" for m in models)]
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
        lines.append(f"- `sertk study` wall time (the invocation that trained): {study['wall_seconds']:.0f} s")
    cfg = study.get("config") or first.get("train")
    lines += ["", "<details><summary>resolved configuration</summary>", "", "```json",
              json.dumps(cfg, indent=2, default=str), "```", "", "</details>"]
    return "\n".join(lines) + "\n"
