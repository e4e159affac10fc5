"""Feature normalisation as an experiment setting: ``none``, ``speaker`` or ``corpus``.

``speaker``: every feature is standardised (mean 0, SD 1) with the statistics of
that speaker's own utterances **in the same set and part**: training speakers
from their training utterances, validation and test speakers from their
validation or test audio only, a cross-corpus speaker from that corpus's audio.
No label is ever used. For held-out sets this is *transductive* over unlabelled
test audio, as in the literature (e.g. per-speaker z-normalisation of openSMILE
functionals): a deployed system needs some unlabelled speech of each speaker.
``speaker-train``: as ``speaker``, except that a speaker **seen in training** is
standardised, in every set, with the statistics of their clean training
utterances (saved with the run: :class:`SpeakerStats`), so no test audio is used
for them: inductive for seen speakers, e.g. the reference split, whose actors are
on both sides. Unseen speakers (speaker folds, other corpora) fall back to
``speaker``. A speaker is the same one only in sets of the same source audio
(the cache the run trained on, or a set materialised from it).
``corpus``: the same as ``speaker`` with one group per set and part. ``none``: raw
features (a classifier may still standardise with training statistics).

A speaker with fewer than :data:`MIN_GROUP` utterances in a set, or a set whose
speakers are unknown, falls back to the set's statistics, and the note says so.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ser_toolkit.settings import SETTINGS

MODES: tuple[str, ...] = tuple(SETTINGS["normalize"].choices)
"""none, speaker, corpus (declared with the ``normalize`` training setting)."""
SEEN = "speaker-train"
"""The mode whose seen speakers keep their training statistics."""
MIN_GROUP = 5
"""Fewest utterances whose statistics standardise a speaker's features (fewer: the set's statistics)."""
UNKNOWN_SPEAKERS = frozenset({"", "unknown", "none", "n/a"})
EPS = 1e-8


def groups(speakers: Sequence[str], mode: str) -> tuple[np.ndarray, str | None]:
    """Group labels (one per utterance of one set and part) for ``mode``, and a note on any fallback.

    ``none`` returns no groups (an empty array).
    """
    if mode not in MODES:
        from ser_toolkit.errors import SertkError

        raise SertkError(f"unknown normalisation {mode!r}", f"use one of {', '.join(MODES)}")
    n = len(speakers)
    if mode == "none":
        return np.empty(0, dtype=object), None
    if mode == "corpus":
        return np.zeros(n, dtype=np.int64), None
    # speaker and speaker-train group alike; speaker-train then replaces seen speakers' statistics (apply_seen)
    names = [str(s) for s in speakers]
    if any(s.strip().lower() in UNKNOWN_SPEAKERS for s in names):
        return np.zeros(n, dtype=np.int64), "speakers unknown: normalised per set (corpus) instead"
    uniq, inverse, counts = np.unique(np.asarray(names, dtype=object), return_inverse=True, return_counts=True)
    small = counts[inverse] < MIN_GROUP
    if not small.any():
        return inverse.astype(np.int64), None
    out = np.where(small, -1, inverse).astype(np.int64)  # -1: the set's statistics
    few = int((counts < MIN_GROUP).sum())
    return out, (f"{few} speaker{'s' if few > 1 else ''} with fewer than {MIN_GROUP} utterances: "
                 "normalised with the set's statistics")


def normalize(features: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Standardise ``features`` (N, ...) within each group (float32; group -1: the whole set's statistics).

    An empty ``group`` (mode ``none``) returns the features unchanged.
    """
    x = np.asarray(features, dtype=np.float32)
    if group.size == 0:
        return x
    if group.shape[0] != x.shape[0]:
        raise ValueError(f"{group.shape[0]} group labels for {x.shape[0]} utterances")
    out = np.empty_like(x)
    whole = (x.mean(0), x.std(0))
    for g in np.unique(group):
        idx = group == g
        mean, sd = whole if g == -1 else (x[idx].mean(0), x[idx].std(0))
        out[idx] = (x[idx] - mean) / np.maximum(sd, EPS)
    return out


def source_of(reader) -> str:
    """The digest of the audio a cache's speakers come from: the cache itself, or the cache a materialised
    (augmented) set was drawn from."""
    return str((reader.config.get("augmentation") or {}).get("source_digest") or reader.digest)


class SpeakerStats:
    """Per-speaker training statistics of ``speaker-train`` runs: for each feature block (featurizer name), every
    training speaker's mean and SD over their clean training utterances, and the source audio they came from."""

    def __init__(self, source: str, blocks: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]) -> None:
        self.source, self.blocks = source, blocks

    @classmethod
    def fit(cls, source: str, block: str, x: np.ndarray, speakers: Sequence[str],
            into: "SpeakerStats | None" = None) -> "SpeakerStats":
        """Add one block's statistics (speakers with at least :data:`MIN_GROUP` utterances; labels unused)."""
        x = np.asarray(x, dtype=np.float32)
        names = np.asarray([str(s) for s in speakers], dtype=object)
        stats = {}
        for name in sorted(set(names)):  # unknown speakers are nobody: never "seen"
            idx = names == name
            if name.strip().lower() not in UNKNOWN_SPEAKERS and idx.sum() >= MIN_GROUP:
                stats[name] = (x[idx].mean(0), x[idx].std(0))
        out = into or cls(source, {})
        out.blocks[block] = stats
        return out

    def seen(self, speakers: Sequence[str], source: str, block: str) -> np.ndarray:
        """Which utterances are of a speaker seen in training (same source audio, statistics for ``block``)."""
        stats = self.blocks.get(block, {})
        if source != self.source or not stats:
            return np.zeros(len(speakers), dtype=bool)
        return np.asarray([str(s) in stats for s in speakers], dtype=bool)

    def apply(self, x: np.ndarray, normalised: np.ndarray, speakers: Sequence[str], source: str,
              block: str) -> tuple[np.ndarray, int]:
        """``normalised`` (per-set statistics) with every seen speaker of the same source audio standardised
        with their training statistics instead; and how many utterances were."""
        mask = self.seen(speakers, source, block)
        if not mask.any():
            return normalised, 0
        out = normalised.copy()
        names = np.asarray([str(s) for s in speakers], dtype=object)
        for name in set(names[mask]):
            idx = names == name
            mean, sd = self.blocks[block][name]
            out[idx] = (np.asarray(x, np.float32)[idx] - mean) / np.maximum(sd, EPS)
        return out, int(mask.sum())

    def save(self, path, run_id: str) -> None:
        """A safetensors file (atomic): ``<block>/mean`` and ``<block>/sd`` (speakers x features) per block;
        the speakers, the source digest and the run id in its metadata."""
        import json

        from safetensors.numpy import save_file

        from ser_toolkit.atomic import atomic_path

        tensors, speakers = {}, {}
        for block, stats in self.blocks.items():
            names = sorted(stats)
            speakers[block] = names
            tensors[f"{block}/mean"] = np.stack([stats[n][0] for n in names]).astype(np.float32)
            tensors[f"{block}/sd"] = np.stack([stats[n][1] for n in names]).astype(np.float32)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"run_id": run_id, "source": self.source,
                                                   "speakers": json.dumps(speakers)})

    @classmethod
    def load(cls, path, run_id: str) -> "SpeakerStats":
        """Read a file written by :meth:`save`, refusing another run's (one-line errors)."""
        import json

        from safetensors import safe_open

        from ser_toolkit.errors import SertkError

        try:
            with safe_open(str(path), framework="numpy") as fh:
                meta = fh.metadata() or {}
                speakers = json.loads(meta.get("speakers", "{}"))
                blocks = {b: {n: (fh.get_tensor(f"{b}/mean")[i], fh.get_tensor(f"{b}/sd")[i])
                              for i, n in enumerate(names)} for b, names in speakers.items()}
        except Exception as exc:  # missing, truncated or foreign: the same advice
            raise SertkError(f"speaker statistics {path} are missing or unreadable ({type(exc).__name__})",
                             "retrain the run") from None
        if meta.get("run_id") != run_id:
            raise SertkError(f"speaker statistics {path} belong to another run", "retrain the run")
        return cls(str(meta.get("source", "")), blocks)
