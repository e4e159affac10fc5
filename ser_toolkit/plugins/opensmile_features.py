"""``egemaps`` and ``compare``: openSMILE functionals per utterance (the ``opensmile`` package).

- ``egemaps``: the extended Geneva Minimalistic Acoustic Parameter Set, eGeMAPS
  v02 (Eyben et al., 2016, IEEE Trans. Affective Computing 7(2)): 88
  functionals and temporal features of 25 expert-chosen low-level descriptors
  (pitch, jitter, shimmer, loudness, HNR, formants, spectral slope, balance
  and flux, MFCC 1-4).
- ``compare``: the ComParE 2016 set (Schuller et al., Interspeech 2016
  Computational Paralinguistics Challenge): 6373 brute-force functionals of
  65 low-level descriptors and their deltas (25 KB per utterance as float32).

Cost: both take about 55-60 ms of one CPU core per 3.7 s RAVDESS utterance
(~17-19 utterances/s, ~65x real time; ``compare`` is no slower than
``egemaps``), so 1000 utterances take about a minute per core.

Both are computed by ``opensmile.Smile(feature_set=..., feature_level=Functionals)``
over the whole utterance: one float32 vector per utterance, whose entries are
named by :meth:`OpenSmileFeaturizer.feature_names` (openSMILE's column names).

openSMILE returns NaN for every functional of a segment shorter than 60 ms
(960 samples at 16 kHz; ``opensmile`` 2.6.0 warns "Segment too short, filling
with NaN"), so shorter input (including empty input) is zero-padded at the end
to ``min_seconds`` (default 0.1 s). With that padding no NaN or infinity was seen
(real speech, sines, silence, noise); any that appeared would be replaced by 0.

The cache identity records the feature set and ``opensmile.__version__``, so
features from another openSMILE build are recomputed, not reused.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ser_toolkit import hookimpl
from ser_toolkit.errors import SertkError
from ser_toolkit.featurizers import Featurizer
from ser_toolkit.params import Param


def _opensmile():
    try:
        import opensmile
    except ImportError:
        raise SertkError("the opensmile package is not installed", "pip install opensmile") from None
    return opensmile


class OpenSmileFeaturizer(Featurizer):
    """openSMILE functionals of one feature set (``feature_set``: an ``opensmile.FeatureSet`` member name)."""

    feature_set: ClassVar[str] = ""
    params = (
        Param("min_seconds", 0.1, "shorter input is zero-padded at the end to this length "
              "(openSMILE gives NaN below 0.06 s)", type="float", min=0.06, max=10.0, unit="s"),
    )
    version = "1"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._smile = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_smile"] = None  # rebuilt on first use in the worker process
        return state

    def smile(self):
        """The ``opensmile.Smile`` extractor (made on first use)."""
        if self._smile is None:
            opensmile = _opensmile()
            self._smile = opensmile.Smile(feature_set=opensmile.FeatureSet[self.feature_set],
                                          feature_level=opensmile.FeatureLevel.Functionals)
        return self._smile

    def extract(self, wave: np.ndarray, rate: int) -> np.ndarray:
        x = np.asarray(wave, dtype=np.float32)
        if x.ndim != 1:
            raise SertkError(f"featurizer '{self.name}' needs a mono waveform (got shape {x.shape})",
                             "pass a 1-D array")
        need = int(np.ceil(self.options["min_seconds"] * rate))
        if x.size < need:
            x = np.pad(x, (0, need - x.size))
        out = np.asarray(self.smile().process_signal(x, rate).to_numpy()[0], dtype=np.float32)
        return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)

    def feature_names(self) -> list[str]:
        return list(self.smile().feature_names)

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "feature_set": self.feature_set, "opensmile": _opensmile().__version__}


class Egemaps(OpenSmileFeaturizer):
    name = "egemaps"
    description = "eGeMAPS v02 functionals (openSMILE, Eyben et al. 2016): 88 values, ~60 ms per utterance"
    feature_set = "eGeMAPSv02"


class Compare(OpenSmileFeaturizer):
    name = "compare"
    description = "ComParE 2016 functionals (openSMILE, Schuller et al.): 6373 values, about egemaps' cost"
    feature_set = "ComParE_2016"


@hookimpl
def register_featurizers(registry) -> None:
    registry.register(Egemaps)
    registry.register(Compare)
