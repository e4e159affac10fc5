"""A deterministic synthetic emotional-speech-like corpus, made in code.

Each utterance is a source-filter synthesis: Rosenberg glottal pulses on an F0
contour (level, range and shape per emotion, with jitter and shimmer), a
spectral tilt and breath noise (voice quality), vowel formants per syllable,
consonant noise bursts, a speaking rate and pauses. Emotions shift these
prosodic and voice-quality parameters; speakers (both genders) differ in F0,
vocal-tract length and expressiveness, and every utterance draws its own
variation, so the classes overlap: learnable, not trivially separable.

``synthetic-shifted`` has other speakers and a different channel (EQ, noise
floor, reverberation): a cross-corpus test set. Every utterance is generated
from a seed derived from (seed, variant, speaker, emotion, take), so output is
bit-identical across runs, machines and worker counts.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ser_toolkit import hookimpl
from ser_toolkit.datasets import Dataset, Scan, Utterance
from ser_toolkit.emotions import EMOTIONS
from ser_toolkit.params import Param

RATE = 16000
GENERATOR_VERSION = 1

# Emotion profiles: means of the per-utterance parameters.
#   f0: F0 multiplier over the speaker's base; range: F0 range (semitones);
#   rate: syllables/s; level: dB over neutral; tilt: + = flatter spectrum (tense),
#   - = steeper (lax); jitter/shimmer: relative period/amplitude perturbation;
#   pause: probability of a pause between syllables; breath: aspiration noise.
PROFILES: dict[str, dict[str, Any]] = {
    "neutral":  dict(f0=1.00, range=2.5, rate=4.5, level=0.0, tilt=0.0, jitter=0.006, shimmer=0.03, pause=0.15, breath=0.05, contour="declination"),
    "happy":    dict(f0=1.18, range=6.0, rate=5.1, level=4.0, tilt=0.3, jitter=0.008, shimmer=0.04, pause=0.10, breath=0.05, contour="rise-fall"),
    "sad":      dict(f0=0.92, range=1.6, rate=3.5, level=-6.0, tilt=-0.5, jitter=0.010, shimmer=0.05, pause=0.35, breath=0.20, contour="declination"),
    "angry":    dict(f0=1.15, range=5.0, rate=5.5, level=7.0, tilt=0.6, jitter=0.012, shimmer=0.06, pause=0.08, breath=0.06, contour="fall"),
    "fear":     dict(f0=1.32, range=4.0, rate=5.9, level=1.0, tilt=-0.1, jitter=0.025, shimmer=0.08, pause=0.22, breath=0.15, contour="tremor"),
    "disgust":  dict(f0=0.96, range=3.5, rate=3.8, level=-1.0, tilt=-0.2, jitter=0.014, shimmer=0.06, pause=0.30, breath=0.12, contour="fall-rise"),
    "surprise": dict(f0=1.38, range=7.5, rate=4.9, level=3.0, tilt=0.2, jitter=0.008, shimmer=0.04, pause=0.10, breath=0.06, contour="rise"),
}
VOWELS = ((730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (570, 840, 2410))
_VARIANTS = {"base": 0, "shifted": 1}


def _speakers(seed: int, variant: str, per_gender: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng([seed, _VARIANTS[variant], 999])
    out = []
    for gender, f0_range, tract in (("female", (180, 235), (1.12, 1.22)), ("male", (95, 135), (0.95, 1.05))):
        for i in range(per_gender):
            prefix = "s" if variant == "base" else "x"
            out.append(dict(id=f"{prefix}{gender[0]}{i + 1}", gender=gender,
                            f0=float(rng.uniform(*f0_range)), tract=float(rng.uniform(*tract)),
                            expressiveness=float(rng.uniform(0.55, 1.15) if variant == "base"
                                                 else rng.uniform(0.5, 0.95))))
    return out


def sample_params(seed: int, variant: str, speaker: dict[str, Any], emotion: str, take: int) -> dict[str, Any]:
    """The prosody/voice-quality parameters of one utterance (deterministic in its arguments)."""
    rng = np.random.default_rng([seed, _VARIANTS[variant], int(hashlib.md5(speaker["id"].encode()).hexdigest()[:8], 16),
                                 EMOTIONS.index(emotion), take])
    p, n = PROFILES[emotion], PROFILES["neutral"]
    e = speaker["expressiveness"]

    def toward(key: str) -> float:  # neutral + speaker-scaled emotional deviation
        return n[key] + e * (p[key] - n[key])

    return dict(
        f0=float(speaker["f0"] * toward("f0") * np.exp(rng.normal(0, 0.07))),
        range=float(max(0.5, toward("range") * np.exp(rng.normal(0, 0.3)))),
        rate=float(toward("rate") * np.exp(rng.normal(0, 0.12))),
        level=float(toward("level") + rng.normal(0, 3.0)),
        tilt=float(toward("tilt") + rng.normal(0, 0.25)),
        jitter=float(max(0.0, toward("jitter") * np.exp(rng.normal(0, 0.3)))),
        shimmer=float(max(0.0, toward("shimmer") * np.exp(rng.normal(0, 0.3)))),
        pause=float(np.clip(toward("pause") + rng.normal(0, 0.05), 0, 0.8)),
        breath=float(max(0.0, toward("breath") * np.exp(rng.normal(0, 0.3)))),
        contour=p["contour"] if rng.random() < 0.75 else str(rng.choice(
            ["declination", "rise-fall", "fall", "rise", "tremor", "fall-rise"])),
        syllables=int(rng.integers(5, 11)),
        synth_seed=int(rng.integers(0, 2**31 - 1)),
    )


def _contour(shape: str, t: np.ndarray, seconds: np.ndarray, span: float) -> np.ndarray:
    """F0 offset in semitones over normalised time ``t`` in [0, 1]."""
    if shape == "declination":
        return span * (0.5 - t) * 0.8
    if shape == "rise-fall":
        return span * (np.sin(np.pi * t) - 0.5)
    if shape == "fall":
        return span * ((1 - t) ** 2 - 0.5)
    if shape == "rise":
        return span * (t ** 2 - 0.25)
    if shape == "tremor":
        return span * 0.3 * (0.5 - t) + span * 0.35 * np.sin(2 * np.pi * 6.0 * seconds)
    return span * (np.abs(2 * t - 1) - 0.5)  # fall-rise


def _resonators(x: np.ndarray, formants: tuple[float, ...], bandwidths=(70.0, 100.0, 140.0)) -> np.ndarray:
    from scipy.signal import lfilter

    for f, bw in zip(formants, bandwidths):
        r = np.exp(-np.pi * bw / RATE)
        a = [1.0, -2 * r * np.cos(2 * np.pi * f / RATE), r * r]
        x = lfilter([sum(a)], a, x)
    return x


def synthesize(params: dict[str, Any], speaker: dict[str, Any]) -> np.ndarray:
    """Render one utterance (float32, 16 kHz, mono) from its parameters."""
    from scipy.signal import lfilter

    rng = np.random.default_rng(params["synth_seed"])
    # Timeline: syllable and pause durations.
    n_syl = params["syllables"]
    syl = np.maximum(0.08, rng.lognormal(np.log(1 / params["rate"]), 0.25, n_syl))
    pauses = np.where(rng.random(n_syl) < params["pause"], rng.uniform(0.08, 0.35, n_syl), 0.0)
    pauses[-1] = 0.0
    lead, tail = rng.uniform(0.08, 0.2, 2)
    total = int(RATE * (lead + tail + syl.sum() + pauses.sum())) + 1
    seconds = np.arange(total) / RATE
    # F0 contour, with accents per syllable and slow jitter.
    t = np.clip((seconds - lead) / max(syl.sum() + pauses.sum(), 1e-3), 0, 1)
    st = _contour(params["contour"], t, seconds, params["range"])
    knots = np.arange(0, total + 80, 80)  # a perturbation value every 5 ms
    st = st + np.interp(np.arange(total), knots, rng.normal(0, 1, knots.size)) * params["jitter"] * 17.3
    f0 = params["f0"] * 2 ** (st / 12)
    phase = np.cumsum(f0 / RATE)
    frac = phase % 1.0
    # Rosenberg glottal flow; its derivative excites the vocal tract.
    flow = np.where(frac < 0.4, 0.5 * (1 - np.cos(np.pi * frac / 0.4)),
                    np.where(frac < 0.6, np.cos(np.pi * (frac - 0.4) / 0.4), 0.0))
    period = phase.astype(np.int64)
    shimmer = 1 + params["shimmer"] * rng.normal(0, 1, period[-1] + 1)[period]
    source = np.diff(flow, prepend=0.0) * shimmer
    a = float(np.clip(0.55 - 0.3 * params["tilt"], 0.05, 0.95))  # spectral tilt
    source = lfilter([1 - a], [1, -a], source)
    breath = lfilter([1, -0.9], [1], rng.normal(0, 1, total)) * params["breath"] * 0.02
    out = np.zeros(total)
    pos = lead
    for i in range(n_syl):
        start, stop = int(pos * RATE), min(total, int((pos + syl[i]) * RATE))
        seg = source[start:stop] + breath[start:stop]
        vowel = VOWELS[rng.integers(len(VOWELS))]
        seg = _resonators(seg, tuple(f * speaker["tract"] for f in vowel))
        n = seg.size
        env = np.ones(n)
        ramp_in, ramp_out = min(n // 3, int(0.02 * RATE)), min(n // 3, int(0.04 * RATE))
        env[:ramp_in] = np.linspace(0, 1, ramp_in)
        env[n - ramp_out:] = np.linspace(1, 0, ramp_out)
        seg = seg * env / (np.sqrt(np.mean(seg ** 2)) + 1e-9)
        burst_len = min(n, int(rng.uniform(0.02, 0.06) * RATE))
        burst = lfilter([1, -0.95], [1], rng.normal(0, 1, burst_len)) * np.hanning(burst_len)
        seg[:burst_len] += burst * rng.uniform(0.1, 0.4) * (1 + 0.3 * params["tilt"])
        out[start:start + n] += seg
        pos += syl[i] + pauses[i]
    gain = 10 ** ((-26 + params["level"]) / 20)
    out = out / (np.sqrt(np.mean(out ** 2)) + 1e-9) * gain
    out += rng.normal(0, 10 ** (-75 / 20), total)
    return out


def apply_channel(wave: np.ndarray, seed: int) -> np.ndarray:
    """The shifted corpus's channel: band-limiting EQ, a reverberant room and a noise floor."""
    from scipy.signal import butter, fftconvolve, sosfilt

    rng = np.random.default_rng(seed)
    sos = butter(2, [rng.uniform(200, 350), rng.uniform(3400, 4500)], btype="bandpass", fs=RATE, output="sos")
    wet = sosfilt(sos, wave)
    rt60 = rng.uniform(0.25, 0.6)
    n = int(rt60 * RATE)
    ir = rng.normal(0, 1, n) * np.exp(-6.9 * np.arange(n) / n)
    ir[0] = 1.0 / 0.3
    wet = fftconvolve(wet, ir * 0.3 / np.sqrt(np.sum(ir ** 2)), mode="full")[: wave.size]
    rms = np.sqrt(np.mean(wet ** 2)) + 1e-12
    snr = rng.uniform(18, 30)
    wet = wet + rng.normal(0, rms / 10 ** (snr / 20), wet.size)
    return wet


class Synthetic(Dataset):
    name = "synthetic"
    description = "synthetic emotional-speech-like corpus made in code (no files; the offline default)"
    needs_root = False
    variant = "base"
    params = (
        Param("speakers", 4, "speakers per gender", type="int", min=1, max=50),
        Param("per_emotion", 6, "utterances per speaker and emotion", type="int", min=1, max=1000),
        Param("seed", 0, "corpus seed", type="int", min=0),
    )
    label_map = {e: e for e in EMOTIONS}

    def cache_name(self) -> str:
        return self.name

    def _speaker_table(self) -> dict[str, dict[str, Any]]:
        spk = _speakers(self.options["seed"], self.variant, self.options["speakers"])
        return {s["id"]: s for s in spk}

    def scan(self, root: Path | None) -> Scan:
        speakers = self._speaker_table()
        utts = []
        for spk in speakers.values():
            for emotion in EMOTIONS:
                for take in range(self.options["per_emotion"]):
                    params = sample_params(self.options["seed"], self.variant, spk, emotion, take)
                    utts.append(Utterance(
                        id=f"{spk['id']}_{emotion}_{take:03d}", path=None, emotion=emotion,
                        speaker=spk["id"], corpus=self.name, gender=spk["gender"],
                        extra={"take": take, "variant": self.variant, "params": params}))
        return Scan(sorted(utts, key=lambda u: u.id), Counter())

    def load(self, utterance: Utterance, root: Path | None):
        speaker = self._speaker_table()[utterance.speaker]
        params = dict(utterance.extra["params"])
        wave = synthesize(params, speaker)
        if self.variant == "shifted":
            wave = apply_channel(wave, params["synth_seed"] + 1)
        return wave.astype(np.float32)[:, None], RATE

    def fingerprint(self, utterance: Utterance, root: Path | None) -> str:
        blob = json.dumps([GENERATOR_VERSION, self.variant, utterance.extra["params"],
                           self._speaker_table()[utterance.speaker]], sort_keys=True)
        return "synthetic:" + hashlib.sha1(blob.encode()).hexdigest()[:16]


class SyntheticShifted(Synthetic):
    name = "synthetic-shifted"
    description = "the synthetic corpus with other speakers and channel (EQ, noise, reverb): cross-corpus test"
    variant = "shifted"
    params = (
        Param("speakers", 2, "speakers per gender", type="int", min=1, max=50),
        Param("per_emotion", 6, "utterances per speaker and emotion", type="int", min=1, max=1000),
        Param("seed", 0, "corpus seed", type="int", min=0),
    )


@hookimpl
def register_datasets(registry) -> None:
    registry.register(Synthetic)
    registry.register(SyntheticShifted)
