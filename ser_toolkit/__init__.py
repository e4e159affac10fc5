"""sertk: reproducible speech-emotion-recognition augmentation studies.

The import name is ``ser_toolkit``; the console script is ``sertk``.
Importing this package is cheap: heavy libraries load only where used.
"""

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("sertk")
"""Decorator for plugin hook implementations: ``@ser_toolkit.hookimpl``."""

__all__ = ["__version__", "hookimpl"]
