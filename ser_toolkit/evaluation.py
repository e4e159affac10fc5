"""Evaluation: metrics per test set (clean, augmented, cross-corpus) and per-utterance predictions.

Per test set: accuracy, weighted F1 (the reference study's headline), macro F1,
unweighted average recall (UAR, the field's headline), per-emotion
precision/recall/F1/support, the confusion matrix (rows: true, columns:
predicted, canonical emotion order) and per-utterance predictions with class
probabilities. Emotions a test corpus lacks are listed in ``missing_emotions``
and excluded from macro F1 and UAR (which average over the emotions present).
"""

from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ser_toolkit.emotions import EMOTIONS
from ser_toolkit.errors import SertkError
from ser_toolkit.settings import EVAL_BATCH_SECONDS, GPU_EVAL_BATCH


def compute_metrics(y_true: Sequence[int], y_pred: Sequence[int]) -> dict[str, Any]:
    """All metrics of one test set from true and predicted class ids.

    Per-class precision, recall and F1 come from scikit-learn (``zero_division=0``); the averages follow from
    them as scikit-learn defines them (weighted F1: by support over all seven emotions; macro F1 and UAR: over
    the emotions present), without validating the labels again for each (tested against ``f1_score``).
    """
    from sklearn.metrics import precision_recall_fscore_support

    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    labels = list(range(len(EMOTIONS)))
    present = sorted(set(y_true.tolist()))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    k = len(labels)
    confusion = np.bincount(y_true.astype(np.int64) * k + y_pred.astype(np.int64), minlength=k * k).reshape(k, k)
    return {
        "n": int(y_true.size),
        "accuracy": float(np.mean(y_true == y_pred)) if y_true.size else 0.0,
        "weighted_f1": float(np.sum(f * s) / np.sum(s)) if np.sum(s) else 0.0,
        "macro_f1": float(np.mean(f[present])) if present else 0.0,
        "uar": float(np.mean([r[c] for c in present])),
        "per_emotion": {EMOTIONS[c]: {"precision": float(p[c]), "recall": float(r[c]), "f1": float(f[c]),
                                      "support": int(s[c])} for c in labels},
        "confusion": confusion.tolist(),
        "missing_emotions": [EMOTIONS[c] for c in labels if c not in present],
    }


DEFAULT_BATCH_SECONDS = EVAL_BATCH_SECONDS
"""Evaluation batches of waveforms hold at most this much padded audio (the batch size caps the count)."""
IN_FLIGHT = 2
"""On CUDA, batches queued on the device before the host waits for the oldest: reading and featurising the
next batch overlaps the model, and the queue (its pinned inputs) stays bounded."""


def length_batches(lengths: Sequence[int], batch_size: int, max_samples: float | None = None) -> list[np.ndarray]:
    """Positions in increasing length order (stable) cut into batches of at most ``batch_size`` whose padded
    size (count x longest) is at most ``max_samples`` (a longer utterance alone; no limit when None)."""
    order = np.argsort(np.asarray(lengths, dtype=np.int64), kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    for end in range(1, len(order) + 1):
        full = end - start > batch_size or (max_samples is not None and end - start > 1 and
                                            (end - start) * int(lengths[order[end - 1]]) > max_samples)
        if full:
            batches.append(order[start:end - 1])
            start = end - 1
    if start < len(order):
        batches.append(order[start:])
    return batches


def predict_batches(model, batches: Iterable[tuple[np.ndarray, list[np.ndarray]]], n: int, device, *,
                    batch_seconds: float | None = None, batch_size: int | None = None,
                    rate: int = 16000, fix: str | None = None) -> np.ndarray:
    """Class probabilities (n, 7) from (positions, featurised inputs) batches, consumed lazily one at a time.

    On CUDA: inputs pinned and copied without blocking, probabilities kept on the device and read back once;
    at most :data:`IN_FLIGHT` batches queued. Out of memory: one line naming the batch and ``batch_seconds`` /
    ``batch_size``, the limits the batches were formed with, and ``fix`` (the caller's options; default
    ``sertk evaluate``'s).
    """
    from collections import deque

    import torch

    from ser_toolkit.memory import EVAL_FIX, batch_facts, is_out_of_memory, out_of_memory

    from ser_toolkit.training.data import Collate
    from ser_toolkit.training.loop import bf16_native, precision_for

    cuda = device.type == "cuda"
    # inference autocasts on CUDA: bf16 where the GPU computes it natively, else fp16 (no emulated bf16)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision_for(device.type, True, cuda and bf16_native()))
    collate = Collate(model.input_kind)
    was_training = model.training
    model.eval()
    positions, parts, queued = [], [], deque()
    oom, facts = None, {}
    try:
        with torch.inference_mode():
            for idx, feats in batches:
                inputs, mask, _, _ = collate([(f, 0, None) for f in feats])
                facts = batch_facts(inputs, mask, rate)
                if cuda:
                    inputs = inputs.pin_memory()
                    mask = mask.pin_memory() if mask is not None else None
                inputs = inputs.to(device, non_blocking=cuda)
                mask = mask.to(device, non_blocking=cuda) if mask is not None else None
                with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                    logits = model(inputs, mask)
                parts.append(torch.softmax(logits.float(), -1))
                positions.append(np.asarray(idx))
                if cuda:
                    queued.append(torch.cuda.Event())
                    queued[-1].record()
                    if len(queued) > IN_FLIGHT:
                        queued.popleft().synchronize()
            probs = np.zeros((n, len(EMOTIONS)), dtype=np.float32)
            if parts:
                probs[np.concatenate(positions)] = torch.cat(parts).cpu().numpy()  # the one read-back
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        oom = out_of_memory(device, "while predicting", facts, batch_seconds, batch_size, fix or EVAL_FIX)
    finally:
        model.train(was_training)
    if oom is not None:  # raised outside the handler: the failed batch's tensors go with its frames
        parts.clear()
        raise oom
    return probs


def predict_waves(model, featurize, waves, batch_size: int, device, *,
                  batch_seconds: float | None = DEFAULT_BATCH_SECONDS, rate: int = 16000,
                  fix: str | None = None) -> np.ndarray:
    """Class probabilities (N, 7) for an iterable of waveforms, batched by similar length."""
    return predict_features(model, [featurize(w) for w in waves], batch_size, device, batch_seconds=batch_seconds,
                            rate=rate, fix=fix)


def predict_features(model, feats: Sequence[np.ndarray], batch_size: int, device, *,
                     batch_seconds: float | None = None, rate: int = 16000, fix: str | None = None) -> np.ndarray:
    """Class probabilities (N, 7) for featurised inputs, batched by similar length (for waveform models, at
    most ``batch_seconds`` of padded audio at ``rate`` per batch)."""
    budget = batch_seconds * rate if batch_seconds and model.input_kind == "wave" else None
    batches = length_batches([f.shape[0] for f in feats], batch_size, budget)
    return predict_batches(model, ((idx, [feats[i] for i in idx]) for idx in batches), len(feats), device,
                           batch_seconds=batch_seconds if budget else None, batch_size=batch_size, rate=rate,
                           fix=fix)


def windows(length: int, most: int | None) -> list[tuple[int, int]]:
    """(start, end) of the equal windows of at most ``most`` samples that cover ``length`` samples (the whole
    when it fits, or when ``most`` is None)."""
    if most is None or length <= most:
        return [(0, length)]
    n = -(-length // most)
    cuts = [round(k * length / n) for k in range(n + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def predict_rows(model, featurize, reader, rows: Sequence[int], batch_size: int, device,
                 workers: int = 1, *, batch_seconds: float | None = DEFAULT_BATCH_SECONDS,
                 fix: str | None = None, max_seconds: float | None = None) -> np.ndarray:
    """Class probabilities for rows of a cache (features memoised for static featurisers).

    Waveform models stream: the rows are read from ``reader`` one batch at a time, in length order, in
    batches of at most ``batch_size`` and ``batch_seconds`` of padded audio (``workers`` is then unused);
    the probabilities come back in the order of ``rows``. With ``max_seconds`` a longer utterance is
    predicted in equal windows of at most that length (:func:`windows`), its probabilities the mean of its
    windows' weighted by their lengths.
    """
    from ser_toolkit.training.data import featurize_rows

    rows = list(rows)
    static = getattr(model, "static_features", False)
    if getattr(model, "input_kind", None) == "wave" and featurize is not None and not static:
        most = int(max_seconds * reader.sample_rate) if max_seconds else None
        pieces = [(k, a, b) for k, i in enumerate(rows) for a, b in windows(int(reader.lengths[i]), most)]
        budget = batch_seconds * reader.sample_rate if batch_seconds else None
        batches = length_batches([b - a for _, a, b in pieces], batch_size, budget)
        last: dict[int, np.ndarray] = {}

        def wave(k: int) -> np.ndarray:  # a long utterance is read once for all of its windows in a batch
            if k not in last:
                last.clear()
                last[k] = reader.wave(rows[k])
            return last[k]

        stream = ((idx, [featurize(wave(pieces[j][0])[pieces[j][1]:pieces[j][2]]) for j in idx]) for idx in batches)
        probs = predict_batches(model, stream, len(pieces), device, batch_seconds=batch_seconds,
                                batch_size=batch_size, rate=reader.sample_rate, fix=fix)
        if len(pieces) == len(rows):
            return probs
        weights = np.array([b - a for _, a, b in pieces], dtype=np.float64)
        owner = np.array([k for k, _, _ in pieces])
        out = np.zeros((len(rows), probs.shape[1]), dtype=np.float64)
        np.add.at(out, owner, probs * weights[:, None])
        return (out / np.bincount(owner, weights=weights, minlength=len(rows))[:, None]).astype(np.float32)
    feats = featurize_rows(featurize, reader, rows, static, workers)
    return predict_features(model, feats, batch_size, device, fix=fix)


def evaluate_rows(model, featurize, reader, rows: Sequence[int], batch_size: int, device, *,
                  batch_seconds: float | None = DEFAULT_BATCH_SECONDS) -> dict[str, Any]:
    """Metrics of ``model`` on rows of a cache reader."""
    probs = predict_rows(model, featurize, reader, rows, batch_size, device, batch_seconds=batch_seconds)
    return compute_metrics(reader.labels[list(rows)], probs.argmax(1))


def predictions_csv(ids: Sequence[str], y_true: Sequence[int], probs: np.ndarray,
                    speakers: Sequence[str] | None = None) -> str:
    """Per-utterance predictions: id, true and predicted emotion, class probabilities, and the speaker
    (the report's resampling unit) when known."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["utterance", "true", "predicted", *[f"p_{e}" for e in EMOTIONS], *(["speaker"] if speakers else [])])
    for k, (uid, t, p) in enumerate(zip(ids, y_true, probs)):
        w.writerow([uid, EMOTIONS[int(t)], EMOTIONS[int(p.argmax())], *[f"{v:.6f}" for v in p],
                    *([speakers[k]] if speakers else [])])
    return buf.getvalue()


def read_speakers(path: Path) -> list[str] | None:
    """The speaker of every row of a predictions CSV; None when it has no speaker column or one is empty."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    speakers = [r.get("speaker") or "" for r in rows]
    return speakers if rows and all(speakers) else None


def read_predictions(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(utterance ids, true class ids, predicted class ids) from a predictions CSV; one line if malformed."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        return ([r["utterance"] for r in rows], np.array([EMOTIONS.index(r["true"]) for r in rows], dtype=np.int64),
                np.array([EMOTIONS.index(r["predicted"]) for r in rows], dtype=np.int64))
    except FileNotFoundError:
        raise SertkError(f"{path} does not exist", "evaluate the run first (sertk evaluate RUN)") from None
    except (KeyError, ValueError, TypeError, UnicodeDecodeError, csv.Error):
        raise SertkError(f"{path} is malformed", "re-evaluate the run (sertk evaluate RUN)") from None


def load_run_model(run_dir: Path, device=None, allow_unfinished: bool = False, info: dict | None = None):
    """(model, featurizer, config, device) of a finished run, from its best weights (safetensors)."""
    import torch

    from ser_toolkit.registry import get
    from ser_toolkit.training import runs

    info = info or runs.check_run(run_dir, allow_unfinished)
    cfg = runs.read_json(run_dir / "config.json")["train"]
    try:
        plugin = get("model", cfg["model"]).obj(**cfg["model_options"])
    except KeyError as exc:
        raise SertkError(f"{run_dir / 'config.json'} lacks the setting {exc}", "the run folder is damaged; "
                         "retrain it") from None
    from ser_toolkit.models import FeatureClassifier

    if isinstance(plugin, FeatureClassifier):
        plugin.load(run_dir / "checkpoints" / runs.CLASSIFIER, info["run_id"])
        plugin.speaker_stats = _speaker_stats(run_dir, cfg, info)
        return plugin, None, cfg, None
    model = plugin.rebuild(len(EMOTIONS), run_dir)
    runs.load_weights(run_dir / "checkpoints" / runs.BEST, model, info["run_id"])
    model.speaker_stats = _speaker_stats(run_dir, cfg, info)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model.to(device).eval()
    except Exception as exc:
        from ser_toolkit.memory import is_out_of_memory, out_of_memory

        if not is_out_of_memory(exc):
            raise
        oom = out_of_memory(device, f"loading run {run_dir}'s model", {}, None, None,
                            "free the GPU (nvidia-smi shows what holds it), or use the CPU: CUDA_VISIBLE_DEVICES= "
                            "sertk ...")
    else:
        oom = None
    if oom is not None:
        raise oom
    model.feature_spec = plugin.featurizer_spec()  # cached features (None: the model's own featurizer)
    return model, model.featurizer(), cfg, device


def _speaker_stats(run_dir: Path, cfg: Mapping[str, Any], info: dict[str, Any]):
    """A ``--normalize speaker-train`` run's training speaker statistics (None for other runs), checked
    against the digest the run was sealed with."""
    from ser_toolkit.normalize import SEEN, SpeakerStats
    from ser_toolkit.training import runs

    if cfg.get("normalize") != SEEN:
        return None
    stats = run_dir / "checkpoints" / runs.SPEAKER_STATS
    sealed = runs.read_json(run_dir / runs.SEAL_FILE) if runs.is_sealed(run_dir) else {}
    recorded = (sealed.get("checkpoints") or {}).get(stats.name)
    if sealed and (recorded is None or not stats.is_file() or runs.file_digest(stats) != recorded):
        raise SertkError(f"{stats} is missing or is not the file this run sealed", "retrain the run")
    return SpeakerStats.load(stats, info["run_id"])


def run_probs(model, featurize, cfg: Mapping[str, Any], reader, rows: Sequence[int], batch_size: int, device,
              workers: int = 1, *, batch_seconds: float | None = DEFAULT_BATCH_SECONDS, fix: str | None = None,
              max_seconds: float | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Class probabilities of a run's model on rows of a cache, and what they were computed from (the feature
    cache's digest and the normalisation, for models on cached features)."""
    spec = getattr(model, "feature_spec", None) or (model.featurizer_spec() if hasattr(model, "predict_proba")
                                                    else None)
    if spec is None:
        return predict_rows(model, featurize, reader, rows, batch_size, device, workers,
                            batch_seconds=batch_seconds, fix=fix, max_seconds=max_seconds), {}
    from ser_toolkit.training.features import set_features

    x, info = set_features(reader, rows, spec, cfg.get("normalize", "none"), workers,
                           seen=getattr(model, "speaker_stats", None))
    if hasattr(model, "predict_proba"):
        return model.predict_proba(x), info
    return predict_features(model, list(x), batch_size, device, fix=fix), info


def _changed(what: str, run_dir: Path, recorded: str | None, now: str) -> SertkError:
    from ser_toolkit.cache.identity import short

    return SertkError(f"{what} changed since run {run_dir} was trained on it (data {short(recorded)} -> "
                      f"{short(now)})", "retrain the run on the new data, restore the old data, or pass "
                      "--allow-changed-data to evaluate anyway (the results then say so)")


def test_sets(run_dir: Path, specs: Sequence[str] | None, info: dict[str, Any] | None = None,
              allow_changed: bool = False, cross: Sequence[str] | None = None, cache: Path | None = None,
              ) -> list[tuple[str, Any, list[int] | None, dict[str, Any]]]:
    """(name, reader, rows or None for all, provenance) of every test set a run is evaluated on.

    Default: the in-corpus test split, every augmented test set materialised
    for that split, and the cross-corpus sets declared for the run (``--cross``
    when it was trained, or ``cross`` here): declared, never inferred.
    Specs: ``test`` (the split), ``augmented``, ``cross``, ``valid`` and
    ``valid-augmented`` (a study's validation part), or a cache path.
    The in-corpus sets must be of the data the run trained on (same content
    digest and split), unless ``allow_changed``. The training cache is found where it was, or relative to the
    run folder (a moved study), or at ``cache`` (``--cache``); a cross-corpus cache likewise.
    """
    from ser_toolkit.augment_sets import sets_dir, split_key
    from ser_toolkit.cache.identity import assignment_digest, cache_name
    from ser_toolkit.cache.reader import CacheReader
    from ser_toolkit.splits import make_split
    from ser_toolkit.training import runs

    cfg = runs.read_json(run_dir / "config.json")
    info = info or runs.run_info(run_dir)
    trained = info.get("data", {})
    cache = runs.locate_cache(run_dir, info, cache)
    trained_digest = trained.get("cache", {}).get("digest")
    reader = CacheReader(cache)
    changed = reader.digest != trained_digest
    if changed and not allow_changed:
        raise _changed(f"cache {cache}", run_dir, trained_digest, reader.digest)
    assignment = make_split(reader.utterances, runs.locate_split(run_dir, info, cfg["train"]["split"]))
    split_now = assignment_digest(assignment)
    if split_now != trained.get("split", {}).get("digest"):
        if not allow_changed:
            raise _changed(f"split {cfg['train']['split']!r}", run_dir, trained.get("split", {}).get("digest"),
                           split_now)
        changed = True
    source = {"source_digest": reader.digest, "trained_digest": trained_digest, "changed": changed}
    out: list[tuple[str, Any, list[int] | None, dict[str, Any]]] = []
    declared = list(cfg["train"].get("cross") or []) if cross is None else list(cross)
    for spec in specs or ("test", "augmented", "cross"):
        if spec in ("test", "valid"):
            rows = [i for i, uid in enumerate(reader.ids) if assignment[uid] == spec]
            if not rows:
                raise SertkError(f"split {cfg['train']['split']!r} of run {run_dir} has no {spec} part",
                                 "evaluate another set")
            out.append((spec, reader, rows, {**source, "rows": f"{spec} split", "split_digest": split_now}))
        elif spec in ("augmented", "valid-augmented"):
            folder = sets_dir(reader, assignment)
            part = "test" if spec == "augmented" else "valid"
            for p in sorted(folder.glob(f"{part}-*.h5")):
                aug = CacheReader(p)
                key = aug.config.get("augmentation", {})
                if (key.get("source_digest"), key.get("split"), key.get("subset")) != \
                        (reader.digest, split_key(assignment), part) or p.stem != f"{part}-{key.get('name')}":
                    raise SertkError(f"augmented set {p} was not made as the {part} part of this run's split "
                                     "(renamed, moved or copied?)", "delete it; sertk materialize makes it again")
                out.append((f"{part}-{key['name']}", aug, None, {**source, "rows": "all"}))
        elif spec == "cross":
            if not declared and specs:
                raise SertkError(f"run {run_dir} declares no cross-corpus set",
                                 "train with --cross DATASET_OR_CACHE, or pass --test CACHE")
            for p in map(Path, declared):
                if not p.is_file() and (run_dir / "config.json").is_file():  # moved with the run: relative to it
                    moved = dict(zip(cfg["train"].get("cross") or [], cfg.get("data", {}).get("cross_relative") or []))
                    p = (run_dir / moved[str(p)]).resolve() if str(p) in moved else p
                other = CacheReader(p)
                _check_disjoint(other, reader, assignment)
                out.append((f"cross-{cache_name(other.config)}", other, None, {"rows": "all"}))
        else:
            p = Path(spec)
            if not p.exists() and not p.suffix:
                p = cache.with_name(f"{spec}.h5")
            if not p.exists():
                raise SertkError(f"test set {spec!r} is neither test, augmented, cross nor a cache file",
                                 "pass --test test|augmented|cross|CACHE.h5")
            other = reader if p.resolve() == cache.resolve() else CacheReader(p)
            same = other.digest == reader.digest
            out.append((f"cross-{cache_name(other.config)}" if not same else "all", reader if same else other, None,
                        {**source, "rows": "all"} if same else {"rows": "all", ADHOC: True}))
    return distinct_sets(out)


ADHOC = "adhoc"
"""Provenance key (never written) of a set given by path that the run does not declare."""


def distinct_sets(sets: list[tuple[str, Any, list[int] | None, dict[str, Any]]]
                  ) -> list[tuple[str, Any, list[int] | None, dict[str, Any]]]:
    """``sets`` if no two share a name (their result files): the same set twice, or two sets of one name with
    other data, is one line."""
    seen: dict[str, Any] = {}
    for name, reader, rows, _ in sets:
        if name in seen:
            other, other_rows = seen[name]
            if other.digest == reader.digest and other_rows == rows:
                raise SertkError(f"test set {name} is given twice ({other.path} and {reader.path}: the same data "
                                 f"{other.digest[:12]})", "pass each set once")
            raise SertkError(f"two test sets are both named {name} but hold other data ({other.path}: "
                             f"{other.digest[:12]}, {reader.path}: {reader.digest[:12]}), so their results would "
                             "share one file", f"rebuild one under another name (sertk cache DATASET --name "
                             f"{name.removeprefix('cross-')}-2 ...) and pass that cache")
        seen[name] = (reader, rows)
    return sets


def _check_disjoint(other, reader, assignment: Mapping[str, str]) -> None:
    """A cross-corpus set must not hold any of the run's training audio (by per-utterance audio digest)."""
    trained = {d for uid, d in zip(reader.ids, reader.column("audio_digest")) if assignment.get(uid) != "test"}
    shared = sum(d in trained for d in other.column("audio_digest"))
    if shared:
        raise SertkError(f"cross-corpus set {other.path} holds {shared} utterances of the run's own training data "
                         f"({reader.path})", "declare a cache of another corpus with --cross")


def evaluate_run(run_dir: Path, specs: Sequence[str] | None = None, batch_size: int | None = None,
                 workers: int = 2, allow_changed: bool = False, allow_unfinished: bool = False,
                 cross: Sequence[str] | None = None, folder: str = "eval", *,
                 batch_seconds: float | None = DEFAULT_BATCH_SECONDS, loaded: tuple | None = None,
                 cache: Path | None = None, fix: str | None = None, max_seconds: float | None = None
                 ) -> dict[str, Any]:
    """Evaluate a finished run on its test sets; writes <folder>/<name>.json, .predictions.csv, summary.json.

    Each eval JSON records the run id and the content digest of the set it was computed on. A study
    evaluates its validation sets into ``folder="selection"``, apart from the test results. Waveform
    models stream each set (:func:`predict_rows`) in batches of at most ``batch_seconds`` of audio and
    ``batch_size`` utterances (default: the run's batch size, at least 8, or :data:`GPU_EVAL_BATCH` on CUDA).
    ``loaded``: the run's model as :func:`load_run_model` returns it, already in memory (a study evaluates
    the model it has just trained, or loads a run once for its test and validation sets); else it is loaded
    from the run folder after checking its seal. ``cache``: where the run's training cache is now (a moved
    cache, found by the digest the run recorded). ``max_seconds`` (default: the run's training crop): a
    waveform model predicts a longer utterance in windows of at most that length (:func:`predict_rows`);
    without it an utterance too long to hold in memory is refused, naming the option.
    """
    from ser_toolkit.atomic import remove_stale_tmp, write_text
    from ser_toolkit.training import runs
    from ser_toolkit.training.loop import check_wave_lengths

    info = runs.run_info(run_dir) if loaded is not None else runs.check_run(run_dir, allow_unfinished)
    sets = test_sets(run_dir, specs, info, allow_changed, cross, cache)
    for name, reader, rows, provenance in sets:  # a set given by path never replaces another set's results
        earlier = run_dir / folder / f"{name}.json"
        if provenance.get(ADHOC) and earlier.is_file():
            recorded = (runs.read_json(earlier).get("data") or {}).get("digest")
            if recorded not in (None, reader.digest):
                raise SertkError(f"{earlier} holds the results of another set named {name} (data "
                                 f"{str(recorded)[:12]}); {reader.path} holds other data ({reader.digest[:12]})",
                                 f"rebuild that cache under another name (sertk cache DATASET --name "
                                 f"{name.removeprefix('cross-')}-2 ...) and evaluate that")
    model, featurize, cfg, device = loaded if loaded is not None else load_run_model(run_dir, info=info)
    cuda = device is not None and device.type == "cuda"
    batch = batch_size or max(GPU_EVAL_BATCH if cuda else 8, cfg["batch_size"])
    summary: dict[str, Any] = {}
    remove_stale_tmp(run_dir / folder, "*")  # what a killed evaluation left half-written
    (run_dir / folder / EVAL_SEAL).unlink(missing_ok=True)  # unsealed until every file of this evaluation is in
    wave_model = getattr(model, "input_kind", None) == "wave"
    max_seconds = max_seconds or cfg.get("max_seconds")  # the same length rule as training
    for name, reader, rows, provenance in sets:
        provenance = {k: v for k, v in provenance.items() if k != ADHOC}
        rows = list(range(len(reader))) if rows is None else rows
        if wave_model and not max_seconds:
            check_wave_lengths(reader.lengths[rows], [reader.ids[i] for i in rows], reader.sample_rate, "test",
                               EVAL_LONG_FIX)
        probs, features = run_probs(model, featurize, cfg, reader, rows, batch, device, workers,
                                    batch_seconds=batch_seconds, fix=fix, max_seconds=max_seconds)
        bad = int((~np.isfinite(probs).all(1)).sum())
        if bad:  # NaN weights (or a diverged run): never sealed as predictions
            raise SertkError(f"run {run_dir} predicts no finite probabilities for {bad} of {len(rows)} utterances "
                             f"of {name} (NaN or infinite outputs: its weights are damaged or training diverged)",
                             "retrain the run (a lower --lr, if its training loss became NaN)")
        if features:
            provenance = {**provenance, "features": features}
        if wave_model and max_seconds:
            longer = int(np.sum(reader.lengths[rows] > max_seconds * reader.sample_rate))
            provenance = {**provenance, "windows": {"max_seconds": max_seconds, "utterances": longer}}
        y_true = reader.labels[rows]
        metrics = compute_metrics(y_true, probs.argmax(1))
        speakers = reader.column("speaker")
        table = predictions_csv([reader.ids[i] for i in rows], y_true, probs, [speakers[i] for i in rows])
        metrics.update(name=name, cache=str(reader.path), dataset=reader.config["dataset"]["name"],
                       run_id=info["run_id"], data={"digest": reader.digest, **provenance},
                       predictions_sha256=hashlib.sha256(table.encode()).hexdigest())
        write_text(run_dir / folder / f"{name}.predictions.csv", table)
        runs.write_json(run_dir / folder / f"{name}.json", metrics)  # last: it vouches for the CSV
        summary[name] = {k: metrics[k] for k in ("n", "accuracy", "weighted_f1", "macro_f1", "uar",
                                                 "missing_emotions")}
    runs.write_json(run_dir / folder / "summary.json", summary)
    seal_evaluation(run_dir / folder, info["run_id"], list(summary))
    return summary


EVAL_LONG_FIX = "pass --max-seconds 60 (longer utterances are predicted in windows of at most 60 s, averaged)"
"""What :func:`evaluate_run` advises for utterances too long for a waveform model (an option ``sertk evaluate``
has; re-caching without them would change the data the run is tied to)."""

EVAL_SEAL = "final.json"
"""In ``RUN/eval`` (and ``RUN/selection``): the run id and the SHA-256 of ``summary.json`` and of every listed
set's JSON and predictions CSV, written last by each evaluation. A report reads only files it vouches for."""


def _eval_files(names: Sequence[str]) -> list[str]:
    return ["summary.json", *(f"{n}{ext}" for n in names for ext in (".json", ".predictions.csv"))]


def seal_evaluation(folder: Path, run_id: str, names: Sequence[str]) -> None:
    """Write ``folder/final.json`` (:data:`EVAL_SEAL`) for the sets ``names`` just evaluated."""
    from ser_toolkit.training import runs

    runs.write_json(folder / EVAL_SEAL, {"run_id": run_id, "files": {f: runs.file_digest(folder / f)
                                                                      for f in _eval_files(names)}})


def check_evaluation(folder: Path, run_id: str) -> list[str]:
    """The sets of an evaluation folder whose files are exactly those its seal vouches for, for run ``run_id``
    (one line otherwise: missing, edited or foreign)."""
    from ser_toolkit.training import runs

    fix = f"re-evaluate the run: sertk evaluate {folder.parent}"
    if not (folder / EVAL_SEAL).is_file():
        raise SertkError(f"the evaluation in {folder} is unfinished or from an older sertk (no {EVAL_SEAL})", fix)
    seal = runs.read_json(folder / EVAL_SEAL)
    files = seal.get("files") if isinstance(seal, dict) else None
    if not isinstance(files, dict) or seal.get("run_id") != run_id:
        raise SertkError(f"{folder / EVAL_SEAL} does not belong to this run", fix)
    listed = runs.read_json(folder / "summary.json") if (folder / "summary.json").is_file() else None
    names = list(listed) if isinstance(listed, dict) else []
    for name in _eval_files(names):
        path = folder / name
        if name not in files or not path.is_file() or runs.file_digest(path) != files[name]:
            raise SertkError(f"{path} is missing or was changed after the evaluation", fix)
    return names
