"""Plugin boundaries and one-line user errors: broken augmentations, manifests, loader workers."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from helpers import run_sertk, write_audio
from helpers import synthetic_cache as cache_synthetic
from ser_toolkit.augmentations import AugmentContext, Augmentation, Weighted
from ser_toolkit.errors import CacheError, PluginError, SertkError
from ser_toolkit.testing import check_augmentation, speechlike

HINT = "report it to the plugin's author or leave it out of --plugins"

# an augmentation that breaks the contract in the way its option 'kind' says (also installed as a plugin)
BROKEN_CODE = '''
import numpy as np

from ser_toolkit import hookimpl
from ser_toolkit.augmentations import Augmentation
from ser_toolkit.errors import SertkError
from ser_toolkit.params import Param

KINDS = ("int16", "2d", "empty", "nan", "peak", "params", "inplace", "unlock", "raises", "single", "sertk")


class Broken(Augmentation):
    name = "broken"
    description = "an augmentation that breaks the contract in a chosen way"
    params = (Param("kind", "int16", "how it breaks", choices=KINDS),)

    def apply(self, wave, rng, context=None):
        kind = self.options["kind"]
        out = wave.copy()
        if kind == "int16":
            return (out * 32767).astype(np.int16), {}
        if kind == "2d":
            return np.stack([out, out]), {}
        if kind == "empty":
            return out[:0], {}
        if kind == "nan":
            out[0] = np.nan
        if kind == "peak":
            out[0] = 1000.0
        if kind == "params":
            return out, {"mask": np.arange(3)}
        if kind == "inplace":
            wave *= 2
        if kind == "unlock":
            wave.flags.writeable = True
            wave[0] = 0.5
        if kind == "raises":
            raise ValueError("boom\\nsecond line")
        if kind == "single":
            return out
        if kind == "sertk":
            raise SertkError("the broken plugin needs libfoo", "install libfoo")
        return out, {"kind": kind}


@hookimpl
def register_augmentations(registry):
    registry.register(Broken)
'''
namespace: dict = {}
exec(compile(BROKEN_CODE, "sertk_broken_aug", "exec"), namespace)
Broken = namespace["Broken"]

EXPECTED = {  # what the error says for each kind
    "int16": "returned int16 audio, not float32",
    "2d": "returned audio of shape (2, 8000), not 1-D",
    "empty": "returned empty audio",
    "nan": "returned NaN or inf samples",
    "peak": "returned samples up to |x| = 1000",
    "params": "returned params that are not JSON-serialisable",
    "inplace": "modified its input in place",
    "unlock": "modified its input in place",
    "raises": "failed: ValueError: boom second line",
    "single": "returned ndarray, not a (wave, params) pair",
}


def context() -> AugmentContext:
    return AugmentContext(utterance_id="spk1/utt7", emotion="happy")


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_broken_output_is_a_plugin_error_naming_plugin_and_utterance(kind):
    wave = speechlike(0.5)
    before = wave.copy()
    with pytest.raises(PluginError) as info:
        Broken(kind=kind)(wave, np.random.default_rng(0), context())
    text = str(info.value)
    assert text.startswith("augmentation 'broken' (utterance spk1/utt7) ") and EXPECTED[kind] in text, text
    assert text.endswith(HINT) and "\n" not in text
    assert np.array_equal(wave, before)  # the caller's array is never written


def test_sertk_errors_from_apply_pass_unchanged():
    with pytest.raises(SertkError, match="^the broken plugin needs libfoo; install libfoo$") as info:
        Broken(kind="sertk")(speechlike(0.2), np.random.default_rng(0), context())
    assert not isinstance(info.value, PluginError)


def test_no_context_means_no_utterance_in_the_message():
    with pytest.raises(PluginError, match=r"^augmentation 'broken' returned empty audio; "):
        Broken(kind="empty")(speechlike(0.2), np.random.default_rng(0))


def test_weighted_names_the_broken_inner_method():
    class Fine(Augmentation):
        name = "fine"
        description = "identity"

        def apply(self, wave, rng, context=None):
            return wave.copy(), {"ok": True}

    combo = Weighted({"fine": Fine(), "broken": Broken(kind="peak")}, {"fine": 1.0, "broken": 0.0})
    out, params = combo(speechlike(0.2), np.random.default_rng(0), context())
    assert params == {"method": "fine", "ok": True} and out.dtype == np.float32 and out.flags.writeable
    combo = Weighted({"fine": Fine(), "broken": Broken(kind="peak")}, {"fine": 0.0, "broken": 1.0})
    with pytest.raises(PluginError, match=r"^augmentation 'broken' \(utterance spk1/utt7\) returned samples"):
        combo(speechlike(0.2), np.random.default_rng(0), context())


def test_returning_the_input_itself_gives_a_writable_copy():
    class Same(Augmentation):
        name = "same"
        description = "returns its input"

        def apply(self, wave, rng, context=None):
            return wave, {}

    wave = speechlike(0.2)
    out, _ = Same()(wave, np.random.default_rng(0))
    assert np.array_equal(out, wave) and out.flags.writeable and not np.shares_memory(out, wave)


def test_conformance_suite_rejects_int16_output_from_apply_itself():
    class Int16(Broken):
        name = "int16"
        description = "returns int16 audio"
        params = ()
        stochastic = False

        def __init__(self, **options):
            super().__init__(**options)
            self.options["kind"] = "int16"

    with pytest.raises(AssertionError, match="augmentation 'int16' .*returned int16 audio, not float32"):
        check_augmentation(Int16, long_seconds=0.5)


@pytest.mark.parametrize("kind", ["inplace", "params"])
def test_conformance_suite_uses_the_same_rules(kind):
    class Bad(Broken):
        params = ()

        def __init__(self, **options):
            super().__init__(**options)
            self.options["kind"] = kind

    with pytest.raises(AssertionError, match=EXPECTED[kind]):
        check_augmentation(Bad, long_seconds=0.5)


# --- through the CLI ---------------------------------------------------------------------------------


def make_plugin(site: Path) -> dict:
    """The broken augmentation as an installed entry-point plugin; the environment that loads it."""
    info = site / "sertk_broken-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sertk-broken\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[sertk]\nsertk_broken = sertk_broken\n")
    (site / "sertk_broken.py").write_text(textwrap.dedent(BROKEN_CODE))
    return {"PYTHONPATH": str(site), "SERTK_LOAD_PLUGINS": "sertk-broken"}


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory):
    return cache_synthetic(tmp_path_factory.mktemp("cache"), speakers=1, per_emotion=1)


def one_line_error(r) -> str:
    assert r.code == 2, r.err
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.err, r.err
    return lines[0]


@pytest.mark.parametrize("kind,workers", [("int16", "0"), ("sertk", "1")])
def test_sertk_train_with_a_broken_plugin_is_one_line(synthetic_cache, tmp_path, kind, workers):
    pytest.importorskip("torch")
    r = run_sertk("train", "--cache-dir", synthetic_cache, "--out", tmp_path / "run", "--model", "tiny",
                  "--model-set", "hidden_size=8", "--epochs", "1", "--batch-size", "4", "--workers", workers,
                  "--split", "stratified:test=0.5,seed=1", "--plugins", "broken", "--set", f"kind={kind}",
                  "-q", env=make_plugin(tmp_path / "site"))
    line = one_line_error(r)
    if kind == "sertk":
        assert line == "Error: the broken plugin needs libfoo; install libfoo"
    else:
        assert line.startswith("Error: augmentation 'broken' (utterance ") and EXPECTED[kind] in line
        assert line.endswith(HINT)


# --- manifests -----------------------------------------------------------------------------------------


def test_latin1_manifest_is_one_line(tmp_path):
    write_audio(tmp_path / "a.wav", 0.1)
    manifest = tmp_path / "m.csv"
    manifest.write_bytes("path,label,speaker\na.wav,happy,s1\na.wav,sad,José\n".encode("latin-1"))
    r = run_sertk("cache", "manifest", "--root", manifest, "--cache-dir", tmp_path / "c", "-q")
    assert one_line_error(r) == f"Error: {manifest.resolve()}:3: not UTF-8 text (byte 0xe9); save it as UTF-8"


def test_latin1_jsonl_manifest_names_the_line(tmp_path):
    from ser_toolkit.plugins.manifest import Manifest

    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes('{"path": "a.wav", "label": "happy", "speaker": "Zoë"}\n'.encode("latin-1"))
    with pytest.raises(SertkError, match=r"m\.jsonl:1: not UTF-8 text \(byte 0xeb\); save it as UTF-8$"):
        Manifest().scan(manifest)


def test_ragged_manifest_is_one_line(tmp_path):
    write_audio(tmp_path / "a.wav", 0.1)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,speaker\na.wav,happy,s1\na.wav,sad,s1,extra\n")
    r = run_sertk("cache", "manifest", "--root", manifest, "--cache-dir", tmp_path / "c", "-q")
    line = one_line_error(r)
    assert line.startswith(f"Error: {manifest.resolve()}:3: 4 fields, but the header has 3; "), line


def test_short_row_names_line_and_counts(tmp_path):
    from ser_toolkit.plugins.manifest import Manifest

    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,speaker\n\na.wav,happy\n")
    with pytest.raises(SertkError, match=r"m\.csv:3: 2 fields, but the header has 3"):
        Manifest().scan(manifest)


def test_utf8_bom_manifest_works(tmp_path, cli):
    write_audio(tmp_path / "a.wav", 0.1)
    write_audio(tmp_path / "b.wav", 0.1)
    csv_file = tmp_path / "m.csv"
    csv_file.write_bytes("\ufeffpath,label,speaker\na.wav,happy,José\n".encode("utf-8"))
    r = cli("cache", "manifest", "--root", csv_file, "--cache-dir", tmp_path / "c", "-q")
    assert r.code == 0, r.err
    from ser_toolkit.plugins.manifest import Manifest

    jl = tmp_path / "m.jsonl"
    jl.write_bytes(("\ufeff" + json.dumps({"path": "b.wav", "label": "sad"}) + "\n").encode("utf-8"))
    assert [(u.id, u.emotion) for u in Manifest().scan(jl).utterances] == [("b", "sad")]
    assert [(u.id, u.speaker) for u in Manifest().scan(csv_file).utterances] == [("a", "José")]


# --- loader workers ------------------------------------------------------------------------------------


class FakeReader:
    """Just what TrainItems reads from a cache: ids, labels, lengths and waveforms."""

    def __init__(self, n: int) -> None:
        self.ids = [f"u{i}" for i in range(n)]
        self.labels = np.zeros(n, dtype=np.int64)
        self.lengths = np.full(n, 1600)
        self.path = Path("fake.h5")

    def wave(self, i: int) -> np.ndarray:
        return speechlike(0.1, seed=i)


def failing_featurize(wave: np.ndarray) -> np.ndarray:
    raise CacheError("cache fake.h5 was rewritten while training", "rebuild it and rerun")


def test_sertk_error_in_a_loader_worker_surfaces_as_the_original():
    torch = pytest.importorskip("torch")
    from ser_toolkit.training.data import Collate, TrainItems

    items = TrainItems([FakeReader(4)], [(0, i, -1) for i in range(4)], featurize=failing_featurize)
    loader = torch.utils.data.DataLoader(items, batch_size=2, collate_fn=Collate(), num_workers=1,
                                         multiprocessing_context="fork")
    with pytest.raises(CacheError) as info:
        for batch in loader:  # what the training loop does with each batch
            if isinstance(batch, SertkError):
                raise batch
    assert str(info.value) == "cache fake.h5 was rewritten while training; rebuild it and rerun"
    with pytest.raises(CacheError, match="^cache fake.h5 was rewritten"):  # in the main process: raised
        items[0]


def test_sertk_error_in_a_featurisation_worker_is_one_line():
    from ser_toolkit.training.data import _parallel

    def fn(x):
        if x == 50:
            raise CacheError("row 50 is unreadable", "rebuild the cache")
        return x

    with pytest.raises(CacheError) as info:
        _parallel(fn, list(range(64)), 2)
    assert str(info.value) == "row 50 is unreadable; rebuild the cache" and info.value.__cause__ is None
