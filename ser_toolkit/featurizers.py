"""The featurizer plugin contract: a fixed-size feature array per utterance, computed once and cached.

A featurizer (``register_featurizers``) maps one 16 kHz mono waveform to a
float32 array of a fixed shape (a vector of functionals, or per-layer pooled
hidden states of a frozen SSL model). Its :meth:`Featurizer.identity` (name,
options, version) keys the feature cache (:mod:`ser_toolkit.cache.features`):
features are computed once per (input cache digest, identity) and reused by
every run, seed, fold and evaluation.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar, Sequence

import numpy as np

from ser_toolkit.params import Param, validate


class Featurizer:
    """Base class for featurizer plugins."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = ()
    version: ClassVar[str] = "1"
    """Bump when the output changes for the same options (invalidates cached features)."""
    parallel: ClassVar[bool] = True
    """True: :meth:`extract_many` runs in worker processes over chunks of utterances (CPU featurizers);
    False: in the calling process, e.g. batched on a GPU."""

    def __init__(self, **options: Any) -> None:
        self.options = validate(self.params, options, f"featurizer '{self.name}'")

    def extract(self, wave: np.ndarray, rate: int) -> np.ndarray:
        """The features of one utterance: a float32 array, the same shape for every utterance."""
        raise NotImplementedError

    def extract_many(self, waves: Sequence[np.ndarray], rate: int) -> list[np.ndarray]:
        """The features of several utterances (override to batch)."""
        return [self.extract(w, rate) for w in waves]

    def feature_names(self) -> list[str] | None:
        """Names of a vector's entries, when known (recorded in the feature cache)."""
        return None

    def warm_up(self, rate: int) -> None:
        """Make this process ready (lazy imports, JIT compilation) before worker processes are forked from it.

        The feature cache calls it once per process and featurizer under the ``fork`` start method, so
        forked workers inherit a warm process instead of each paying the start-up (about 2 s per worker
        for librosa's pitch tracker). The default extracts half a second of seeded noise.
        """
        noise = np.random.default_rng(0).standard_normal(rate // 2).astype(np.float32) * 0.05
        self.extract_many([noise], rate)

    def identity(self) -> dict[str, Any]:
        """What the features depend on besides the audio: name, options, version."""
        return {"name": self.name, "options": dict(sorted(self.options.items())), "version": self.version}

    def key(self) -> str:
        """A short hash of :meth:`identity` (part of the feature cache's file name)."""
        return hashlib.sha1(json.dumps(self.identity(), sort_keys=True, default=str).encode()).hexdigest()[:12]


def get_featurizer(name: str, options: dict[str, Any] | None = None) -> Featurizer:
    """A featurizer plugin by name, with validated options; one-line errors for unknown names or values."""
    from ser_toolkit.registry import get

    return get("featurizer", name).obj(**(options or {}))
