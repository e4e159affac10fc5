"""``noise``: additive white Gaussian noise or background noise, at an absolute level or an SNR.

- ``mode=level`` (the reference study): noise of standard deviation ``level``
  (or one of ``levels``) on audio in [-1, 1].
- ``mode=snr``: noise scaled so that the signal-to-noise ratio over the
  *speech-active* part of the signal (frames within 40 dB of the loudest 25 ms
  frame) equals ``snr_db`` (or a value drawn from ``snr_range``).
- ``noise_dir``: instead of white noise, a random excerpt of a random audio file
  from this folder (resampled to 16 kHz mono, looped when too short).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from ser_toolkit import hookimpl
from ser_toolkit.augmentations import Augmentation, check_range, pick
from ser_toolkit.errors import ParameterError
from ser_toolkit.params import Param

FRAME = 400  # 25 ms
HOP = 160  # 10 ms
ACTIVE_DB = 40.0


def active_power(wave: np.ndarray) -> float:
    """Mean power over speech-active frames (within 40 dB of the loudest frame)."""
    if wave.size < FRAME:
        return float(np.mean(np.square(wave, dtype=np.float64)))
    frames = np.lib.stride_tricks.sliding_window_view(wave.astype(np.float64), FRAME)[::HOP]
    power = np.mean(frames ** 2, axis=1)
    peak = power.max()
    if peak <= 0:
        return 0.0
    return float(power[power >= peak * 10 ** (-ACTIVE_DB / 10)].mean())


def active_mask(wave: np.ndarray) -> np.ndarray:
    """Sample mask of the speech-active frames used by :func:`active_power`."""
    mask = np.zeros(wave.size, bool)
    if wave.size < FRAME:
        mask[:] = True
        return mask
    frames = np.lib.stride_tricks.sliding_window_view(wave.astype(np.float64), FRAME)[::HOP]
    power = np.mean(frames ** 2, axis=1)
    for i in np.flatnonzero(power >= power.max() * 10 ** (-ACTIVE_DB / 10)):
        mask[i * HOP:i * HOP + FRAME] = True
    return mask


@lru_cache(maxsize=8)
def _noise_files(folder: str) -> tuple[str, ...]:
    from ser_toolkit.datasets import audio_files

    files = tuple(str(p) for p in audio_files(Path(folder)))
    if not files:
        raise ParameterError(f"noise_dir {folder} holds no audio files", "point it at a folder of noise recordings")
    return files


@lru_cache(maxsize=32)
def _noise_audio(path: str) -> np.ndarray:
    from ser_toolkit.audio import load

    return load(path)


class Noise(Augmentation):
    name = "noise"
    description = "additive white Gaussian or background noise at an absolute level or a speech-active SNR"
    params = (
        Param("mode", "level", "level: absolute standard deviation (reference); snr: target SNR in dB",
              choices=("level", "snr")),
        Param("levels", [0.001, 0.005, 0.01], "noise standard deviations to choose from (mode=level)",
              type="list[float]", min=0.0, max=1.0, unit="full scale"),
        Param("level", None, "a fixed noise standard deviation (mode=level)", type="float", min=0.0, max=1.0,
              unit="full scale"),
        Param("snr_range", [5.0, 20.0], "low,high: SNR drawn uniformly (mode=snr)", type="list[float]",
              min=-20.0, max=80.0, unit="dB"),
        Param("snr_db", None, "a fixed SNR (mode=snr)", type="float", min=-20.0, max=80.0, unit="dB"),
        Param("noise_dir", None, "folder of background-noise recordings (default: white noise)", type="path"),
    )

    def check_options(self) -> None:
        check_range(f"augmentation '{self.name}'", "snr_range", self.options["snr_range"])
        if self.options["snr_db"] is not None and self.options["level"] is not None:
            raise ParameterError("augmentation 'noise': set either level or snr_db, not both", "drop one of them")
        if self.options["snr_db"] is not None:
            self.options["mode"] = "snr"
        if self.options["noise_dir"] is not None and not Path(self.options["noise_dir"]).is_dir():
            raise ParameterError(f"augmentation 'noise': noise_dir {self.options['noise_dir']} is not a folder",
                                 "point it at a folder of noise recordings")

    keeps_length = True

    def randomize(self, n, rng, context=None):
        """The noise source (white: the generator's state, then its n draws skipped; a file and an offset),
        then the level or SNR: the draws of the one-step noise, in its order."""
        if self.options["noise_dir"] is None:
            plan = self._white(n, rng)
        else:
            files = _noise_files(str(self.options["noise_dir"]))
            path = files[int(rng.integers(len(files)))]
            size = _noise_audio(path).size
            if size == 0:
                plan = self._white(n, rng)
            else:
                start = int(rng.integers(size))
                plan = {"noise": Path(path).name, "noise_offset_s": start / 16000, "_path": path, "_start": start}
        if self.options["mode"] == "level":
            plan["_level"] = pick(rng, self.options["level"], self.options["levels"], None)
        else:
            plan["_snr"] = pick(rng, self.options["snr_db"], None, self.options["snr_range"])
        return plan

    @staticmethod
    def _white(n: int, rng: np.random.Generator) -> dict:
        state = rng.bit_generator.state
        rng.standard_normal(n)  # advanced as the one-step call advances it; apply_params draws them again
        return {"noise": "white", "_state": state}

    def _noise(self, n: int, plan) -> np.ndarray:
        if plan["noise"] == "white" and "_state" in plan:
            bits = getattr(np.random, plan["_state"]["bit_generator"])()
            bits.state = plan["_state"]
            return np.random.Generator(bits).standard_normal(n)
        source = _noise_audio(plan["_path"])
        idx = (plan["_start"] + np.arange(n)) % source.size  # crop, looping when too short
        noise = source[idx].astype(np.float64)
        return noise / (noise.std() + 1e-12)

    def apply_params(self, wave, plan, context=None):
        noise = self._noise(wave.size, plan)
        info = {k: v for k, v in plan.items() if not k.startswith("_")}
        if self.options["mode"] == "level":
            level = plan["_level"]
            return (wave + level * noise).astype(np.float32), {"mode": "level", "level": level, **info}
        snr = plan["_snr"]
        signal_power = active_power(wave)
        noise_power = float(np.mean(noise ** 2))
        if signal_power <= 0 or noise_power <= 0:
            return wave.copy(), {"mode": "snr", "snr_db": snr, "level": 0.0, "note": "silent input", **info}
        scale = np.sqrt(signal_power / (noise_power * 10 ** (snr / 10)))
        return (wave + scale * noise).astype(np.float32), {"mode": "snr", "snr_db": snr,
                                                           "level": float(scale * np.sqrt(noise_power)), **info}


@hookimpl
def register_augmentations(registry) -> None:
    registry.register(Noise)
