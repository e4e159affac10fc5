"""``sertk report``: a markdown report of a study (or of runs), with figures and every number as CSV/JSON.

Modules: :mod:`~ser_toolkit.report.collect` (the runs, checked and grouped into
models), :mod:`~ser_toolkit.report.analysis` (estimates with intervals over seeds
and speakers, paired comparisons with adjusted p-values, chance levels),
:mod:`~ser_toolkit.report.summary` (setup and findings in sentences, the data
section), :mod:`~ser_toolkit.report.tables`, :mod:`~ser_toolkit.report.figures`,
:mod:`~ser_toolkit.report.matrix` (train x test corpus matrix of a study over
several corpora), :mod:`~ser_toolkit.report.publish` (atomic publication) and
:mod:`~ser_toolkit.report.write` (putting it together).
"""

from ser_toolkit.report.collect import METRIC_NAMES, Model, Numbers, collect, label
from ser_toolkit.report.publish import files_of
from ser_toolkit.report.tables import selection_sentence
from ser_toolkit.report.write import write_report

__all__ = ["METRIC_NAMES", "Model", "Numbers", "collect", "files_of", "label", "selection_sentence",
           "write_report"]
