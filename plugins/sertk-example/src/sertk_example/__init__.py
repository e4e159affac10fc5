"""sertk-example: an example sertk plugin distribution (a CREMA-D dataset, a reverb augmentation).

sertk imports this module through the ``sertk`` entry point declared in
``pyproject.toml`` and calls the hook implementations below.
"""

from ser_toolkit import hookimpl

from sertk_example.cremad import CremaD
from sertk_example.reverb import Reverb

__version__ = "0.1.0"


@hookimpl
def register_datasets(registry):
    """Register this distribution's datasets (see sertk's docs/plugins.md)."""
    registry.register(CremaD)


@hookimpl
def register_augmentations(registry):
    """Register this distribution's augmentations."""
    registry.register(Reverb)
