"""Decoding, down-mixing and resampling to the model input format (16 kHz mono float32).

Down-mix rule (``mono``):

- ``mean`` (default): average the channels. Right for a stereo mix of one
  source; wrong for two microphones at different distances, where the delay
  between them comb-filters the average.
- ``first``: keep channel 0 (e.g. the close-talking microphone).
- ``loudest``: keep the channel with the highest RMS energy.

Resampling uses soxr (``soxr-hq`` by default, ``soxr-vhq`` optional) and the
output has ``ceil(n * target / rate)`` samples. With ``mean`` down-mixing this
is sample-for-sample what ``librosa.load(path, sr=16000)`` returns, i.e. the
reference study's loader. Audio already at the target rate is not touched.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from ser_toolkit.errors import AudioError

TARGET_RATE = 16000
MONO_RULES = ("mean", "first", "loudest")
RESAMPLERS = {"soxr-hq": "HQ", "soxr-vhq": "VHQ"}
RESAMPLER = "soxr-hq"
CLIP_LEVEL = 0.999


def _check_wav_complete(path: Path) -> None:
    """libsndfile silently shortens truncated WAV files; compare the header with the file size."""
    with open(path, "rb") as fh:
        head = fh.read(12)
        if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
            return
        size = path.stat().st_size
        pos = 12
        while pos + 8 <= size:
            fh.seek(pos)
            cid, clen = struct.unpack("<4sI", fh.read(8))
            if cid == b"data":
                if clen == 0xFFFFFFFF:  # a streaming WAV: size unknown when written, the data runs to the end
                    return
                if clen == 0 and size > pos + 8:  # a writer that never went back to fill in the size
                    raise AudioError(f"{path}: the WAV header declares 0 data bytes but {size - pos - 8} follow (its "
                                     "writer never finished the header)", "re-export the file (e.g. sox IN.wav "
                                     "OUT.wav, or ffmpeg -i IN.wav OUT.wav)")
                if pos + 8 + clen > size:
                    raise AudioError(f"{path}: truncated WAV (header declares {clen} data bytes, "
                                     f"{size - pos - 8} present)", "re-copy or re-export the file")
                return
            pos += 8 + clen + (clen & 1)


def _kind(path: Path) -> str:
    """What a path that is neither a regular file nor a folder is (for messages)."""
    import stat

    mode = path.stat().st_mode
    return ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a character device" if stat.S_ISCHR(mode)
            else "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "a special file")


def decode(path: str | Path) -> tuple[np.ndarray, int]:
    """Decode an audio file to float32 ``(frames, channels)`` and its sample rate.

    Raises :class:`AudioError` for missing, empty, non-audio, truncated or
    undecodable files and for NaN/inf samples.
    """
    import soundfile as sf

    path = Path(path)
    if not path.is_file():  # stat only: a FIFO or device is never opened (it could block)
        if path.is_dir():
            raise AudioError(f"{path}: is a folder, not an audio file",
                             f"pass the audio files in it (e.g. {path}/*.wav)")
        if path.exists():
            raise AudioError(f"{path}: not a regular file but {_kind(path)}",
                             "save the audio to a regular file and pass that file")
        if path.is_symlink():
            raise AudioError(f"{path}: a symbolic link that leads to no file (a loop, or its target is gone)",
                             "fix the link, or pass the audio file itself")
        raise AudioError(f"{path}: no such file", "check the path")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file (0 bytes)", "re-copy the file or remove it")
    _check_wav_complete(path)
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except sf.LibsndfileError as exc:
        text = str(exc).split(": ", 1)[-1] if "Format not recognised" not in str(exc) else "not an audio file (format not recognised)"
        raise AudioError(f"{path}: cannot decode: {text}", "re-copy the file or remove it") from None
    except (RuntimeError, ValueError) as exc:
        raise AudioError(f"{path}: cannot decode: {exc}", "re-copy the file or remove it") from None
    if data.shape[0] == 0:
        raise AudioError(f"{path}: no audio frames", "remove the empty recording")
    if not np.isfinite(data).all():
        raise AudioError(f"{path}: contains NaN or infinite samples", "re-export the file")
    return data, int(rate)


def to_mono(data: np.ndarray, rule: str = "mean") -> np.ndarray:
    """Down-mix ``(frames, channels)`` to ``(frames,)`` by ``rule`` (see module doc)."""
    if data.ndim == 1:
        return data
    if data.shape[1] == 1:
        return data[:, 0]
    if rule == "mean":
        return data.mean(axis=1, dtype=np.float64).astype(np.float32)
    if rule == "first":
        return np.ascontiguousarray(data[:, 0])
    if rule == "loudest":
        rms = np.sqrt(np.mean(np.square(data, dtype=np.float64), axis=0))
        return np.ascontiguousarray(data[:, int(np.argmax(rms))])
    raise ValueError(f"unknown mono rule {rule!r}; use one of {', '.join(MONO_RULES)}")


def resample(wave: np.ndarray, rate: int, target: int = TARGET_RATE, resampler: str = RESAMPLER) -> np.ndarray:
    """soxr resampling to ``ceil(n * target / rate)`` samples; identity when ``rate == target``."""
    if rate == target:
        return wave.astype(np.float32, copy=False)
    import soxr

    out = soxr.resample(wave, rate, target, quality=RESAMPLERS[resampler]).astype(np.float32, copy=False)
    n = int(np.ceil(wave.shape[0] * target / rate))
    if out.shape[0] < n:
        out = np.concatenate([out, np.zeros(n - out.shape[0], np.float32)])
    return out[:n]


def prepare(data: np.ndarray, rate: int, mono: str = "mean", target: int = TARGET_RATE,
            resampler: str = RESAMPLER) -> np.ndarray:
    """Decoded samples -> model input: mono, ``target`` Hz, float32."""
    return resample(to_mono(data, mono), rate, target, resampler)


MIN_SOURCE_RATE = 4000
"""Hz; below this a file is not speech audio (or its header is damaged): refused by caching and prediction."""


def load(path: str | Path, mono: str = "mean", target: int = TARGET_RATE, resampler: str = RESAMPLER) -> np.ndarray:
    """Decode a file and prepare it as model input in one step (the same source-rate rule as caching)."""
    data, rate = decode(path)
    if rate < MIN_SOURCE_RATE:
        raise AudioError(f"{path}: sample rate {rate} Hz is below {MIN_SOURCE_RATE} Hz (damaged header?)",
                         "re-export the file")
    return prepare(data, rate, mono, target, resampler)


def clipped_samples(wave: np.ndarray, level: float = CLIP_LEVEL) -> int:
    """Number of samples at or beyond full scale (a clipping indicator)."""
    return int(np.count_nonzero(np.abs(wave) >= level))
