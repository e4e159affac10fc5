"""Dataset plugins and the cache on the real corpora in ../shared/data."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import soundfile as sf

from ser_toolkit.cache.reader import CacheReader
from ser_toolkit.plugins.ravdess import Ravdess
from ser_toolkit.plugins.savee import Savee
from ser_toolkit.splits import make_split

pytestmark = pytest.mark.shared_data


@pytest.fixture(scope="module")
def ravdess_scan(shared_data):
    return Ravdess().scan(shared_data / "ravdess")


def test_ravdess_scan(ravdess_scan):
    utts = ravdess_scan.utterances
    assert len(utts) == 1248
    counts = Counter(u.emotion for u in utts)
    assert counts == {"neutral": 96, "happy": 192, "sad": 192, "angry": 192, "fear": 192,
                      "disgust": 192, "surprise": 192}
    speakers = Counter(u.speaker for u in utts)
    assert len(speakers) == 24 and set(speakers.values()) == {52}
    genders = {u.speaker: u.gender for u in utts}
    assert genders["Actor_01"] == "male" and genders["Actor_02"] == "female"
    assert Counter(genders.values()) == {"male": 12, "female": 12}
    u = next(x for x in utts if x.id == "03-01-05-02-01-02-07")
    assert (u.emotion, u.speaker, u.path) == ("angry", "Actor_07", "Actor_07/03-01-05-02-01-02-07.flac")
    assert u.extra["intensity"] == "strong" and u.extra["repetition"] == 2
    assert u.extra["statement"] == "Kids are talking by the door"
    assert ravdess_scan.ignored == {}


def test_reference_split_reproduced(shared_data, ravdess_scan):
    split = make_split(ravdess_scan.utterances, f"file:{shared_data / 'ravdess' / 'seed_split.csv'}")
    assert Counter(split.values()) == {"train": 998, "test": 250}
    rows = (shared_data / "ravdess" / "seed_split.csv").read_text().split()[1:]
    assert all(split[r.split(",")[0]] == r.split(",")[1] for r in rows)
    # the reference split puts every actor on both sides (flaw 3); ours does not
    test_spk = {u.speaker for u in ravdess_scan.utterances if split[u.id] == "test"}
    assert len(test_spk) == 24
    si = make_split(ravdess_scan.utterances, "speaker:test=0.25,seed=1")
    held = {u.speaker for u in ravdess_scan.utterances if si[u.id] == "test"}
    train = {u.speaker for u in ravdess_scan.utterances if si[u.id] == "train"}
    assert len(held) == 6 and not held & train
    assert Counter(int(s[-2:]) % 2 for s in held) == {0: 3, 1: 3}


def test_savee_scan_and_reference_subset(shared_data):
    utts = Savee().scan(shared_data / "savee").utterances
    assert len(utts) == 480
    assert Counter(u.emotion for u in utts)["neutral"] == 120
    assert {u.speaker for u in utts} == {"DC", "JE", "JK", "KL"} and {u.gender for u in utts} == {"male"}
    assert utts[0].id == "DC/a01" and utts[0].emotion == "angry"
    ref = Savee(subset="reference").scan(shared_data / "savee")
    assert len(ref.utterances) == 420 and set(Counter(u.emotion for u in ref.utterances).values()) == {60}
    listed = set((shared_data / "savee" / "seed_subset.csv").read_text().split()[1:])
    assert {u.id for u in ref.utterances} == listed
    assert ref.ignored["outside the reference subset"] == 60


def test_cache_real_subset_reads_back_sample_exact(shared_data, tmp_path, cli):
    # a real subset: two actors, linked into a temporary corpus folder
    root = tmp_path / "ravdess"
    for actor in ("Actor_03", "Actor_04"):
        (root / actor).mkdir(parents=True)
        for f in sorted((shared_data / "ravdess" / actor).glob("*.flac")):
            (root / actor / f.name).symlink_to(f)
    r = cli("cache", "ravdess", "--root", root, "--cache-dir", tmp_path / "cache", "--workers", "2", "--json")
    assert r.code == 0, r.err
    reader = CacheReader(tmp_path / "cache" / "ravdess.h5")
    assert len(reader) == 104
    for i in range(len(reader)):
        u = reader.utterance(i)
        direct, rate = sf.read(str(shared_data / "ravdess" / u.path), dtype="float32")
        assert rate == 16000
        np.testing.assert_array_equal(reader.wave(i), direct)
    info = json.loads(cli("inspect", tmp_path / "cache" / "ravdess.h5", "--json").out)
    assert info["utterances"] == 104 and len(info["speakers"]) == 2 and info["sample_rate"] == 16000


@pytest.mark.slow
def test_full_corpora_via_cli(shared_data, tmp_path, cli):
    """The issue's acceptance commands: RAVDESS 1,248 / 24 speakers; SAVEE 480 and 420."""
    out = tmp_path / "cache"
    assert cli("cache", "ravdess", "--root", shared_data / "ravdess", "--cache-dir", out, "-q").code == 0
    info = json.loads(cli("inspect", out / "ravdess.h5", "--json").out)
    assert info["utterances"] == 1248 and len(info["speakers"]) == 24 and info["sample_rate"] == 16000
    assert info["emotions"] == {"neutral": 96, "happy": 192, "sad": 192, "angry": 192, "fear": 192,
                                "disgust": 192, "surprise": 192}
    assert info["schema_version"] == 2 and info["skipped"] == [] and 1.2 < info["hours"] < 1.4
    assert cli("cache", "savee", "--root", shared_data / "savee", "--cache-dir", out, "-q").code == 0
    assert cli("cache", "savee", "--root", shared_data / "savee", "--cache-dir", out, "-q",
               "--set", "subset=reference").code == 0
    assert json.loads(cli("inspect", out / "savee.h5", "--json").out)["utterances"] == 480
    ref = json.loads(cli("inspect", out / "savee-reference.h5", "--json").out)
    assert ref["utterances"] == 420 and set(ref["emotions"].values()) == {60}
    # a no-op re-run decodes nothing
    r = cli("cache", "ravdess", "--root", shared_data / "ravdess", "--cache-dir", out, "--json")
    summary = json.loads(r.out)
    assert summary["unchanged"] and summary["decoded"] == 0 and summary["reused"] == 1248
