"""Which finished runs depend on a cache: recorded when a run is sealed, asked before a cache is replaced.

``<cache>.runs/<run id>.json`` holds the run folder and the cache digest the run trained on. A cache whose
content would change (other options, changed audio) while finished runs still depend on its current content
is not replaced unless the user forces it: those runs could no longer be evaluated or reported.
"""

from __future__ import annotations

import json
from pathlib import Path

from ser_toolkit.atomic import write_text


def folder(cache: Path) -> Path:
    return cache.with_name(cache.name + ".runs")


def register(cache: Path, run_dir: Path, run_id: str, digest: str) -> None:
    """Record that finished run ``run_id`` (in ``run_dir``) trained on ``cache`` as of ``digest``. Best effort: a cache
    folder that cannot be written (read-only shared storage) protects nothing, and stops nothing."""
    try:
        write_text(folder(cache) / f"{run_id}.json",
                   json.dumps({"run": str(run_dir.resolve()), "run_id": run_id, "digest": digest}) + "\n")
    except OSError:
        pass


def finished_runs(cache: Path, digest: str, own: Path | None = None) -> tuple[list[Path], list[Path]]:
    """The finished runs that trained on ``cache`` when it held ``digest``: (those still where they were sealed,
    those no longer there: moved or deleted, and so still protected). Runs under ``own`` (a study's runs
    folder: it retrains them) and records of a folder that now holds another or an unfinished run are not."""
    from ser_toolkit.training import runs

    found: list[Path] = []
    gone: list[Path] = []
    for entry in sorted(folder(cache).glob("*.json")):
        try:
            record = json.loads(entry.read_text())
            run = Path(record["run"])
        except Exception:  # noqa: BLE001 - a damaged record names no run
            continue
        if record.get("digest") != digest or (own is not None and run.is_relative_to(own.resolve())):
            continue
        if not run.exists():
            gone.append(run)
            continue
        try:
            info = runs.run_info(run)
        except Exception:  # noqa: BLE001 - a folder that holds no run now
            continue
        if info.get("run_id") == record.get("run_id") and runs.is_sealed(run) \
                and info.get("data", {}).get("cache", {}).get("digest") == digest:
            found.append(run)
    return found, gone
