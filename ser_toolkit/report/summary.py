"""The report's opening: setup and findings in sentences generated from the numbers, and the data section."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ser_toolkit.report.analysis import ALPHA, CORRECTION, Comparison, chance, estimate, share_of_top_class
from ser_toolkit.report.collect import Model, label

SMALL_TEST = 100
"""Fewer test utterances than this: intervals are wide, say so."""
MAX_FINDINGS = 6
"""At most this many significant differences per reference are told in sentences (the tables have all)."""
FEW_SPEAKERS = 5
"""Fewer test speakers than this: the speaker bootstrap is unreliable, say so."""
FEW_SEEDS = 5
"""Fewer seeds than this: say that the tests have little power."""
COLLAPSE_SHARE = 0.5
"""A model predicting one emotion for more than this share of a set is named in the findings."""


NORMALISATION_NOTES = {
    "speaker": " (transductive: each test speaker's own unlabelled audio)",
    "speaker-train": (" (speakers seen in training: their training statistics, no test audio; unseen speakers: "
                      "their own unlabelled audio, transductive)"),
}

def _read(path: Path) -> dict[str, Any]:
    from ser_toolkit.training.runs import read_json

    try:
        return read_json(path) if path.is_file() else {}
    except Exception:  # a summary line must never stop the report
        return {}


def _millions(n: Any) -> str:
    return f"{n / 1e6:.1f} M" if isinstance(n, (int, float)) and n >= 1e5 else str(n)


def setup_lines(models: list[Model], study: dict[str, Any]) -> list[str]:
    """Model, data and training in a few bullet points (from the baseline's first run and the study)."""
    base = next(m for m in models if m.role == "baseline")
    run = base.runs[0]
    cfg = _read(run / "config.json").get("train", {})
    summary = _read(run / "train_summary.json")
    params = summary.get("parameters") or {}
    opts = cfg.get("model_options") or {}
    model = f"`{cfg.get('model')}`" + (f" (checkpoint `{opts['checkpoint']}`)" if opts.get("checkpoint") else "")
    fitted = summary.get("classifier")
    norm = cfg.get("normalize", "none")
    if isinstance(fitted, dict):  # a feature classifier, fitted once
        chosen = ", ".join(f"{k.replace('clf__', '')} {v}" for k, v in (fitted.get("chosen") or {}).items())
        model += (f" on `{opts.get('features')}` features ({fitted.get('features')} values), normalisation "
                  f"{norm}" + NORMALISATION_NOTES.get(norm, "") + f"; {chosen} chosen by {fitted.get('cv')} on the "
                  "training part")
    elif params:
        model += f", {_millions(params.get('trainable'))} of {_millions(params.get('total'))} parameters trained"
        if norm != "none":
            model += f"; features normalised per {norm}"
    folds = {f for f in base.folds if f is not None}
    data = (f"{Path(str(cfg.get('dataset', '?'))).stem}: {summary.get('train_utterances', '?')} training, "
            f"{summary.get('valid_utterances', 0)} validation and {summary.get('test_utterances', '?')} test "
            f"utterances" + (f" per fold ({len(folds)} folds)" if folds else "")
            + f"; split `{study.get('split') or cfg.get('split')}`")
    emotions = summary.get("train_emotions")
    if isinstance(emotions, dict) and emotions:
        data += "; training emotions " + ", ".join(f"{k} {v}" for k, v in emotions.items())
    seeds = sorted({s for m in models for s in m.seeds})
    aug = study.get("config", {}).get("augmentations", {})
    how = ("fitted once (no epochs)" if isinstance(fitted, dict) else
           f"{cfg.get('epochs')} epochs, lr {cfg.get('lr')}, batch {cfg.get('batch_size')}, "
           f"schedule {cfg.get('schedule')}")
    copies = cfg.get("aug_copies")
    training = (f"{how}, {len(seeds)} seed{'s' * (len(seeds) > 1)} ({', '.join(map(str, seeds))})"
                f"; augmentation {cfg.get('aug_mode')}, {copies} cop{'ies' if copies != 1 else 'y'} per file"
                + (f"; methods {', '.join(aug.get('methods', []))}" if aug.get("methods") else "")
                + (f" with options {aug['options']}" if aug.get("options") else ""))
    return [f"- **Model**: {model}.", f"- **Data**: {data}.", *speaker_overlap(summary.get("overlap"),
                                                                             cfg.get("valid") or (study.get(
                                                                                 "selection") or {}).get("valid_share")),
            f"- **Training**: {training}."]


def speaker_overlap(stats: Any, asked: float | None) -> list[str]:
    """The report's statement of how far the in-corpus test part is from training (:func:`splits.overlap`,
    recorded by every run in train_summary.json): test speakers also in training and validation, and the
    validation part's real share."""
    if not isinstance(stats, dict) or "test_speakers" not in stats:
        return ["- **Speakers**: not recorded (a run trained by an older sertk)."]
    n, u = stats["test_speakers"], stats["test_utterances"]

    def seen(part: str) -> str:
        k, ku = stats[f"test_speakers_in_{part}"], stats[f"test_utterances_of_speakers_in_{part}"]
        return f"{k} of {n} test speakers ({ku} of {u} test utterances) also in {part}"

    if n == 0:
        text = "speakers unknown: whether test speakers were seen in training cannot be told"
    elif stats["test_speakers_in_train"] == 0 and stats["test_speakers_in_valid"] == 0:
        text = f"speaker-independent: none of the {n} test speakers is in training or validation"
    else:
        text = f"{seen('train')}; {seen('valid')}" + (
            ": the test part mixes seen and unseen speakers" if stats["test_speakers_in_train"] < n else
            ": every test speaker was also heard in training (speaker-dependent test)")
    if stats.get("unknown_speaker_utterances"):
        text += f"; {stats['unknown_speaker_utterances']} test utterances of unknown speakers"
    if stats.get("valid_share"):
        text += (f"; validation is {100 * stats['valid_share']:.0f} % of the training data ("
                 + (f"{100 * asked:.0f} % asked, " if asked else "") + f"{stats['valid_speakers']} speakers"
                 + (", by whole speakers" if stats.get("valid_speakers_in_train") == 0 else "") + ")")
    return [f"- **Speakers**: {text}."]


def findings(models: list[Model], tests: list[str], comps: list[Comparison], metric: str = "uar") -> list[str]:
    """Sentences from the numbers: the best model, every significant change (adjusted p), collapses, chance."""
    from ser_toolkit.report.collect import METRIC_NAMES

    name = METRIC_NAMES[metric]
    out: list[str] = []
    base = next(m for m in models if m.role == "baseline")
    clean = "test" if "test" in tests else tests[0]
    est = {m.name: estimate(m, clean, metric) for m in models}
    best = max((m for m in models if est[m.name]), key=lambda m: est[m.name].mean)
    e, b = est[best.name], est[base.name]
    ch = chance(base.preds[clean][0][1], metric)
    if best is base:
        out.append(f"On the {label(clean)} test set the baseline is the best model ({name} {b.mean:.3f} "
                   f"[{b.lo:.3f}, {b.hi:.3f}]; chance {ch:.3f}).")
    else:
        out.append(f"On the {label(clean)} test set the best model is **{best.name}** ({name} {e.mean:.3f} "
                   f"[{e.lo:.3f}, {e.hi:.3f}]); the baseline reaches {b.mean:.3f} [{b.lo:.3f}, {b.hi:.3f}] "
                   f"(chance {ch:.3f}).")
    ours = [c for c in comps if c.metric == metric]
    for ref in dict.fromkeys(c.reference for c in ours):
        what = "the baseline" if ref == base.name else "the control"
        here = [c for c in ours if c.reference == ref]
        if max(c.replicates for c in here) < 2:
            big = sorted(here, key=lambda c: -abs(c.delta))[:MAX_FINDINGS // 2]
            out.append(f"One seed: differences to {what} are not tested (seed-to-seed variation is unmeasured); "
                       "the largest: " + "; ".join(f"{c.model} on {label(c.test)} {c.delta:+.3f} "
                                                   f"[{c.lo:+.3f}, {c.hi:+.3f}]" for c in big) + ".")
            continue
        sig = sorted((c for c in here if c.significant), key=lambda c: -abs(c.delta))
        for c in sig[:MAX_FINDINGS]:
            verb = "improves" if c.delta > 0 else "lowers"
            out.append(f"{c.model} {verb} {label(c.test)} {name} by {c.delta:+.3f} [{c.lo:+.3f}, {c.hi:+.3f}] "
                       f"over {what} (adjusted p = {c.p_adj:.2g}).")
        if len(sig) > MAX_FINDINGS:
            out.append(f"{len(sig) - MAX_FINDINGS} more significant differences to {what} are in the tables below.")
        rest = [c for c in here if not c.significant]
        if rest:
            smallest = min(rest, key=lambda c: c.p_adj)
            out.append(("Nothing else" if sig else "No model") + f" changes {name} significantly against {what} on "
                       f"any test set (smallest adjusted p = {smallest.p_adj:.2g}: {smallest.model} on "
                       f"{label(smallest.test)}).")
    collapsed = []
    for m in models:
        for t in tests:
            evals = m.evals.get(t) or []
            if evals:
                tops = [share_of_top_class(e) for e in evals]
                emotion = Counter(x[0] for x in tops).most_common(1)[0][0]
                share = float(np.mean([x[1] for x in tops]))
                if share > COLLAPSE_SHARE:
                    collapsed.append((share, f"{m.name} predicts '{emotion}' for {100 * share:.0f} % of {label(t)}"))
    if collapsed:
        collapsed.sort(reverse=True)
        out.append("Predictions concentrate on one emotion: " + "; ".join(x for _, x in collapsed[:4])
                   + (f" (and {len(collapsed) - 4} more model/set pairs over {100 * COLLAPSE_SHARE:.0f} %, in the "
                      "confusion matrices)" if len(collapsed) > 4 else "") + ".")
    at_chance = []
    for t in tests:
        e = estimate(base, t, metric)
        if e and base.preds.get(t) and e.lo <= chance(base.preds[t][0][1], metric):
            at_chance.append(f"{label(t)} ({e.mean:.3f} [{e.lo:.3f}, {e.hi:.3f}])")
    if at_chance:
        out.append(f"The baseline's {name} is not distinguishable from chance ({ch:.3f}) on " + ", ".join(at_chance)
                   + ".")
    return out


def caveats(models: list[Model], tests: list[str]) -> list[str]:
    """Warnings about what the numbers cannot show: one seed, small test sets, unknown speakers."""
    out = []
    if max(len(set(m.seeds)) for m in models) < 2:
        out.append("One seed per model: training variance is unmeasured; the intervals cover test sampling only and "
                   "the paired tests ignore seed-to-seed differences, so their effects may be chance (run more "
                   "seeds: `[study] seeds = 3`).")
    elif max(len(set(m.seeds)) for m in models) < FEW_SEEDS:
        r = max(len(set(m.seeds)) for m in models)
        out.append(f"{r} seeds per model: the seed part of every interval and test has Student-t tails with {r - 1} "
                   f"degree{'s' * (r > 2)} of freedom, so only large, consistent effects can be significant; "
                   f"{FEW_SEEDS} or more seeds give the tests power (`[study] seeds = {FEW_SEEDS}`).")
    base = next(m for m in models if m.role == "baseline")
    small = [f"{label(t)} ({base.evals[t][0]['n']})" for t in tests
             if base.evals.get(t) and base.evals[t][0]["n"] < SMALL_TEST]
    if small:
        out.append(f"Small test sets (< {SMALL_TEST} utterances), wide intervals: " + ", ".join(small) + ".")
    few = [f"{label(t)} ({len(set(base.groups(t).tolist()))})" for t in tests
           if base.preds.get(t) and base.groups(t) is not None and len(set(base.groups(t).tolist())) < FEW_SPEAKERS]
    if few:
        out.append(f"Test sets with fewer than {FEW_SPEAKERS} speakers: resampling so few speakers cannot show how "
                   "results vary over speakers, so their intervals are unreliable: " + ", ".join(few) + ".")
    unknown = [label(t) for t in tests if base.preds.get(t) and base.groups(t) is None]
    if unknown:
        out.append("Speakers unknown (utterances resampled; intervals too narrow if speakers repeat): "
                   + ", ".join(unknown) + ".")
    return out


def summary_section(models: list[Model], tests: list[str], study: dict[str, Any],
                    comps: list[Comparison]) -> str:
    from ser_toolkit.diagnostics import report_warnings
    from ser_toolkit.report.tables import selection_sentence

    lines = ["## Summary", "", *setup_lines(models, study)]
    if "selection" in study or "gains" in study:
        lines.append(f"- **Selection**: {selection_sentence(study)}")
    lines += ["", "**Findings** (UAR; intervals: 95 % hierarchical bootstrap over seeds and test speakers; "
              f"significance: paired test against the baseline and the control, p adjusted ({CORRECTION}) over "
              f"each table's comparisons, α = {ALPHA}):", ""]
    lines += [f"- {s}" for s in findings(models, tests, comps)]
    notes = caveats(models, tests)
    if notes:
        lines += ["", "**Caveats**:", "", *(f"- {s}" for s in notes)]
    lines += [""] + report_warnings(models)
    return "\n".join(lines) + "\n"


def _part_stats(reader, rows: list[int]) -> dict[str, Any]:
    speakers = reader.column("speaker")
    emotions = Counter(reader.column("emotion")[i] for i in rows)
    return {"utterances": len(rows), "speakers": len({speakers[i] for i in rows}),
            "emotions": ", ".join(f"{k} {v}" for k, v in sorted(emotions.items())),
            "hours": float(reader.lengths[rows].sum()) / reader.sample_rate / 3600}


def data_section(models: list[Model], tests: list[str]) -> str:
    """Per corpus and part: utterances, speakers, emotions, hours, rate, down-mix; the fingerprint of every set."""
    from ser_toolkit.cache.reader import CacheReader
    from ser_toolkit.errors import SertkError
    from ser_toolkit.splits import make_split
    from ser_toolkit.training.loop import carve_validation

    base = next(m for m in models if m.role == "baseline")
    run = base.runs[0]
    info = _read(run / "run.json").get("data", {})
    cfg = _read(run / "config.json").get("train", {})
    header = ["| set | part | utterances | speakers | hours | rate, down-mix | emotions | fingerprint |",
              "|---|---|---|---|---|---|---|---|"]
    rows: list[str] = []

    def row(name: str, part: str, reader, idx: list[int], digest: str) -> None:
        st = _part_stats(reader, idx)
        pre = reader.config["preprocess"]
        rows.append(f"| {name} | {part} | {st['utterances']} | {st['speakers']} | {st['hours']:.2f} | "
                    f"{pre['sample_rate']} Hz, {pre['mono']} | {st['emotions']} | `{digest[:16]}` |")

    try:
        from ser_toolkit.training.runs import locate_cache, locate_split

        record = {"data": info}
        reader = CacheReader(locate_cache(run, record))
        assignment = make_split(reader.utterances, locate_split(run, record, cfg["split"]))
        if cfg.get("valid") and "valid" not in assignment.values():
            train = [u for u in reader.utterances if assignment[u.id] == "train"]
            assignment.update(carve_validation(train, float(cfg["valid"]), int(cfg["seed"])))
        for part in ("train", "valid", "test"):
            idx = [i for i, uid in enumerate(reader.ids) if assignment.get(uid) == part]
            if idx:
                row(reader.path.stem, part, reader, idx, reader.digest)
    except (SertkError, KeyError, TypeError, OSError) as exc:
        rows.append(f"| training cache | – | – | – | – | – | unreadable ({str(exc)[:80]}) | – |")
    augmented: dict[str, dict[str, Any]] = {}  # every augmented training set of every run
    for m in models:
        for r in m.runs:
            for aug in _read(r / "run.json").get("data", {}).get("augmented") or []:
                augmented.setdefault(aug["path"], {**aug, "model": m.name})
    for path, aug in augmented.items():
        try:
            other = CacheReader(Path(path))
            row(f"{Path(path).name} ({aug['model']})", "train (augmented)", other, list(range(len(other.ids))),
                aug["digest"])
        except (SertkError, KeyError, OSError):
            rows.append(f"| {Path(path).name} ({aug['model']}) | train (augmented) | – | – | – | – | – | "
                        f"`{aug['digest'][:16]}` |")
    for t in tests:
        if t == "test":
            continue
        e = (base.evals.get(t) or [None])[0]
        if e is None:
            continue
        try:
            other = CacheReader(Path(e["cache"]))
            keep = set(base.preds[t][0][0])
            idx = [i for i, uid in enumerate(other.ids) if uid in keep]
            row(label(t), "cross-corpus" if t.startswith("cross-") else "test (augmented)", other, idx,
                e["data"]["digest"])
        except (SertkError, KeyError, OSError):
            rows.append(f"| {label(t)} | – | {e['n']} | – | – | – | – | `{e['data']['digest'][:16]}` |")
    folds = any(f is not None for f in base.folds)
    note = ("\nParts of the first fold; every fold's parts are in its split file. " if folds else "\n") + \
        "Fingerprint: the first 16 hex digits of the set's content digest (what every result records); the " \
        f"parts are cut by the split with digest `{str(info.get('split', {}).get('digest'))[:16]}`.\n"
    return "\n".join(header + rows) + "\n" + note
