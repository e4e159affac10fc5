"""The user-error contract, command by command, over a matrix of bad inputs.

Every user error must print exactly one line on stderr (``Error: <problem>; <fix>``),
exit with status 2, show no traceback, and change no file: the whole temporary
tree (the shared fixtures and the case's own folder) is snapshotted before and
after each command (size, mtime, SHA-256 of every file, and every folder), and the
command's declared output must not appear when the command fails.

The fixtures are built once per module: a synthetic cache, a finished and
evaluated tiny run, a small WAV file and a valid manifest. Each case builds what
it damages (copies of the cache or the run) in its own folder before the snapshot,
and runs with that folder as its working directory, so default outputs
(``cache/``, ``runs/``, ``reports/``) land inside the snapshot too.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import run_sertk, write_audio

pytestmark = pytest.mark.slow  # ~75 subprocesses (a tiny training run among them): about 70 s on 2 cores

TIMEOUT = 120
TRAIN_ARGS = {"--model": "tiny", "--model-set": "hidden_size=16", "--epochs": "1", "--batch-size": "8",
              "--workers": "0", "--split": "speaker:test=0.25"}


# ----------------------------------------------------------------------------- fixtures


@dataclass
class World:
    base: Path  # everything below is snapshotted
    cache_dir: Path
    cache: Path  # a complete synthetic cache
    run: Path  # a finished, evaluated tiny run on it
    wav: Path  # a small WAV file
    corpus: Path  # folder with a.wav, b.wav and manifest.csv (valid)


def _check_ok(result, what: str) -> None:
    assert result.code == 0, f"fixture step {what} failed ({result.code}):\n{result.out}\n{result.err}"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    base = tmp_path_factory.mktemp("error_matrix")
    w = base / "world"
    w.mkdir()
    cache_dir = w / "cache"
    _check_ok(run_sertk("cache", "synthetic", "--set", "per_emotion=2", "--cache-dir", cache_dir, "-q",
                        cwd=w, timeout=TIMEOUT), "cache")
    run = w / "run"
    _check_ok(run_sertk("train", "--cache-dir", cache_dir, "--dataset", "synthetic", *_flat(TRAIN_ARGS),
                        "--out", run, "-q", cwd=w, timeout=300), "train")
    _check_ok(run_sertk("evaluate", run, cwd=w, timeout=TIMEOUT), "evaluate")
    assert (run / "final.json").is_file() and (run / "eval" / "test.json").is_file()
    wav = write_audio(w / "tone.wav")
    corpus = w / "corpus"
    write_audio(corpus / "a.wav", freq=200.0)
    write_audio(corpus / "b.wav", freq=300.0)
    (corpus / "manifest.csv").write_text("path,label,speaker\na.wav,angry,s1\nb.wav,happy,s2\n")
    return World(base, cache_dir, cache_dir / "synthetic.h5", run, wav, corpus)


def _flat(options: dict) -> list[str]:
    return [x for k, v in options.items() for x in (k, v)]


# ----------------------------------------------------------------------------- snapshot

_DIGESTS: dict[tuple, str] = {}


def _digest(p: Path, st: os.stat_result) -> str:
    key = (str(p), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def snapshot(root: Path) -> dict[str, tuple]:
    """Every folder and file below ``root``: files by size, mtime and SHA-256."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = ("folder",)
        for f in filenames:
            p = Path(dirpath) / f
            st = p.lstat()
            rel = os.path.relpath(p, root)
            out[rel] = ("link", os.readlink(p)) if p.is_symlink() else (st.st_size, st.st_mtime_ns, _digest(p, st))
    return out


def diff(before: dict[str, tuple], after: dict[str, tuple]) -> list[str]:
    changes = [f"new: {k}" for k in sorted(after.keys() - before.keys())]
    changes += [f"removed: {k}" for k in sorted(before.keys() - after.keys())]
    changes += [f"changed: {k}" for k in sorted(before.keys() & after.keys()) if before[k] != after[k]]
    return changes


# ----------------------------------------------------------------------------- damaged inputs (built per case)


def text_h5(d: Path) -> Path:
    p = d / "x.h5"
    p.write_text("this is a text file, not HDF5\n")
    return p


def foreign_h5(d: Path) -> Path:
    import h5py
    import numpy as np

    p = d / "foreign.h5"
    with h5py.File(p, "w") as fh:
        fh.create_dataset("audio", data=np.zeros(16, np.float32))
    return p


def cache_copy(w: World, d: Path, name: str = "copy.h5") -> Path:
    p = d / name
    shutil.copyfile(w.cache, p)
    return p


def offset_corrupt(w: World, d: Path) -> Path:
    import h5py

    p = cache_copy(w, d, "offsets.h5")
    with h5py.File(p, "r+") as fh:
        fh["utterances/offset"][3] = fh["utterances/offset"][3] + 10
    return p


def chunk_damaged(w: World, d: Path) -> Path:
    """A copy with flipped bytes inside the first utterance's audio (fails its CRC-32)."""
    import h5py

    p = cache_copy(w, d, "damaged.h5")
    with h5py.File(p, "r") as fh:
        start = fh["audio"].id.get_offset() + 4 * int(fh["utterances/length"][0]) // 2
    with open(p, "r+b") as fh:
        fh.seek(start)
        block = fh.read(64)
        fh.seek(start)
        fh.write(bytes(b ^ 0xFF for b in block))
    return p


def run_copy(w: World, d: Path, name: str = "run") -> Path:
    p = d / name
    shutil.copytree(w.run, p)
    return p


def not_a_run(d: Path) -> Path:
    p = d / "notrun"
    p.mkdir()
    (p / "notes.txt").write_text("not a run\n")
    return p


def empty_config_run(w: World, d: Path) -> Path:
    p = run_copy(w, d)
    (p / "config.json").write_text("{}")
    return p


def unfinished_run(w: World, d: Path) -> Path:
    p = run_copy(w, d)
    (p / "final.json").unlink()
    return p


def other_weights_run(w: World, d: Path) -> Path:
    """best.safetensors replaced by weights of the same architecture from another run."""
    from safetensors.torch import load_file, save_file

    p = run_copy(w, d)
    best = p / "checkpoints" / "best.safetensors"
    tensors = load_file(str(best))
    save_file({k: v + 0.5 for k, v in tensors.items()}, str(best), metadata={"run_id": uuid.uuid4().hex})
    return p


def corrupt_weights_run(w: World, d: Path) -> Path:
    p = run_copy(w, d)
    (p / "checkpoints" / "best.safetensors").write_bytes(b"\x00garbage" * 64)
    return p


def bad_eval_json_run(w: World, d: Path) -> Path:
    p = run_copy(w, d)
    (p / "eval" / "test.json").write_text("not json")
    return p


def bad_predictions_run(w: World, d: Path) -> Path:
    p = run_copy(w, d)
    (p / "eval" / "test.predictions.csv").write_text("utterance,true,predicted\nu1,sideways,angry\n")
    return p


def new_cache_dir(d: Path) -> Path:
    p = d / "cache"
    p.mkdir()
    return p


def study_config(d: Path, text: str) -> Path:
    p = d / "study.toml"
    p.write_text(text)
    return p


# ----------------------------------------------------------------------------- the matrix


@dataclass
class Call:
    args: list
    output: Path | None = None  # the command's declared output: must not appear on failure
    mention: tuple[str, ...] = ()  # what the one error line must name (case-insensitive)


def _with(call: Call, **changes) -> Call:
    for k, v in changes.items():
        setattr(call, k, v)
    return call


Case = Callable[[World, Path], Call]
CASES: dict[str, Case] = {}


def case(name: str):
    def register(fn: Case) -> Case:
        assert name not in CASES, name
        CASES[name] = fn
        return fn

    return register


# --- cache

case("cache-unknown-dataset")(lambda w, d: Call(["cache", "nope", "--cache-dir", new_cache_dir(d), "-q"]))
case("cache-missing-root")(lambda w, d: Call(["cache", "ravdess", "--cache-dir", new_cache_dir(d), "-q"]))


@case("cache-root-is-file")
def _(w, d):
    f = d / "file.txt"
    f.write_text("x\n")
    return Call(["cache", "ravdess", "--root", f, "--cache-dir", new_cache_dir(d), "-q"])


@case("cache-cache-dir-is-file")
def _(w, d):
    f = d / "cachefile"
    f.write_text("x\n")
    return Call(["cache", "synthetic", "--set", "per_emotion=2", "--cache-dir", f, "-q"])


@case("cache-corpus-escapes")
def _(w, d):
    c = new_cache_dir(d)  # d/cache/../../x.h5 is d/../x.h5: inside the snapshot
    return Call(["cache", "manifest", "--root", w.corpus / "manifest.csv", "--set", "corpus=../../x",
                 "--cache-dir", c, "-q"], output=d.parent / "x.h5", mention=("../../x",))


case("cache-corpus-hidden")(lambda w, d: Call(
    ["cache", "manifest", "--root", w.corpus / "manifest.csv", "--set", "corpus=.hidden",
     "--cache-dir", new_cache_dir(d), "-q"], output=d / "cache" / ".hidden.h5"))


@case("cache-manifest-latin1")
def _(w, d):
    m = d / "manifest.csv"
    m.write_bytes("path,label,speaker\n{a},angry,Jos\u00e9\n{b},happy,Ren\u00e9e\n".format(
        a=w.corpus / "a.wav", b=w.corpus / "b.wav").encode("latin-1"))
    return Call(["cache", "manifest", "--root", m, "--cache-dir", new_cache_dir(d), "-q"],
                output=d / "cache" / "manifest.h5", mention=("utf-8",))


@case("cache-manifest-ragged")
def _(w, d):
    m = d / "manifest.csv"
    m.write_text(f"path,label,speaker\n{w.corpus / 'a.wav'},angry,s1\n{w.corpus / 'b.wav'},happy,s2,extra\n")
    return Call(["cache", "manifest", "--root", m, "--cache-dir", new_cache_dir(d), "-q"],
                output=d / "cache" / "manifest.h5", mention=("manifest.csv:3",))


case("cache-mono-sideways")(lambda w, d: Call(
    ["cache", "synthetic", "--set", "per_emotion=2", "--cache-dir", new_cache_dir(d), "--mono", "sideways", "-q"],
    output=d / "cache" / "synthetic.h5", mention=("sideways",)))
case("cache-dtype-int8")(lambda w, d: Call(
    ["cache", "synthetic", "--set", "per_emotion=2", "--cache-dir", new_cache_dir(d), "--dtype", "int8", "-q"],
    output=d / "cache" / "synthetic.h5", mention=("int8",)))


@case("cache-name-holds-another-corpus")
def _(w, d):
    c = d / "cache"
    shutil.copytree(w.cache_dir, c)
    return Call(["cache", "manifest", "--root", w.corpus / "manifest.csv", "--set", "corpus=synthetic",
                 "--cache-dir", c, "-q"], mention=("another corpus",))


@case("cache-name-holds-another-corpus-copied-file")
def _(w, d):
    c = new_cache_dir(d)  # the cache file alone (copied from elsewhere): no lock file beside it yet
    shutil.copyfile(w.cache, c / "synthetic.h5")
    return Call(["cache", "manifest", "--root", w.corpus / "manifest.csv", "--set", "corpus=synthetic",
                 "--cache-dir", c, "-q"], mention=("another corpus",))


case("cache-verify-damaged")(lambda w, d: Call(["cache", chunk_damaged(w, d), "--verify"], mention=("damaged",)))
case("cache-verify-not-hdf5")(lambda w, d: Call(["cache", text_h5(d), "--verify"]))
case("cache-verify-with-build-options")(lambda w, d: Call(
    ["cache", w.cache, "--verify", "--force", "--root", w.corpus, "--name", "other"],
    mention=("--force", "--root", "--name", "builds nothing")))

# --- inspect / split / materialize over broken cache files


def _cache_cmd(cmd: str, cache, d: Path) -> Call:
    if cmd == "split":
        return Call(["split", cache, "-o", d / "split.csv"], output=d / "split.csv")
    if cmd == "materialize":
        return Call(["materialize", cache, "--plugins", "noise", "-q"])
    return Call([cmd, cache])


_BROKEN_CACHES: dict[str, Callable[[World, Path], Path]] = {
    "missing": lambda w, d: d / "missing.h5",
    "text-h5": lambda w, d: text_h5(d),
    "foreign-h5": lambda w, d: foreign_h5(d),
    "corrupt-offset": offset_corrupt,
}
for _cmd in ("inspect", "split", "materialize"):
    for _kind, _make in _BROKEN_CACHES.items():
        case(f"{_cmd}-{_kind}")(lambda w, d, c=_cmd, m=_make: _cache_cmd(c, m(w, d), d))

case("split-bad-spec")(lambda w, d: Call(["split", w.cache, "--split", "bogus:test=0.2", "-o", d / "split.csv"],
                                         output=d / "split.csv", mention=("bogus",)))
case("materialize-bad-spec")(lambda w, d: Call(
    ["materialize", cache_copy(w, d), "--plugins", "noise", "--split", "bogus:test=0.2", "-q"], mention=("bogus",)))
case("materialize-unknown-plugin")(lambda w, d: Call(
    ["materialize", cache_copy(w, d), "--plugins", "nope", "-q"], mention=("nope",)))
case("materialize-subset-sideways")(lambda w, d: Call(
    ["materialize", cache_copy(w, d), "--plugins", "noise", "--subset", "sideways", "-q"], mention=("sideways",)))

# --- augment

case("augment-unknown")(lambda w, d: Call(["augment", "nope", w.wav, d / "out.wav"], output=d / "out.wav",
                                          mention=("nope",)))
case("augment-missing-input")(lambda w, d: Call(["augment", "noise", d / "missing.wav", d / "out.wav"],
                                                output=d / "out.wav", mention=("missing.wav",)))
case("augment-unknown-extension")(lambda w, d: Call(["augment", "noise", w.wav, d / "out.xyz"],
                                                    output=d / "out.xyz", mention=(".xyz",)))


@case("augment-in-is-out")
def _(w, d):
    p = d / "in.wav"
    shutil.copyfile(w.wav, p)
    return Call(["augment", "noise", p, p])


case("augment-bad-set")(lambda w, d: Call(["augment", "noise", w.wav, d / "out.wav", "--set", "level=-1"],
                                          output=d / "out.wav", mention=("level",)))
case("augment-mono-sideways")(lambda w, d: Call(["augment", "noise", w.wav, d / "out.wav", "--mono", "sideways"],
                                                output=d / "out.wav", mention=("sideways",)))


# --- train


def _train(w: World, d: Path, **override: str) -> Call:
    opts = {"--cache-dir": str(w.cache_dir), "--dataset": "synthetic", **TRAIN_ARGS, "--out": str(d / "newrun"),
            **{"--" + k.replace("_", "-"): v for k, v in override.items()}}
    return Call(["train", *_flat(opts), "-q"], output=Path(opts["--out"]))


case("train-device-tpu")(lambda w, d: _with(_train(w, d, device="tpu"), mention=("tpu",)))
case("train-epochs-0")(lambda w, d: _with(_train(w, d, epochs="0"), mention=("--epochs",)))
case("train-lr-negative")(lambda w, d: _with(_train(w, d, lr="-1"), mention=("--lr",)))
case("train-lr-abc")(lambda w, d: _with(_train(w, d, lr="abc"), mention=("--lr",)))
case("train-unknown-plugin")(lambda w, d: _with(_train(w, d, plugins="nope"), mention=("nope",)))
case("train-missing-cache")(lambda w, d: _with(_train(w, d, dataset="nothere"), mention=("nothere",)))
case("train-damaged-cache-audio")(lambda w, d: _with(_train(w, d, dataset=str(chunk_damaged(w, d))),
                                                     mention=("damaged",)))
case("train-damaged-cache-table")(lambda w, d: _with(_train(w, d, dataset=str(offset_corrupt(w, d))),
                                                     mention=("damaged",)))


@case("train-out-finished-run")
def _(w, d):
    r = run_copy(w, d)
    return _with(_train(w, d, out=str(r)), output=None)


@case("train-resume-not-a-run")
def _(w, d):
    r = not_a_run(d)
    return Call(["train", "--out", r, "--resume", "-q"])


@case("train-resume-changed-epochs")
def _(w, d):
    r = run_copy(w, d)
    return Call(["train", "--out", r, "--resume", "--epochs", "5", "-q"], mention=("epochs", "5"))


# --- evaluate / predict / report over broken runs


def _run_cmd(cmd: str, w: World, d: Path, run: Path) -> Call:
    if cmd == "predict":
        return Call(["predict", run, w.wav])
    if cmd == "report":
        return Call(["report", run, "-o", d / "report.md"], output=d / "report.md")
    return Call(["evaluate", run])


_BROKEN_RUNS: dict[str, tuple[Callable[[World, Path], Path], tuple[str, ...]]] = {
    "not-a-run": (lambda w, d: not_a_run(d), ()),
    "empty-config": (empty_config_run, ("config.json",)),
    "unfinished": (unfinished_run, ("unfinished",)),
    "weights-of-another-run": (other_weights_run, ("best.safetensors",)),
    "weights-corrupt": (corrupt_weights_run, ("best.safetensors",)),
}
for _cmd in ("evaluate", "predict", "report"):
    for _kind, (_make, _mention) in _BROKEN_RUNS.items():
        case(f"{_cmd}-{_kind}")(lambda w, d, c=_cmd, m=_make, n=_mention: _with(_run_cmd(c, w, d, m(w, d)), mention=n))

case("report-bad-eval-json")(lambda w, d: _with(_run_cmd("report", w, d, bad_eval_json_run(w, d)),
                                                mention=("test.json",)))
case("report-bad-predictions-csv")(lambda w, d: _with(_run_cmd("report", w, d, bad_predictions_run(w, d)),
                                                      mention=("test.predictions.csv",)))
case("report-neither-study-nor-run")(lambda w, d: _run_cmd("report", w, d, not_a_run(d)))
case("predict-missing-audio")(lambda w, d: Call(["predict", w.run, d / "missing.wav"], mention=("missing.wav",)))


@case("predict-not-audio")
def _(w, d):
    p = d / "notes.wav"
    p.write_text("this is text, not audio\n" * 20)
    return Call(["predict", w.run, p], mention=("notes.wav",))


# --- study (run in the case folder: its cache/, runs/ and reports/ land in the snapshot)

_STUDY_OUT = Path("reports") / "demo.md"

case("study-preset-fancy")(lambda w, d: Call(["study", "--preset", "fancy"], output=d / _STUDY_OUT,
                                             mention=("fancy",)))
case("study-epochs-string")(lambda w, d: Call(
    ["study", "--preset", "demo", "--config", study_config(d, '[training]\nepochs = "ten"\n')],
    output=d / _STUDY_OUT, mention=("epochs",)))
case("study-split-int")(lambda w, d: Call(
    ["study", "--preset", "demo", "--config", study_config(d, "[data]\nsplit = 42\n")],
    output=d / _STUDY_OUT, mention=("split",)))
case("study-typo-key")(lambda w, d: Call(
    ["study", "--preset", "demo", "--config", study_config(d, '[data]\nsplt = "x"\n')],
    output=d / _STUDY_OUT, mention=("'splt'", "'split'")))
case("study-dataset-needs-root")(lambda w, d: Call(
    ["study", "--preset", "demo", "--config", study_config(d, '[data]\ndataset = "ravdess"\n')],
    output=d / _STUDY_OUT, mention=("root",)))
case("study-config-not-toml")(lambda w, d: Call(
    ["study", "--config", study_config(d, "this: is [not toml\n  - at all\n")], output=d / _STUDY_OUT))
case("study-seeds-0")(lambda w, d: Call(["study", "--preset", "demo", "--seeds", "0"], output=d / _STUDY_OUT,
                                        mention=("seeds",)))


# ----------------------------------------------------------------------------- the test


@pytest.mark.parametrize("case_id", list(CASES))
def test_user_error_contract(world: World, case_id: str) -> None:
    d = world.base / "cases" / case_id
    d.mkdir(parents=True)
    call = CASES[case_id](world, d)
    args = [str(a) for a in call.args]
    output_existed = call.output is not None and call.output.exists()
    before = snapshot(world.base)
    r = run_sertk(*args, cwd=d, timeout=TIMEOUT)
    after = snapshot(world.base)

    problems = []
    if r.code != 2:
        problems.append(f"exit status {r.code}, expected 2")
    lines = r.err.splitlines()
    if len(lines) != 1 or not lines[0].strip():
        problems.append(f"stderr has {len(lines)} lines, expected exactly one")
    elif not (lines[0].startswith("Error: ") and "; " in lines[0]):
        problems.append("stderr line is not 'Error: <problem>; <fix>'")
    if "Traceback" in r.out + r.err:
        problems.append("a traceback is shown")
    missing = [m for m in call.mention if lines and m.lower() not in lines[0].lower()]
    if missing:
        problems.append(f"the error line does not name {missing}")
    changes = diff(before, after)
    if changes:
        problems.append("files changed: " + ", ".join(changes[:12]) + (" ..." if len(changes) > 12 else ""))
    if call.output is not None and not output_existed and call.output.exists():
        problems.append(f"declared output {call.output} was created")
    assert not problems, (f"sertk {' '.join(args)}\n  " + "\n  ".join(problems)
                          + f"\n--- stdout ---\n{r.out[-3000:]}\n--- stderr ---\n{r.err[-3000:]}")
