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

    keeps_length = True  # the reverberant tail is cut: training needs no randomise pass to bucket

    # Two steps (optional; ``apply(wave, rng, context)`` alone works too): every draw happens in randomize,
    # before any audio is processed, in the order a one-step apply would make them.
    def randomize(self, n, rng, context=None):
        rt60 = pick(rng, self.options["rt60"], None, self.options["rt60_range"])
        m = int(rt60 * RATE)
        # 60 dB of decay over rt60 seconds: amplitude envelope exp(-6.91 t / rt60)
        ir = rng.standard_normal(m) * np.exp(-6.91 * np.arange(m) / m)
        ir /= np.sqrt(np.sum(ir ** 2)) + 1e-12
        return {"rt60": rt60, "wet": self.options["wet"], "_ir": ir}  # "_ir": used, not logged

    def apply_params(self, wave, plan, context=None):
        from scipy.signal import fftconvolve

        wet = fftconvolve(wave, plan["_ir"])[: wave.size]
        w = plan["wet"]
        out = (1 - w) * wave + w * wet * (np.std(wave) / (np.std(wet) + 1e-12))
        return out.astype(np.float32), {"rt60": plan["rt60"], "wet": w}
