"""``duplicate``: the identity, for the "clean x2" control.

A baseline trained on clean + duplicate sees as many utterances and optimizer
steps as a model trained on clean + one augmented copy, so an augmentation's
gain can be separated from the gain of simply training longer (flaw 2 of the
reference study).
"""

from __future__ import annotations

from ser_toolkit import hookimpl
from ser_toolkit.augmentations import Augmentation


class Duplicate(Augmentation):
    name = "duplicate"
    description = "identity (the clean x2 control with as many steps as an augmented model)"
    stochastic = False
    identity = True  # training may reuse the clean rows instead of copying the audio
    keeps_length = True

    def randomize(self, n, rng, context=None):
        return {}

    def apply_params(self, wave, plan, context=None):
        return wave.copy(), {}


@hookimpl
def register_augmentations(registry) -> None:
    registry.register(Duplicate)
