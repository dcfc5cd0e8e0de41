"""What `GradStats` recorded: compact per-step arrays, tidy DataFrames on demand, save and load.

The record knows nothing of fastai. It holds float32 arrays that grow by a quarter at a time while
training; `.df` and `.steps` build pandas DataFrames from them when asked and cache them
until the next step arrives. Saved runs are a directory of parquet files and a small JSON
file (no pickle), so a run from someone else is safe to open and other tools read it.

The rooms: `columns` (the names of what a record holds), `arrays` (the growable arrays), `grad_record` (`GradRecord`
itself and `record_method`) with its methods in `filling` (layers and steps in), `pending` (steps waiting, values still
to come), `thinning` (bounded memory), `tables` (the DataFrames out) and `saved` (the saved-run format, `save`), and
`loading` (`load`, `merge`). This package re-exports their names: `fastai_gradstats.record.GradRecord`, `.load`, ...
"""
from __future__ import annotations

from .columns import ADDED_METRICS, COUNT_COLUMNS, DERIVED_COLUMNS, EXTRA_COLUMNS, LAYER_COLUMNS, STEP_COLUMNS
from .arrays import _Growable   # pickles of records made before the split name it here
from .saved import FORMAT_VERSION
from .grad_record import GradRecord, record_method
from .loading import load, merge

__all__ = ['GradRecord', 'load', 'merge', 'record_method', 'LAYER_COLUMNS', 'STEP_COLUMNS', 'COUNT_COLUMNS', 'EXTRA_COLUMNS']
