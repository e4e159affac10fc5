"""Dataset plugins on synthetic folder layouts: RAVDESS variants, flat SAVEE, manifests."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from helpers import write_audio
from ser_toolkit.errors import SertkError
from ser_toolkit.plugins.manifest import Manifest
from ser_toolkit.plugins.ravdess import Ravdess
from ser_toolkit.plugins.savee import Savee


@pytest.fixture
def ravdess_like(tmp_path):
    root = tmp_path / "RAVDESS" / "nested"
    names = [
        "Actor_01/03-01-01-01-01-01-01.wav",  # neutral speech
        "Actor_01/03-01-02-01-01-01-01.wav",  # calm speech
        "Actor_02/03-01-05-02-02-01-02.flac",  # angry speech, female
        "Actor_02/03-02-05-01-01-01-02.wav",  # angry song
        "deep/er/Actor_03/03-01-08-01-01-02-03.ogg",  # surprised, any nesting, ogg
        "Actor_03/readme.wav",  # not a RAVDESS name
    ]
    for n in names:
        write_audio(root / n, 0.2)
    (root / "Actor_01" / "notes.txt").write_text("ignored")
    return root.parent


def test_ravdess_calm_song_nesting(ravdess_like):
    scan = Ravdess().scan(ravdess_like)
    assert [u.id for u in scan.utterances] == ["03-01-01-01-01-01-01", "03-01-05-02-02-01-02",
                                               "03-01-08-01-01-02-03"]
    assert [u.emotion for u in scan.utterances] == ["neutral", "angry", "surprise"]
    assert [u.gender for u in scan.utterances] == ["male", "female", "male"]
    assert scan.ignored == {"calm (dropped)": 1, "song file (speech only)": 1, "not a RAVDESS file name": 1}
    merged = Ravdess(calm="neutral").scan(ravdess_like)
    calm = next(u for u in merged.utterances if u.id == "03-01-02-01-01-01-01")
    assert calm.emotion == "neutral" and calm.extra["label"] == "calm"
    assert "calm (dropped)" not in merged.ignored


def test_savee_flat_layout(tmp_path):
    for n in ("DC_a01.wav", "JE_sa03.wav", "KL_su15.wav", "JK_n30.wav", "other.wav"):
        write_audio(tmp_path / n, 0.1)
    scan = Savee().scan(tmp_path)
    assert {u.id: u.emotion for u in scan.utterances} == {
        "DC/a01": "angry", "JE/sa03": "sad", "KL/su15": "surprise", "JK/n30": "neutral"}
    assert scan.ignored == {"not a SAVEE file name": 1}


def test_savee_official_layout_and_seeded_subset(tmp_path):
    root = tmp_path / "savee"
    for spk in ("DC", "JE", "JK", "KL"):
        for code, n in (("a", 15), ("d", 15), ("f", 15), ("h", 15), ("n", 30), ("sa", 15), ("su", 15)):
            for i in range(1, n + 1):
                (root / "AudioData" / spk).mkdir(parents=True, exist_ok=True)
                (root / "AudioData" / spk / f"{code}{i:02d}.wav").write_bytes(b"")  # scan needs names only
    assert len(Savee().scan(root).utterances) == 480
    a = Savee(subset="reference", seed=1).scan(root).utterances
    b = Savee(subset="reference", seed=1).scan(root).utterances
    c = Savee(subset="reference", seed=2).scan(root).utterances
    assert len(a) == 420 and set(Counter(u.emotion for u in a).values()) == {60}
    assert [u.id for u in a] == [u.id for u in b] and [u.id for u in a] != [u.id for u in c]
    with pytest.raises(SertkError, match="does not exist"):
        Savee(subset="reference", subset_file=str(tmp_path / "nope.csv")).scan(root)


def test_manifest_csv_and_jsonl(tmp_path):
    write_audio(tmp_path / "audio" / "a.wav")
    write_audio(tmp_path / "audio" / "b.flac")
    write_audio(tmp_path / "audio" / "c.wav")
    (tmp_path / "manifest.csv").write_text(
        "path,label,speaker,gender,split,session\n"
        "audio/a.wav,ang,s1,F,train,1\naudio/b.flac,neu,s2,m,test,2\naudio/c.wav,cal,s2,m,train,2\n")
    scan = Manifest(labels="ang=angry,neu=neutral,cal=").scan(tmp_path)
    assert [(u.id, u.emotion, u.speaker, u.gender) for u in scan.utterances] == [
        ("audio/a", "angry", "s1", "female"), ("audio/b", "neutral", "s2", "male")]
    assert scan.utterances[0].extra == {"split": "train", "session": "1", "label": "ang"}
    assert scan.ignored == {"cal (dropped)": 1}
    with pytest.raises(SertkError, match=r"labels \['ang', 'cal', 'neu'\] are not canonical"):
        Manifest().scan(tmp_path)
    lines = [{"file": "audio/a.wav", "emotion": "happy", "id": "x1"},
             {"file": str(tmp_path / "audio" / "c.wav"), "emotion": "sad", "speaker": "p"}]
    jl = tmp_path / "list.jsonl"
    jl.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    scan = Manifest().scan(jl)  # --root may be the manifest itself
    assert [(u.id, u.emotion) for u in scan.utterances] == [("c", "sad"), ("x1", "happy")]
    ds = Manifest()
    wave, rate = ds.load(scan.utterances[0], jl)
    assert rate == 16000 and wave.shape[1] == 1


def test_manifest_errors(tmp_path):
    with pytest.raises(SertkError, match="does not exist"):
        Manifest().scan(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"path": "a.wav", "label": "happy"}\nnot json\n')
    with pytest.raises(SertkError, match=":2: not valid JSON"):
        Manifest().scan(bad)
    with pytest.raises(SertkError, match="unknown emotion 'furious'"):
        Manifest(labels="a=furious").scan(bad)


def test_manifest_cache_via_cli(tmp_path, cli):
    write_audio(tmp_path / "x.wav", rate=8000)
    (tmp_path / "m.csv").write_text("path,label,speaker\nx.wav,happy,s\n")
    r = cli("cache", "manifest", "--root", tmp_path / "m.csv", "--set", "corpus=mine",
            "--cache-dir", tmp_path / "c", "-q")
    assert r.code == 0, r.err
    from ser_toolkit.cache.reader import CacheReader

    reader = CacheReader(tmp_path / "c" / "mine.h5")
    assert len(reader) == 1 and reader.wave(0).size == 8000 and np.abs(reader.wave(0)).max() > 0.1
