"""The model plugin contract.

A model plugin (``register_models``) builds an :class:`SerModel`: a torch module
mapping a padded batch (``inputs``, ``attention_mask``) to logits over the
canonical emotions, plus ``featurizer()``, the per-utterance preprocessing
run in DataLoader workers (e.g. the checkpoint's input normalisation, or a
vector of acoustic statistics). Training, evaluation and prediction are the
same for every model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import numpy as np

from ser_toolkit.params import Param, validate


class ModelPlugin:
    """Base class for model plugins."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = ()
    train_defaults: ClassVar[Mapping[str, Any]] = {}
    """Training settings this model prefers over the global defaults (e.g. lr, epochs)."""

    def __init__(self, **options: Any) -> None:
        self.options = validate(self.params, options, f"model '{self.name}'")

    def build(self, num_labels: int, run_dir: Path | None = None, **train_options: Any) -> "SerModel":
        """A new model for training; may save what :meth:`rebuild` needs into ``run_dir``."""
        raise NotImplementedError

    def rebuild(self, num_labels: int, run_dir: Path) -> "SerModel":
        """The same architecture (weights come from a checkpoint), without network access."""
        return self.build(num_labels, None)


def _identity(wave: np.ndarray) -> np.ndarray:
    return wave


class SerModelMixin:
    """What the training loop needs from a model besides ``forward``."""

    input_kind: str = "wave"  # "wave": padded 1-D audio batches; "vector": fixed-size feature vectors
    static_features: bool = False  # featurize() output may be memoised across epochs

    def featurizer(self) -> Callable[[np.ndarray], np.ndarray]:
        """A picklable per-utterance preprocessing function, run in DataLoader workers."""
        return _identity

    def prepare(self, train_features: list[np.ndarray]) -> None:
        """Called once with the training inputs before training (e.g. to fit a standardiser)."""


SerModel = Any  # a torch.nn.Module that also implements SerModelMixin
