"""``specaugment``: real SpecAugment (Park et al. 2019) on a spectrogram, resynthesised to audio.

The waveform's STFT (25 ms Hann window, 10 ms hop, 512-point FFT) gets
``n_time_masks`` time masks of width ``t ~ U[0, T]`` frames and
``n_freq_masks`` frequency masks of width ``f ~ U[0, F]`` bands (mel bands of
an ``n_mels``-band mel scale, or linear STFT bins), with ``T`` drawn from
``time_mask`` and ``F`` from ``freq_mask`` (the reference study's {10, 20, 30}).
Masked cells are set to zero; an optional time warp (``time_warp`` = W frames)
moves one point of the time axis by up to W frames. The result is resynthesised
with the original phase, so outside the masks the audio is unchanged up to the
STFT round-trip error, and the augmentation serves training and test sets alike.

The sampled parameters give each mask in frames or bands and in physical
units: ``time_masks_s`` ([start, end] in seconds, frame centres) and
``freq_masks_hz`` ([low, high] in Hz).
"""

from __future__ import annotations

import copy

import numpy as np

from ser_toolkit import hookimpl
from ser_toolkit.augmentations import Augmentation
from ser_toolkit.params import Param

N_FFT = 512
WIN = 400
HOP = 160
RATE = 16000


def stft(wave: np.ndarray) -> np.ndarray:
    import warnings

    import librosa

    with warnings.catch_warnings():  # inputs shorter than one FFT frame are zero-padded, as intended
        warnings.filterwarnings("ignore", message="n_fft=.* is too large")
        return librosa.stft(wave, n_fft=N_FFT, hop_length=HOP, win_length=WIN, window="hann", center=True)


def istft(spec: np.ndarray, length: int) -> np.ndarray:
    import librosa

    return librosa.istft(spec, hop_length=HOP, win_length=WIN, n_fft=N_FFT, window="hann", center=True,
                         length=length)


def mel_edges(n_mels: int) -> np.ndarray:
    """``n_mels + 1`` band edges (Hz) splitting 0..8 kHz into equal mel-scale bands."""
    import librosa

    return librosa.mel_frequencies(n_mels + 1, fmin=0.0, fmax=RATE / 2)


def _warp(spec: np.ndarray, center: int, shift: int) -> np.ndarray:
    """Piecewise-linear time warp: frame ``center`` moves to ``center + shift``."""
    n = spec.shape[1]
    target = np.arange(n, dtype=np.float64)
    src = np.where(target <= center + shift, target * center / max(center + shift, 1),
                   center + (target - center - shift) * (n - 1 - center) / max(n - 1 - center - shift, 1))
    lo = np.clip(np.floor(src).astype(int), 0, n - 1)
    hi = np.clip(lo + 1, 0, n - 1)
    frac = src - lo
    mag = (1 - frac) * np.abs(spec[:, lo]) + frac * np.abs(spec[:, hi])
    phase = np.angle(spec[:, np.where(frac < 0.5, lo, hi)])
    return mag * np.exp(1j * phase)


class SpecAugment(Augmentation):
    name = "specaugment"
    description = "time and frequency masking of the STFT (mel bands or bins), resynthesised with the original phase"
    params = (
        Param("time_mask", [10, 20, 30], "time-mask parameters T to choose from (width ~ U[0, T])",
              type="list[int]", min=0, max=1000, unit="frames (10 ms)"),
        Param("freq_mask", [10, 20, 30], "frequency-mask parameters F to choose from (width ~ U[0, F])",
              type="list[int]", min=0, max=257, unit="bands"),
        Param("n_time_masks", 1, "number of time masks", type="int", min=0, max=20),
        Param("n_freq_masks", 1, "number of frequency masks", type="int", min=0, max=20),
        Param("scale", "mel", "frequency axis of the masks: mel bands or linear STFT bins",
              choices=("mel", "linear")),
        Param("n_mels", 80, "mel bands (scale=mel)", type="int", min=8, max=256),
        Param("max_time_ratio", 1.0, "upper bound on a time mask's width as a share of the frames (p)",
              type="float", min=0.0, max=1.0),
        Param("time_warp", 0, "time-warp parameter W (0 = off)", type="int", min=0, max=200,
              unit="frames (10 ms)"),
    )

    keeps_length = True

    def randomize(self, n, rng, context=None):
        n_frames = 1 + n // HOP  # librosa.stft(center=True) frames of an n-sample input (any n >= 1)
        n_bins = N_FFT // 2 + 1
        freqs = np.arange(n_bins) * RATE / N_FFT
        o = self.options
        params: dict = {"T": None, "F": None, "time_masks": [], "freq_masks": [], "time_masks_s": [],
                        "freq_masks_hz": []}
        if o["time_warp"] and n_frames > 2 * o["time_warp"] + 2:
            w = o["time_warp"]
            center = int(rng.integers(w, n_frames - w))
            shift = int(rng.integers(-w, w + 1))
            params["time_warp"] = {"center_frame": center, "shift_frames": shift}
        T = int(o["time_mask"][int(rng.integers(len(o["time_mask"])))])
        F = int(o["freq_mask"][int(rng.integers(len(o["freq_mask"])))])
        params["T"], params["F"] = T, F
        t_max = min(T, int(o["max_time_ratio"] * n_frames))
        for _ in range(o["n_time_masks"]):
            t = int(rng.integers(0, t_max + 1))
            t0 = int(rng.integers(0, n_frames - t + 1))
            params["time_masks"].append([t0, t0 + t])
            params["time_masks_s"].append([t0 * HOP / RATE, (t0 + t) * HOP / RATE])
        n_bands = o["n_mels"] if o["scale"] == "mel" else n_bins
        edges = mel_edges(o["n_mels"]) if o["scale"] == "mel" else None
        for _ in range(o["n_freq_masks"]):
            f = int(rng.integers(0, min(F, n_bands) + 1))
            f0 = int(rng.integers(0, n_bands - f + 1))
            if edges is not None:
                lo, hi = float(edges[f0]), float(edges[f0 + f])
            else:
                lo, hi = float(freqs[f0]) if f else 0.0, float(freqs[f0 + f - 1]) if f else 0.0
            params["freq_masks"].append([f0, f0 + f])
            params["freq_masks_hz"].append([lo, hi])
        return params

    def apply_params(self, wave, plan, context=None):
        spec = stft(wave)
        n_bins = spec.shape[0]
        freqs = np.arange(n_bins) * RATE / N_FFT
        if "time_warp" in plan:
            spec = _warp(spec, plan["time_warp"]["center_frame"], plan["time_warp"]["shift_frames"])
        for t0, t1 in plan["time_masks"]:
            spec[:, t0:t1] = 0
        for (f0, f1), (lo, hi) in zip(plan["freq_masks"], plan["freq_masks_hz"]):
            if self.options["scale"] == "mel":
                rows = (freqs >= lo) & (freqs < hi) if f1 > f0 else np.zeros(n_bins, bool)
            else:
                rows = np.zeros(n_bins, bool)
                rows[f0:f1] = True
            spec[rows, :] = 0
        return istft(spec, wave.size).astype(np.float32), copy.deepcopy(dict(plan))


@hookimpl
def register_augmentations(registry) -> None:
    registry.register(SpecAugment)
