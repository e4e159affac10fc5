"""Split kinds: stratified, speaker-independent, k-fold by speaker, leave-one-speaker-out, split files."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ser_toolkit.datasets import Utterance
from ser_toolkit.emotions import EMOTIONS
from ser_toolkit.errors import SplitError
from ser_toolkit.splits import (
    fold_count,
    fold_specs,
    make_split,
    natural_key,
    parse_spec,
)


def corpus(n_female: int = 4, n_male: int = 4, per: int = 5) -> list[Utterance]:
    utts = []
    for g, n in (("female", n_female), ("male", n_male)):
        for s in range(n):
            for e in EMOTIONS:
                for k in range(per):
                    utts.append(Utterance(f"{g[0]}{s}_{e}_{k}", None, e, f"{g[0]}{s}", "t", g))
    return utts


def test_stratified_keeps_class_proportions_and_is_seeded():
    utts = corpus()
    a = make_split(utts, "stratified")
    assert Counter(a.values())["test"] == 56
    test_emotions = Counter(u.emotion for u in utts if a[u.id] == "test")
    assert set(test_emotions.values()) == {8}
    assert a == make_split(utts, "stratified:seed=42") != make_split(utts, "stratified:seed=1")


def test_speaker_independent_balanced_by_gender():
    utts = corpus(5, 5)
    s = make_split(utts, "speaker:test=0.2,seed=3")
    held = {u.speaker for u in utts if s[u.id] == "test"}
    assert len(held) == 2 and {h[0] for h in held} == {"f", "m"}
    assert not held & {u.speaker for u in utts if s[u.id] == "train"}


@given(k=st.integers(2, 6), seed=st.integers(0, 10_000), n_f=st.integers(3, 6), n_m=st.integers(3, 6))
@settings(max_examples=30, deadline=None)
def test_kfold_partitions_speakers(k, seed, n_f, n_m):
    utts = corpus(n_f, n_m, per=1)
    folds = [make_split(utts, f"kfold:k={k},fold={f},seed={seed}") for f in range(k)]
    per_speaker = Counter()
    for fold in folds:
        test_spk = {u.speaker for u in utts if fold[u.id] == "test"}
        train_spk = {u.speaker for u in utts if fold[u.id] == "train"}
        assert test_spk and not test_spk & train_spk
        per_speaker.update(test_spk)
    assert set(per_speaker.values()) == {1} and len(per_speaker) == n_f + n_m


def test_split_file(tmp_path):
    utts = corpus(1, 1, 1)
    f = tmp_path / "s.csv"
    f.write_text("utterance,split\n" + "".join(f"{u.id},{'test' if i % 2 else 'train'}\n" for i, u in enumerate(utts)))
    s = make_split(utts, f"file:{f}")
    assert Counter(s.values()) == {"train": 7, "test": 7}
    f.write_text("utterance,split\n" + utts[0].id + ",train\n")
    with pytest.raises(SplitError, match="does not list 13 utterances"):
        make_split(utts, f"file:{f}")


@pytest.mark.parametrize("spec, needle", [
    ("random", "unknown split kind"), ("speaker:test=2", "between 0 and 1"),
    ("kfold:k=3,fold=3", r"fold=3 is out of range for k=3 \(allowed: 0\.\.2\)"),
    ("kfold:k=1", r"k=1 is too small"), ("kfold:fold=-1", r"fold=-1 is out of range"),
    ("kfold:order=random", r"unknown kfold order 'random' \(allowed: shuffled, sorted\)"),
    ("kfold:order=", r"unknown kfold order ''"), ("loso:fold=-1", r"loso fold=-1 is out of range"),
    ("loso:k=2", "bad split option"), ("loso:order=sorted", "bad split option"),
    ("kfold:k=x", "must be an int"), ("speaker:size=1", "bad split option"),
    ("file:", "needs a path"), ("file:/nope.csv", "does not exist"), ("speaker:test=x", "must be a number"),
])
def test_bad_specs(spec, needle):
    with pytest.raises(SplitError, match=needle):
        if spec.startswith("file:/"):
            make_split(corpus(1, 1, 1), spec)
        else:
            parse_spec(spec)


def test_split_cli_writes_csv(tmp_path, cli):
    assert cli("cache", "synthetic", "--set", "per_emotion=2", "--cache-dir", tmp_path, "-q").code == 0
    out = tmp_path / "split.csv"
    r = cli("split", tmp_path / "synthetic.h5", "--split", "speaker:test=0.25", "-o", out, "--json")
    assert r.code == 0, r.err
    import json

    counts = json.loads(r.out)
    assert counts["test"]["utterances"] == 28 and len(counts["test"]["speakers"]) == 2
    assert len(out.read_text().splitlines()) == 1 + 112
    r2 = cli("split", tmp_path / "synthetic.h5", "--split", f"file:{out}", "--json")
    assert json.loads(r2.out) == counts


def speakers_in_test(utts: list[Utterance], split: dict[str, str]) -> list[str]:
    return sorted({u.speaker for u in utts if split[u.id] == "test"}, key=natural_key)


def named(speakers: list[str], per: int = 2) -> list[Utterance]:
    """``per`` utterances for each speaker id, in the order given."""
    return [Utterance(f"{s}_{i}", None, EMOTIONS[i % len(EMOTIONS)], s, "t", None)
            for s in speakers for i in range(per)]


def old_kfold(utts: list[Utterance], k: int, fold: int, seed: int) -> dict[str, str]:
    """The k-fold algorithm before ``order`` existed (speakers shuffled per gender, dealt round-robin)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    by_gender: dict[str, set[str]] = {}
    for u in utts:
        by_gender.setdefault(u.gender or "unknown", set()).add(u.speaker)
    speakers = []
    for g in sorted(by_gender):
        spk = sorted(by_gender[g])
        rng.shuffle(spk)
        speakers += spk
    fold_of = {s: i % k for i, s in enumerate(speakers)}
    return {u.id: "test" if fold_of[u.speaker] == fold else "train" for u in utts}


def test_kfold_default_order_is_unchanged():
    utts = corpus(4, 4, per=1)
    # recorded before order= existed
    assert [speakers_in_test(utts, make_split(utts, f"kfold:k=3,fold={f}")) for f in range(3)] == \
        [["f0", "f3", "m0"], ["f2", "m1", "m3"], ["f1", "m2"]]
    assert [speakers_in_test(utts, make_split(utts, f"kfold:k=4,fold={f},seed=7")) for f in range(4)] == \
        [["f0", "m3"], ["f2", "m1"], ["f1", "m2"], ["f3", "m0"]]
    utts = corpus(5, 3, per=1) + named(["x1", "x2"], per=1)
    for k, seed in ((2, 0), (3, 42), (5, 123), (10, 9)):
        for f in range(k):
            expected = old_kfold(utts, k, f, seed)
            assert make_split(utts, f"kfold:k={k},fold={f},seed={seed}") == expected
            assert make_split(utts, f"kfold:k={k},fold={f},seed={seed},order=shuffled") == expected


def test_natural_sort():
    ids = ["s10", "s2", "s1", "s12", "s11", "s3", "s9", "s4", "s8", "s5", "s7", "s6"]
    assert sorted(ids, key=natural_key) == [f"s{i}" for i in range(1, 13)]
    assert sorted(["Actor_10", "Actor_2", "Actor_1"], key=natural_key) == ["Actor_1", "Actor_2", "Actor_10"]
    assert sorted(["10", "2", "1"], key=natural_key) == ["1", "2", "10"]
    assert sorted(["Actor_10", "Actor_02", "Actor_01"], key=natural_key) == ["Actor_01", "Actor_02", "Actor_10"]
    assert sorted(["b2", "a10", "a2", "B1"], key=natural_key) == ["a2", "a10", "B1", "b2"]


def test_kfold_sorted_cuts_consecutive_natural_groups():
    utts = named([f"s{i}" for i in (7, 12, 1, 10, 3, 5, 2, 11, 9, 4, 8, 6)])
    folds = [speakers_in_test(utts, make_split(utts, f"kfold:k=5,fold={f},order=sorted")) for f in range(5)]
    # 12 speakers in 5 groups: the first 12 % 5 = 2 groups get one more
    assert folds == [["s1", "s2", "s3"], ["s4", "s5", "s6"], ["s7", "s8"], ["s9", "s10"], ["s11", "s12"]]
    # the seed plays no part in a sorted split
    assert make_split(utts, "kfold:k=5,fold=2,order=sorted,seed=1") == make_split(utts, "kfold:k=5,fold=2,order=sorted")
    assert [speakers_in_test(utts, make_split(utts, s)) for s in fold_specs("kfold:k=12,order=sorted", utts)] == \
        [[f"s{i}"] for i in range(1, 13)]


def test_kfold_sorted_reproduces_emobox_ravdess_folds(shared_data):
    from ser_toolkit.plugins.ravdess import Ravdess

    utts = Ravdess().scan(shared_data / "ravdess").utterances
    specs = fold_specs("kfold:k=6,order=sorted", utts)
    assert specs == [f"kfold:k=6,fold={f},order=sorted" for f in range(6)]
    times_in_test = Counter()
    for f, spec in enumerate(specs):
        split = make_split(utts, spec)
        held = speakers_in_test(utts, split)
        assert held == [f"Actor_{a:02d}" for a in range(4 * f + 1, 4 * f + 5)]
        assert not set(held) & {u.speaker for u in utts if split[u.id] == "train"}
        times_in_test.update(i for i, side in split.items() if side == "test")
    assert len(times_in_test) == len(utts) and set(times_in_test.values()) == {1}


def test_loso_holds_out_each_speaker_once():
    utts = named(["s10", "s2", "s1", "s3"], per=3)
    specs = fold_specs("loso", utts)
    assert specs == ["loso:fold=0", "loso:fold=1", "loso:fold=2", "loso:fold=3"] and fold_count("loso", utts) == 4
    held, seen = [], Counter()
    for spec in specs:
        split = make_split(utts, spec)
        held += speakers_in_test(utts, split)
        assert Counter(split.values()) == {"test": 3, "train": 9}
        seen.update(i for i, side in split.items() if side == "test")
    assert held == ["s1", "s2", "s3", "s10"]
    assert set(seen) == {u.id for u in utts} and set(seen.values()) == {1}
    assert make_split(utts, "loso") == make_split(utts, "loso:fold=0")
    with pytest.raises(SplitError, match=r"loso fold=4 is out of range for 4 speakers \(allowed: 0\.\.3\)"):
        make_split(utts, "loso:fold=4")
    with pytest.raises(SplitError, match="at least two speakers"):
        make_split(named(["solo"]), "loso")


@pytest.mark.parametrize("spec, expected", [
    ("kfold:k=3,order=sorted", ["kfold:k=3,fold=0,order=sorted", "kfold:k=3,fold=1,order=sorted",
                                "kfold:k=3,fold=2,order=sorted"]),
    ("kfold:k=2,fold=1,seed=7", ["kfold:k=2,fold=0,seed=7", "kfold:k=2,fold=1,seed=7"]),
    ("kfold:seed=3, k=2", ["kfold:seed=3,k=2,fold=0", "kfold:seed=3,k=2,fold=1"]),
    ("kfold", [f"kfold:fold={f}" for f in range(5)]),
    ("loso:fold=2", ["loso:fold=0", "loso:fold=1", "loso:fold=2", "loso:fold=3", "loso:fold=4", "loso:fold=5"]),
    ("speaker:test=0.25", ["speaker:test=0.25"]), ("stratified", ["stratified"]),
    ("file:/any/split.csv", ["file:/any/split.csv"]),
])
def test_fold_specs(spec, expected):
    utts = named([f"s{i}" for i in range(1, 7)])
    assert fold_specs(spec, utts) == expected
    assert fold_count(spec, utts) == len(expected)
    for s in expected:
        if not s.startswith("file:"):
            parse_spec(s)  # every expanded spec is itself valid


def test_fold_specs_reproduce_the_single_folds():
    utts = corpus(3, 3, per=1)
    for spec in ("kfold:k=3,seed=5", "kfold:k=3,order=sorted", "loso"):
        splits = [make_split(utts, s) for s in fold_specs(spec, utts)]
        assert splits[1] == make_split(utts, spec + ",fold=1" if ":" in spec else spec + ":fold=1")


@pytest.mark.parametrize("spec", ["kfold:k=7", "kfold:k=7,order=sorted", "kfold:k=7,fold=6,order=sorted"])
def test_k_larger_than_speakers(spec):
    utts = named([f"s{i}" for i in range(1, 7)])
    with pytest.raises(SplitError, match=r"k=7 is out of range for 6 speakers \(allowed: 2 <= k <= 6\)") as err:
        make_split(utts, spec)
    assert "\n" not in str(err.value)
    with pytest.raises(SplitError, match="k=7 is out of range"):
        fold_specs(spec, utts)
    with pytest.raises(SplitError, match="k=7 is out of range"):
        fold_count(spec, utts)


def test_overlap_counts_test_speakers_heard_in_training_and_the_real_validation_share():
    from ser_toolkit.splits import overlap

    # speakers a, b: train and test; c: valid and test; d: test only; e: train only; one test utterance unknown
    plan = {"a": "train train test", "b": "train test test", "c": "valid valid test", "d": "test test",
            "e": "train train train", "": "test"}
    utts, assignment = [], {}
    for spk, parts in plan.items():
        for i, part in enumerate(parts.split()):
            u = Utterance(f"{spk or 'x'}{i}", None, "happy", spk, "c")
            utts.append(u)
            assignment[u.id] = part
    o = overlap(utts, assignment)
    assert (o["test_utterances"], o["test_speakers"], o["unknown_speaker_utterances"]) == (7, 4, 1)
    assert (o["test_speakers_in_train"], o["test_utterances_of_speakers_in_train"]) == (2, 3)
    assert (o["test_speakers_in_valid"], o["test_utterances_of_speakers_in_valid"]) == (1, 1)
    assert o["valid_share"] == pytest.approx(2 / 8) and (o["valid_speakers"], o["valid_speakers_in_train"]) == (1, 0)
