"""Tests of the example plugin, run through sertk's real plugin loading (entry points)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import soundfile as sf

from ser_toolkit.registry import build_registry


def _corpus(root):
    root.mkdir()
    rate = 16000
    for name in ("1001_DFA_ANG_XX", "1001_IEO_HAP_HI", "1002_DFA_SAD_LO", "1002_TIE_NEU_XX", "readme"):
        t = np.arange(rate // 4) / rate
        sf.write(str(root / f"{name}.wav"), 0.2 * np.sin(2 * np.pi * 200 * t), rate)
    (root.parent / "VideoDemographics.csv").write_text("ActorID,Age,Sex,Race,Ethnicity\n"
                                                       "1001,51,Male,Caucasian,Not Hispanic\n"
                                                       "1002,21,Female,Caucasian,Not Hispanic\n")
    return root


def test_registered_through_the_entry_point():
    entry = build_registry().get("dataset", "cremad")
    assert entry.provider.distribution == "sertk-example"


def test_scan(tmp_path):
    from sertk_example.cremad import CremaD

    scan = CremaD().scan(_corpus(tmp_path / "AudioWAV"))
    assert [(u.id, u.emotion, u.speaker, u.gender) for u in scan.utterances] == [
        ("1001_DFA_ANG_XX", "angry", "1001", "male"), ("1001_IEO_HAP_HI", "happy", "1001", "male"),
        ("1002_DFA_SAD_LO", "sad", "1002", "female"), ("1002_TIE_NEU_XX", "neutral", "1002", "female")]
    assert scan.ignored == {"not a CREMA-D file name": 1}
    assert len(CremaD(intensity="high").scan(tmp_path / "AudioWAV").utterances) == 1


def test_cache_and_inspect_through_the_cli(tmp_path):
    root = _corpus(tmp_path / "AudioWAV")
    run = lambda *a: subprocess.run([sys.executable, "-m", "ser_toolkit", *map(str, a)],  # noqa: E731
                                    capture_output=True, text=True)
    r = run("cache", "cremad", "--root", root, "--cache-dir", tmp_path / "cache", "-q")
    assert r.returncode == 0, r.stderr
    info = json.loads(run("inspect", tmp_path / "cache" / "cremad.h5", "--json").stdout)
    assert info["utterances"] == 4 and info["emotions"]["surprise"] == 0
    assert info["genders"] == {"female": 2, "male": 2}
    listed = json.loads(run("plugins", "--json", "--kind", "dataset").stdout)
    cremad = next(e for e in listed if e["name"] == "cremad")
    assert cremad["distribution"] == "sertk-example" and cremad["params"][0]["name"] == "intensity"
