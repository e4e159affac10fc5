"""Shared fixtures: the real corpora and an in-process CLI runner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import Result, shared_data_dir

if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    # test files run in parallel (pytest-xdist, one process per core): one math thread each, inherited by the
    # sertk processes the tests start, instead of every process spreading over every core
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, "1")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = shared_data_dir()
    if not (root / "ravdess").is_dir() or not (root / "savee").is_dir():
        pytest.skip(f"real corpora not found at {root} (set SERTK_SHARED_DATA to the folder holding ravdess/ and savee/)")
    return root


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run ``sertk ARGS`` in-process; returns exit code, stdout, stderr."""
    from ser_toolkit.cli import main

    def run(*args: str, cwd: Path | None = None) -> Result:
        if cwd is not None:
            monkeypatch.chdir(cwd)
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def pytest_collection_modifyitems(session, config, items) -> None:
    """Files with the most slow-marked tests first: run in parallel by file, the long ones start at once
    instead of finishing alone at the end."""
    slow: dict[str, int] = {}
    for item in items:
        slow[item.nodeid.split("::")[0]] = slow.get(item.nodeid.split("::")[0], 0) + bool(
            item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.nodeid.split("::")[0]])  # stable: order within a file kept
