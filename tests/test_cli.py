"""The command line: help, version, start-up cost, one-line errors with exit status 2."""

from __future__ import annotations

import subprocess
import sys

from helpers import run_sertk

HEAVY = ("torch", "transformers", "librosa", "numpy", "h5py", "scipy", "sklearn")


def test_help_and_version(cli):
    r = cli("--help")
    assert r.code == 0 and "cache" in r.out and "inspect" in r.out and "plugins" in r.out
    r = cli("--version")
    assert r.code == 0 and r.out.strip().startswith("sertk ")


def test_startup_imports_no_heavy_library():
    code = ("import sys; from ser_toolkit.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_plugins_listing_imports_no_heavy_library():
    code = ("import sys; from ser_toolkit.cli import main\n"
            "try:\n    main(['plugins', '--json'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'librosa') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def _one_line_error(r, *needles):
    assert r.code == 2, (r.out, r.err)
    lines = [line for line in r.err.splitlines() if line.strip()]
    assert len(lines) == 1, r.err
    assert lines[0].startswith("Error: ")
    for n in needles:
        assert n in lines[0], lines[0]


def test_user_errors_are_one_line(cli, tmp_path):
    _one_line_error(cli("cache", "nope"), "unknown dataset 'nope'", "ravdess", "synthetic")
    _one_line_error(cli("cache", "ravdess"), "needs a corpus folder", "--root")
    _one_line_error(cli("cache", "ravdess", "--root", tmp_path / "missing"), "does not exist")
    _one_line_error(cli("cache", "ravdess", "--root", tmp_path, "--set", "calm=maybe"), "'calm'", "drop, neutral")
    _one_line_error(cli("cache", "ravdess", "--root", tmp_path, "--set", "color=red"), "unknown parameter 'color'")
    _one_line_error(cli("cache", "ravdess", "--root", tmp_path, "--set", "calm"), "key=value")
    _one_line_error(cli("cache", "synthetic", "--bogus"), "No such option")
    _one_line_error(cli("cache", "synthetic", "--mono", "left", "--cache-dir", tmp_path), "mono rule")
    _one_line_error(cli("cache", "synthetic", "--root", tmp_path), "takes no --root")
    _one_line_error(cli("cache", "ravdess", "--root", tmp_path), "found no utterances")
    _one_line_error(cli("inspect", tmp_path / "none.h5"), "does not exist")
    _one_line_error(cli("plugins", "--kind", "thing"), "unknown plugin kind")
    _one_line_error(cli("nosuchcommand"), "No such command")
    (tmp_path / "afile").write_text("")
    _one_line_error(cli("cache", "synthetic", "--cache-dir", tmp_path / "afile"), "is a file, not a folder")


def test_foreign_and_corrupt_files_are_one_line(cli, tmp_path):
    import h5py

    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    _one_line_error(cli("inspect", junk), "not an HDF5 file")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as fh:
        fh["x"] = [1, 2, 3]
    _one_line_error(cli("inspect", foreign), "not a sertk cache")
    # a cache build refuses to overwrite a foreign file of the same name
    target = tmp_path / "synthetic.h5"
    target.write_bytes(foreign.read_bytes())
    _one_line_error(cli("cache", "synthetic", "--set", "per_emotion=1", "--cache-dir", tmp_path, "-q"),
                    "is not a sertk cache")
    assert target.read_bytes() == foreign.read_bytes()


def test_debug_shows_traceback():
    r = run_sertk("--debug", "cache", "nope")
    assert r.code != 0 and "Traceback" in r.err
    r = run_sertk("cache", "nope")
    assert r.code == 2 and "Traceback" not in r.err


def test_plugins_show_each_dataset_s_down_mix(cli):
    import json

    listed = {e["name"]: e for e in json.loads(cli("plugins", "--json", "--kind", "dataset").out)}
    from ser_toolkit.registry import get

    assert {n: e["mono"] for n, e in listed.items()} == {n: get("dataset", n).obj.mono for n in listed}
    table = cli("plugins", "--kind", "dataset").out
    assert "(down-mix:" in table and table.count("mean)") + table.count("mean") >= len(listed)
