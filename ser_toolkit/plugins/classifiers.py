"""scikit-learn classifiers over any featurizer: ``svm`` (linear), ``rbf-svm``, ``logreg``, ``mlp``.

The field's classic baselines (openSMILE functionals + an SVM). Each is a
pipeline *scaling → classifier*; the scaling (standardise or none) and C (and
gamma, alpha) are chosen by cross-validation on the training part only, with
folds grouped by speaker (an utterance and its augmented copies share their
speaker, so they never straddle folds), scored by UAR (balanced accuracy).
``--class-weights balanced`` weighs each class by its inverse frequency in every
fit (the search's and the final one; not ``mlp``, which cannot weight classes).
Probabilities are calibrated (sigmoid, on the same grouped folds) where the
classifier has none of its own (SVMs). The fitted pipeline is saved with the
run as ``checkpoints/classifier.skops`` (the skops format: JSON schema + numpy
arrays in a zip; loaded only if every type and function it names is in
:data:`SKOPS_TYPES`, the exact list of what sertk writes, so no code from a run
folder runs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ser_toolkit import hookimpl
from ser_toolkit.emotions import EMOTIONS
from ser_toolkit.errors import SertkError
from ser_toolkit.models import FeatureClassifier
from ser_toolkit.params import Param

CV_FOLDS = 5
"""Speaker-grouped folds of the hyper-parameter search (fewer when there are fewer speakers)."""
SKOPS_TYPES = frozenset({
    # what sertk's classifiers write: their pipelines, scalings, estimators, calibration and kernels
    "sklearn.pipeline.Pipeline", "sklearn.compose._column_transformer.ColumnTransformer",
    "sklearn.preprocessing._data.StandardScaler", "sklearn.preprocessing._label.LabelBinarizer",
    "sklearn.preprocessing._function_transformer.FunctionTransformer",  # a fitted "passthrough" (no function)
    "sklearn.svm._classes.SVC", "sklearn.linear_model._logistic.LogisticRegression",
    "sklearn.neural_network._multilayer_perceptron.MLPClassifier",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "sklearn.calibration.CalibratedClassifierCV", "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.metrics.pairwise.rbf_kernel", "sklearn.metrics.pairwise.linear_kernel",  # the only functions
    # their data: arrays, numbers, generators' state, containers (no callable)
    "numpy.ndarray", "numpy.dtype", "numpy.float32", "numpy.float64", "numpy.int32", "numpy.int64", "numpy.bool_",
    "numpy.random.mtrand.RandomState",
    "builtins.dict", "builtins.list", "builtins.tuple", "builtins.slice", "builtins.str", "builtins.int",
    "builtins.float", "builtins.bool", "builtins.NoneType",
})
"""Every type and function a classifier file may name, exactly (nothing matched by prefix, no builtins
callable, no function but the two kernels): what sertk's classifiers write. A file naming anything else is
refused before skops builds a single object from it."""

FEATURES = Param("features", "egemaps", "featurizer plugin the classifier reads (see 'sertk plugins --kind "
                 "featurizer')")


def _cv(y: np.ndarray, groups: np.ndarray, seed: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], str]:
    """Speaker-grouped folds (stratified where possible); stratified folds when there are < 2 speakers."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    n_groups = len(np.unique(groups))
    if n_groups >= 2:
        k = min(CV_FOLDS, n_groups)
        cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        return list(cv.split(np.zeros(len(y)), y, groups)), f"{k} speaker-grouped folds"
    k = max(2, min(CV_FOLDS, int(np.bincount(y).min(initial=2))))
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return list(cv.split(np.zeros(len(y)), y)), f"{k} stratified folds (one speaker: not grouped)"


SCALINGS = ("standardise", "none")
"""Scalings searched: standardise each feature with training statistics, or none (e.g. after speaker
normalisation). Joined feature sets (``egemaps+compare``) weigh each featurizer's block by 1/sqrt(width), so
every featurizer counts the same in a linear model however many values it has."""


def _scalings(x: np.ndarray) -> tuple[str, ...]:
    """The scalings worth searching for ``x``: only ``standardise`` when every column already has mean 0 and
    SD 1 (or is constant), as after per-speaker or per-corpus normalisation, where standardising on any
    speakers' rows is the identity and both scalings would score the same (the tie goes to ``standardise``)."""
    if len(x) < 2:
        return SCALINGS
    mean, sd = x.mean(0, dtype=np.float64), x.std(0, dtype=np.float64)
    standard = bool(np.all(np.abs(mean) < 1e-3) and np.all((np.abs(sd - 1) < 1e-3) | (sd < 1e-6)))
    return SCALINGS[:1] if standard else SCALINGS


def _scaling(label: str, blocks, width: int):
    """The ``scale`` step for a scaling label and the featurizer blocks [(name, width), ...] of the vectors."""
    from sklearn.preprocessing import StandardScaler

    if not blocks or len(blocks) < 2:
        return StandardScaler() if label == "standardise" else "passthrough"
    from sklearn.compose import ColumnTransformer

    if sum(w for _, w in blocks) != width:
        raise SertkError(f"feature blocks {blocks} do not add up to {width} values", "recompute the features")
    parts, weights, start = [], {}, 0
    for name, w in blocks:
        parts.append((name, StandardScaler() if label == "standardise" else "passthrough",
                      np.arange(start, start + w)))
        weights[name] = float(1.0 / np.sqrt(w))
        start += w
    return ColumnTransformer(parts, transformer_weights=weights)


def _scaling_label(step) -> str:
    from sklearn.preprocessing import StandardScaler

    if step == "passthrough":
        return "none"
    if isinstance(step, StandardScaler):
        return "standardise"
    kinds = {type(t).__name__ if t != "passthrough" else "none" for _, t, _ in step.transformers}
    return ("standardise" if kinds == {"StandardScaler"} else "none") + " (blocks weighted 1/sqrt(width))"


def kernel_search(svc, grid: list[dict[str, list[Any]]], x: np.ndarray, y: np.ndarray,
                  folds: list[tuple[np.ndarray, np.ndarray]], workers: int = 1) -> tuple[dict[str, Any], float, int]:
    """What ``GridSearchCV(Pipeline([scale, svc]), grid, scoring="balanced_accuracy", cv=folds)`` finds
    (best parameters, their mean fold score, grid size), from precomputed kernels.

    Per scaling and fold the scaling is fitted on the fold's training part (as the pipeline does) and the
    Gram matrix is computed once with BLAS, then shared by every C and gamma, so libsvm only solves:
    about 3x faster than the pipeline search on 1,600 x 400 features. Candidates are visited in
    ``ParameterGrid`` order and ties go to the first, as in GridSearchCV; a failing fit scores 0 (its
    ``error_score``). Decisions equal the pipeline search's up to floating-point rounding (tested).
    libsvm releases the GIL, so the fits run in ``workers`` threads (the same scores for any number).
    """
    from concurrent.futures import ThreadPoolExecutor

    from sklearn.base import clone
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import ParameterGrid
    from sklearn.svm import SVC

    grams: dict[tuple[int, int], tuple[np.ndarray, ...]] = {}

    def gram(scale, f: int) -> tuple[np.ndarray, ...]:
        key = (id(scale), f)
        if key not in grams:
            tr, te = folds[f]
            if scale == "passthrough":
                a, b = x[tr], x[te]
            else:
                fitted = clone(scale).fit(x[tr])
                a, b = fitted.transform(x[tr]), fitted.transform(x[te])
            a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
            grams[key] = (a @ a.T, b @ a.T, np.einsum("ij,ij->i", a, a), np.einsum("ij,ij->i", b, b))
        return grams[key]

    candidates = list(ParameterGrid(grid))
    for params in candidates:  # every Gram matrix first (BLAS uses the cores itself)
        for f in range(len(folds)):
            gram(params["scale"], f)

    # one job per kernel (scaling, gamma) and fold: the kernel is computed once and shared by every C
    groups: dict[tuple[int, Any], list[int]] = {}
    for c, params in enumerate(candidates):
        groups.setdefault((id(params["scale"]), params.get("clf__gamma", svc.gamma)), []).append(c)

    def score(job: tuple[list[int], int]) -> list[tuple[int, float]]:
        members, f = job
        params = candidates[members[0]]
        tr, te = folds[f]
        gamma = params.get("clf__gamma", svc.gamma)
        k_tr, k_te, n_tr, n_te = gram(params["scale"], f)
        if svc.kernel == "rbf":
            k_tr = np.exp(-gamma * np.maximum(n_tr[:, None] + n_tr[None, :] - 2 * k_tr, 0.0))
            k_te = np.exp(-gamma * np.maximum(n_te[:, None] + n_tr[None, :] - 2 * k_te, 0.0))
        out = []
        for c in members:
            model = SVC(kernel="precomputed", C=candidates[c].get("clf__C", svc.C), class_weight=svc.class_weight,
                        random_state=svc.random_state)
            try:
                out.append((c, float(balanced_accuracy_score(y[te], model.fit(k_tr, y[tr]).predict(k_te)))))
            except ValueError:
                out.append((c, 0.0))
        return out

    jobs = [(members, f) for members in groups.values() for f in range(len(folds))]
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(score, jobs))
    else:
        results = [score(job) for job in jobs]
    fold_scores = np.zeros((len(candidates), len(folds)))
    for (members, f), scored in zip(jobs, results):
        for c, value in scored:
            fold_scores[c, f] = value
    per = fold_scores
    scores = [float(np.mean(row)) for row in per]
    best = int(np.argmax(scores))
    return candidates[best], scores[best], len(candidates)


def _rbf_on_gram(pipe, gamma: float, width: int):
    """The same RBF pipeline with scikit-learn's ``rbf_kernel`` as a callable kernel, so libsvm solves on a Gram
    matrix computed with BLAS (3x faster to calibrate and to predict than ``kernel="rbf"``).

    A callable kernel takes no parameters: ``rbf_kernel(X, Y)`` uses gamma = 1/width, so the scaling step
    multiplies every value by sqrt(gamma * width) (``ColumnTransformer`` weights), which gives
    exp(-gamma * |x - y|^2) on the scaled vectors: the same model. Every step stays a scikit-learn type.
    """
    from sklearn.base import clone
    from sklearn.compose import ColumnTransformer
    from sklearn.metrics.pairwise import rbf_kernel

    factor = float(np.sqrt(gamma * width))
    scale = pipe.named_steps["scale"]
    if isinstance(scale, ColumnTransformer):
        weights = {name: w * factor for name, w in (scale.transformer_weights or {}).items()}
        scale = clone(scale).set_params(transformer_weights=weights)
    else:
        scale = ColumnTransformer([("all", clone(scale) if scale != "passthrough" else "passthrough",
                                    np.arange(width))], transformer_weights={"all": factor})
    svc = clone(pipe.named_steps["clf"]).set_params(kernel=rbf_kernel, gamma="scale")
    return clone(pipe).set_params(scale=scale, clf=svc)


class SklearnClassifier(FeatureClassifier):
    """Shared fit/predict/save for the scikit-learn pipelines (subclasses give the estimator and the grid)."""

    calibrate = False  # True: the classifier has no predict_proba of its own

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        from ser_toolkit.registry import get

        from ser_toolkit.training.features import COMBINE

        for name in self.options["features"].split(COMBINE):
            get("featurizer", name)  # an unknown name: one line listing the available ones
        self.estimator_: Any = None

    def estimator(self, seed: int):
        raise NotImplementedError

    def grid(self, norm: float) -> dict[str, list[Any]]:
        """Hyper-parameters searched besides the scaling (pipeline step ``clf``); ``norm`` is the mean squared
        norm of the scaled training vectors, so C and gamma scale with the features."""
        raise NotImplementedError

    def fit(self, x, y, groups, seed, workers=1, blocks=None, class_weights="none"):
        import warnings

        from sklearn.base import clone
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.model_selection import GridSearchCV
        from sklearn.pipeline import Pipeline

        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2:
            raise SertkError(f"model '{self.name}' reads feature vectors, but '{self.options['features']}' gives "
                             f"arrays of shape {x.shape[1:]}", "choose a vector featurizer (--model-set features=...)")
        folds, how = _cv(y, groups, seed)
        grid = []
        for label in _scalings(x):
            scale = _scaling(label, blocks, x.shape[1])
            norm = float(np.mean(np.sum(np.square(clone(scale).fit_transform(x) if scale != "passthrough"
                                                  else x), axis=1)))
            grid.append({"scale": [scale], **self.grid(max(norm, 1e-12))})
        pipe = Pipeline([("scale", "passthrough"), ("clf", self.estimator(seed))])
        if class_weights == "balanced":
            if "class_weight" not in pipe.named_steps["clf"].get_params():
                raise SertkError(f"model '{self.name}' cannot weight classes", "use --class-weights none")
            pipe.set_params(clf__class_weight="balanced")  # n / (classes x count), on every fit of the search
        elif class_weights != "none":
            raise SertkError(f"unknown class weights {class_weights!r}", "use --class-weights none or balanced")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            kernel = getattr(pipe.named_steps["clf"], "kernel", None)
            kernel = "linear" if callable(kernel) and kernel.__name__ == "linear_kernel" else kernel
            if kernel == "linear" or (kernel == "rbf" and all("clf__gamma" in g for g in grid)):
                best, score, size = kernel_search(pipe.named_steps["clf"], grid, x, y, folds, workers)
            else:
                search = GridSearchCV(pipe, grid, scoring="balanced_accuracy", cv=folds, n_jobs=max(1, workers),
                                      refit=False, error_score=0.0).fit(x, y)
                best, score, size = search.best_params_, search.best_score_, len(search.cv_results_["params"])
            model = clone(pipe).set_params(**best)
            if kernel == "rbf" and "clf__gamma" in best:
                model = _rbf_on_gram(model, float(best["clf__gamma"]), x.shape[1])
            if self.calibrate:
                from sklearn.calibration import CalibratedClassifierCV

                model = CalibratedClassifierCV(model, method="sigmoid", cv=folds, ensemble=False)
            from joblib import parallel_config

            fit_params = {}
            if self.calibrate and class_weights == "balanced":
                from sklearn.utils.class_weight import compute_sample_weight

                # the calibration weighs classes too, else its probabilities restore the training priors and
                # their argmax undoes the weighting (the SVMs themselves take class_weight, not these weights)
                fit_params["sample_weight"] = compute_sample_weight("balanced", y)
                warnings.filterwarnings("ignore", message=".*sample weights will only be used for the calibration")
            with parallel_config(backend="threading", n_jobs=max(1, workers)):  # libsvm releases the GIL
                model.fit(x, y, **fit_params)
        self.estimator_ = model
        chosen = {k: (_scaling_label(v) if k == "scale" else float(f"{v:.4g}") if isinstance(v, float) else v)
                  for k, v in best.items()}
        out = {"chosen": chosen, "cv": how, "cv_uar": float(score), "grid_size": int(size),
               "features": int(x.shape[1]), "class_weights": class_weights}
        if blocks and len(blocks) > 1:
            out["blocks"] = {name: int(width) for name, width in blocks}
        return out

    def predict_proba(self, x):
        if self.estimator_ is None:
            raise SertkError(f"model '{self.name}' is not fitted", "train the run first (sertk train)")
        p = self.estimator_.predict_proba(np.asarray(x, dtype=np.float32))
        out = np.zeros((len(x), len(EMOTIONS)), dtype=np.float32)
        out[:, np.asarray(self.estimator_.classes_, dtype=np.int64)] = p
        return out

    def save(self, path: Path, run_id: str) -> None:
        import skops.io as sio

        from ser_toolkit.atomic import atomic_path

        with atomic_path(path) as tmp:
            sio.dump({"run_id": run_id, "model": self.name, "estimator": self.estimator_}, tmp)

    def load(self, path: Path, run_id: str) -> None:
        import skops.io as sio

        try:
            named = skops_names(path)
            foreign = sorted(named - SKOPS_TYPES)
            untrusted = sio.get_untrusted_types(file=path)
            foreign += sorted(set(untrusted) - SKOPS_TYPES - set(foreign))
            if foreign:
                raise SertkError(f"classifier {path} holds types sertk does not load ({', '.join(foreign[:3])}"
                                 f"{f' and {len(foreign) - 3} more' if len(foreign) > 3 else ''}): it was not "
                                 "written by sertk and could run code, so it is not loaded", "retrain the run")
            state = sio.load(path, trusted=untrusted)
        except SertkError:
            raise
        except Exception as exc:  # corrupt or foreign file: one line, no traceback
            raise SertkError(f"classifier {path} cannot be read ({type(exc).__name__})", "retrain the run") \
                from None
        if not isinstance(state, dict) or state.get("run_id") != run_id:
            raise SertkError(f"classifier {path} belongs to another run", "copy no checkpoints between runs; "
                             "retrain this run")
        self.estimator_ = state["estimator"]


def skops_names(path: Path) -> set[str]:
    """Every ``module.name`` a skops file's schema names (types, functions, methods), read as JSON: nothing in
    the file is imported or built to find them."""
    import json
    import zipfile

    with zipfile.ZipFile(path) as archive:
        schema = json.loads(archive.read("schema.json"))
    names: set[str] = set()
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "__class__" in node or "__module__" in node:
                names.add(f"{node.get('__module__')}.{node.get('__class__')}")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return names


class LinearSVM(SklearnClassifier):
    name = "svm"
    description = "linear SVM over a featurizer (C and scaling by speaker-grouped CV; calibrated probabilities)"
    params = (FEATURES,)
    calibrate = True

    def estimator(self, seed):
        from sklearn.metrics.pairwise import linear_kernel
        from sklearn.svm import SVC

        # the linear kernel as a callable: libsvm then solves on a Gram matrix computed with BLAS, 3x faster to
        # fit and 4x faster to predict than kernel="linear" on 1,600 x 400 features (the same model up to the
        # solver's tolerance); the fitted SVC keeps its training vectors (~5 MB)
        return SVC(kernel=linear_kernel, random_state=seed)

    def grid(self, norm):
        return {"clf__C": [c / norm for c in (0.1, 1.0, 10.0)]}


class RbfSVM(SklearnClassifier):
    name = "rbf-svm"
    description = "RBF-kernel SVM over a featurizer (C, gamma and scaling by speaker-grouped CV; calibrated)"
    params = (FEATURES,)
    calibrate = True

    def estimator(self, seed):
        from sklearn.svm import SVC

        return SVC(kernel="rbf", random_state=seed)

    def grid(self, norm):
        return {"clf__C": [1.0, 10.0, 100.0], "clf__gamma": [0.1 / norm, 1.0 / norm]}


class LogReg(SklearnClassifier):
    name = "logreg"
    description = "multinomial logistic regression over a featurizer (C and scaling by speaker-grouped CV)"
    params = (FEATURES,)

    def estimator(self, seed):
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(max_iter=2000, random_state=seed)

    def grid(self, norm):
        return {"clf__C": [c / norm for c in (0.1, 1.0, 10.0, 100.0)]}


class MLP(SklearnClassifier):
    name = "mlp"
    description = "scikit-learn MLP (one hidden layer) over a featurizer (alpha and scaling by speaker-grouped CV)"
    params = (FEATURES, Param("hidden", 128, "hidden units", type="int", min=1, max=4096))

    def estimator(self, seed):
        from sklearn.neural_network import MLPClassifier

        return MLPClassifier(hidden_layer_sizes=(self.options["hidden"],), early_stopping=False, max_iter=300,
                             random_state=seed)

    def grid(self, norm):
        return {"clf__alpha": [1e-3, 1e-1, 1.0]}


@hookimpl
def register_models(registry) -> None:
    for cls in (LinearSVM, RbfSVM, LogReg, MLP):
        registry.register(cls)
