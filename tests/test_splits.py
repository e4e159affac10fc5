"""Split kinds: stratified, speaker-independent, k-fold by speaker, split files."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ser_toolkit.datasets import Utterance
from ser_toolkit.emotions import EMOTIONS
from ser_toolkit.errors import SplitError
from ser_toolkit.splits import make_split, parse_spec


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
    ("kfold:k=3,fold=3", "fold < k"), ("speaker:size=1", "bad split option"),
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
