"""Classic baselines on the shared corpora (issue 11): featurizer x classifier x normalisation.

Run from the repository root:

    python benchmarks/bench_baselines.py [--data ../shared/data] [--cache-dir cache]

Every combination of {egemaps, compare, acoustic, egemaps+acoustic,
egemaps+acoustic+compare} x {svm, rbf-svm, logreg} x {none, speaker} is scored (UAR, weighted F1, macro F1, seconds) on:

- ``reference``: the reference study's RAVDESS 998/250 split (stratified: every
  actor on both sides);
- ``preset``: the same test part, trained on the 831 files the ``reference-cpu``
  study trains on (its validation part for the Top-k selection carved out of the
  998, as the study does): the like-for-like comparison with the preset's baseline;
- ``folds``: six fixed speaker folds of RAVDESS (actors 1-4, 5-8, ..., 21-24
  held out in turn; mean and SD over the folds);
- ``savee7``: trained on all RAVDESS, tested on all 480 SAVEE files, 7 emotions;
- ``savee4``: the same restricted to neutral, happy, sad, angry.

It uses sertk's own pieces: the input caches, the feature cache (features once
per corpus and featurizer; its cold and warm timings give the feature
throughput and the rerun speed-up), :mod:`ser_toolkit.normalize` through
``set_features`` (speaker statistics from each part's own utterances) and the
classifier plugins (hyper-parameters by speaker-grouped CV on the training part
only). Results: ``benchmarks/results/baselines.json``; a markdown table is printed.

``--normalize`` takes sertk's modes (``none``, ``speaker``, ``speaker-train``,
``corpus``; ``speaker-train`` through :class:`ser_toolkit.normalize.SpeakerStats`
as a run does) and one more that exists only here, to explain the issue's
reference-split figures (a speaker is on both sides of that split):

- ``speaker-pooled``: each speaker's statistics over all of their audio in the
  training and the held-out part together (the training features then depend
  on test audio; what sertk's rules forbid).

On ``folds`` and the SAVEE protocols no speaker is on both sides, so
``speaker-train`` and ``speaker-pooled`` equal ``speaker`` there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FOUR = ("neutral", "happy", "sad", "angry")


def ravdess_actor(uid: str) -> int:
    return int(uid.split("-")[-1])


def speaker_ids(reader, rows) -> np.ndarray:
    """Speakers of ``rows``, qualified by corpus (a SAVEE and a RAVDESS speaker never share statistics)."""
    return np.asarray([f"{reader.config['dataset']['name']}/{s}" for s in
                       np.asarray(reader.column("speaker"), dtype=object)[rows]], dtype=object)


def shared_speaker_stats(xtr: np.ndarray, xte: np.ndarray, str_: np.ndarray, ste: np.ndarray,
                         mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Standardise raw features per speaker with ``speaker-pooled`` statistics (above)."""
    from ser_toolkit.normalize import EPS

    def stats(x, s):
        return {g: (x[s == g].mean(0), np.maximum(x[s == g].std(0), EPS)) for g in np.unique(s)}

    if mode != "speaker-pooled":
        raise SystemExit(f"unknown --normalize {mode!r}")
    ref_tr = ref_te = stats(np.vstack([xtr, xte]), np.concatenate([str_, ste]))
    out = []
    for x, s, ref in ((xtr, str_, ref_tr), (xte, ste, ref_te)):
        y = np.empty_like(x)
        for g in np.unique(s):
            mean, sd = ref[g]
            y[s == g] = (x[s == g] - mean) / sd
        out.append(y)
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("SERTK_SHARED_DATA",
                                                                     REPO.parent / "shared" / "data")))
    ap.add_argument("--cache-dir", type=Path, default=REPO / "cache")
    ap.add_argument("--featurizers", default="egemaps,compare,acoustic,egemaps+acoustic,egemaps+acoustic+compare",
                    help="comma-separated; join featurizers with '+' (blocks weighted 1/sqrt(width))")
    ap.add_argument("--classifiers", default="svm,rbf-svm,logreg")
    ap.add_argument("--normalize", default="none,speaker")
    ap.add_argument("--protocols", default="reference,folds,savee7,savee4")
    ap.add_argument("--class-weights", default="none", choices=("none", "balanced"),
                    help="the classifiers' class weights (sertk's --class-weights)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--skip-throughput", action="store_true",
                    help="keep the feature caches (no cold rebuild to time feature throughput)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "baselines.json")
    args = ap.parse_args()

    from ser_toolkit.cache.build import build_cache
    from ser_toolkit.cache.features import feature_path, load_features
    from ser_toolkit.cache.reader import CacheReader
    from ser_toolkit.emotions import EMOTIONS
    from ser_toolkit.evaluation import compute_metrics
    from ser_toolkit.featurizers import get_featurizer
    from ser_toolkit.registry import get
    from ser_toolkit.splits import make_split
    from ser_toolkit.training.features import set_features

    if not (args.data / "ravdess").is_dir() or not (args.data / "savee").is_dir():
        sys.exit(f"the shared corpora are not under {args.data}; pass --data")
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    readers = {}
    for name in ("ravdess", "savee"):
        path = args.cache_dir / f"{name}.h5"
        if not path.is_file():
            build_cache(get("dataset", name).obj(), args.data / name, path, workers=args.workers, quiet=True)
        readers[name] = CacheReader(path)
    rav, sav = readers["ravdess"], readers["savee"]
    featurizers = args.featurizers.split(",")
    results: dict = {"features": {}, "rows": [], "machine": {"cpus": os.cpu_count()}}

    # feature throughput: a cold build (from scratch) and a warm rerun from the feature cache
    for f in dict.fromkeys(n for f in featurizers for n in f.split("+")):  # each featurizer once
        if args.skip_throughput:
            break
        fz = get_featurizer(f)
        for r in (rav, sav):
            feature_path(r, fz).unlink(missing_ok=True)
        t = time.perf_counter()
        for r in (rav, sav):
            load_features(r, fz, workers=args.workers)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        for r in (rav, sav):
            load_features(r, fz, workers=args.workers)
        warm = time.perf_counter() - t
        n = len(rav.ids) + len(sav.ids)
        results["features"][f] = {"utterances": n, "cold_s": cold, "warm_s": warm, "utt_per_s": n / cold,
                                  "speedup": cold / warm, "workers": args.workers}
        print(f"{f}: {n / cold:.1f} utt/s with {args.workers} workers; rerun from the cache {cold / warm:.0f}x faster",
              flush=True)

    split = make_split(rav.utterances, f"file:{args.data / 'ravdess' / 'seed_split.csv'}")
    ref_train = [i for i, u in enumerate(rav.ids) if split[u] == "train"]
    ref_test = [i for i, u in enumerate(rav.ids) if split[u] == "test"]
    actors = np.array([ravdess_actor(u) for u in rav.ids])
    four = [EMOTIONS.index(e) for e in FOUR]
    # the reference-cpu preset's own parts: its study carves a validation part (for the Top-k selection) out of
    # the reference training part, so its models learn from 831 of the 998 training files
    from ser_toolkit.training.loop import carve_validation

    carved = carve_validation([rav.utterance(i) for i in ref_train], 0.2, 42)
    preset_train = [i for i in ref_train if carved.get(rav.ids[i], "train") == "train"]
    rav_all = list(range(len(rav.ids)))
    sav_all = list(range(len(sav.ids)))
    protocols = {
        "reference": [(rav, ref_train, rav, ref_test)],
        "preset": [(rav, preset_train, rav, ref_test)],
        "folds": [(rav, [i for i in rav_all if not lo <= actors[i] < lo + 4], rav,
                   [i for i in rav_all if lo <= actors[i] < lo + 4]) for lo in range(1, 25, 4)],
        "savee7": [(rav, rav_all, sav, sav_all)],
        "savee4": [(rav, [i for i in rav_all if rav.labels[i] in four], sav,
                    [i for i in sav_all if sav.labels[i] in four])],
    }
    wanted = args.protocols.split(",")
    print("| features | classifier | normalize | " + " | ".join(wanted) + " | seconds |", flush=True)
    for f in featurizers:
        for clf in args.classifiers.split(","):
            for mode in args.normalize.split(","):
                row = {"features": f, "classifier": clf, "normalize": mode, "class_weights": args.class_weights}
                t0 = time.perf_counter()
                for proto in wanted:
                    scores = []
                    for tr_reader, tr_rows, te_reader, te_rows in protocols[proto]:
                        sertk_mode = "none" if mode == "speaker-pooled" else mode
                        seen = None
                        if mode == "speaker-train":  # sertk's: the training speakers' statistics, per block
                            from ser_toolkit.normalize import SpeakerStats, source_of

                            names = list(np.asarray(tr_reader.column("speaker"), dtype=object)[tr_rows])
                            for block in f.split("+"):
                                raw, _ = set_features(tr_reader, tr_rows, (block, {}), "none")
                                seen = SpeakerStats.fit(source_of(tr_reader), block, raw, names, into=seen)
                        xtr, info = set_features(tr_reader, tr_rows, (f, {}), sertk_mode, seen=seen)
                        blocks = [(b["featurizer"], b["width"]) for b in info.get("blocks", ())] or None
                        xte, _ = set_features(te_reader, te_rows, (f, {}), sertk_mode, seen=seen)
                        if sertk_mode != mode:
                            xtr, xte = shared_speaker_stats(xtr, xte, speaker_ids(tr_reader, tr_rows),
                                                            speaker_ids(te_reader, te_rows), mode)
                        plugin = get("model", clf).obj(features=f)
                        speakers = np.asarray(tr_reader.column("speaker"), dtype=object)[tr_rows]
                        chosen = plugin.fit(xtr, tr_reader.labels[tr_rows], speakers, seed=0, workers=args.workers,
                                             blocks=blocks, class_weights=args.class_weights)
                        m = compute_metrics(te_reader.labels[te_rows], plugin.predict_proba(xte).argmax(1))
                        scores.append({k: m[k] for k in ("uar", "weighted_f1", "macro_f1")} | {"chosen": chosen})
                    row[proto] = {k: float(np.mean([s[k] for s in scores])) for k in ("uar", "weighted_f1", "macro_f1")}
                    row[proto]["uar_sd"] = float(np.std([s["uar"] for s in scores], ddof=1)) if len(scores) > 1 else None
                    row[proto]["chosen"] = [s["chosen"]["chosen"] for s in scores]
                row["seconds"] = time.perf_counter() - t0
                results["rows"].append(row)
                print(f"| {f} | {clf} | {mode} | " + " | ".join(
                    f"{row[p]['uar']:.3f}" + (f" ± {row[p]['uar_sd']:.3f}" if row[p]["uar_sd"] else "")
                    for p in wanted) + f" | {row['seconds']:.0f} |", flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
