"""Feature models: cached features, normalised per set and group, and one fit of a classifier.

Features come from the feature cache (:mod:`ser_toolkit.cache.features`):
computed once per (input cache digest, featurizer) and shared by every run, seed,
fold and evaluation. Normalisation (``--normalize``, :mod:`ser_toolkit.normalize`)
groups each set's rows on their own: the training part of the clean cache, each
materialised augmented copy set, the validation part, each test set.
Augmentation is always materialised (``aug_mode = offline``): k copies, their
features cached like the clean ones.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ser_toolkit.errors import SertkError


COMBINE = "+"
"""Joins featurizer names into one feature set (``egemaps+acoustic+compare``)."""


def set_features(reader, rows: Sequence[int] | None, spec: tuple[str, dict[str, Any]], mode: str,
                 workers: int = 1, quiet: bool = True, seen=None) -> tuple[np.ndarray, dict[str, Any]]:
    """Features of ``rows`` of a cache (all rows when None), normalised over those rows; and their provenance
    (feature cache digest, featurizer identity, normalisation and its note).

    ``seen``: the run's :class:`~ser_toolkit.normalize.SpeakerStats` for ``--normalize speaker-train`` (its seen
    speakers are standardised with their training statistics; the provenance counts those utterances).

    A name joining featurizers with ``+`` concatenates their vectors (each normalised on its own); the
    provenance lists the blocks and their widths (a classifier weighs them, see
    :class:`~ser_toolkit.models.FeatureClassifier`), and the digest covers every block.
    """
    name, options = spec
    if COMBINE in name:
        import hashlib

        parts = [set_features(reader, rows, (n, options), mode, workers, quiet, seen) for n in name.split(COMBINE)]
        if any(x.ndim != 2 for x, _ in parts):
            raise SertkError(f"feature set {name!r} joins featurizers whose features are not vectors",
                             "join only vector featurizers with '+'")
        x = np.concatenate([x for x, _ in parts], axis=1)
        digest = hashlib.sha256("+".join(i["features"] for _, i in parts).encode()).hexdigest()
        info = {"features": digest, "featurizer": [i["featurizer"] for _, i in parts], "normalize": mode,
                "blocks": [{"featurizer": i["featurizer"]["name"], "features": i["features"],
                            "width": int(x_.shape[1])} for x_, i in parts]}
        notes = sorted({i["note"] for _, i in parts if "note" in i})
        if notes:
            info["note"] = "; ".join(notes)
        if "train_statistics" in parts[0][1]:
            info["train_statistics"] = parts[0][1]["train_statistics"]
        return x, info
    return _one_set(reader, rows, spec, mode, workers, quiet, seen)


def _one_set(reader, rows: Sequence[int] | None, spec: tuple[str, dict[str, Any]], mode: str,
             workers: int, quiet: bool, seen=None) -> tuple[np.ndarray, dict[str, Any]]:
    from ser_toolkit.cache.features import load_features
    from ser_toolkit.featurizers import get_featurizer
    from ser_toolkit.normalize import SEEN, groups, normalize, source_of

    featurizer = get_featurizer(*spec)
    cached = load_features(reader, featurizer, workers=max(1, workers), quiet=quiet)
    idx = np.arange(len(reader.ids)) if rows is None else np.asarray(list(rows), dtype=np.int64)
    x = np.asarray(cached.features[idx], dtype=np.float32)
    speakers = np.asarray(reader.column("speaker"), dtype=object)[idx]
    group, note = groups(list(speakers), mode)
    info = {"features": cached.digest, "featurizer": featurizer.identity(), "normalize": mode}
    if note:
        info["note"] = note
    out = normalize(x, group)
    if mode == SEEN and seen is not None:
        source = source_of(reader)
        out, info["train_statistics"] = seen.apply(x, out, list(speakers), source, spec[0])
        if info["train_statistics"]:  # the fallback note concerns the unseen speakers only
            note = groups(list(speakers[~seen.seen(list(speakers), source, spec[0])]), "speaker")[1]
            info.pop("note", None)
            if note:
                info["note"] = note
    return out, info


def training_statistics(data, spec: tuple[str, dict[str, Any]], workers: int = 1, quiet: bool = True):
    """:class:`~ser_toolkit.normalize.SpeakerStats` of a run's clean training utterances, per feature block."""
    from ser_toolkit.normalize import SpeakerStats, source_of

    clean = [r for r, reader in enumerate(data.train.readers) if reader.path == data.reader.path]
    rows = [i for r, i, copy in data.train.items if r in clean and copy < 0]
    speakers = list(np.asarray(data.reader.column("speaker"), dtype=object)[rows])
    stats = None
    for name in spec[0].split(COMBINE):
        raw, _ = _one_set(data.reader, rows, (name, spec[1]), "none", workers, quiet)
        stats = SpeakerStats.fit(source_of(data.reader), name, raw, speakers, into=stats)
    return stats


def item_features(items, spec: tuple[str, dict[str, Any]], mode: str, workers: int = 1,
                  quiet: bool = True, seen=None) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Features of every training item (clean rows and materialised copies; no online augmentation), each
    reader's rows normalised together; and the provenance of each reader's features."""
    by_reader: dict[int, list[int]] = {}
    for k, (r, _, copy) in enumerate(items.items):
        if copy >= 0:
            raise SertkError("feature models train on materialised augmented copies, not on the fly",
                             "use --aug-mode offline")
        by_reader.setdefault(r, []).append(k)
    out: np.ndarray | None = None
    infos = []
    for r, ks in by_reader.items():
        reader = items.readers[r]
        x, info = set_features(reader, [items.items[k][1] for k in ks], spec, mode, workers, quiet, seen)
        if out is None:
            out = np.zeros((len(items.items), *x.shape[1:]), dtype=np.float32)
        out[ks] = x
        infos.append({"set": str(reader.path), "rows": len(ks), **info})
    return (out if out is not None else np.zeros((0, 0), np.float32)), infos


def _class_weights(plugin, mode: str) -> dict[str, str]:
    """``class_weights`` for ``plugin.fit``: passed when its ``fit`` takes it (an older third-party classifier's
    may not; it is then refused for anything but ``none``)."""
    import inspect

    if "class_weights" in inspect.signature(plugin.fit).parameters:
        return {"class_weights": mode}
    if mode != "none":
        raise SertkError(f"model '{plugin.name}' cannot weight classes", "use --class-weights none")
    return {}


def fit_classifier(cfg, run_dir: Path, resume: bool = False, quiet: bool = False,
                   on_epoch: Callable[[dict[str, Any]], None] | None = None) -> tuple[dict[str, Any], Any]:
    """Fit a :class:`~ser_toolkit.models.FeatureClassifier` run: features, one fit, validation, a sealed run.
    Returns the summary and the fitted classifier (with its ``speaker_stats``, as evaluation loads it)."""
    from ser_toolkit.evaluation import compute_metrics
    from ser_toolkit.normalize import SEEN
    from ser_toolkit.registry import get
    from ser_toolkit.training import runs
    from ser_toolkit.training.loop import _start_run, prepare_data

    if cfg.plugins and cfg.aug_mode != "offline":
        raise SertkError(f"model '{cfg.model}' is fitted once on cached features: it trains on materialised "
                         "augmented copies", "use --aug-mode offline (the default for this model)")
    t0 = time.perf_counter()
    plugin = get("model", cfg.model).obj(**cfg.model_options)
    spec = plugin.featurizer_spec()
    run_dir.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg, None, run_dir)
    seen = training_statistics(data, spec, cfg.workers, quiet) if cfg.normalize == SEEN else None
    x, sets = item_features(data.train, spec, cfg.normalize, cfg.workers, quiet, seen)
    y = data.train.labels()
    speakers = np.asarray([str(data.train.readers[r].column("speaker")[i]) for r, i, _ in data.train.items],
                          dtype=object)
    data.data["features"] = [{"set": s["set"], "digest": s["features"]} for s in sets]
    resuming = resume and (run_dir / runs.RUN_FILE).is_file()
    run_id = _start_run(run_dir, data.data, resuming, True)
    t_fit = time.perf_counter()
    blocks = [(b["featurizer"], b["width"]) for b in sets[0].get("blocks", ())] if sets else None
    chosen = plugin.fit(x, y, speakers, cfg.seed, workers=max(1, cfg.workers), blocks=blocks or None,
                        **_class_weights(plugin, cfg.class_weights))
    fit_seconds = time.perf_counter() - t_fit
    row: dict[str, Any] = {"epoch": 1, "seconds": fit_seconds, "cv_uar": chosen.get("cv_uar")}
    if data.valid_rows:
        xv, _ = set_features(data.reader, data.valid_rows, spec, cfg.normalize, cfg.workers, quiet, seen)
        metrics = compute_metrics(data.reader.labels[data.valid_rows], plugin.predict_proba(xv).argmax(1))
        row.update({f"valid_{k}": metrics[k] for k in ("accuracy", "weighted_f1", "macro_f1", "uar")})
    plugin.save(run_dir / "checkpoints" / runs.CLASSIFIER, run_id)
    if seen is not None:
        seen.save(run_dir / "checkpoints" / runs.SPEAKER_STATS, run_id)  # sealed with the classifier
    if on_epoch is not None:
        on_epoch({**row, "epochs": 1})
    summary = {"epochs_run": 1, "best": row.get(f"valid_{cfg.select_metric}", chosen.get("cv_uar")),
               "history": [row], "classifier": chosen, "features": sets,
               "parameters": {"total": 0, "trainable": 0}, "seconds": time.perf_counter() - t0,
               **data.summary}
    runs.write_json(run_dir / "train_summary.json", summary)
    runs.seal(run_dir, run_id)  # last: only now is the run finished
    plugin.speaker_stats = seen
    return summary, plugin
