"""RAVDESS speech (Livingstone & Russo 2018): ``Actor_XX/MM-VC-EE-II-SS-RR-AA.ext``.

Any folder nesting is accepted; only speech files (vocal channel 01) are
kept, song files are ignored and counted. Calm is dropped by default
(``calm=neutral`` merges it into neutral). Gender comes from actor parity
(odd = male, even = female).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from ser_toolkit import hookimpl
from ser_toolkit.datasets import Dataset, Scan, Utterance, audio_files, check_root, note_duplicates
from ser_toolkit.params import Param

_NAME = re.compile(r"^(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})$")
CODES = {"01": "neutral", "02": "calm", "03": "happy", "04": "sad", "05": "angry",
         "06": "fearful", "07": "disgust", "08": "surprised"}
STATEMENTS = {"01": "Kids are talking by the door", "02": "Dogs are sitting by the door"}


class Ravdess(Dataset):
    name = "ravdess"
    description = "RAVDESS speech, audio-only (24 actors, 8 emotions; calm dropped or merged)"
    params = (
        Param("calm", "drop", "what to do with calm recordings", choices=("drop", "neutral")),
    )
    label_map = {"neutral": "neutral", "calm": None, "happy": "happy", "sad": "sad",
                 "angry": "angry", "fearful": "fear", "disgust": "disgust", "surprised": "surprise"}

    def labels(self) -> dict[str, str | None]:
        mapping = dict(self.label_map)
        if self.options["calm"] == "neutral":
            mapping["calm"] = "neutral"
        return mapping

    def scan(self, root: Path | None) -> Scan:
        root = check_root(self.name, root)
        mapping = self.labels()
        ignored: Counter = Counter()
        found: dict[str, Utterance] = {}
        duplicates: list[tuple[str, str]] = []
        for path in audio_files(root):
            m = _NAME.match(path.stem)
            if not m or m.group(3) not in CODES:
                ignored["not a RAVDESS file name"] += 1
                continue
            modality, channel, code, intensity, statement, repetition, actor = m.groups()
            if channel == "02":
                ignored["song file (speech only)"] += 1
                continue
            if channel != "01":
                ignored["unknown vocal channel"] += 1
                continue
            label = CODES[code]
            emotion = mapping[label]
            if emotion is None:
                ignored[f"{label} (dropped)"] += 1
                continue
            if path.stem in found:
                duplicates.append((path.relative_to(root).as_posix(), found[path.stem].path))
                continue
            actor_no = int(actor)
            found[path.stem] = Utterance(
                id=path.stem,
                path=path.relative_to(root).as_posix(),
                emotion=emotion,
                speaker=f"Actor_{actor}",
                corpus=self.name,
                gender="male" if actor_no % 2 else "female",
                extra={"label": label, "intensity": "strong" if intensity == "02" else "normal",
                       "statement": STATEMENTS.get(statement, statement),
                       "repetition": int(repetition), "modality": modality},
            )
        note_duplicates(ignored, duplicates)
        return Scan(sorted(found.values(), key=lambda u: u.id), ignored)


@hookimpl
def register_datasets(registry) -> None:
    registry.register(Ravdess)
