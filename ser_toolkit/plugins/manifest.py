"""Any corpus from a manifest: a CSV or JSON-lines file, one utterance per row.

Columns (JSON keys): ``path`` (or ``file``/``audio``), ``label`` (or
``emotion``), and optionally ``id``, ``speaker``, ``gender``, ``split``; every
other column is kept in the utterance's extra fields. Relative paths are
resolved against the manifest's folder. Labels that are canonical emotions map
to themselves; others need ``labels`` (``ang=angry,hap=happy,cal=``; an empty
target drops the label).
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from ser_toolkit import hookimpl
from ser_toolkit.datasets import Dataset, Scan, Utterance
from ser_toolkit.emotions import EMOTIONS
from ser_toolkit.errors import SertkError
from ser_toolkit.params import Param

_PATH_KEYS = ("path", "file", "audio")
_LABEL_KEYS = ("label", "emotion")
_GENDERS = {"m": "male", "male": "male", "man": "male", "f": "female", "female": "female",
            "woman": "female"}


def parse_label_mapping(text: str | None) -> dict[str, str | None]:
    """``"ang=angry,cal="`` -> ``{"ang": "angry", "cal": None}`` (targets checked)."""
    mapping: dict[str, str | None] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        src, sep, dst = item.partition("=")
        if not sep:
            raise SertkError(f"label mapping item {item!r} is not source=emotion",
                             "write e.g. --set labels=ang=angry,cal=")
        dst = dst.strip() or None
        if dst is not None and dst not in EMOTIONS:
            raise SertkError(f"label mapping targets unknown emotion {dst!r}",
                             f"use one of {', '.join(EMOTIONS)} (empty to drop)")
        mapping[src.strip()] = dst
    return mapping


def _text_lines(path: Path) -> Iterator[str]:
    """The lines of ``path`` (line endings kept) decoded as UTF-8, a leading BOM dropped."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                yield raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise SertkError(f"{path}:{lineno}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x})",
                                 "save it as UTF-8") from None


def _csv_rows(path: Path) -> Iterator[dict[str, str]]:
    """The rows of a CSV file as dicts keyed by its header; a row with another field count is an error."""
    reader = csv.reader(_text_lines(path))
    try:
        header = next(reader, None)
        for fields in reader:
            if not fields:  # a blank line
                continue
            if len(fields) != len(header):
                raise SertkError(f"{path}:{reader.line_num}: {len(fields)} fields, but the header has "
                                 f"{len(header)}",
                                 "give every row one value per header column (quote values that contain commas)")
            yield dict(zip(header, fields))
    except csv.Error as exc:
        raise SertkError(f"{path}:{reader.line_num}: not valid CSV ({exc})", "save it as plain CSV") from None


class Manifest(Dataset):
    name = "manifest"
    description = "any corpus listed in a CSV or JSON-lines manifest (path, label, speaker, gender, split...)"
    params = (
        Param("file", None, "manifest file (default: manifest.csv or manifest.jsonl in --root; "
                            "--root may also be the manifest file itself)", type="path"),
        Param("labels", "", "label mapping source=emotion,... (empty target drops the label)"),
        Param("corpus", "manifest", "corpus name stored with each utterance"),
    )
    label_map = {e: e for e in EMOTIONS}
    root_may_be_file = True

    def cache_name(self) -> str:
        return self.options["corpus"]

    def _manifest_path(self, root: Path | None) -> Path:
        if self.options["file"]:
            path = Path(self.options["file"]).expanduser()
            if not path.is_absolute() and root is not None and root.is_dir():
                path = root / path
        elif root is not None and root.is_file():
            path = root
        elif root is not None:
            candidates = [root / "manifest.csv", root / "manifest.jsonl"]
            path = next((c for c in candidates if c.is_file()), candidates[0])
        else:
            raise SertkError("dataset 'manifest' needs a manifest", "pass --root MANIFEST.csv or --set file=PATH")
        if not path.is_file():
            raise SertkError(f"manifest {path} does not exist", "pass --root MANIFEST or --set file=PATH")
        return path.resolve()

    def _rows(self, path: Path) -> Iterator[dict[str, Any]]:
        if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
            for lineno, line in enumerate(_text_lines(path), 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise SertkError(f"{path}:{lineno}: not valid JSON ({exc.msg})",
                                         "write one JSON object per line") from None
                    if not isinstance(row, dict):
                        raise SertkError(f"{path}:{lineno}: not a JSON object", "write one JSON object per line")
                    yield row
        else:
            yield from _csv_rows(path)

    def resolve_root(self, root: Path | None) -> Path:
        """Audio paths in the manifest are relative to the manifest's folder."""
        return self._manifest_path(root).parent

    def scan(self, root: Path | None) -> Scan:
        path = self._manifest_path(root)
        base = path.parent
        mapping = {**self.label_map, **parse_label_mapping(self.options["labels"])}
        ignored: Counter = Counter()
        found: dict[str, Utterance] = {}
        unmapped: set[str] = set()
        rows = 0
        for row in self._rows(path):
            rows += 1
            file_key = next((k for k in _PATH_KEYS if row.get(k)), None)
            label_key = next((k for k in _LABEL_KEYS if row.get(k) not in (None, "")), None)
            if file_key is None or label_key is None:
                raise SertkError(f"{path}: a row lacks a path or label column ({sorted(row)})",
                                 "give every row 'path' and 'label'")
            label = str(row[label_key]).strip()
            if label not in mapping:
                unmapped.add(label)
                continue
            emotion = mapping[label]
            if emotion is None:
                ignored[f"{label} (dropped)"] += 1
                continue
            audio = Path(str(row[file_key]))
            full = audio if audio.is_absolute() else base / audio
            rel = full.relative_to(base).as_posix() if not audio.is_absolute() else str(full)
            default_id = full.stem if audio.is_absolute() else Path(rel).with_suffix("").as_posix()
            uid = str(row.get("id") or default_id)
            if uid in found:
                raise SertkError(f"{path}: utterance id {uid!r} appears twice", "make ids unique")
            gender = _GENDERS.get(str(row.get("gender") or "").strip().lower())
            extra = {k: v for k, v in row.items()
                     if k not in (*_PATH_KEYS, *_LABEL_KEYS, "id", "speaker", "gender")}
            extra["label"] = label
            found[uid] = Utterance(id=uid, path=rel, emotion=emotion,
                                   speaker=str(row.get("speaker") or "unknown"),
                                   corpus=self.options["corpus"], gender=gender, extra=extra)
        if unmapped:
            raise SertkError(f"{path}: labels {sorted(unmapped)} are not canonical emotions",
                             "map them with --set labels=SRC=EMOTION,... (empty target drops)")
        if not rows:
            raise SertkError(f"manifest {path} lists no utterances (no row below its header)" if
                             path.suffix.lower() not in (".jsonl", ".json", ".ndjson") else
                             f"manifest {path} lists no utterances (no JSON line)",
                             "add one row per recording (path and label at least), or pass another manifest")
        return Scan(sorted(found.values(), key=lambda u: u.id), ignored)

    def source_path(self, utterance: Utterance, root: Path | None) -> Path:
        assert utterance.path is not None
        p = Path(utterance.path)
        return p if p.is_absolute() else self.resolve_root(root) / p

    def fingerprint(self, utterance: Utterance, root: Path | None) -> str:
        """As for every dataset; a missing file says where it was looked for (relative paths: the manifest's
        folder, not the working directory)."""
        try:
            return super().fingerprint(utterance, root)
        except FileNotFoundError as exc:
            full = self.source_path(utterance, root)
            where = "" if Path(str(utterance.path)).is_absolute() else (
                f"; relative paths are relative to the manifest's folder {self.resolve_root(root)} "
                "(write them so, or absolute)")
            raise FileNotFoundError(exc.errno, f"no such file {full}{where}", str(full)) from None


@hookimpl
def register_datasets(registry) -> None:
    registry.register(Manifest)
