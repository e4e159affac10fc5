"""Unclear messages made clear: each names the problem and a fix the printing command really has (one line,
exit 2); and inputs that were wrongly refused (a streaming WAV, symlinked actor folders) are accepted."""

from __future__ import annotations

import json
import os
import shlex
import struct
import textwrap
from pathlib import Path

import pytest

from helpers import one_line_error, run_sertk, seal_fake_run, synthetic_cache, write_audio


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return synthetic_cache(tmp_path_factory.mktemp("cache"), speakers=2, per_emotion=1)


def flat(text: str) -> str:
    """Console output with rich's line wrapping undone."""
    return " ".join(text.split())


def fake_run(folder: Path, **train) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"train": {"model": "tiny", "epochs": 1, **train}}))
    seal_fake_run(folder)
    return folder


# 1 -------------------------------------------------------------------------------------------------------------
def test_weights_from_a_missing_run_folder_says_it_does_not_exist(cli, tmp_path):
    r = cli("train", "--weights-from", tmp_path / "nonexistent", "--weights-from", tmp_path / "also-missing",
            "--dataset", "synthetic", "--cache-dir", tmp_path, "--model", "tiny", "--epochs", "1")
    line = one_line_error(r, f"--weights-from {tmp_path / 'nonexistent'}: the run folder does not exist",
                          "pass folders of finished 'sertk train' runs: the baseline first")
    assert "improves" not in line


# 2 -------------------------------------------------------------------------------------------------------------
def test_predict_on_a_folder_or_a_fifo_says_what_it_is(cli, tmp_path):
    run = fake_run(tmp_path / "run")
    (tmp_path / "recordings").mkdir()
    one_line_error(cli("predict", run, tmp_path / "recordings"), "recordings: is a folder, not an audio file",
                   f"pass the audio files in it (e.g. {tmp_path / 'recordings'}/*.wav)")
    fifo = tmp_path / "stream"
    os.mkfifo(fifo)
    r = run_sertk("predict", run, fifo, timeout=60)  # a FIFO is never opened: nothing blocks
    one_line_error(r, "stream: not a regular file but a FIFO (named pipe)",
                   "save the audio to a regular file and pass that file")
    assert "no such file" not in r.err


# 3 -------------------------------------------------------------------------------------------------------------
def test_a_typo_in_sertk_load_plugins_names_the_installed_plugins(tmp_path):
    info = tmp_path / "sertk_tones-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sertk-tones\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[sertk]\nsertk_tones = sertk_tones\n")
    (tmp_path / "sertk_tones.py").write_text("")
    env = {"PYTHONPATH": str(tmp_path)}
    r = run_sertk("plugins", "--json", env={**env, "SERTK_LOAD_PLUGINS": "sertk-tonse"})
    one_line_error(r, "SERTK_LOAD_PLUGINS names 'sertk-tonse', which is no installed plugin",
                   "sertk_tones (distribution sertk-tones)", "or set SERTK_LOAD_PLUGINS='' to load none")
    assert run_sertk("plugins", "--json", env={**env, "SERTK_LOAD_PLUGINS": ""}).code == 0  # still loads none
    assert run_sertk("plugins", "--json", env={**env, "SERTK_LOAD_PLUGINS": "sertk_tones"}).code == 0


# 4 -------------------------------------------------------------------------------------------------------------
def test_a_split_seed_must_be_an_int(cli, cache):
    r = cli("split", cache / "synthetic.h5", "--split", "speaker:seed=1.5")
    line = one_line_error(r, "split option seed must be an int (got '1.5')", "write e.g. speaker:seed=42")
    assert "a number" not in line


# 5 -------------------------------------------------------------------------------------------------------------
def test_an_unknown_model_name_suggests_the_plugin(cli, tmp_path):
    r = cli("train", "--model", "tiy", "--dataset", "synthetic", "--cache-dir", tmp_path, "--epochs", "1")
    line = one_line_error(r, "unknown model 'tiy'; did you mean 'tiny'?", "see 'sertk plugins'",
                          "hub id of the form org/name")
    assert "Hugging Face cache" not in line


# 6 -------------------------------------------------------------------------------------------------------------
def test_a_streaming_wav_is_cached(cli, tmp_path):
    import soundfile as sf

    from ser_toolkit.cache.reader import CacheReader

    wav = write_audio(tmp_path / "stream.wav", seconds=0.5)
    data = bytearray(wav.read_bytes())
    at = data.index(b"data")
    data[at + 4:at + 8] = struct.pack("<I", 0xFFFFFFFF)  # a streaming writer's "size unknown"
    wav.write_bytes(bytes(data))
    assert sf.read(str(wav))[0].shape[0] == 8000  # libsndfile reads it
    (tmp_path / "m.csv").write_text("path,label,speaker\nstream.wav,happy,s1\n")
    r = cli("cache", "manifest", "--root", tmp_path / "m.csv", "--cache-dir", tmp_path / "c", "--strict", "-q")
    assert r.code == 0, r.err
    assert "truncated" not in r.out + r.err and len(CacheReader(tmp_path / "c" / "manifest.h5")) == 1


# 7 -------------------------------------------------------------------------------------------------------------
def test_two_files_with_one_stem_name_both_and_the_kept_one(cli, tmp_path):
    actor = tmp_path / "ravdess" / "Actor_01"
    write_audio(actor / "03-01-03-01-01-01-01.wav")
    write_audio(actor / "03-01-03-01-01-01-01.flac")
    r = cli("cache", "ravdess", "--root", tmp_path / "ravdess", "--cache-dir", tmp_path / "c", "-q")
    assert r.code == 0, r.err
    assert ("ignored 1 files: duplicate utterance id: Actor_01/03-01-03-01-01-01-01.wav (kept "
            "Actor_01/03-01-03-01-01-01-01.flac, the first in sorted order)") in flat(r.out)


# 8 -------------------------------------------------------------------------------------------------------------
def test_a_missing_manifest_file_says_where_it_looked(cli, tmp_path):
    write_audio(tmp_path / "audio" / "a.wav")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "m.csv").write_text("path,label,speaker\naudio/a.wav,happy,s1\n")  # relative to the cwd
    r = cli("cache", "manifest", "--root", "lists/m.csv", "--cache-dir", "c", "-q", cwd=tmp_path)
    one_line_error(r, f"no such file {tmp_path / 'lists' / 'audio' / 'a.wav'}",
                   f"relative paths are relative to the manifest's folder {tmp_path / 'lists'} (write them so, "
                   "or absolute)")


# 9 -------------------------------------------------------------------------------------------------------------
def test_an_empty_manifest_says_it_lists_no_utterances(cli, tmp_path):
    (tmp_path / "m.csv").write_text("path,label,speaker\n")
    r = cli("cache", "manifest", "--root", tmp_path / "m.csv", "--cache-dir", tmp_path / "c", "-q")
    line = one_line_error(r, f"manifest {tmp_path / 'm.csv'} lists no utterances (no row below its header)",
                          "add one row per recording (path and label at least)")
    assert "--root" not in line


# 10 ------------------------------------------------------------------------------------------------------------
def test_symlinked_ravdess_actor_folders_are_followed(cli, tmp_path):
    from ser_toolkit.cache.reader import CacheReader

    write_audio(tmp_path / "store" / "a1" / "03-01-03-01-01-01-01.wav")
    write_audio(tmp_path / "store" / "a2" / "03-01-04-01-01-01-02.wav")
    root = tmp_path / "ravdess"
    root.mkdir()
    (root / "Actor_01").symlink_to(tmp_path / "store" / "a1")
    (root / "Actor_02").symlink_to(tmp_path / "store" / "a2")
    (tmp_path / "store" / "a2" / "loop").symlink_to(tmp_path / "store")  # a loop is walked once
    r = cli("cache", "ravdess", "--root", root, "--cache-dir", tmp_path / "c", "-q")
    assert r.code == 0, r.err
    assert sorted(u.speaker for u in CacheReader(tmp_path / "c" / "ravdess.h5").utterances) == ["Actor_01",
                                                                                               "Actor_02"]


# 11 ------------------------------------------------------------------------------------------------------------
def test_materialize_on_a_full_disk_names_what_materialize_can_do(cli, cache, monkeypatch):
    import collections
    import shutil

    import ser_toolkit.space as space

    usage = collections.namedtuple("usage", "total used free")

    class OneMegabyte:  # the disk reports 1 MB free
        @staticmethod
        def disk_usage(p):
            u = shutil.disk_usage(p)
            return usage(u.total, u.total - (1 << 20), 1 << 20)

    monkeypatch.setattr(space, "shutil", OneMegabyte)
    r = cli("materialize", cache / "synthetic.h5", "--plugins", "noise", "--split", "speaker:test=0.5", "-q")
    line = one_line_error(r, "not enough disk space for augmented set",
                          "copy the cache to a disk with room and pass that copy as CACHE")
    assert "--cache-dir" not in line and "--out" not in line


def test_a_study_cache_refusal_names_what_a_study_can_do(cli, tmp_path):
    assert run_sertk("cache", "synthetic", "--set", "speakers=2", "--set", "per_emotion=1", "--cache-dir",
                     tmp_path / "cache", "--dtype", "int16", "-q").code == 0
    (tmp_path / "s.toml").write_text(textwrap.dedent("""\
        [data]
        dataset = "synthetic"
        options = { speakers = 2, per_emotion = 1 }
        split = "speaker:test=0.5,seed=42"
        cross = []
        cache_dir = "cache"
        [model]
        name = "tiny"
        [augmentations]
        methods = ["noise"]
        """))
    r = cli("study", "--config", "s.toml", "-q", cwd=tmp_path)
    line = one_line_error(r, "was built with dtype=int16, not dtype=float32", "the same keys per corpus in the "
                          "study config", "set another cache_dir in its [data], or rebuild the cache: sertk cache "
                          "synthetic --set speakers=2 --set per_emotion=1 --cache-dir cache --force")
    assert "--name" not in line and "sertk cache:" not in line
    command = line.rsplit("rebuild the cache: ", 1)[1]
    assert cli(*shlex.split(command)[1:], "-q", cwd=tmp_path).code == 0  # the command it names works


# 12 ------------------------------------------------------------------------------------------------------------
def test_report_names_the_absolute_run_path_a_study_lists(cli, tmp_path):
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "study.json").write_text(json.dumps({"runs": [
        {"name": "baseline", "role": "baseline", "seed": 42, "run": "runs/other/baseline-s42", "plugins": []}]}))
    r = cli("report", "study", "-o", "out/r.md", cwd=tmp_path)
    one_line_error(r, f"{tmp_path / 'study' / 'study.json'} lists run runs/other/baseline-s42",
                   f"{tmp_path / 'runs' / 'other' / 'baseline-s42'} (relative to the working directory)",
                   f"{tmp_path / 'study' / 'baseline-s42'} is a sertk run folder (no config.json)",
                   "run 'sertk report' from the folder the study ran in")


# 13 ------------------------------------------------------------------------------------------------------------
def test_resume_of_a_sealed_run_with_an_edited_config_blames_the_file(cli, tmp_path):
    run = fake_run(tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config["train"]["epochs"] = 3  # edited by hand after the seal
    (run / "config.json").write_text(json.dumps(config))
    r = cli("train", "--out", run, "--resume", "--epochs", "1", "--model", "tiny", "--dataset", "synthetic",
            "--cache-dir", tmp_path)
    line = one_line_error(r, f"{run / 'config.json'} was changed after the run was sealed",
                          "restore that file", "or train a new run with another --out")
    assert "epochs" not in line
