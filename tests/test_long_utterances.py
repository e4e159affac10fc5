"""Evaluation applies the length rules of training: a test utterance too long for a waveform model is refused
in one line naming ``sertk evaluate --max-seconds`` (which predicts it in windows), and training says so first."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import one_line_error, run_sertk, write_audio

EMOTIONS = ("neutral", "happy", "sad", "angry", "fear", "disgust", "surprise")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """14 one-second clips (7 emotions x 2 speakers) for training, and a test part with a 70-s clip."""
    root = tmp_path_factory.mktemp("corpus")
    rows, split = ["path,label,speaker,id"], ["utterance,split"]
    for k, emotion in enumerate(EMOTIONS):
        for spk in ("a", "b", "c"):
            uid = f"{spk}-{emotion}"
            write_audio(root / f"{uid}.wav", 1.0 if spk != "c" else 1.2, freq=120 + 40 * k)
            rows.append(f"{uid}.wav,{emotion},{spk},{uid}")
            split.append(f"{uid},{'test' if spk == 'c' else 'train'}")
    write_audio(root / "long.wav", 70.0, freq=200)
    rows.append("long.wav,neutral,c,long")
    split.append("long,test")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    (root / "split.csv").write_text("\n".join(split) + "\n")
    cache = root / "cache"
    r = run_sertk("cache", "manifest", "--root", root / "manifest.csv", "--set", "corpus=long", "--cache-dir",
                  cache, "-q")
    assert r.code == 0, r.err
    return root, cache / "long.h5"


def test_a_long_test_utterance_is_said_at_training_and_evaluated_in_windows(corpus, tmp_path):
    root, cache = corpus
    run = tmp_path / "run"
    r = run_sertk("train", "--model", "tiny", "--model-set", "hidden_size=16", "--dataset", cache, "--split",
                  f"file:{root / 'split.csv'}", "--epochs", "1", "--workers", "0", "--out", run, "-q")
    assert r.code == 0, r.err
    assert "test utterance 'long' is 70 s long" in r.err and "sertk evaluate --max-seconds" in r.err
    one_line_error(run_sertk("evaluate", run), "test utterance 'long' is 70 s long", "pass --max-seconds 60")
    r = run_sertk("evaluate", run, "--max-seconds", "30", "--json")
    assert r.code == 0, r.err
    e = json.loads((run / "eval" / "test.json").read_text())
    assert e["n"] == 8 and e["data"]["windows"] == {"max_seconds": 30.0, "utterances": 1}
    rows = (run / "eval" / "test.predictions.csv").read_text().splitlines()
    long = next(line for line in rows if line.startswith("long,")).split(",")
    assert abs(sum(map(float, long[3:10])) - 1) < 1e-4  # the windows' probabilities, averaged


def test_windows_cover_an_utterance_in_equal_parts():
    from ser_toolkit.evaluation import windows

    assert windows(100, None) == [(0, 100)] and windows(100, 100) == [(0, 100)]
    parts = windows(1_120_000, 480_000)  # 70 s at 16 kHz in windows of at most 30 s: 3 of 23.3 s
    assert len(parts) == 3 and parts[0][0] == 0 and parts[-1][1] == 1_120_000
    assert all(b == c for (_, b), (c, _) in zip(parts, parts[1:])) and max(b - a for a, b in parts) <= 480_000
    assert np.ptp([b - a for a, b in parts]) <= 1
