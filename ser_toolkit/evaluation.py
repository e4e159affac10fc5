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
import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ser_toolkit.emotions import EMOTIONS
from ser_toolkit.errors import SertkError


def compute_metrics(y_true: Sequence[int], y_pred: Sequence[int]) -> dict[str, Any]:
    """All metrics of one test set from true and predicted class ids."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    labels = list(range(len(EMOTIONS)))
    present = sorted(set(y_true.tolist()))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "n": int(y_true.size),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "uar": float(np.mean([r[c] for c in present])),
        "per_emotion": {EMOTIONS[c]: {"precision": float(p[c]), "recall": float(r[c]), "f1": float(f[c]),
                                      "support": int(s[c])} for c in labels},
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "missing_emotions": [EMOTIONS[c] for c in labels if c not in present],
    }


def predict_waves(model, featurize, waves, batch_size: int, device) -> np.ndarray:
    """Class probabilities (N, 7) for an iterable of waveforms, batched by similar length."""
    return predict_features(model, [featurize(w) for w in waves], batch_size, device)


def predict_features(model, feats: Sequence[np.ndarray], batch_size: int, device) -> np.ndarray:
    """Class probabilities (N, 7) for featurised inputs, batched by similar length."""
    import torch

    from ser_toolkit.training.data import Collate

    order = np.argsort([f.shape[0] for f in feats], kind="stable")
    probs = np.zeros((len(feats), len(EMOTIONS)), dtype=np.float32)
    collate = Collate(model.input_kind)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            inputs, mask, _, _ = collate([(feats[i], 0, None) for i in idx])
            inputs = inputs.to(device)
            mask = mask.to(device) if mask is not None else None
            with torch.autocast(device.type, dtype=torch.bfloat16,
                                enabled=device.type == "cuda" and torch.cuda.is_bf16_supported()):
                logits = model(inputs, mask)
            probs[idx] = torch.softmax(logits.float(), -1).cpu().numpy()
    model.train(was_training)
    return probs


def predict_rows(model, featurize, reader, rows: Sequence[int], batch_size: int, device,
                 workers: int = 1) -> np.ndarray:
    """Class probabilities for rows of a cache (features memoised for static featurisers)."""
    from ser_toolkit.training.data import featurize_rows

    feats = featurize_rows(featurize, reader, list(rows), getattr(model, "static_features", False), workers)
    return predict_features(model, feats, batch_size, device)


def evaluate_rows(model, featurize, reader, rows: Sequence[int], batch_size: int, device) -> dict[str, Any]:
    """Metrics of ``model`` on rows of a cache reader."""
    probs = predict_rows(model, featurize, reader, rows, batch_size, device)
    return compute_metrics(reader.labels[list(rows)], probs.argmax(1))


def predictions_csv(ids: Sequence[str], y_true: Sequence[int], probs: np.ndarray) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["utterance", "true", "predicted", *[f"p_{e}" for e in EMOTIONS]])
    for uid, t, p in zip(ids, y_true, probs):
        w.writerow([uid, EMOTIONS[int(t)], EMOTIONS[int(p.argmax())], *[f"{v:.6f}" for v in p]])
    return buf.getvalue()


CROSS_CORPUS = {"ravdess": ("savee-reference", "savee"), "synthetic": ("synthetic-shifted",)}


def load_run_model(run_dir: Path, device=None):
    """(model, featurizer, config) of a trained run, from its best checkpoint."""
    import torch

    from ser_toolkit.registry import get
    from ser_toolkit.training import runs

    cfg = runs.read_json(run_dir / "config.json")["train"]
    state = runs.load_checkpoint(run_dir / "checkpoints" / "best.pt")
    plugin = get("model", cfg["model"]).obj(**cfg["model_options"])
    model = plugin.rebuild(len(EMOTIONS), run_dir)
    model.load_state_dict(state["model"])
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    return model, model.featurizer(), cfg, device


def test_sets(run_dir: Path, specs: Sequence[str] | None) -> list[tuple[str, Path, list[int] | None]]:
    """(name, cache path, rows or None for all) of every test set a run is evaluated on.

    Default: the in-corpus test split, every augmented test set materialised
    for that split, and the cross-corpus caches present in the cache folder.
    Specs: ``test`` (the split), ``augmented``, ``cross``, or a cache path.
    """
    from ser_toolkit.augment_sets import sets_dir
    from ser_toolkit.cache.reader import CacheReader
    from ser_toolkit.splits import make_split
    from ser_toolkit.training import runs

    cfg = runs.read_json(run_dir / "config.json")
    cache = Path(cfg["data"]["cache"])
    reader = CacheReader(cache)
    assignment = make_split(reader.utterances, cfg["train"]["split"])
    out: list[tuple[str, Path, list[int] | None]] = []
    for spec in specs or ("test", "augmented", "cross"):
        if spec == "test":
            out.append(("test", cache, [i for i, uid in enumerate(reader.ids) if assignment[uid] == "test"]))
        elif spec == "augmented":
            folder = sets_dir(cache, assignment)
            out += [(p.stem, p, None) for p in sorted(folder.glob("test-*.h5"))]
        elif spec == "cross":
            name = reader.config["dataset"]["name"]
            for other in CROSS_CORPUS.get(name, ()):
                p = cache.with_name(f"{other}.h5")
                if p.exists():
                    out.append((f"cross-{other}", p, None))
                    break
        else:
            p = Path(spec)
            if not p.exists() and not p.suffix:
                p = cache.with_name(f"{spec}.h5")
            if not p.exists():
                raise SertkError(f"test set {spec!r} is neither test, augmented, cross nor a cache file",
                                 "pass --test test|augmented|cross|CACHE.h5")
            out.append((f"cross-{p.stem}" if p.resolve() != cache.resolve() else "all", p, None))
    return out


def evaluate_run(run_dir: Path, specs: Sequence[str] | None = None, batch_size: int | None = None,
                 workers: int = 2) -> dict[str, Any]:
    """Evaluate a run on its test sets; writes eval/<name>.json, .predictions.csv and eval/summary.json."""
    from ser_toolkit.atomic import write_text
    from ser_toolkit.cache.reader import CacheReader
    from ser_toolkit.training import runs

    model, featurize, cfg, device = load_run_model(run_dir)
    batch = batch_size or max(8, cfg["batch_size"])
    summary: dict[str, Any] = {}
    for name, path, rows in test_sets(run_dir, specs):
        reader = CacheReader(path)
        rows = list(range(len(reader))) if rows is None else rows
        probs = predict_rows(model, featurize, reader, rows, batch, device, workers)
        y_true = reader.labels[rows]
        metrics = compute_metrics(y_true, probs.argmax(1))
        metrics.update(name=name, cache=str(path), dataset=reader.config["dataset"]["name"])
        runs.write_json(run_dir / "eval" / f"{name}.json", metrics)
        write_text(run_dir / "eval" / f"{name}.predictions.csv",
                   predictions_csv([reader.ids[i] for i in rows], y_true, probs))
        summary[name] = {k: metrics[k] for k in ("n", "accuracy", "weighted_f1", "macro_f1", "uar",
                                                 "missing_emotions")}
    runs.write_json(run_dir / "eval" / "summary.json", summary)
    return summary
