"""SAVEE (Haq & Jackson 2009): four male British speakers, seven emotions.

Reads the official layout ``AudioData/<SPK>/<code><nn>.ext`` and the flat
layout ``<SPK>_<code><nn>.ext``. ``subset=reference`` keeps the reference
study's 420 files: those listed in ``seed_subset.csv`` (``subset_file``, by
default the one in the corpus root) or, when there is none, a seeded removal
of 60 of the 120 neutral files.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from pathlib import Path

from ser_toolkit import hookimpl
from ser_toolkit.datasets import Dataset, Scan, Utterance, audio_files, check_root, note_duplicates
from ser_toolkit.errors import SertkError
from ser_toolkit.params import Param

SPEAKERS = ("DC", "JE", "JK", "KL")
_OFFICIAL = re.compile(r"^(sa|su|a|d|f|h|n)(\d{1,3})$")
_SPEAKER = re.compile(r"^[A-Z]{2}$")
_FLAT = re.compile(r"^([A-Z]{2})_(sa|su|a|d|f|h|n)(\d{1,3})$")
CODES = {"a": "anger", "d": "disgust", "f": "fear", "h": "happiness", "n": "neutral",
         "sa": "sadness", "su": "surprise"}
REFERENCE_NEUTRAL_REMOVED = 60


class Savee(Dataset):
    name = "savee"
    description = "SAVEE (4 male speakers, 7 emotions); official and flat layouts; reference 420-file subset"
    params = (
        Param("subset", "all", "all 480 files, or the reference study's 420", choices=("all", "reference")),
        Param("subset_file", None, "utterance list for subset=reference (default: <root>/seed_subset.csv)",
              type="path"),
        Param("seed", 42, "seed of the neutral removal when no subset file exists", type="int", min=0),
    )
    label_map = {"anger": "angry", "disgust": "disgust", "fear": "fear", "happiness": "happy",
                 "neutral": "neutral", "sadness": "sad", "surprise": "surprise"}

    def cache_name(self) -> str:
        return "savee-reference" if self.options["subset"] == "reference" else "savee"

    def scan(self, root: Path | None) -> Scan:
        root = check_root(self.name, root)
        ignored: Counter = Counter()
        found: dict[str, Utterance] = {}
        duplicates: list[tuple[str, str]] = []
        for path in audio_files(root):
            m = _OFFICIAL.match(path.stem)
            if m and _SPEAKER.match(path.parent.name):
                speaker, code, number = path.parent.name, m.group(1), m.group(2)
            else:
                m = _FLAT.match(path.stem)
                if not m:
                    ignored["not a SAVEE file name"] += 1
                    continue
                speaker, code, number = m.groups()
            uid = f"{speaker}/{code}{int(number):02d}"
            if uid in found:
                duplicates.append((path.relative_to(root).as_posix(), found[uid].path))
                continue
            label = CODES[code]
            found[uid] = Utterance(id=uid, path=path.relative_to(root).as_posix(),
                                   emotion=self.label_map[label], speaker=speaker, corpus=self.name,
                                   gender="male", extra={"label": label, "number": int(number)})
        note_duplicates(ignored, duplicates)
        utterances = sorted(found.values(), key=lambda u: u.id)
        if self.options["subset"] == "reference":
            keep = self._reference_ids(root, utterances)
            ignored["outside the reference subset"] += len(utterances) - len(keep)
            utterances = [u for u in utterances if u.id in keep]
        return Scan(utterances, ignored)

    def _reference_ids(self, root: Path, utterances: list[Utterance]) -> set[str]:
        listed = self.options["subset_file"]
        path = Path(listed).expanduser() if listed else root / "seed_subset.csv"
        if path.is_file():
            with open(path, newline="") as fh:
                reader = csv.DictReader(fh)
                if not reader.fieldnames or "utterance" not in reader.fieldnames:
                    raise SertkError(f"{path}: no 'utterance' column", "the subset file needs a header 'utterance'")
                return {row["utterance"].strip() for row in reader}
        if listed:
            raise SertkError(f"subset file {path} does not exist", "check --set subset_file=PATH")
        import numpy as np

        neutral = [u.id for u in utterances if u.emotion == "neutral"]
        rng = np.random.default_rng(self.options["seed"])
        removed = set(rng.choice(neutral, size=min(REFERENCE_NEUTRAL_REMOVED, len(neutral)), replace=False))
        return {u.id for u in utterances} - removed


@hookimpl
def register_datasets(registry) -> None:
    registry.register(Savee)
