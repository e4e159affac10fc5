"""Nothing from a run folder executes: a classifier file that names a type or function sertk never writes is
refused before anything in it is built, even with a recomputed seal (anyone handing over a run can do that)."""

from __future__ import annotations

import builtins
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from helpers import one_line_error, run_sertk, synthetic_cache, write_audio


@pytest.fixture(scope="module")
def svm_run(tmp_path_factory):
    cache = synthetic_cache(tmp_path_factory.mktemp("cache"), speakers=4, per_emotion=2) / "synthetic.h5"
    run = tmp_path_factory.mktemp("runs") / "svm"
    r = run_sertk("train", "--model", "svm", "--model-set", "features=acoustic", "--dataset", cache, "--out", run,
                  "--split", "speaker:test=0.25", "--workers", "1", "--normalize", "none", "-q", timeout=600)
    assert r.code == 0, r.err
    return run


def craft(run: Path, marker: Path) -> None:
    """The chain a hostile run folder held: FunctionTransformers numpy.full_like(X, fill_value=<code>,
    dtype=object) -> numpy.ravel -> builtins.max -> builtins.eval, then a classifier; resealed."""
    import skops.io as sio
    from sklearn.dummy import DummyClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    payload = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    pipe = Pipeline([("a", FunctionTransformer(np.full_like, kw_args={"fill_value": payload, "dtype": object})),
                     ("b", FunctionTransformer(np.ravel)), ("c", FunctionTransformer(builtins.max)),
                     ("d", FunctionTransformer(builtins.eval)), ("clf", DummyClassifier().fit([[0.0]], [0]))])
    path = run / "checkpoints" / "classifier.skops"
    run_id = json.loads((run / "run.json").read_text())["run_id"]
    sio.dump({"run_id": run_id, "model": "svm", "estimator": pipe}, path)
    seal = json.loads((run / "final.json").read_text())
    seal["checkpoints"]["classifier.skops"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (run / "final.json").write_text(json.dumps(seal))


def test_a_crafted_classifier_runs_no_code_on_evaluate_or_predict(svm_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(svm_run, run)
    marker = tmp_path / "PAYLOAD-RAN"
    craft(run, marker)
    err = one_line_error(run_sertk("evaluate", run), "holds types sertk does not load", "builtins.eval")
    assert "could run code" in err and not marker.exists()
    audio = [write_audio(tmp_path / f"a{k}.wav", 0.6, freq=150 + 30 * k) for k in range(2)]
    one_line_error(run_sertk("predict", run, *audio), "holds types sertk does not load")
    assert not marker.exists()
    r = run_sertk("evaluate", svm_run)  # the run as sertk wrote it loads under the same list
    assert r.code == 0, r.err


def test_the_allow_list_is_exact():
    from ser_toolkit.plugins.classifiers import SKOPS_TYPES

    assert not any(name.endswith(".") or "*" in name for name in SKOPS_TYPES)  # no prefixes, no patterns
    callables = {n for n in SKOPS_TYPES if n.startswith("builtins.")} - {
        "builtins.dict", "builtins.list", "builtins.tuple", "builtins.slice", "builtins.str", "builtins.int",
        "builtins.float", "builtins.bool", "builtins.NoneType"}
    assert not callables  # no builtins function (eval, exec, max, getattr...)
    functions = {n for n in SKOPS_TYPES if n.split(".")[-1].islower() and not n.startswith(("builtins.", "numpy."))}
    assert functions == {"sklearn.metrics.pairwise.rbf_kernel", "sklearn.metrics.pairwise.linear_kernel"}


@pytest.mark.parametrize("model", ["svm", "rbf-svm", "logreg", "mlp"])
def test_every_classifier_sertk_writes_is_on_the_list(model, tmp_path):
    from ser_toolkit.plugins.classifiers import SKOPS_TYPES, skops_names
    from ser_toolkit.registry import get

    rng = np.random.default_rng(0)
    x = rng.normal(size=(42, 5)).astype(np.float32)
    y, groups = np.repeat(np.arange(3), 14), np.tile(np.arange(7), 6)
    for blocks in (None, [("a", 2), ("b", 3)]):
        for weights in (["none", "balanced"] if model != "mlp" else ["none"]):
            plugin = get("model", model).obj(features="acoustic")
            plugin.fit(x, y, groups, 0, blocks=blocks, class_weights=weights)
            plugin.save(tmp_path / "c.skops", "r")
            assert skops_names(tmp_path / "c.skops") <= SKOPS_TYPES
            again = get("model", model).obj(features="acoustic")
            again.load(tmp_path / "c.skops", "r")
            np.testing.assert_array_equal(again.predict_proba(x), plugin.predict_proba(x))
