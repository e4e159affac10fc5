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
from typing import Any, Callable, ClassVar, Mapping, Sequence

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

    def featurizer_spec(self) -> tuple[str, dict[str, Any]] | None:
        """(featurizer plugin, options) whose cached features this model reads, or None (its own
        ``featurizer()`` on every input). With a featurizer, ``--normalize`` applies and augmentation is
        materialised once instead of recomputed every epoch."""
        return None


def _identity(wave: np.ndarray) -> np.ndarray:
    return wave


class SerModelMixin:
    """What the training loop needs from a model besides ``forward``."""

    input_kind: str = "wave"  # "wave": padded 1-D audio batches; "vector": fixed-size feature vectors
    static_features: bool = False  # featurize() output may be memoised across epochs
    find_unused_parameters: bool = False
    """Some trainable parameters may get no gradient on some steps (e.g. layerdrop): DDP then looks for them
    after every backward (a graph traversal per step), so only models that need it say so."""

    def featurizer(self) -> Callable[[np.ndarray], np.ndarray]:
        """A picklable per-utterance preprocessing function, run in DataLoader workers; None for a model that
        reads only cached features (its plugin's ``featurizer_spec``), e.g. the cached frozen SSL probe."""
        return _identity

    def prepare(self, train_features: list[np.ndarray]) -> None:
        """Called once with the training inputs before training (e.g. to fit a standardiser)."""


SerModel = Any  # a torch.nn.Module that also implements SerModelMixin


class FeatureClassifier(ModelPlugin):
    """Base class for classifiers fitted once on cached features (e.g. scikit-learn), not trained by epochs.

    Set ``params`` (with a ``features`` parameter naming a featurizer plugin) and
    implement :meth:`fit` and :meth:`predict_proba`. sertk computes the features
    once (the feature cache), normalises them (``--normalize``), trains on
    materialised augmented copies, saves the fitted classifier with the run
    (:meth:`save`/:meth:`load`), and evaluates, predicts and reports it like any model.
    """

    train_defaults: ClassVar[Mapping[str, Any]] = {"aug_mode": "offline"}

    def featurizer_spec(self) -> tuple[str, dict[str, Any]]:
        """(featurizer name, options) of the features this classifier reads."""
        return self.options["features"], {}

    def fit(self, x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int, workers: int = 1,
            blocks: Sequence[tuple[str, int]] | None = None, class_weights: str = "none") -> dict[str, Any]:
        """Fit on training features ``x`` (N, D), labels ``y`` and CV groups (speakers); returns what was
        chosen (hyper-parameters, cross-validated scores), recorded in ``train_summary.json``.

        ``blocks``: for a joined feature set (``features = "egemaps+compare"``), the (featurizer, width) of
        each block of columns, in order (None for one featurizer). ``class_weights``: the run's
        ``--class-weights`` (``none`` or ``balanced``: inverse class frequency); a classifier that cannot
        weight classes raises :class:`~ser_toolkit.errors.SertkError` for ``balanced``. A ``fit`` without
        this parameter is called without it, and the run refuses ``balanced`` for it."""
        raise NotImplementedError

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities (N, 7) over the canonical emotions."""
        raise NotImplementedError

    def save(self, path: Path, run_id: str) -> None:
        """Write the fitted classifier to ``path`` (with the run id)."""
        raise NotImplementedError

    def load(self, path: Path, run_id: str) -> None:
        """Read a classifier written by :meth:`save` (refusing another run's)."""
        raise NotImplementedError
