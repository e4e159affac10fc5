"""scikit-learn classifiers over cached features: train, evaluate, predict, study, report like any model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from helpers import one_line_error, run_sertk, synthetic_caches, write_audio
from ser_toolkit.cache.reader import CacheReader


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return synthetic_caches(tmp_path_factory.mktemp("cache"))


FAST = ["--split", "speaker:test=0.25", "--workers", "1", "-q"]


@pytest.fixture(scope="module")
def svm_run(cache_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "svm"
    r = run_sertk("train", "--cache-dir", cache_dir, "--out", run, "--model", "svm", "--model-set",
                  "features=acoustic", "--normalize", "speaker", "--plugins", "noise", "--aug-copies", "2",
                  "--cross", "synthetic-shifted", "--class-weights", "balanced", *FAST, timeout=600)
    assert r.code == 0, r.err
    return run


@pytest.mark.timeout(900)
def test_svm_trains_on_cached_features_of_clean_and_materialised_copies(svm_run, cache_dir):
    summary = json.loads((svm_run / "train_summary.json").read_text())
    cfg = json.loads((svm_run / "config.json").read_text())["train"]
    assert cfg["aug_mode"] == "offline" and cfg["normalize"] == "speaker"  # the model's default, recorded
    fitted = summary["classifier"]
    assert set(fitted["chosen"]) == {"scale", "clf__C"} and "speaker-grouped" in fitted["cv"]
    assert fitted["class_weights"] == cfg["class_weights"] == "balanced"  # the setting reaches the fit
    sets = summary["features"]
    assert len(sets) == 2 and sets[0]["rows"] == summary["train_utterances"]
    assert sets[1]["rows"] == 2 * summary["train_utterances"]  # two materialised copies per training file
    info = json.loads((svm_run / "run.json").read_text())
    assert [f["digest"] for f in info["data"]["features"]] == [s["features"] for s in sets]
    assert (svm_run / "checkpoints" / "classifier.skops").is_file()
    assert not (svm_run / "checkpoints" / "best.safetensors").exists()
    r = run_sertk("evaluate", svm_run, "--json")
    assert r.code == 0, r.err
    results = json.loads(r.out)
    assert set(results) == {"test", "cross-synthetic-shifted"}
    e = json.loads((svm_run / "eval" / "test.json").read_text())
    assert e["data"]["features"]["normalize"] == "speaker" and e["data"]["features"]["features"]
    assert e["accuracy"] > 1 / 7 + 0.1  # learns the synthetic corpus
    probs = np.loadtxt(svm_run / "eval" / "test.predictions.csv", delimiter=",", skiprows=1,
                       usecols=range(3, 10))
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)  # calibrated probabilities over the 7 emotions
    # a second evaluation reuses the feature cache: same predictions, byte for byte
    before = (svm_run / "eval" / "test.predictions.csv").read_bytes()
    assert run_sertk("evaluate", svm_run, "--test", "test").code == 0
    assert (svm_run / "eval" / "test.predictions.csv").read_bytes() == before


def test_a_swapped_classifier_is_refused(svm_run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(svm_run, other)
    (other / "checkpoints" / "classifier.skops").write_bytes(b"PK\x03\x04 not a classifier")
    one_line_error(run_sertk("evaluate", other), "is not the file this run sealed")


def test_feature_settings_that_cannot_apply_are_refused(cache_dir, tmp_path):
    one_line_error(run_sertk("train", "--cache-dir", cache_dir, "--out", tmp_path / "a", "--model", "svm",
                             "--plugins", "noise", "--aug-mode", "online", *FAST), "--aug-mode offline")
    one_line_error(run_sertk("train", "--cache-dir", cache_dir, "--out", tmp_path / "b", "--model", "tiny",
                             "--normalize", "speaker", *FAST), "--normalize speaker needs a model on cached features")
    one_line_error(run_sertk("train", "--cache-dir", cache_dir, "--out", tmp_path / "c", "--model", "svm",
                             "--model-set", "features=nope", *FAST), "unknown featurizer 'nope'")
    one_line_error(run_sertk("train", "--cache-dir", cache_dir, "--out", tmp_path / "d", "--model", "mlp",
                             "--model-set", "features=acoustic", "--class-weights", "balanced", *FAST),
                   "model 'mlp' cannot weight classes")
    assert not any((tmp_path / n).exists() and any((tmp_path / n).rglob("*.skops")) for n in "abcd")


@pytest.mark.timeout(900)
def test_predict_with_a_classifier(svm_run, cache_dir, tmp_path):
    files = []
    for k in range(6):  # one unknown speaker's files, normalised together
        files.append(tmp_path / f"f{k}.wav")
        write_audio(files[-1], 0.8, freq=150 + 30 * k)
    r = run_sertk("predict", svm_run, *files, "--json")
    assert r.code == 0, r.err
    out = json.loads(r.out)
    assert len(out) == 6 and all(abs(sum(o["probabilities"].values()) - 1) < 1e-4 for o in out)
    one_line_error(run_sertk("predict", svm_run, files[0]), "utterances")


@pytest.mark.timeout(900)
@pytest.mark.slow
def test_a_study_of_a_classifier_reports_like_any_model(tmp_path):
    (tmp_path / "s.toml").write_text("""
name = "svm"
[data]
options = { per_emotion = 2 }
[model]
name = "logreg"
options = { features = "acoustic" }
[training]
normalize = "speaker"
workers = 1
[augmentations]
methods = ["noise"]
top_k = []
[study]
runs_dir = "runs/svm"
report = "reports/svm.md"
""")
    r = run_sertk("study", "--preset", "demo", "--config", tmp_path / "s.toml", cwd=tmp_path, timeout=800)
    assert r.code == 0, r.err
    md = (tmp_path / "reports" / "svm.md").read_text()
    assert "`logreg` on `acoustic` features" in md and "normalisation speaker" in md and "fitted once" in md
    runs = tmp_path / "runs" / "svm"
    for run in runs.glob("*-s42"):
        assert (run / "checkpoints" / "classifier.skops").is_file()
    # every run and evaluation read the same cached features of the clean cache: computed once
    feats = list((tmp_path / "cache").glob("synthetic.features/acoustic-*.h5"))
    assert len(feats) == 1
    assert len(CacheReader(tmp_path / "cache" / "synthetic.h5").ids) > 0


def test_a_classifier_file_with_foreign_types_is_not_loaded(tmp_path):
    import fractions

    import skops.io as sio

    from ser_toolkit.errors import SertkError
    from ser_toolkit.registry import get

    plugin = get("model", "svm").obj(features="acoustic")
    sio.dump({"run_id": "r1", "estimator": fractions.Fraction(1, 3)}, tmp_path / "c.skops")
    with pytest.raises(SertkError, match="holds types sertk does not load .fractions.Fraction"):
        plugin.load(tmp_path / "c.skops", "r1")
    x = np.random.default_rng(0).normal(size=(40, 5)).astype(np.float32)
    y = np.arange(40) % 4
    plugin.fit(x, y, np.repeat(np.arange(8), 5), seed=0)
    plugin.save(tmp_path / "ok.skops", "r1")
    with pytest.raises(SertkError, match="belongs to another run"):
        plugin.load(tmp_path / "ok.skops", "r2")
    again = get("model", "svm").obj(features="acoustic")
    again.load(tmp_path / "ok.skops", "r1")
    np.testing.assert_array_equal(again.predict_proba(x), plugin.predict_proba(x))
    assert plugin.predict_proba(x)[:, 4:].sum() == 0  # emotions never trained on get probability 0


def test_joined_feature_blocks_weigh_the_same_whatever_their_width():
    """'a+b' features: each block standardised (training statistics) and weighted 1/sqrt(width)."""
    from ser_toolkit.plugins.classifiers import _scaling, _scaling_label

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(5, 3, (60, 4)), rng.normal(-2, 0.1, (60, 100))], axis=1)
    step = _scaling("standardise", [("small", 4), ("wide", 100)], 104).fit(x)
    z = step.transform(x)
    np.testing.assert_allclose(np.square(z[:, :4]).sum(1).mean(), 1.0, rtol=1e-6)  # each block: unit total
    np.testing.assert_allclose(np.square(z[:, 4:]).sum(1).mean(), 1.0, rtol=1e-6)  # variance, 4 or 100 wide
    assert _scaling_label(step) == "standardise (blocks weighted 1/sqrt(width))"
    assert _scaling("standardise", None, 104).__class__.__name__ == "StandardScaler"
    with pytest.raises(Exception, match="do not add up"):
        _scaling("none", [("small", 4), ("wide", 99)], 104)


@pytest.mark.timeout(900)
def test_a_classifier_on_joined_features(cache_dir, tmp_path):
    run = tmp_path / "joined"
    r = run_sertk("train", "--cache-dir", cache_dir, "--out", run, "--model", "logreg", "--model-set",
                  "features=acoustic+egemaps", "--normalize", "speaker", *FAST, timeout=600)
    assert r.code == 0, r.err
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["classifier"]["blocks"] == {"acoustic": 588, "egemaps": 88}
    assert summary["classifier"]["features"] == 676 and "blocks weighted" in summary["classifier"]["chosen"]["scale"]
    assert [b["featurizer"] for b in summary["features"][0]["blocks"]] == ["acoustic", "egemaps"]
    r = run_sertk("evaluate", run, "--test", "test", "--json")
    assert r.code == 0, r.err  # the saved ColumnTransformer loads under the skops allow-list
    e = json.loads((run / "eval" / "test.json").read_text())
    assert e["data"]["features"]["features"] == summary["features"][0]["features"]  # one digest over both blocks
    one_line_error(run_sertk("train", "--cache-dir", cache_dir, "--out", tmp_path / "x", "--model", "svm",
                             "--model-set", "features=acoustic+nope", *FAST), "nope")


@pytest.mark.parametrize("workers, class_weight", [(1, None), (2, None), (2, "balanced")])
@pytest.mark.parametrize("model", ["svm", "rbf-svm"])
def test_kernel_search_decides_like_the_pipeline_search(model, workers, class_weight):
    """The precomputed-kernel search finds GridSearchCV's parameters and fold score on the same folds (with
    and without class weights, on unequal classes)."""
    from sklearn.base import clone
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import Pipeline

    from ser_toolkit.plugins.classifiers import SCALINGS, _cv, _scaling, kernel_search
    from ser_toolkit.registry import get

    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(4), [15, 30, 30, 45])
    x = (rng.normal(size=(120, 12)) + 0.6 * np.eye(4, 12)[y] * rng.uniform(0.5, 3, 12)).astype(np.float32)
    x[:, 5] *= 40.0  # a badly scaled column: standardising matters
    speakers = np.array([f"s{i % 6}" for i in range(120)])
    plugin = get("model", model).obj(features="acoustic")
    folds, _ = _cv(y, speakers, 0)
    grid = [{"scale": [_scaling(label, None, 12)], **plugin.grid(10.0 if label == "none" else 12.0)}
            for label in SCALINGS]
    pipe = Pipeline([("scale", "passthrough"), ("clf", plugin.estimator(0))]).set_params(clf__class_weight=class_weight)
    search = GridSearchCV(clone(pipe), grid, scoring="balanced_accuracy", cv=folds, refit=False).fit(x, y)
    best, score, size = kernel_search(pipe.named_steps["clf"], grid, x, y, folds, workers)
    assert size == len(search.cv_results_["params"]) == (6 if model == "svm" else 12)
    assert {k: v for k, v in best.items() if k != "scale"} == \
        {k: v for k, v in search.best_params_.items() if k != "scale"}
    assert best["scale"] is search.best_params_["scale"] or best["scale"] == search.best_params_["scale"]
    assert score == pytest.approx(search.best_score_, abs=1e-12)
    means = search.cv_results_["mean_test_score"]
    assert len(set(np.round(means, 6))) > 1  # the grid is not flat: the choice is a real one
    if model == "rbf-svm":  # the fitted model: gamma folded into the scaling, rbf_kernel as a callable
        from sklearn.svm import SVC

        from ser_toolkit.plugins.classifiers import _rbf_on_gram

        for params in search.cv_results_["params"]:  # pairwise decision values (ovr ones count votes)
            pairwise = {**params, "clf__decision_function_shape": "ovo"}
            plain = clone(pipe).set_params(**pairwise).fit(x, y)
            fast = _rbf_on_gram(clone(pipe).set_params(**pairwise), params["clf__gamma"], 12).fit(x, y)
            assert isinstance(plain.named_steps["clf"], SVC) and callable(fast.named_steps["clf"].kernel)
            np.testing.assert_allclose(fast.decision_function(x), plain.decision_function(x), atol=5e-3)  # tol=1e-3


def test_feature_classifiers_refuse_torchrun(cache_dir, tmp_path):
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555"}
    r = run_sertk("train", "--cache-dir", cache_dir, "--out", tmp_path / "run", "--model", "svm", *FAST, env=env)
    one_line_error(r, "is fitted once on cached features, in one process")
    assert not (tmp_path / "run" / "train_summary.json").exists()


@pytest.mark.parametrize("model", ["svm", "rbf-svm"])
def test_normalised_features_search_one_scaling_with_the_same_choice(model, monkeypatch):
    """After per-speaker standardisation, standardising again is the identity: the search drops the second
    scaling and still chooses what the full grid chooses (ties go to ``standardise``)."""
    from ser_toolkit.normalize import groups, normalize
    from ser_toolkit.plugins import classifiers
    from ser_toolkit.registry import get

    rng = np.random.default_rng(5)
    y = np.repeat(np.arange(4), 40)
    speakers = np.array([f"s{i % 8}" for i in range(160)], dtype=object)
    raw = (rng.normal(size=(160, 10)) + np.eye(4, 10)[y] * 1.5 + rng.normal(size=(8, 10))[np.arange(160) % 8] * 3)
    x = normalize(raw.astype(np.float32), groups(list(speakers), "speaker")[0])
    assert classifiers._scalings(raw.astype(np.float32)) == classifiers.SCALINGS
    assert classifiers._scalings(x) == ("standardise",)
    fast = get("model", model).obj(features="acoustic").fit(x, y, speakers, 0)
    monkeypatch.setattr(classifiers, "_scalings", lambda _: classifiers.SCALINGS)
    full = get("model", model).obj(features="acoustic").fit(x, y, speakers, 0)
    assert fast["grid_size"] * 2 == full["grid_size"]
    assert fast["chosen"] == full["chosen"] and fast["cv_uar"] == pytest.approx(full["cv_uar"], abs=1e-9)


def test_class_weights_reach_every_fit_and_are_refused_where_they_cannot_apply():
    """--class-weights balanced weighs the search's fits and the final one (other choices on unequal classes);
    a classifier that cannot weight classes (mlp, or a fit without the parameter) refuses in one message."""
    from ser_toolkit.errors import SertkError
    from ser_toolkit.registry import get
    from ser_toolkit.training.features import _class_weights

    rng = np.random.default_rng(5)
    y = np.repeat(np.arange(3), [10, 40, 70])
    x = (rng.normal(size=(120, 6)) + np.eye(3, 6)[y]).astype(np.float32)
    speakers = np.array([f"s{i % 6}" for i in range(120)])
    recalls = {}
    for weights in ("none", "balanced"):  # the calibration is weighted too: its argmax keeps the weighting
        plugin = get("model", "svm").obj(features="acoustic")
        chosen = plugin.fit(x, y, speakers, seed=0, class_weights=weights)
        assert chosen["class_weights"] == weights
        svc = plugin.estimator_.estimator.named_steps["clf"]
        assert svc.class_weight == (None if weights == "none" else "balanced")
        pred = plugin.predict_proba(x).argmax(1)
        recalls[weights] = float(np.mean(pred[y == 0] == 0))
    assert recalls["none"] < 0.2 and recalls["balanced"] > 0.6  # the rare class is found when weighted
    with pytest.raises(SertkError, match="cannot weight classes"):
        get("model", "mlp").obj(features="acoustic").fit(x, y, speakers, seed=0, class_weights="balanced")
    with pytest.raises(SertkError, match="unknown class weights"):
        get("model", "svm").obj(features="acoustic").fit(x, y, speakers, seed=0, class_weights="inverse")

    class Older:  # a third-party classifier written before the parameter existed
        name = "older"

        def fit(self, x, y, groups, seed, workers=1, blocks=None):
            return {}

    assert _class_weights(Older(), "none") == {}
    with pytest.raises(SertkError, match="model 'older' cannot weight classes"):
        _class_weights(Older(), "balanced")
    assert _class_weights(get("model", "svm").obj(features="acoustic"), "balanced") == {"class_weights": "balanced"}


@pytest.mark.timeout(900)
def test_speaker_train_keeps_seen_speakers_training_statistics(cache_dir, tmp_path):
    """--normalize speaker-train: the training speakers' statistics are saved and sealed with the run; a test
    set of the same audio uses them for its seen speakers, another corpus its own; torch models refuse it."""
    run = tmp_path / "st"
    r = run_sertk("train", "--cache-dir", cache_dir, "--out", run, "--model", "svm", "--model-set",
                  "features=acoustic", "--normalize", "speaker-train", "--split", "stratified:test=0.25",
                  "--cross", "synthetic-shifted", "--workers", "1", "-q", timeout=600)
    assert r.code == 0, r.err
    stats = run / "checkpoints" / "speaker_stats.safetensors"
    assert "speaker_stats.safetensors" in json.loads((run / "final.json").read_text())["checkpoints"]
    r = run_sertk("evaluate", run, "--json")
    assert r.code == 0, r.err
    test = json.loads((run / "eval" / "test.json").read_text())["data"]["features"]
    cross = json.loads((run / "eval" / "cross-synthetic-shifted.json").read_text())["data"]["features"]
    assert test["normalize"] == "speaker-train" and test["train_statistics"] > 0  # stratified: speakers seen
    assert cross["train_statistics"] == 0  # another corpus: its speakers' own statistics
    stats.write_bytes(stats.read_bytes()[:-8] + b"\0" * 8)
    one_line_error(run_sertk("evaluate", run), "is not the file this run sealed")
    # a model trained by epochs on cached features (the acoustic MLP) saves and applies them the same way
    mlp = tmp_path / "mlp"
    r = run_sertk("train", "--cache-dir", cache_dir, "--out", mlp, "--model", "acoustic", "--normalize",
                  "speaker-train", "--split", "stratified:test=0.25", "--epochs", "2", "--workers", "0", "-q",
                  timeout=600)
    assert r.code == 0, r.err
    assert "speaker_stats.safetensors" in json.loads((mlp / "final.json").read_text())["checkpoints"]
    assert run_sertk("evaluate", mlp, "--test", "test").code == 0
    test = json.loads((mlp / "eval" / "test.json").read_text())["data"]["features"]
    assert test["train_statistics"] > 0 and "fewer than" not in test.get("note", "")  # all seen
    one_line_error(run_sertk("train", "--cache-dir", cache_dir, "--out", tmp_path / "a", "--model", "acoustic",
                             "--normalize", "speaker-train", "--max-seconds", "2", *FAST),
                   "needs cached features of whole utterances")
