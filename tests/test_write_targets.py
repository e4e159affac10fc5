"""Atomic writes replace regular files only: a device or FIFO is written through, a symbolic link's target is
written (the link stays), a folder is refused in one line; nothing that is not sertk's is renamed over."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from helpers import one_line_error, run_sertk, synthetic_cache, write_audio


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return synthetic_cache(tmp_path_factory.mktemp("cache"), speakers=2, per_emotion=1) / "synthetic.h5"


def split_to(cache, out):
    return run_sertk("split", cache, "--split", "stratified:test=0.5", "-o", out)


def test_a_character_device_is_written_through_never_replaced(cache, tmp_path):
    node = tmp_path / "null"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a private /dev/null
    except PermissionError:
        pytest.skip("creating a device node needs root")
    r = split_to(cache, node)
    assert r.code == 0, r.err
    assert stat.S_ISCHR(os.stat(node).st_mode) and os.stat(node).st_rdev == os.makedev(1, 3)
    assert not [p for p in tmp_path.iterdir() if p != node]  # no temporary left beside it


def test_a_fifo_is_written_through_and_one_nobody_reads_is_refused(cache, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    one_line_error(split_to(cache, fifo), "no process reads the FIFO")
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()))
    reader.start()
    import time

    time.sleep(0.3)  # the reader has the FIFO open
    r = split_to(cache, fifo)
    reader.join(timeout=60)
    assert r.code == 0, r.err
    assert got and got[0].startswith(b"utterance,split\n")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_a_symlink_is_never_written_through_and_a_folder_is_refused(cache, tmp_path):
    target = tmp_path / "real.csv"
    target.write_text("precious\n")
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    one_line_error(split_to(cache, link), "is a symbolic link", "give the target's own path")
    assert link.is_symlink() and os.readlink(link) == str(target) and target.read_text() == "precious\n"
    one_line_error(run_sertk("report", tmp_path / "nothing", "-o", link), "is a symbolic link")
    wav, wav_link, toml_link = tmp_path / "in.wav", tmp_path / "out.wav", tmp_path / "cfg.toml"
    write_audio(wav)
    wav_link.symlink_to(target)
    toml_link.symlink_to(target)
    one_line_error(run_sertk("augment", "noise", wav, wav_link), "is a symbolic link")
    one_line_error(run_sertk("study", "--preset", "demo", "--save-config", toml_link, cwd=tmp_path),
                   "is a symbolic link")
    assert target.read_text() == "precious\n"
    assert split_to(cache, target).code == 0  # the target itself, named: replaced as asked
    assert target.read_text().startswith("utterance,split\n")
    (tmp_path / "folder").mkdir()
    one_line_error(split_to(cache, tmp_path / "folder"), "is a folder", "give the path of a file")
    one_line_error(run_sertk("report", tmp_path / "nothing", "-o", tmp_path / "folder"), "is a folder")
