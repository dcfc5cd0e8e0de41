"""What a record knows of but has not added yet: steps recorded and waiting to be assembled (`hold`: added before
anything reads the record), and the extra columns of the last step that come later (`set_last`, `set_last_later`:
the update norms, known only after the optimizer step)."""
from __future__ import annotations

import numpy as np

from ..stats import METRICS

__all__ = []


class _Pending:
    """`GradRecord`'s methods for steps and values to come: `hold` and what adds the steps waiting, the last step's extra
    columns (`set_last`, `set_last_later`, `fetch_pending`, `pending_last`) and `mark_skipped`."""

    def hold(self, add):
        """Some recorded steps are not added yet: `add()` adds them (with `add_step` or `_extend`). The record calls
        it once, before anything reads or changes it (`len`, `df`, `steps`, `last`, `save`, `set_last`, ...) and
        when pickled, so no reader ever misses a step. `GradStats` holds the steps it records this way and
        assembles them up to `MAX_WAITING` (16) at a time, which costs less than one step at a time."""
        if not callable(add): raise TypeError(f"`add` must be callable, got {type(add).__name__}")
        self._waiting = add

    def _add_waiting(self):
        "Add the steps `hold` said are waiting, if any (their `add` runs once)."
        if self._waiting is None: return
        add, self._waiting = self._waiting, None
        add()

    def set_last(self, column, values):
        "Fill the extra column `column` (one of `value_columns`) of the rows of the last recorded step."
        self._check_extra_column(column)
        self._add_waiting()
        n = self._step_cols['n_rows'].view[-1] if self._n_steps() else 0
        values = np.asarray(values, np.float32).reshape(-1)
        if len(values) != n: raise ValueError(f"`values` has {len(values)} entries for the last step's {n} rows")
        if n: self._values.view[-n:, self.value_columns.index(column)] = values
        self.pending_last, self._deferred = False, None
        self._cache.clear()

    def _check_extra_column(self, column):
        if column not in self.value_columns[len(METRICS):]:
            raise ValueError(f"`column` must be one of the record's extra columns {self.value_columns[len(METRICS):]}, got {column!r}")

    def set_last_later(self, column, fetch):
        """The extra column `column` of the last recorded step is known but not on the host yet: `fetch()`
        returns its values (as `set_last` takes them). It is called only when the record is read (`df`,
        `hist`, `save`, `merge`, `fetch_pending`), pickled or copied, or given a step before `set_last`
        fills the column; `GradStats` calls `fetch_pending` at the end of every fit. So a fit that ends
        without its last event (an interrupted one) loses nothing, and one that goes on pays no extra
        copy: the next step's `set_last` makes `fetch` unneeded. `set_last` and `mark_skipped` drop it."""
        self._check_extra_column(column)
        if not callable(fetch): raise TypeError(f"`fetch` must be callable, got {type(fetch).__name__}")
        if not self._n_steps(): raise ValueError("no step recorded yet")  # (it adds the steps waiting)
        self._deferred = (column, fetch)

    @property
    def pending_last(self) -> bool:
        "True while the last recorded step's extra columns (`update_norm`) are still to come (`set_last` fills them)."
        self._add_waiting()
        return self._pending_last

    @pending_last.setter
    def pending_last(self, value): self._pending_last = bool(value)

    def fetch_pending(self):
        "Fill the last step's column that `set_last_later` left to fetch, if any (one host copy)."
        self._add_waiting()
        if self._deferred is None: return
        column, fetch = self._deferred
        self.set_last(column, fetch())

    def mark_skipped(self):
        "Flag the last recorded step as one the optimizer did not apply (its `update_norm`, if recorded, is then 0)."
        if not self._n_steps(): raise ValueError("no step recorded yet")
        self._step_cols['skipped'].view[-1] = True
        if 'update_norm' in self.value_columns:
            n = int(self._step_cols['n_rows'].view[-1])
            if n: self._values.view[-n:, self.value_columns.index('update_norm')] = 0
        self.pending_last, self._deferred = False, None  # the optimizer did not apply it: its update is 0, not pending
        self._cache.clear()
