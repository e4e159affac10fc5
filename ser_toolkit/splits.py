"""Train/test splits as part of an experiment.

A split is written as a spec string:

- ``stratified[:test=0.2,seed=42]``: stratified random split by emotion
  (the reference study's kind; every speaker ends up on both sides).
- ``speaker[:test=0.2,seed=42]``: speaker-independent; whole speakers are
  held out, balanced by gender where genders are known.
- ``kfold[:k=5,fold=0,seed=42,order=shuffled]``: fold ``fold`` (test) of a
  k-fold split by speaker, ``0 <= fold < k``, ``2 <= k <= speakers``.
  ``order=shuffled`` (default): speakers shuffled by ``seed`` within each
  gender and dealt to the folds round-robin. ``order=sorted``: speakers in
  natural order of their ids (``Actor_2`` before ``Actor_10``) cut into ``k``
  consecutive groups, as equal as possible (the first ``speakers % k`` groups
  get one more); ``seed`` is unused. On RAVDESS ``kfold:k=6,order=sorted``
  gives actors 1-4, 5-8, ..., 21-24 (the EmoBox folds).
- ``loso[:fold=0]``: leave one speaker out; speakers in natural order of
  their ids, fold ``i`` holds out speaker ``i`` (``0 <= fold < speakers``).
- ``file:PATH``: an ``utterance,split`` CSV (``train``/``test``/``valid``);
  ``../shared/data/ravdess/seed_split.csv`` reproduces the reference split.

Every function returns ``{utterance id: "train" | "test" | ...}`` and takes
its randomness from an explicit seed. ``fold_specs(spec, utts)`` expands a
``kfold``/``loso`` spec into the specs of all its folds (any other spec into
itself, e.g. for a study's ``folds = "all"``); ``fold_count`` counts them.
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ser_toolkit.datasets import Utterance
from ser_toolkit.errors import SplitError

KINDS = ("stratified", "speaker", "kfold", "loso", "file")
ORDERS = ("shuffled", "sorted")
_DEFAULTS: dict[str, dict[str, float | int | str]] = {
    "stratified": {"test": 0.2, "seed": 42}, "speaker": {"test": 0.2, "seed": 42},
    "kfold": {"k": 5, "fold": 0, "seed": 42, "order": "shuffled"}, "loso": {"fold": 0}}


def natural_key(text: str) -> tuple:
    """Sort key for ids with numbers in them: ``"2" < "10"``, ``"Actor_2" < "Actor_10"``."""
    parts = tuple((0, int(t), "") if t.isdigit() else (1, 0, t.casefold())
                  for t in re.findall(r"[0-9]+|[^0-9]+", text))
    return parts, text


def _sorted_speakers(utts: Sequence[Utterance]) -> list[str]:
    return sorted({u.speaker for u in utts}, key=natural_key)


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
        if key == "order":
            opts[key] = value.strip()
            continue
        try:
            opts[key] = float(value) if key == "test" else int(value)
        except ValueError:
            kind_of = "a number" if key == "test" else "an int"
            raise SplitError(f"split option {key} must be {kind_of} (got {value!r})",
                             f"write e.g. {kind}:{key}={_DEFAULTS[kind][key]}") from None
    if kind in ("stratified", "speaker") and not 0 < float(opts["test"]) < 1:
        raise SplitError(f"split test fraction must be between 0 and 1 (got {opts['test']})", "e.g. test=0.2")
    if kind == "kfold":
        k, fold = int(opts["k"]), int(opts["fold"])
        if k < 2:
            raise SplitError(f"kfold k={k} is too small (allowed: 2 <= k <= number of speakers)", "e.g. kfold:k=5")
        if not 0 <= fold < k:
            raise SplitError(f"kfold fold={fold} is out of range for k={k} (allowed: 0..{k - 1})",
                             f"e.g. kfold:k={k},fold=0")
        if opts["order"] not in ORDERS:
            raise SplitError(f"unknown kfold order {opts['order']!r} (allowed: {', '.join(ORDERS)})",
                             "write order=shuffled or order=sorted")
    if kind == "loso" and int(opts["fold"]) < 0:
        raise SplitError(f"loso fold={opts['fold']} is out of range (allowed: 0 <= fold < number of speakers)",
                         "e.g. loso:fold=0")
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


def _check_k(k: int, n_speakers: int) -> None:
    if not 2 <= k <= n_speakers:
        raise SplitError(f"kfold k={k} is out of range for {n_speakers} speakers "
                         f"(allowed: 2 <= k <= {n_speakers})",
                         "lower k" if n_speakers >= 2 else "use a corpus with at least two speakers")


def kfold(utts: Sequence[Utterance], k: int = 5, fold: int = 0, seed: int = 42,
          order: str = "shuffled") -> dict[str, str]:
    """Fold ``fold`` of ``k`` speaker folds.

    ``order="shuffled"``: speakers shuffled by ``seed`` within each gender and
    dealt round-robin. ``order="sorted"``: speakers in natural id order cut
    into ``k`` consecutive groups (the first ``n % k`` one larger); no seed.
    """
    if order not in ORDERS:
        raise SplitError(f"unknown kfold order {order!r} (allowed: {', '.join(ORDERS)})",
                         "write order=shuffled or order=sorted")
    if order == "shuffled":
        rng = np.random.default_rng(seed)
        speakers = [s for group in _speakers_by_gender(utts, rng) for s in group]
        _check_k(k, len(speakers))
        fold_of = {s: i % k for i, s in enumerate(speakers)}
    else:
        speakers = _sorted_speakers(utts)
        _check_k(k, len(speakers))
        size, extra = divmod(len(speakers), k)
        fold_of, start = {}, 0
        for i in range(k):
            stop = start + size + (1 if i < extra else 0)
            fold_of.update((s, i) for s in speakers[start:stop])
            start = stop
    if not 0 <= fold < k:
        raise SplitError(f"kfold fold={fold} is out of range for k={k} (allowed: 0..{k - 1})",
                         f"e.g. kfold:k={k},fold=0")
    return {u.id: "test" if fold_of[u.speaker] == fold else "train" for u in utts}


def loso(utts: Sequence[Utterance], fold: int = 0) -> dict[str, str]:
    """Leave one speaker out: speakers in natural id order, fold ``i`` holds out speaker ``i``."""
    speakers = _sorted_speakers(utts)
    if len(speakers) < 2:
        raise SplitError(f"loso needs at least two speakers (found {len(speakers)})", "use a stratified split")
    if not 0 <= fold < len(speakers):
        raise SplitError(f"loso fold={fold} is out of range for {len(speakers)} speakers "
                         f"(allowed: 0..{len(speakers) - 1})", "e.g. loso:fold=0")
    held = speakers[fold]
    return {u.id: "test" if u.speaker == held else "train" for u in utts}


def from_file(utts: Sequence[Utterance], path: str | Path) -> dict[str, str]:
    """Read an ``utterance,split`` CSV; every utterance must be listed."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_file():
        what = "a folder" if path.is_dir() else "not a regular file (a FIFO or a device)"
        raise SplitError(f"split file {path} is {what}", "pass an utterance,split CSV file after file:")
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
    if kind == "loso":
        return loso(utts, int(opts["fold"]))
    return kfold(utts, int(opts["k"]), int(opts["fold"]), int(opts["seed"]), str(opts["order"]))


def fold_count(spec: str, utts: Sequence[Utterance]) -> int:
    """How many folds ``spec`` has on ``utts``: ``k`` for kfold, the speakers for loso, else 1."""
    kind, opts = parse_spec(spec)
    if kind == "kfold":
        k = int(opts["k"])
        _check_k(k, len({u.speaker for u in utts}))
        return k
    if kind == "loso":
        n = len({u.speaker for u in utts})
        if n < 2:
            raise SplitError(f"loso needs at least two speakers (found {n})", "use a stratified split")
        return n
    return 1


def fold_specs(spec: str, utts: Sequence[Utterance]) -> list[str]:
    """The specs of all folds of ``spec`` (e.g. for a study's ``folds = "all"``).

    ``kfold:k=6,order=sorted`` -> ``["kfold:k=6,fold=0,order=sorted", ..., "...fold=5..."]``
    (the other options kept as written, ``fold`` set or replaced after ``k``);
    ``loso`` -> one spec per speaker; any other spec -> ``[spec]``.
    """
    kind, _ = parse_spec(spec)
    n = fold_count(spec, utts)
    if kind not in ("kfold", "loso"):
        return [spec]
    items = [x.strip() for x in spec.partition(":")[2].split(",") if x.strip()]
    at = next((i for i, x in enumerate(items) if x.partition("=")[0] == "fold"), None)
    if at is None:
        at = next((i + 1 for i, x in enumerate(items) if x.partition("=")[0] == "k"), 0)
    items = [x for x in items if x.partition("=")[0] != "fold"]
    items.insert(at, "")
    out = []
    for f in range(n):
        items[at] = f"fold={f}"
        out.append(f"{kind}:{','.join(items)}")
    return out


def overlap(utts: Sequence[Utterance], assignment: Mapping[str, str]) -> dict[str, Any]:
    """How far the test part is kept apart from training: test speakers (and their utterances) also in the
    train and the validation parts, and the validation part's real share of the training data (the requested
    one is rounded to whole speakers when validation is carved speaker-disjoint). Unknown speakers are counted
    as unknown, never as seen."""
    parts: dict[str, list[Utterance]] = {"train": [], "valid": [], "test": []}
    for u in utts:
        if assignment.get(u.id) in parts:
            parts[assignment[u.id]].append(u)
    known = {p: {u.speaker for u in us if u.speaker} for p, us in parts.items()}
    test = parts["test"]
    out: dict[str, Any] = {"test_utterances": len(test), "test_speakers": len(known["test"]),
                           "unknown_speaker_utterances": sum(1 for u in test if not u.speaker)}
    for part in ("train", "valid"):
        seen = known["test"] & known[part]
        out[f"test_speakers_in_{part}"] = len(seen)
        out[f"test_utterances_of_speakers_in_{part}"] = sum(1 for u in test if u.speaker in seen)
    fit = len(parts["train"]) + len(parts["valid"])
    out["valid_share"] = len(parts["valid"]) / fit if fit else 0.0
    out["valid_speakers"] = len(known["valid"])
    out["valid_speakers_in_train"] = len(known["valid"] & known["train"])
    return out
