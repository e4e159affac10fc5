"""The canonical emotion set, in the order used everywhere (labels, tables, reports)."""

from __future__ import annotations

EMOTIONS: tuple[str, ...] = ("neutral", "happy", "sad", "angry", "fear", "disgust", "surprise")
"""Canonical emotions; a label's index in this tuple is its class id."""

EMOTION_INDEX: dict[str, int] = {name: i for i, name in enumerate(EMOTIONS)}


def emotion_index(name: str) -> int:
    """Class id of a canonical emotion name (``KeyError`` for anything else)."""
    return EMOTION_INDEX[name]
