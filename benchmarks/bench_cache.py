"""Cache benchmarks (issue 2): build speed vs the reference loader, random reads, no-op re-run, memory.

Run from the repository root:

    python benchmarks/bench_cache.py [--data ../shared/data] [--out benchmarks/results/cache.json]

1. Build: ``sertk cache`` of RAVDESS + SAVEE (2 workers) vs the reference approach
   (``librosa.load(path, sr=16000)`` per file in one process), on the shared 16 kHz
   FLAC copies and on WAV copies at the distributed rates (RAVDESS 48 kHz,
   SAVEE 44.1 kHz) made in a temporary folder.
2. Random reads: utterances/s reading random utterances from the cache (each read
   checked against its CRC-32), vs a layout with one HDF5 dataset per utterance,
   the same array read without a check, and HDF5 fletcher32 chunk checksums.
3. No-op re-run: wall time of ``sertk cache ravdess`` on an up-to-date cache
   (a whole process, Python start-up included).
4. Peak memory: ``sertk cache synthetic`` at 1x and 10x size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def sertk(*args: str, env: dict | None = None) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ser_toolkit", *map(str, args)], check=True,
                   env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def reference_load(files: list[Path]) -> float:
    """The reference study's loading: librosa.load(path, sr=16000), one process."""
    code = ("import sys, time, librosa\nfiles = sys.argv[1:]\nlibrosa.load(files[0], sr=16000)\n"
            "t = time.perf_counter()\nfor f in files:\n    librosa.load(f, sr=16000)\n"
            "print(time.perf_counter() - t)")
    listing = Path(tempfile.mkstemp(suffix=".txt")[1])
    listing.write_text("\n".join(map(str, files)))
    out = subprocess.run([sys.executable, "-c", code.replace("sys.argv[1:]", f"open({str(listing)!r}).read().split()")],
                         check=True, capture_output=True, text=True).stdout
    listing.unlink()
    return float(out.strip().splitlines()[-1])


def make_wav_copies(data: Path, dest: Path) -> None:
    """WAV copies at the corpora's distributed rates (48 kHz RAVDESS, 44.1 kHz SAVEE)."""
    import soundfile as sf
    import soxr

    for corpus, rate in (("ravdess", 48000), ("savee", 44100)):
        for f in sorted((data / corpus).rglob("*.flac")):
            x, sr = sf.read(str(f), dtype="float32")
            target = dest / corpus / f.relative_to(data / corpus).with_suffix(".wav")
            target.parent.mkdir(parents=True, exist_ok=True)
            sf.write(str(target), soxr.resample(x, sr, rate, quality="VHQ"), rate, subtype="PCM_16")
        for extra in (data / corpus).glob("*.csv"):
            (dest / corpus / extra.name).write_bytes(extra.read_bytes())


OURS = """
import sys, time, shutil
from pathlib import Path
from ser_toolkit.registry import get
from ser_toolkit.cache.build import Preprocess, build_cache
data, out, dtype = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
t = time.perf_counter()
for name in ("ravdess", "savee"):
    build_cache(get("dataset", name).obj(), data / name, out / f"{name}.h5", Preprocess(dtype=dtype),
                workers=2, quiet=True)
print(time.perf_counter() - t)
"""


def sertk_build(data: Path, out: Path, dtype: str) -> float:
    """sertk's build of both corpora with 2 workers, timed inside a warm process like the reference."""
    res = subprocess.run([sys.executable, "-c", OURS, str(data), str(out), dtype], check=True,
                         capture_output=True, text=True)
    return float(res.stdout.strip().splitlines()[-1])


def bench_build(data: Path, work: Path, label: str, repeats: int) -> dict:
    files = sorted((data / "ravdess").rglob("*.*")) + sorted((data / "savee").rglob("*.*"))
    files = [f for f in files if f.suffix in (".flac", ".wav")]
    out: dict = {"files": len(files)}
    ref = min(reference_load(files) for _ in range(repeats))
    out["reference_s"] = ref
    for dtype in ("float32", "int16"):
        best = min(sertk_build(data, work / f"cache-{label}-{dtype}-{i}", dtype) for i in range(repeats))
        out[f"sertk_{dtype}_s"] = best
        out[f"speedup_{dtype}"] = ref / best
    return out


def bench_reads(cache: Path, work: Path, n: int = 5000, seed: int = 0) -> dict:
    import h5py

    from ser_toolkit.cache.reader import CacheReader

    reader = CacheReader(cache)
    rng = np.random.default_rng(seed)
    order = rng.integers(0, len(reader), n)
    reader.wave(0)
    t = time.perf_counter()
    for i in order:
        reader.wave(int(i))
    ours = n / (time.perf_counter() - t)
    # the alternative layout: one dataset per utterance
    per_utt = work / "per_utterance.h5"
    with h5py.File(per_utt, "w") as fh:
        for i in range(len(reader)):
            fh.create_dataset(f"u/{reader.ids[i]}", data=reader.wave(i))
    with h5py.File(per_utt, "r") as fh:
        group = fh["u"]
        t = time.perf_counter()
        for i in order:
            group[reader.ids[int(i)]][()]
        alt = n / (time.perf_counter() - t)
    # the same contiguous layout read without any integrity check, and HDF5's own fletcher32 chunk checksums
    audio = reader._dataset()
    t = time.perf_counter()
    for i in order:
        start = int(reader.offsets[i])
        audio[start:start + int(reader.lengths[i])]
    unchecked = n / (time.perf_counter() - t)
    chunked = work / "fletcher32.h5"
    with h5py.File(chunked, "w") as fh:
        copy = fh.create_dataset("audio", shape=audio.shape, dtype=audio.dtype, chunks=(1 << 16,), fletcher32=True)
        for start in range(0, audio.shape[0], 1 << 22):  # in slices: this process's peak RSS is measured later
            copy[start:start + (1 << 22)] = audio[start:start + (1 << 22)]
    with h5py.File(chunked, "r") as fh:
        ds = fh["audio"]
        t = time.perf_counter()
        for i in order:
            start = int(reader.offsets[i])
            ds[start:start + int(reader.lengths[i])]
        fletcher = n / (time.perf_counter() - t)
    return {"reads": n, "utterances_per_s": ours, "one_dataset_per_utterance_per_s": alt, "ratio": ours / alt,
            "contiguous_unchecked_per_s": unchecked, "fletcher32_chunks_per_s": fletcher}


def peak_rss(args: list[str]) -> dict:
    """Peak RSS (MiB) of a sertk run: the main process and its largest worker."""
    code = ("import resource, sys\nfrom ser_toolkit.cli import main\ntry:\n    main(sys.argv[1:])\n"
            "except SystemExit:\n    pass\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
            "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True).stdout
    main_kb, child_kb = map(int, out.strip().splitlines()[-1].split())
    return {"main_mib": main_kb / 1024, "worker_mib": child_kb / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("SERTK_SHARED_DATA", REPO.parent / "shared" / "data")))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "cache.json")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not (args.data / "ravdess").is_dir():
        sys.exit(f"corpora not found at {args.data}; pass --data")
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                 "platform": platform.platform()}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results["build_16k_flac"] = bench_build(args.data, work, "16k", args.repeats)
        print("build 16 kHz FLAC:", results["build_16k_flac"], flush=True)
        wav = work / "wav"
        make_wav_copies(args.data, wav)
        results["build_48k_44k_wav"] = bench_build(wav, work, "wav", args.repeats)
        print("build 48/44.1 kHz WAV:", results["build_48k_44k_wav"], flush=True)
        cache = work / "cache-16k-float32-0" / "ravdess.h5"
        results["random_reads"] = bench_reads(cache, work)
        print("random reads:", results["random_reads"], flush=True)
        noop = [sertk("cache", "ravdess", "--root", args.data / "ravdess", "--cache-dir", cache.parent, "-q")
                for _ in range(args.repeats)]
        results["noop_rerun_s"] = min(noop)
        print("no-op re-run (s):", min(noop), flush=True)
        mem = {}
        for scale, per in (("1x", 6), ("10x", 60)):
            mem[scale] = peak_rss(["cache", "synthetic", "--set", f"per_emotion={per}", "-q", "-j", "2",
                                   "--cache-dir", str(work / f"mem-{scale}")])
            from ser_toolkit.cache.reader import CacheReader

            info = CacheReader(work / f"mem-{scale}" / "synthetic.h5").summary()
            mem[scale].update(utterances=info["utterances"], hours=info["hours"])
        results["peak_memory"] = mem
        print("peak memory:", mem, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
