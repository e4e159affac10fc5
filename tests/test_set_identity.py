"""Held-out sets are named by what they hold, never by their file name: two sets never share a result file."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import one_line_error, run_sertk, synthetic_caches

pytest.importorskip("torch")

FAST = ["--model", "tiny", "--model-set", "hidden_size=16", "--epochs", "1", "--batch-size", "8",
        "--workers", "0", "--split", "speaker:test=0.25", "-q"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A run trained on synthetic with cross set A/synthetic-shifted.h5, and B/synthetic-shifted.h5: the same
    file name, other data (more utterances per emotion)."""
    root = tmp_path_factory.mktemp("sets")
    caches = synthetic_caches(root / "A")
    other = root / "B"
    assert run_sertk("cache", "synthetic-shifted", "--set", "per_emotion=2", "--cache-dir", other, "-q").code == 0
    run = root / "run"
    r = run_sertk("train", "--cache-dir", caches, "--cross", caches / "synthetic-shifted.h5", "--out", run, *FAST)
    assert r.code == 0, r.err
    assert run_sertk("evaluate", run).code == 0
    return root, caches / "synthetic-shifted.h5", other / "synthetic-shifted.h5", run


def _digests(run):
    return {p.name: p.read_bytes() for p in (run / "eval").iterdir()}


def test_two_caches_of_one_file_name_are_refused_when_training(world, tmp_path):
    root, a, b, _ = world
    r = run_sertk("train", "--cache-dir", root / "A", "--cross", a, "--cross", b, "--out", tmp_path / "r", *FAST)
    one_line_error(r, "two test sets are both named cross-synthetic-shifted but hold other data", "--name")
    assert not (tmp_path / "r").exists()
    r = run_sertk("train", "--cache-dir", root / "A", "--cross", a, "--cross", a, "--out", tmp_path / "r", *FAST)
    one_line_error(r, "test set cross-synthetic-shifted is given twice")


def test_evaluate_never_merges_or_overwrites_sets_of_one_name(world):
    root, a, b, run = world
    before = _digests(run)
    declared = json.loads((run / "eval" / "cross-synthetic-shifted.json").read_text())["data"]["digest"]
    # two sets of one file name in one call: refused, nothing written
    one_line_error(run_sertk("evaluate", run, "--test", a, "--test", b), "both named cross-synthetic-shifted")
    # a copy under another file name is the same set: given twice
    copy = shutil.copy(a, root / "x-loudest.h5")
    one_line_error(run_sertk("evaluate", run, "--test", a, "--test", copy), "is given twice")
    # another set of the declared set's name never replaces its results
    one_line_error(run_sertk("evaluate", run, "--test", b), f"holds the results of another set named "
                   f"cross-synthetic-shifted (data {declared[:12]})", "sertk cache DATASET --name")
    assert _digests(run) == before
    # the renamed copy keeps its name (identity, not file stem): its results are the declared set's
    assert run_sertk("evaluate", run, "--test", copy).code == 0
    assert not (run / "eval" / "cross-x-loudest.json").exists()
    assert json.loads((run / "eval" / "cross-synthetic-shifted.json").read_text())["data"]["digest"] == declared
    # built under a name of its own, the other set gets its own result file
    r = run_sertk("cache", "synthetic-shifted", "--set", "per_emotion=2", "--cache-dir", root / "B",
                  "--name", "shifted-2", "-q")
    assert r.code == 0, r.err
    assert run_sertk("evaluate", run, "--test", root / "B" / "shifted-2.h5").code == 0
    assert json.loads((run / "eval" / "cross-shifted-2.json").read_text())["data"]["digest"] != declared


def test_study_cross_entries_of_one_cache_name_need_names(tmp_path):
    cfg = tmp_path / "s.toml"
    cfg.write_text('[data]\noptions = { per_emotion = 2 }\ncross = [\n'
                   '  { dataset = "synthetic-shifted", options = { per_emotion = 1 } },\n'
                   '  { dataset = "synthetic-shifted", options = { per_emotion = 2 } },\n]\n')
    r = run_sertk("study", "--preset", "demo", "--config", cfg, cwd=tmp_path)
    one_line_error(r, "[data] cross[0] and [data] cross[1] would share the cache 'synthetic-shifted'",
                   'name = "synthetic-shifted-2"')
    assert not (tmp_path / "cache").exists()
    cfg.write_text(cfg.read_text().replace("per_emotion = 2 } },", 'per_emotion = 2 }, name = "shifted-2" },'))
    out = tmp_path / "resolved.toml"
    r = run_sertk("study", "--preset", "demo", "--config", cfg, "--save-config", out, cwd=tmp_path)
    assert r.code == 0, r.err
    assert 'name = "shifted-2"' in out.read_text()
