"""The record's compact arrays: numpy arrays that grow by a quarter at a time while training (`_Growable`), the
index ranges that pick the rows of some steps out of them (`_ranges`), and each step's squared total norm
(`_step_squares`, kept as steps arrive)."""
from __future__ import annotations

import numpy as np

from ..stats import METRICS

__all__ = []


def _step_squares(values, n_rows) -> np.ndarray:
    """Each step's sum of its layers' squared `grad_norm` in float64, for `values` (rows x value columns) holding
    `n_rows` consecutive rows per step: the square of the step's total norm (`steps['grad_norm']`)."""
    n_rows = np.asarray(n_rows, np.int64)
    squares = np.square(values[:, METRICS.index('grad_norm')], dtype=np.float64)
    return np.bincount(np.repeat(np.arange(len(n_rows)), n_rows), weights=squares, minlength=len(n_rows))


class _Growable:
    """A numpy array that grows along its first axis by a quarter at a time, without per-append copies: it allocates
    at most 25% more rows than it holds (doubling would allow 100%), and copies each row about 4 times over a run."""
    def __init__(self, dtype, width=None):
        self.shape_tail = () if width is None else (width,)
        self.data = np.empty((16,) + self.shape_tail, dtype)
        self.n = 0

    def extend(self, rows):
        if not (type(rows) is np.ndarray and rows.dtype == self.data.dtype and rows.ndim == len(self.shape_tail) + 1
                and rows.shape[1:] == self.shape_tail):
            rows = np.asarray(rows, self.data.dtype).reshape((-1,) + self.shape_tail)
        need = self.n + len(rows)
        self._reserve(need)
        self.data[self.n:need] = rows
        self.n = need

    def append(self, value):
        "Append one row (one value when the array is 1-D): no per-call array conversions, for the per-step path."
        self._reserve(self.n + 1)
        self.data[self.n] = value
        self.n += 1

    def _reserve(self, need):
        "Room for `need` rows, growing the buffer by a quarter when it is full."
        if need > len(self.data):
            grown = np.empty((max(need, len(self.data) + len(self.data) // 4, 16),) + self.shape_tail, self.data.dtype)
            grown[:self.n] = self.data[:self.n]
            self.data = grown

    @property
    def view(self): return self.data[:self.n]

    def compress(self, keep):
        "Keep only the rows where `keep` is True, in a new buffer (DataFrames already handed out keep their data)."
        self.data = self.data[:self.n][keep]
        self.n = len(self.data)

    def __len__(self): return self.n


def _ranges(starts, lengths) -> np.ndarray:
    "The indices start, start + 1, ... of each of the ranges (`starts[i]`, `lengths[i]` long), one after another."
    lengths = np.asarray(lengths, np.int64)
    offsets = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(np.asarray(starts, np.int64), lengths) + offsets
