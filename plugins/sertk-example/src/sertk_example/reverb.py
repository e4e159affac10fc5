"""``reverb``: convolution with a synthetic room impulse response (exponentially decaying noise)."""

from __future__ import annotations

import numpy as np

from ser_toolkit.augmentations import Augmentation, check_range, pick
from ser_toolkit.params import Param

RATE = 16000


class Reverb(Augmentation):
    name = "reverb"
    description = "synthetic room reverberation at a sampled RT60 - from the sertk-example plugin"
    params = (
        Param("rt60_range", [0.2, 0.8], "low,high: reverberation time drawn uniformly", type="list[float]",
              min=0.05, max=3.0, unit="s"),
        Param("rt60", None, "a fixed reverberation time", type="float", min=0.05, max=3.0, unit="s"),
        Param("wet", 0.5, "share of reverberant signal in the mix", type="float", min=0.0, max=1.0),
    )

    def check_options(self) -> None:
        check_range(f"augmentation '{self.name}'", "rt60_range", self.options["rt60_range"])

    def apply(self, wave, rng, context=None):
        from scipy.signal import fftconvolve

        rt60 = pick(rng, self.options["rt60"], None, self.options["rt60_range"])
        n = int(rt60 * RATE)
        # 60 dB of decay over rt60 seconds: amplitude envelope exp(-6.91 t / rt60)
        ir = rng.standard_normal(n) * np.exp(-6.91 * np.arange(n) / n)
        ir /= np.sqrt(np.sum(ir ** 2)) + 1e-12
        wet = fftconvolve(wave, ir)[: wave.size]
        w = self.options["wet"]
        out = (1 - w) * wave + w * wet * (np.std(wave) / (np.std(wet) + 1e-12))
        return out.astype(np.float32), {"rt60": rt60, "wet": w}
