"""What a report reads: the runs of a study (or run folders), checked, grouped into models.

Every run must be sealed; every evaluation must be of that run, carry the digest
of its data and vouch for its predictions CSV; a test set must be the same data
in every run. Predictions (and the speaker of every utterance, the resampling
unit of the statistics) are kept per replicate: one per seed, a seed's folds
pooled when they hold different utterances.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ser_toolkit.errors import SertkError
from ser_toolkit.evaluation import check_evaluation, read_predictions, read_speakers

METRIC_NAMES = {"weighted_f1": "weighted F1", "macro_f1": "macro F1", "uar": "UAR"}


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
    speakers: dict[str, list[list[str] | None]] = field(default_factory=dict)  # test -> per replicate
    keys: dict[str, list[tuple]] = field(default_factory=dict)  # test -> replicate keys: (seed,) or (seed, fold)

    def groups(self, test: str) -> np.ndarray | None:
        """The speaker of every utterance of ``test`` (replicate 0's order); None when unknown."""
        s = self.speakers.get(test) or [None]
        return None if s[0] is None else np.asarray(s[0])


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


def _recomputed(metrics: dict[str, Any], preds: tuple[list[str], np.ndarray, np.ndarray], path: Path
                ) -> dict[str, Any]:
    """The eval JSON with every metric recomputed from its predictions (the sealed CSV): the numbers a report
    shows never come from an editable field. A JSON whose metrics disagree with its predictions is refused."""
    from ser_toolkit.evaluation import compute_metrics

    _, y_true, y_pred = preds
    fresh = compute_metrics(y_true, y_pred)
    for key, value in fresh.items():
        stored = metrics.get(key)
        same = stored == value if not isinstance(value, float) else \
            isinstance(stored, (int, float)) and not isinstance(stored, bool) and abs(stored - value) <= 1e-9
        if not same:
            raise SertkError(f"{path} says {key} = {str(stored)[:40]}, but its predictions give {str(value)[:40]} "
                             "(edited after the evaluation?)", f"re-evaluate the run: sertk evaluate {path.parent.parent}")
    return {**metrics, **fresh}


REPLICATE_IGNORED = frozenset({"seed", "split", "cross", "dataset"})
"""Settings in which the runs of one model may differ: the seed (replicates), the split file (folds), the
declared cross-corpus sets and the training cache's path (the data itself is compared by digest)."""


def _check_replicate(m: "Model", run: Path, fold: int | None) -> None:
    """A run joins a model only as a new replicate: the same settings as its other runs but the seed (and
    fold), never the seed and fold of a run already in it (two studies of the same config and seed are one
    replicate written twice, not two)."""
    from ser_toolkit.settings import RUNTIME
    from ser_toolkit.training.runs import read_json, run_info

    cfg = read_json(run / "config.json")["train"]
    for other, seed, other_fold in zip(m.runs, m.seeds, m.folds):
        ignored = REPLICATE_IGNORED | RUNTIME
        theirs = read_json(other / "config.json")["train"]
        differ = sorted(k for k in set(cfg) | set(theirs) if k not in ignored and cfg.get(k) != theirs.get(k))
        if differ:
            raise SertkError(f"runs {other} and {run} are both named '{m.name}' but differ in {', '.join(differ[:3])}"
                             ": they are not replicates of one model", "report them separately")
        if run_info(run).get("data", {}).get("cache", {}).get("digest") != \
                run_info(other).get("data", {}).get("cache", {}).get("digest"):
            raise SertkError(f"runs {other} and {run} are both named '{m.name}' but trained on different data",
                             "report them separately")
        if (seed, other_fold) == (cfg.get("seed"), fold):
            raise SertkError(f"runs {other} and {run} are both model '{m.name}' with seed {seed}"
                             f"{f', fold {fold}' if fold is not None else ''}: the same settings and seed trained "
                             "twice are one replicate, not two", "report one of the studies (or runs) at a time")


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


def _listed_run(study: Path, listed: str) -> Path:
    """A run a study.json lists: the run folder of that name beside the study.json (where a study puts its runs,
    so a copied or moved study reports its own runs, never the original's), else its path as recorded
    (relative: to the folder the study ran in); one line naming both absolute paths tried when neither is a run
    folder."""
    run, beside = Path(listed), study / Path(listed).name
    for candidate in (beside, run):
        if (candidate / "config.json").is_file():
            return candidate
    how = "" if run.is_absolute() else " (relative to the working directory)"
    raise SertkError(f"{(study / 'study.json').resolve()} lists run {listed}, but neither {run.resolve()}{how} nor "
                     f"{beside.resolve()} is a sertk run folder (no config.json): that entry points at a run that was "
                     "moved, removed or belongs to another study", "run 'sertk report' from the folder the study ran "
                     "in, or pass the study's run folders themselves")


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
            study["runs"] = [{**e, "run": str(_listed_run(p, e["run"]))} for e in study["runs"]]
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
    seen: dict[str, Path] = {}  # run id -> the folder it was read from
    for e in entries:
        m = models.setdefault(e["name"], Model(e["name"], e["role"], e["plugins"], e.get("weights")))
        run = Path(e["run"])
        info = check_run(run, allow_unfinished)
        if info["run_id"] in seen:  # a copy of a run (whatever its folder name or edited seed) is that run
            raise SertkError(f"runs {seen[info['run_id']]} and {run} are the same run (run id "
                             f"{info['run_id'][:12]}), copied: one run counted twice", "report each run once "
                             "(one of the copies, or one of the studies)")
        seen[info["run_id"]] = run
        if not (run / "eval" / "summary.json").is_file():
            raise SertkError(f"run {run} has not been evaluated", f"run: sertk evaluate {run}")
        tests = check_evaluation(run / "eval", info["run_id"])  # every file as the evaluation wrote it
        _check_replicate(m, run, e.get("fold"))
        m.runs.append(run)
        m.seeds.append(e["seed"])
        m.folds.append(e.get("fold"))
        for test in tests:
            e = _read_eval(run / "eval" / f"{test}.json", info["run_id"])
            _check_predictions(run / "eval" / f"{test}.predictions.csv", e)
            preds = read_predictions(run / "eval" / f"{test}.predictions.csv")
            m.evals.setdefault(test, []).append(_recomputed(e, preds, run / "eval" / f"{test}.json"))
            m.preds.setdefault(test, []).append(preds)
            m.speakers.setdefault(test, []).append(read_speakers(run / "eval" / f"{test}.predictions.csv"))
            m.keys.setdefault(test, []).append((m.seeds[-1],) if m.folds[-1] is None else (m.seeds[-1], m.folds[-1]))
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
        for seed, _, p, spk in sorted(zip(m.seeds, m.folds, preds, m.speakers[test]), key=lambda x: (x[0], x[1] or 0)):
            by_seed.setdefault(seed, []).append((p, spk))
        m.preds[test] = [([uid for p, _ in ps for uid in p[0]], np.concatenate([p[1] for p, _ in ps]),
                          np.concatenate([p[2] for p, _ in ps])) for _, ps in sorted(by_seed.items())]
        m.speakers[test] = [None if any(spk is None for _, spk in ps) else [x for _, spk in ps for x in spk]
                            for _, ps in sorted(by_seed.items())]
        m.keys[test] = [(seed,) for seed in sorted(by_seed)]


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
