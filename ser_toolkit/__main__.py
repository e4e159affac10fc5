"""``python -m ser_toolkit`` runs the ``sertk`` command line."""

from ser_toolkit.cli import entry

entry()
