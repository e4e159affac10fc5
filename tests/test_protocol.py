"""The study protocol (issue 9): leak-free held-out sets, selection on validation, declared cross sets."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import run_sertk, write_audio
from ser_toolkit.augment_sets import materialize_heldout, sets_dir
from ser_toolkit.cache.build import build_cache
from ser_toolkit.cache.reader import CacheReader
from ser_toolkit.plugins.synthetic import Synthetic
from ser_toolkit.splits import make_split
from ser_toolkit.training.loop import carve_validation
from ser_toolkit.report import files_of

SPLIT = "speaker:test=0.25,seed=42"


def one_line_error(r, needle: str) -> None:
    assert r.code == 2 and needle in r.err, (r.code, r.err)
    assert len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err + r.out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("protocol") / "synthetic.h5"
    build_cache(Synthetic(per_emotion=2), None, path, quiet=True)
    reader = CacheReader(path)
    assignment = make_split(reader.utterances, SPLIT)
    train = [u for u in reader.utterances if assignment[u.id] == "train"]
    assignment.update(carve_validation(train, 0.34, 42))
    return reader, assignment


def test_no_held_out_set_holds_training_audio(corpus):
    reader, assignment = corpus
    methods = ["ncp", "noise", "timestretch"]
    for part in ("test", "valid"):
        made = materialize_heldout(reader, assignment, part, methods, {}, log=print)
        assert set(made) == {*methods, "mixed"}
        for name, (path, _) in made.items():
            rows = CacheReader(path).utterances
            assert {u.extra["source"] for u in rows} == {uid for uid, p in assignment.items() if p == part}
            for u in rows:  # every source and every partner is of the same held-out part
                assert all(assignment[x] == part for x in [u.extra["source"], *u.extra["partners"]]), (name, u)
            if name == "ncp":
                assert all(len(u.extra["partners"]) == 1 for u in rows)


def test_a_part_without_neutral_partners_skips_the_method(corpus):
    reader, assignment = corpus
    drop = {uid: ("train" if p == "valid" and reader.utterance(reader.index(uid)).emotion == "neutral" else p)
            for uid, p in assignment.items()}
    said: list[str] = []
    made = materialize_heldout(reader, drop, "valid", ["ncp", "noise", "specaugment"], {}, log=said.append)
    assert set(made) == {"noise", "specaugment", "mixed"}
    assert len(said) == 1 and "valid-ncp skipped" in said[0] and "never filled with training audio" in said[0]
    mixed = CacheReader(made["mixed"][0])
    assert {u.extra["method"] for u in mixed.utterances} <= {"noise", "specaugment"}
    assert not (sets_dir(reader, drop) / "valid-ncp.h5").exists()


SMALL = """
name = "small"
[data]
options = {{ per_emotion = 3 }}
cross = [{cross}]
[training]
epochs = 15
workers = 1
[augmentations]
methods = ["noise", "timestretch"]
top_k = [2]
[study]
runs_dir = "runs/small"
report = "reports/small.md"
"""


def _cremad(root: Path) -> Path:
    """A tiny corpus in CREMA-D's layout (the example third-party plugin reads it)."""
    root.mkdir(parents=True)
    for i, name in enumerate(("1001_DFA_ANG_XX", "1001_IEO_HAP_HI", "1002_DFA_SAD_LO", "1002_TIE_NEU_XX")):
        write_audio(root / f"{name}.wav", 0.5, freq=180 + 40 * i)
    return root


def _manifest(root: Path) -> Path:
    root.mkdir(parents=True)
    rows = []
    for i, emotion in enumerate(("angry", "sad", "happy", "neutral", "fear")):
        write_audio(root / f"m{i}.wav", 0.5, freq=150 + 50 * i)
        rows.append(f"m{i}.wav,{emotion},spk{i % 2}\n")
    (root / "list.csv").write_text("path,label,speaker\n" + "".join(rows))
    return root / "list.csv"


@pytest.mark.timeout(1900)  # above the subprocess limits inside
@pytest.mark.slow
def test_study_selects_on_validation_and_reports_every_declared_cross_set(tmp_path):
    pytest.importorskip("sertk_example")
    manifest, cremad = _manifest(tmp_path / "m"), _cremad(tmp_path / "cremad" / "AudioWAV")
    cross = ", ".join([
        '{ dataset = "synthetic-shifted", options = { per_emotion = 1 } }',
        f'{{ dataset = "manifest", root = "{manifest}", options = {{ corpus = "mycorpus" }} }}',
        f'{{ dataset = "cremad", root = "{cremad}" }}'])
    (tmp_path / "s.toml").write_text(SMALL.format(cross=cross))
    r = run_sertk("study", "--preset", "demo", "--config", tmp_path / "s.toml", cwd=tmp_path, timeout=900)
    assert r.code == 0, r.err
    runs = tmp_path / "runs" / "small"
    study = json.loads((runs / "study.json").read_text())
    assert study["selection"]["set"] == "validation" and study["selection"]["reference_model"] == "duplicate"
    # the validation part is carved from training data only, and every run trains without it
    parts = {row["utterance"]: row["split"] for row in csv.DictReader(open(runs / "split.csv"))}
    declared = make_split(CacheReader(study["cache"]).utterances, "speaker:test=0.25,seed=42")
    assert {u for u, p in parts.items() if p == "valid"} <= {u for u, p in declared.items() if p == "train"}
    assert {u for u, p in parts.items() if p == "test"} == {u for u, p in declared.items() if p == "test"}
    summary = json.loads((runs / "noise-s42" / "train_summary.json").read_text())
    assert summary["valid_utterances"] == sum(p == "valid" for p in parts.values())
    md = (tmp_path / "reports" / "small.md").read_text()
    for name in ("synthetic-shifted", "mycorpus", "cremad"):
        assert f"cross-corpus: {name}" in md
    assert "chosen on the validation" in md
    # every selection gain carries its paired interval; without folds its delta is the study's gain
    gains = [n for n in json.loads((files_of(tmp_path / "reports" / "small.md") / "numbers.json").read_text())
             if n["section"] == "gains"]
    assert {n["method"] for n in gains} == set(study["gains"]) == {"noise", "timestretch"}
    for n in gains:
        assert n["gain"] == pytest.approx(study["gains"][n["method"]]) and n["ci_low"] <= n["gain"] <= n["ci_high"]
    for run in runs.glob("*-s42"):  # validation results are never reported as test sets
        assert not any(p.name.startswith("valid") for p in (run / "eval").iterdir())
    # selection never looks at test: scrambling every test prediction leaves gains and weights unchanged
    before = {k: study[k] for k in ("gains", "weights")}
    rng = np.random.default_rng(0)
    for path in runs.glob("*-s42/eval/test*.predictions.csv"):
        rows = list(csv.DictReader(open(path)))
        for row in rows:
            row["predicted"] = ["neutral", "happy", "sad", "angry", "fear", "disgust", "surprise"][rng.integers(7)]
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    scrambled = {p: p.read_bytes() for p in runs.glob("*-s42/eval/test*.predictions.csv")}
    one_line_error(run_sertk("report", runs, "-o", tmp_path / "scrambled.md", cwd=tmp_path),
                   "was changed after the evaluation")  # the evaluation's seal no longer vouches for them
    r = run_sertk("study", "--preset", "demo", "--config", tmp_path / "s.toml", cwd=tmp_path, timeout=900)
    # the study recomputes gains and weights (from validation) and re-evaluates the runs whose evaluation
    # files changed (their seal): the report is of the runs' own predictions again
    assert r.code == 0, r.err
    assert all(path.read_bytes() != text for path, text in scrambled.items())
    after = json.loads((runs / "study.json").read_text())
    assert {k: after[k] for k in ("gains", "weights")} == before


def test_cross_sets_are_declared_never_inferred(tmp_path):
    cache = tmp_path / "cache"
    for args in (["synthetic", "--set", "per_emotion=1"], ["synthetic-shifted", "--set", "per_emotion=1"]):
        assert run_sertk("cache", *args, "--cache-dir", cache, "-q").code == 0
    fast = ["--cache-dir", cache, "--model", "tiny", "--model-set", "hidden_size=16", "--epochs", "1",
            "--workers", "0", "--split", "speaker:test=0.25", "-q"]
    plain, declared = tmp_path / "plain", tmp_path / "declared"
    assert run_sertk("train", *fast, "--out", plain).code == 0
    one_line_error(run_sertk("evaluate", plain, "--test", "cross"), "declares no cross-corpus set")
    r = run_sertk("evaluate", plain, "--json")
    assert r.code == 0 and set(json.loads(r.out)) == {"test"}  # nothing inferred
    one_line_error(run_sertk("train", *fast, "--out", tmp_path / "bad", "--cross", "nothing"), "no cache")
    assert run_sertk("train", *fast, "--out", declared, "--cross", "synthetic-shifted").code == 0
    cfg = json.loads((declared / "config.json").read_text())["train"]
    assert cfg["cross"] == [str((cache / "synthetic-shifted.h5").resolve())]
    r = run_sertk("evaluate", declared, "--json")
    assert r.code == 0 and set(json.loads(r.out)) == {"test", "cross-synthetic-shifted"}
    shutil.rmtree(declared)


@pytest.mark.timeout(1000)  # above the subprocess limits inside
@pytest.mark.slow
def test_every_fold_of_a_study(tmp_path):
    (tmp_path / "f.toml").write_text("""
name = "folds"
[data]
options = { per_emotion = 2 }
split = "kfold:k=2,order=sorted"
folds = "all"
cross = []
[training]
epochs = 10
workers = 1
[augmentations]
methods = ["noise"]
top_k = []
[study]
runs_dir = "runs/folds"
report = "reports/folds.md"
""")
    r = run_sertk("study", "--preset", "demo", "--config", tmp_path / "f.toml", cwd=tmp_path, timeout=900)
    assert r.code == 0, r.err
    runs = tmp_path / "runs" / "folds"
    study = json.loads((runs / "study.json").read_text())
    assert [f["fold"] for f in study["folds"]] == [0, 1]
    assert {p.name for p in runs.glob("*-s42")} == {f"{m}-f{f}-s42" for m in ("baseline", "noise", "duplicate")
                                                     for f in (0, 1)}
    tests = [{row["utterance"] for row in csv.DictReader(open(runs / f"split-f{f}.csv")) if row["split"] == "test"}
             for f in (0, 1)]
    assert tests[0] and not tests[0] & tests[1]  # every utterance is tested in one fold only
    numbers = json.loads((files_of(tmp_path / "reports" / "folds.md") / "numbers.json").read_text())
    per_run = [n for n in numbers if n["section"] == "per_run" and n["model"] == "baseline" and n["test"] == "test"]
    assert sorted(n["fold"] for n in per_run) == [0, 1]
    headline = next(n for n in numbers if n["section"] == "headline" and n["model"] == "baseline"
                    and n["test"] == "test" and n["metric"] == "uar")
    assert headline["mean"] == pytest.approx(np.mean([n["uar"] for n in per_run]))
    assert "mean ± sample SD over seeds and folds" in (tmp_path / "reports" / "folds.md").read_text()
    gain = next(n for n in numbers if n["section"] == "gains")  # a seed's folds pooled into one paired test
    assert gain["method"] == "noise" and gain["replicates"] == 1 and gain["ci_low"] <= gain["ci_high"]
    assert "folds pooled" in (tmp_path / "reports" / "folds.md").read_text()


def _cfg(data: dict) -> dict:
    from ser_toolkit.study import check

    return check({"name": "m", "data": data, "model": {"name": "acoustic"},
                  "augmentations": {"methods": ["noise"]}})


def test_corpus_studies_train_on_each_corpus_with_the_others_as_cross_sets(tmp_path):
    from ser_toolkit.study import corpus_studies, with_cross_matrix

    assert corpus_studies(_cfg({"dataset": "synthetic"})) == []  # one training corpus: the plain protocol
    shifted = {"dataset": "synthetic-shifted", "options": {"per_emotion": 1}}
    manifest = {"dataset": "manifest", "root": str(_manifest(tmp_path / "m")), "options": {"corpus": "mine"}}
    cfg = _cfg({"dataset": "synthetic", "split": "file:split.csv", "cross": [shifted, manifest],
                "train": [{"dataset": "synthetic"}, {**shifted, "split": "speaker:test=0.5"}]})
    studies = dict(corpus_studies(cfg))
    assert list(studies) == ["synthetic", "synthetic-shifted"]  # [data] listed again in train: one corpus
    own, other = studies["synthetic"]["data"], studies["synthetic-shifted"]["data"]
    assert own["split"] == "file:split.csv" and other["split"] == "speaker:test=0.5"
    assert own["cross"] == [shifted, manifest] and other["cross"] == [{"dataset": "synthetic", "options": {}},
                                                                       manifest]
    assert studies["synthetic"]["study"]["runs_dir"] == str(Path("runs/m/synthetic"))
    assert studies["synthetic-shifted"]["study"]["report"] == str(Path("reports/m-synthetic-shifted.md"))
    # --cross-matrix: every cross entry trains too; a file: split names one corpus's files, so it is not inherited
    studies = dict(corpus_studies(with_cross_matrix(_cfg({"dataset": "synthetic", "split": "file:s.csv",
                                                          "cross": [shifted, manifest]}))))
    assert list(studies) == ["synthetic", "synthetic-shifted", "mine"]
    assert studies["mine"]["data"]["split"] == "stratified:test=0.2,seed=42"
    assert [c["dataset"] for c in studies["mine"]["data"]["cross"]] == ["synthetic", "synthetic-shifted"]
    with pytest.raises(Exception, match="another training corpus with other settings"):
        corpus_studies(_cfg({"dataset": "synthetic", "train": [{"dataset": "synthetic", "mono": "first"}]}))
    with pytest.raises(Exception, match="needs more corpora"):
        with_cross_matrix(_cfg({"dataset": "synthetic"}))


@pytest.mark.timeout(1000)  # above the subprocess limits inside
@pytest.mark.slow
def test_cross_matrix_study_reports_train_by_test_corpus(tmp_path):
    (tmp_path / "x.toml").write_text("""
name = "mx"
[data]
options = { per_emotion = 3 }
cross = [{ dataset = "synthetic-shifted", options = { per_emotion = 3 } }]
[training]
epochs = 6
workers = 1
[augmentations]
methods = ["noise"]
top_k = []
[study]
runs_dir = "runs/mx"
report = "reports/mx.md"
""")
    r = run_sertk("study", "--preset", "demo", "--config", tmp_path / "x.toml", "--cross-matrix", cwd=tmp_path,
                  timeout=900)
    assert r.code == 0, r.err
    runs = tmp_path / "runs" / "mx"
    sizes = {n: len(CacheReader(tmp_path / "cache" / f"{n}.h5").ids) for n in ("synthetic", "synthetic-shifted")}
    numbers = json.loads((files_of(tmp_path / "reports" / "mx.md") / "numbers.json").read_text())
    cells = {(n["model"], n["train"], n["test"]): n for n in numbers
             if n["section"] == "matrix" and n["metric"] == "weighted_f1"}
    paired = {(n["model"], n["train"], n["test"]): n for n in numbers if n["section"] == "matrix_vs_baseline"}
    assert set(paired) == {(m, a, b) for m in ("noise", "duplicate") for a in sizes for b in sizes}
    for (model, train, test), n in paired.items():  # the paired difference is the difference of the cells
        assert n["delta"] == pytest.approx(cells[(model, train, test)]["mean"] - cells[("baseline", train, test)]["mean"])
        assert n["ci_low"] <= n["delta"] <= n["ci_high"] and n["replicates"] == 1
    assert {k[1:] for k in cells} == {(a, b) for a in sizes for b in sizes}
    for train in sizes:
        summary = json.loads((runs / train / "baseline-s42" / "train_summary.json").read_text())
        assert sum(summary["train_emotions"].values()) == summary["train_utterances"]
        for test in sizes:
            name = "test" if test == train else f"cross-{test}"
            e = json.loads((runs / train / "baseline-s42" / "eval" / f"{name}.json").read_text())
            assert cells[("baseline", train, test)]["mean"] == pytest.approx(e["weighted_f1"])
            assert cells[("baseline", train, test)]["in_corpus"] == (test == train)
            assert (e["n"] == sizes[test]) == (test != train)  # another corpus is tested whole
    md = (tmp_path / "reports" / "mx.md").read_text()
    assert "train \\ test" in md and "[report](mx-synthetic-shifted.md)" in md
    assert "chosen on the validation part" in md
    assert (tmp_path / "reports" / "mx-synthetic.md").is_file()
    # the matrix folder is reported alone, again identically
    assert run_sertk("report", runs, "-o", tmp_path / "again.md", cwd=tmp_path).code == 0
    one_line_error(run_sertk("report", runs, runs / "synthetic", cwd=tmp_path), "reported alone")
