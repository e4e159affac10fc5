"""Train/test splits as part of an experiment.

A split is written as a spec string:

- ``stratified[:test=0.2,seed=42]``: stratified random split by emotion
  (the reference study's kind; every speaker ends up on both sides).
- ``speaker[:test=0.2,seed=42]``: speaker-independent; whole speakers are
  held out, balanced by gender where genders are known.
- ``kfold[:k=5,fold=0,seed=42]``: fold ``fold`` of a k-fold split by speaker
  (speakers dealt to folds by gender, then shuffled).
- ``file:PATH``: an ``utterance,split`` CSV (``train``/``test``/``valid``);
  ``../shared/data/ravdess/seed_split.csv`` reproduces the reference split.

Every function returns ``{utterance id: "train" | "test" | ...}`` and takes
its randomness from an explicit seed.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from ser_toolkit.datasets import Utterance
from ser_toolkit.errors import SplitError

KINDS = ("stratified", "speaker", "kfold", "file")
_DEFAULTS = {"stratified": {"test": 0.2, "seed": 42}, "speaker": {"test": 0.2, "seed": 42},
             "kfold": {"k": 5, "fold": 0, "seed": 42}}


def parse_spec(spec: str) -> tuple[str, dict[str, float | int | str]]:
    """``"speaker:test=0.25,seed=1"`` -> ``("speaker", {"test": 0.25, "seed": 1})``."""
    kind, _, rest = spec.partition(":")
    kind = kind.strip()
    if kind not in KINDS:
        raise SplitError(f"unknown split kind {kind!r}", f"use one of {', '.join(KINDS)} (e.g. speaker:test=0.2)")
    if kind == "file":
        if not rest:
            raise SplitError("split 'file' needs a path", "write file:PATH/TO/split.csv")
        return kind, {"path": rest}
    opts: dict[str, float | int | str] = dict(_DEFAULTS[kind])
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in opts:
            raise SplitError(f"bad split option {item!r} for {kind}",
                             f"options: {', '.join(f'{k}=' for k in opts)}")
        try:
            opts[key] = float(value) if key == "test" else int(value)
        except ValueError:
            raise SplitError(f"split option {key} must be a number (got {value!r})", "fix the value") from None
    if kind in ("stratified", "speaker") and not 0 < float(opts["test"]) < 1:
        raise SplitError(f"split test fraction must be between 0 and 1 (got {opts['test']})", "e.g. test=0.2")
    if kind == "kfold" and not (int(opts["k"]) >= 2 and 0 <= int(opts["fold"]) < int(opts["k"])):
        raise SplitError(f"kfold needs k >= 2 and 0 <= fold < k (got k={opts['k']}, fold={opts['fold']})",
                         "e.g. kfold:k=5,fold=0")
    return kind, opts


def stratified(utts: Sequence[Utterance], test: float = 0.2, seed: int = 42) -> dict[str, str]:
    """Stratified random split by emotion (scikit-learn's ``train_test_split``)."""
    from sklearn.model_selection import train_test_split

    ids = [u.id for u in utts]
    try:
        _, test_ids = train_test_split(ids, test_size=test, random_state=seed, stratify=[u.emotion for u in utts])
    except ValueError as exc:
        raise SplitError(f"cannot stratify this corpus: {exc}", "use more utterances or another split") from None
    test_set = set(test_ids)
    return {i: "test" if i in test_set else "train" for i in ids}


def _speakers_by_gender(utts: Sequence[Utterance], rng: np.random.Generator) -> list[list[str]]:
    groups: dict[str, set[str]] = defaultdict(set)
    for u in utts:
        groups[u.gender or "unknown"].add(u.speaker)
    out = []
    for g in sorted(groups):
        spk = sorted(groups[g])
        rng.shuffle(spk)
        out.append(spk)
    return out


def speaker_independent(utts: Sequence[Utterance], test: float = 0.2, seed: int = 42) -> dict[str, str]:
    """Hold out whole speakers (about ``test`` of them), the same share of each gender."""
    rng = np.random.default_rng(seed)
    held: set[str] = set()
    for spk in _speakers_by_gender(utts, rng):
        n = max(1, int(round(test * len(spk)))) if len(spk) > 1 else 0
        held.update(spk[:n])
    if not held:
        raise SplitError("a speaker-independent split needs at least two speakers", "use a stratified split")
    return {u.id: "test" if u.speaker in held else "train" for u in utts}


def kfold(utts: Sequence[Utterance], k: int = 5, fold: int = 0, seed: int = 42) -> dict[str, str]:
    """Fold ``fold`` of ``k`` speaker folds; speakers dealt round-robin within each gender."""
    rng = np.random.default_rng(seed)
    speakers = [s for group in _speakers_by_gender(utts, rng) for s in group]
    if len(speakers) < k:
        raise SplitError(f"kfold with k={k} needs at least {k} speakers (found {len(speakers)})", "lower k")
    fold_of = {s: i % k for i, s in enumerate(speakers)}
    return {u.id: "test" if fold_of[u.speaker] == fold else "train" for u in utts}


def from_file(utts: Sequence[Utterance], path: str | Path) -> dict[str, str]:
    """Read an ``utterance,split`` CSV; every utterance must be listed."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SplitError(f"split file {path} does not exist", "check the path after file:")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"utterance", "split"} <= set(reader.fieldnames):
            raise SplitError(f"{path} needs the columns utterance,split", "write a header 'utterance,split'")
        table = {row["utterance"].strip(): row["split"].strip() for row in reader}
    missing = [u.id for u in utts if u.id not in table]
    if missing:
        raise SplitError(f"{path} does not list {len(missing)} utterances (e.g. {missing[0]!r})",
                         "use a split file made for this corpus")
    return {u.id: table[u.id] for u in utts}


def make_split(utts: Sequence[Utterance], spec: str) -> dict[str, str]:
    """Apply a split spec (see the module doc) to utterances."""
    kind, opts = parse_spec(spec)
    if kind == "file":
        return from_file(utts, str(opts["path"]))
    if kind == "stratified":
        return stratified(utts, float(opts["test"]), int(opts["seed"]))
    if kind == "speaker":
        return speaker_independent(utts, float(opts["test"]), int(opts["seed"]))
    return kfold(utts, int(opts["k"]), int(opts["fold"]), int(opts["seed"]))
