"""``ncp``: Neutral CopyPaste (after Pappagari et al., ICASSP 2021).

- ``mode=reference`` (the reference study): a *neutral* partner utterance is
  split into three equal parts and its middle third is replaced by an equally
  long segment from the centre of the input. The result carries the input's
  emotion and keeps the input's label.
- ``mode=concat`` (the original paper): the input and a neutral partner are
  concatenated in random order; the label is the input's.

Partners come from the context's :class:`~ser_toolkit.augmentations.PartnerPool`,
built from the training split only, so test audio is never pasted into training
data. **A neutral input** gets the same treatment with another *neutral*
partner, so a neutral clip stays neutral and never carries an emotion it does not
have; an emotional clip is never labelled neutral. (The reference study's code
pasted neutral speech into emotional files and kept the label "neutral": flaw 4.)

If the input's centre is shorter than a third of the partner, the whole input is
pasted and the output is correspondingly shorter.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ser_toolkit import hookimpl
from ser_toolkit.augmentations import Augmentation
from ser_toolkit.errors import SertkError
from ser_toolkit.params import Param

RATE = 16000


def paste_middle(neutral: np.ndarray, emotional: np.ndarray, crossfade: int = 0) -> tuple[np.ndarray, dict]:
    """The neutral utterance with its middle third replaced by the centre of the emotional one."""
    third = neutral.size // 3
    seg = min(third, emotional.size)
    start = (emotional.size - seg) // 2
    middle = emotional[start:start + seg]
    head, tail = neutral[:third], neutral[2 * third:]
    if crossfade:
        k = min(crossfade, seg // 2, head.size, tail.size)
        if k:
            ramp = np.linspace(0, 1, k, dtype=np.float32)
            middle = middle.copy()
            middle[:k] = middle[:k] * ramp + neutral[third:third + k] * (1 - ramp)
            middle[-k:] = middle[-k:] * ramp[::-1] + neutral[2 * third - k:2 * third] * (1 - ramp[::-1])
    out = np.concatenate([head, middle, tail])
    return out, {"cut_s": [third / RATE, (third + seg) / RATE],
                 "segment_s": [start / RATE, (start + seg) / RATE]}


class NeutralCopyPaste(Augmentation):
    name = "ncp"
    description = "Neutral CopyPaste: emotional centre pasted into a neutral partner's middle third (label kept)"
    needs_partners = True
    partner_emotions = ("neutral",)
    params = (
        Param("mode", "reference", "reference: middle third of a neutral partner; concat: random-order concatenation",
              choices=("reference", "concat")),
        Param("crossfade_ms", 0.0, "crossfade at the paste boundaries (reference: 0)", type="float",
              min=0.0, max=100.0, unit="ms"),
    )

    def randomize(self, n, rng, context=None):
        if context is None or context.partners is None:
            raise SertkError("augmentation 'ncp' needs partner utterances",
                             "give it a training-split partner pool (or --partner FILE with 'sertk augment')")
        forced = context.extra.get("partner_id")
        if forced is not None:
            partner_id = forced
        else:
            partner_id = context.partners.pick(rng, "neutral", exclude=context.utterance_id)
        plan = {"mode": self.options["mode"], "partner": partner_id, "input_emotion": context.emotion,
                "label": context.emotion, "_partner_samples": context.partners.size(partner_id)}
        if self.options["mode"] == "concat":
            plan["first"] = "input" if rng.random() < 0.5 else "partner"
        return plan

    def output_length(self, n, plan):
        m = plan["_partner_samples"]
        return n + m if plan["mode"] == "concat" else m - m // 3 + min(m // 3, n)

    def apply_params(self, wave, plan, context=None):
        if context is None or context.partners is None:
            raise SertkError("augmentation 'ncp' needs partner utterances",
                             "give it a training-split partner pool (or --partner FILE with 'sertk augment')")
        partner = np.asarray(context.partners.load(plan["partner"]), dtype=np.float32)
        params = {k: plan[k] for k in ("mode", "partner", "input_emotion", "label")}
        if plan["mode"] == "concat":
            parts = [wave, partner] if plan["first"] == "input" else [partner, wave]
            return np.concatenate(parts), {**params, "first": plan["first"]}
        out, info = paste_middle(partner, wave, int(self.options["crossfade_ms"] * RATE / 1000))
        return out, {**params, **info}


def plan_pairs(ids: Sequence[str], emotions: Sequence[str], copies: int,
               rng: np.random.Generator) -> dict[str, list[str]]:
    """The reference pairing for materialised N-CP: ``copies`` distinct neutral partners per utterance.

    Every utterance gets exactly ``copies`` augmented versions (so the class
    distribution of the augmented set equals the clean one), and each
    neutral x utterance pair is used at most once.
    """
    neutral = [u for u, e in zip(ids, emotions) if e == "neutral"]
    plan: dict[str, list[str]] = {}
    for uid in ids:
        pool = [n for n in neutral if n != uid]
        if len(pool) < copies:
            raise SertkError(f"N-CP needs {copies} distinct neutral partners for {uid}, only {len(pool)} exist",
                             "use fewer copies or a training split with more neutral utterances")
        plan[uid] = [pool[i] for i in rng.choice(len(pool), size=copies, replace=False)]
    return plan


def pair_counts(plan: Mapping[str, list[str]]) -> int:
    """Largest number of times one (partner, utterance) pair occurs in a plan (1 for a valid plan)."""
    from collections import Counter

    counts = Counter((p, u) for u, ps in plan.items() for p in ps)
    return max(counts.values(), default=0)


@hookimpl
def register_augmentations(registry) -> None:
    registry.register(NeutralCopyPaste)
