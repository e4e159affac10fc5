"""``timestretch``: pitch-preserving tempo change (phase vocoder).

Output duration is ``input / rate``. Rates come from ``rates`` (the reference
study's {0.8, 0.9, 1.0, 1.1, 1.2}), from a continuous ``rate_range``, or are
fixed with ``rate``.
"""

from __future__ import annotations

import numpy as np

from ser_toolkit import hookimpl
from ser_toolkit.augmentations import Augmentation, check_range, pick
from ser_toolkit.params import Param

N_FFT = 2048
HOP = 512


class TimeStretch(Augmentation):
    name = "timestretch"
    description = "pitch-preserving tempo change (phase vocoder); duration becomes input / rate"
    params = (
        Param("rates", [0.8, 0.9, 1.0, 1.1, 1.2], "rates to choose from (uniformly)", type="list[float]",
              min=0.25, max=4.0, unit="x tempo"),
        Param("rate_range", None, "low,high: draw the rate uniformly from this range instead",
              type="list[float]", min=0.25, max=4.0, unit="x tempo"),
        Param("rate", None, "a fixed rate (overrides rates and rate_range)", type="float", min=0.25, max=4.0,
              unit="x tempo"),
    )

    def check_options(self) -> None:
        check_range(f"augmentation '{self.name}'", "rate_range", self.options["rate_range"])

    def randomize(self, n, rng, context=None):
        return {"rate": pick(rng, self.options["rate"], self.options["rates"], self.options["rate_range"])}

    def output_length(self, n, plan):
        return n if plan["rate"] == 1.0 else max(1, int(round(n / plan["rate"])))

    def apply_params(self, wave, plan, context=None):
        import librosa

        rate = plan["rate"]
        if rate == 1.0:
            return wave.copy(), {"rate": rate}
        target = int(round(wave.size / rate))
        if wave.size < N_FFT:  # too short for the phase vocoder: a plain resampling keeps it usable
            out = np.interp(np.linspace(0, wave.size - 1, max(1, target)), np.arange(wave.size), wave)
            return out.astype(np.float32), {"rate": rate, "method": "interpolation (input shorter than one frame)"}
        out = librosa.effects.time_stretch(wave, rate=rate, n_fft=N_FFT, hop_length=HOP)
        out = librosa.util.fix_length(out, size=target)
        return out.astype(np.float32), {"rate": rate}


@hookimpl
def register_augmentations(registry) -> None:
    registry.register(TimeStretch)
