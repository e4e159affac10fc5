"""Feature normalisation as an experiment setting: ``none``, ``speaker`` or ``corpus``.

``speaker``: every feature is standardised (mean 0, SD 1) with the statistics of
that speaker's own utterances **in the same set and part**: training speakers
from their training utterances, validation and test speakers from their
validation or test audio only, a cross-corpus speaker from that corpus's audio.
No label is ever used. For held-out sets this is *transductive* over unlabelled
test audio, as in the literature (e.g. per-speaker z-normalisation of openSMILE
functionals): a deployed system needs some unlabelled speech of each speaker.
``corpus``: the same with one group per set and part. ``none``: raw features (a
classifier may still standardise with training statistics).

A speaker with fewer than :data:`MIN_GROUP` utterances in a set, or a set whose
speakers are unknown, falls back to the set's statistics, and the note says so.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ser_toolkit.settings import SETTINGS

MODES: tuple[str, ...] = tuple(SETTINGS["normalize"].choices)
"""none, speaker, corpus (declared with the ``normalize`` training setting)."""
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
