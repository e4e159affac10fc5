"""CREMA-D: ``<actor>_<sentence>_<EMO>_<intensity>.wav`` (e.g. ``1001_DFA_ANG_XX.wav``)."""

from __future__ import annotations

import csv
import re
from collections import Counter
from pathlib import Path

from ser_toolkit.datasets import Dataset, Scan, Utterance, audio_files, check_root
from ser_toolkit.params import Param

_NAME = re.compile(r"^(\d{4})_([A-Z]{3})_([A-Z]{3})_([A-Z]{2})$")
INTENSITIES = {"LO": "low", "MD": "medium", "HI": "high", "XX": "unspecified"}


class CremaD(Dataset):
    name = "cremad"
    description = "CREMA-D (91 actors, 6 emotions; no surprise) - from the sertk-example plugin"
    params = (
        Param("intensity", "all", "keep all files or only one intensity level",
              choices=("all", "low", "medium", "high", "unspecified")),
    )
    # Every corpus label is mapped explicitly; CREMA-D has no 'surprise'.
    label_map = {"NEU": "neutral", "HAP": "happy", "SAD": "sad", "ANG": "angry", "FEA": "fear",
                 "DIS": "disgust"}

    def scan(self, root: Path | None) -> Scan:
        root = check_root(self.name, root)
        genders = self._genders(root)
        ignored: Counter = Counter()
        utts = []
        for path in audio_files(root):
            m = _NAME.match(path.stem)
            if not m or m.group(3) not in self.label_map:
                ignored["not a CREMA-D file name"] += 1
                continue
            actor, sentence, emo, level = m.groups()
            intensity = INTENSITIES.get(level, level)
            if self.options["intensity"] not in ("all", intensity):
                ignored[f"intensity {intensity} (filtered)"] += 1
                continue
            utts.append(Utterance(id=path.stem, path=path.relative_to(root).as_posix(),
                                  emotion=self.label_map[emo], speaker=actor, corpus=self.name,
                                  gender=genders.get(actor),
                                  extra={"label": emo, "sentence": sentence, "intensity": intensity}))
        return Scan(sorted(utts, key=lambda u: u.id), ignored)

    @staticmethod
    def _genders(root: Path) -> dict[str, str]:
        """Genders from the corpus's VideoDemographics.csv, when present in or above the root."""
        for folder in (root, root.parent):
            table = folder / "VideoDemographics.csv"
            if table.is_file():
                with open(table, newline="") as fh:
                    return {row["ActorID"]: row["Sex"].strip().lower() for row in csv.DictReader(fh)
                            if row.get("Sex", "").strip().lower() in ("male", "female")}
        return {}
