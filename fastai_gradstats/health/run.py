"""What every check reads of a record, computed once: the applied steps and their phases, the loss and its chance
level, the layers by kind and depth, and the findings the checks before have made."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..record import GradRecord
from ..thresholds import Thresholds

__all__ = ['finding', 'span', 'check_inputs', 'applied_mask', 'Run']

MODEL = 'model'
HEALTH_COLUMNS = ('check', 'layer', 'status', 'value', 'threshold', 'first_step', 'last_step', 'reason')
STATUSES = ('critical', 'warning', 'ok')
NO_APPLIED = ("no applied step yet: every recorded step was skipped by the optimizer (e.g. the fp16 grad scaler), "
              "so no gradient has been used (see skipped)")


def finding(check, status, reason, layer=MODEL, value=np.nan, threshold=np.nan, first_step=None, last_step=None):
    "One row of `health`."
    return {'check': check, 'layer': layer, 'status': status, 'value': float(value), 'threshold': float(threshold),
            'first_step': first_step, 'last_step': last_step, 'reason': reason}


def span(steps):
    "The first and last of `steps` as ints, (None, None) for none."
    steps = list(steps)
    return (int(min(steps)), int(max(steps))) if steps else (None, None)


def check_inputs(record, thresholds):
    "`record` and the thresholds to hold it against: those passed, else those it was recorded with, else the defaults."
    if not isinstance(record, GradRecord): raise TypeError(f"`record` must be a GradRecord, got {type(record).__name__}")
    if thresholds is None: thresholds = record.thresholds if record.thresholds is not None else Thresholds()
    if not isinstance(thresholds, Thresholds):
        raise TypeError(f"`thresholds` must be a fastai_gradstats.health.Thresholds, got {type(thresholds).__name__}")
    if not len(record): raise ValueError("`record` is empty: no step was recorded, nothing to diagnose")
    return thresholds


def applied_mask(steps, record):
    """Which `steps` count as applied: those the optimizer applied, and the ones `GradStats(stop_on_critical=True)`
    stopped at (flagged skipped, since they were never applied, but their gradients are the finding)."""
    applied = ~steps['skipped'].to_numpy(bool)
    if record.stopped_steps: applied |= np.isin(steps['step'].to_numpy(), record.stopped_steps)
    return applied


def _phases(rows, position, n, ranks=None):
    """A phase number for each of `n` applied steps (`position`: the applied step of each of `rows`): one per set of
    recorded tensors (a frozen body, then the whole model unfrozen; a GAN's generator and critic taking turns), so that
    norms are compared like with like, the steps of one set with each other wherever they fall. In a merge (`ranks`:
    each applied step's rank), each rank's steps are phases of their own."""
    codes = rows['layer'].cat.codes.to_numpy(np.float64)
    signature = np.stack([np.bincount(position, weights=w, minlength=n) for w in (np.ones_like(codes), codes, codes ** 2)], 1)
    if ranks is not None: signature = np.column_stack([signature, ranks])
    return np.unique(signature, axis=0, return_inverse=True)[1].reshape(-1)


def _by_code(values, codes, positions, n_codes, n_positions, how) -> np.ndarray:
    """`how` ('median', 'min', 'max') of finite `values` per code (0 to `n_codes` - 1), where `positions` (0 to
    `n_positions` - 1) tell values of one code apart (at most one value per code and position); NaN for a code without
    values. A median of an even count is the mean of the two middle values, as pandas takes it."""
    if how not in ('median', 'min', 'max'): raise ValueError(f"`how` must be 'median', 'min' or 'max', got {how!r}")
    if not len(values): return np.full(n_codes, np.nan)
    table = np.full((n_codes, n_positions), np.nan)   # a row per code: sorting it puts its NaNs (no value) last
    table[codes, positions] = values
    if how == 'min': return np.fmin.reduce(table, axis=1)
    if how == 'max': return np.fmax.reduce(table, axis=1)
    counts = np.bincount(codes, minlength=n_codes)
    table.sort(axis=1)
    rows = np.arange(n_codes)
    low, high = np.maximum(counts - 1, 0) // 2, counts // 2
    with np.errstate(invalid='ignore'):
        return np.where(counts > 0, (table[rows, low] + table[rows, high]) / 2, np.nan)


class Run:
    """The shared reading of a record for the checks: `t` (the thresholds), `df`, `layers`; `applied` and `not_applied`
    steps; per applied step its total norm over the tensors the optimizer holds (`norms`) and its `phase`; the loss at
    the start and at the end; the chance level of a classifier's loss; the weights (2+-D tensors, no embedding tables)
    in depth order; and `findings`, by check, as the checks before have made them."""
    def __init__(self, record, t):
        self.record, self.t = record, t
        self.df, self.layers, self.stopped_steps = record.df, record.layers, list(record.stopped_steps)
        steps = record.steps
        applied = applied_mask(steps, record)
        if applied.all(): self.applied, self.not_applied = steps.reset_index(drop=True), steps.iloc[:0]
        else: self.applied, self.not_applied = steps[applied].reset_index(drop=True), steps[~applied]
        if 'rank' in steps:   # a merge: each rank's steps one after the other, so that a step's neighbours are its rank's
            self.applied = self.applied.sort_values(['rank', 'step'], kind='stable').reset_index(drop=True)
        by_name = pd.Index(self.layers['name'].to_numpy(object), name='name')
        self.depth, self.module, self.shape, self.group, self.numel = (
            pd.Series(self.layers[c].to_numpy(), index=by_name, name=c) for c in ('depth', 'module', 'shape', 'group', 'numel'))
        # layers as their categorical codes (fast to group and look up), and what each code is
        self.categories = list(self.df['layer'].cat.categories)
        self.code_of = {n: i for i, n in enumerate(self.categories)}
        present = [self.categories[c] for c in pd.unique(self.df['layer'].cat.codes.to_numpy()) if c >= 0]
        names = self.layers['name'].tolist()
        depth, shape, module = (dict(zip(names, self.layers[c].tolist())) for c in ('depth', 'shape', 'module'))
        self.order = sorted(present, key=depth.__getitem__)
        self._depth_codes = np.array([self.code_of[n] for n in self.order], np.int64)
        self.weights = [n for n in self.order if len(shape[n]) >= 2 and module[n] != 'Embedding']
        position = self._applied_position(steps)
        every = bool((position >= 0).all())   # the usual run: every step applied, no copy of the rows
        self.applied_rows = self.df if every else self.df[position >= 0]
        self.position = position if every else position[position >= 0]
        self._columns, self._indexes = {}, {}
        self._applied_codes = self.applied_rows['layer'].cat.codes.to_numpy()
        self._applied_labels = self.applied_rows.index.to_numpy()   # increasing: `df` is in step order
        # the optimizer's tensors, when it is known: gradients it never uses (no parameter group) cannot explode training
        known = (self.group >= 0).any()
        self.optimized = [n for n in present if self.group[n] >= 0] if known else list(present)
        self.norms = self._total_norms()
        self.phase = _phases(self.applied_rows, self.position, len(self.applied),
                             self.applied['rank'].to_numpy() if 'rank' in steps else None)
        self.findings = {}
        self._read_loss()

    def _applied_position(self, steps) -> np.ndarray:
        "Each row's applied step (its place in `applied`; -1: a skipped step), by step and, in a merge, rank."
        if 'rank' in steps:
            keys = ['rank', 'step']
            return pd.MultiIndex.from_frame(self.applied[keys]).get_indexer(pd.MultiIndex.from_frame(self.df[keys]))
        applied, rows = self.applied['step'].to_numpy(), self.df['step'].to_numpy()   # each step once, increasing
        position = np.searchsorted(applied, rows)
        found = position < len(applied)
        found[found] = applied[position[found]] == rows[found]
        return np.where(found, position, -1)

    def _total_norms(self):
        "The total norm of each applied step over the optimizer's tensors (all of them when it is unknown; NaN: none)."
        used = self.mask(self.applied_rows, self.optimized)
        squares = self.applied_rows['grad_norm'].to_numpy(np.float64)[used] ** 2
        with np.errstate(invalid='ignore', over='ignore'):
            total = np.sqrt(np.bincount(self.position[used], weights=squares, minlength=len(self.applied)))
        total[np.bincount(self.position[used], minlength=len(self.applied)) == 0] = np.nan
        return total

    def _read_loss(self):
        t, n = self.t, len(self.applied)
        self.enough = n >= 10
        loss = self.applied['loss'].to_numpy(np.float64)
        finite = loss[np.isfinite(loss)]
        tail = finite[len(finite) - max(1, len(finite) // 5):] if len(finite) else finite
        # the start is the very first loss, at the initial weights: the loss of the next steps may already have exploded,
        # or converged
        self.loss_start = float(finite[0]) if len(finite) else math.nan
        self.loss_end = float(np.median(tail)) if len(tail) else math.nan
        self.falling = self.loss_end < (1 - t.loss_fall) * self.loss_start
        self.rising = self.loss_end > (1 + t.loss_fall) * self.loss_start or (len(finite) < n and len(finite) > 0
                                                                            and not np.isfinite(loss[-1]))
        self.flat = bool(self.enough and len(finite) >= n // 2 and not self.falling and not self.rising)
        if len(tail) >= 2 and self.loss_start > 0:
            half = len(tail) // 2  # how much the late loss still moves, against where training started
            self.late_change = abs(np.median(tail[half:]) - np.median(tail[:half])) / self.loss_start
        else: self.late_change = math.nan
        self.loss_settled = bool(self.enough and self.loss_end <= t.loss_converged * self.loss_start
                                 and self.late_change <= t.loss_flat)
        # a classifier's loss at a uniform guess: ln(classes) of the output-most weight (ln 2 for one output, BCE)
        out = self.weights[-1] if self.weights else None
        self.outputs = self.shape[out][0] if out is not None else 0
        self.classes = max(2, self.outputs) if self.outputs else 0
        self.chance = math.log(self.classes) if self.classes else math.nan
        # a loss's scale says something only of a classifier of 2+ classes: one output may be a regression's
        self.classifier = self.outputs >= 2
        self.at_chance = bool(self.classifier and abs(self.loss_start - self.chance) <= t.chance_margin * self.chance)
        late = self.norms[len(self.norms) - max(1, len(self.norms) // 5):]
        late = late[np.isfinite(late)]
        self.late_norm = float(np.median(late)) if len(late) else math.nan

    @property
    def late_steps(self):
        "The last fifth of the applied steps."
        n = len(self.applied)
        return self.applied['step'].iloc[n - max(1, n // 5):] if n else self.applied['step']

    def problems(self, checks=None) -> list:
        "The findings made so far that are not ok (of `checks` only, when given)."
        return [f for check, found in self.findings.items() if checks is None or check in checks
                for f in found if f['status'] != 'ok']

    def column(self, name, rows=None) -> np.ndarray:
        "Column `name` of `rows` (default: `applied_rows`, whose columns are read once) as float64."
        if rows is not None and rows is not self.applied_rows: return rows[name].to_numpy(np.float64)
        if name not in self._columns: self._columns[name] = self.applied_rows[name].to_numpy(np.float64)
        return self._columns[name]

    def codes(self, rows) -> np.ndarray:
        "The layer code (an index of `categories`) of each of `rows` (of `df`); those of `applied_rows` read once."
        if rows is self.applied_rows: return self._applied_codes
        return rows['layer'].cat.codes.to_numpy()

    def mask(self, rows, layers) -> np.ndarray:
        "Which of `rows` (of `df`) belong to one of `layers` (names)."
        wanted = np.zeros(len(self.categories) + 1, bool)   # the last entry stands for code -1 (no layer)
        wanted[[self.code_of[n] for n in layers]] = True
        return wanted[self.codes(rows)]

    def of_rows(self, rows, attribute: pd.Series) -> np.ndarray:
        "`attribute` (a Series by layer name, e.g. `self.numel`) for each of `rows`."
        return attribute.reindex(self.categories).to_numpy()[self.codes(rows)]

    def per_layer(self, column, layers=None, rows=None, how='median', values=None, where=None):
        """`how` ('median', 'min' or 'max') of `column` (or of `values`, one per row) per layer over applied `rows`
        (default: all) or those of `applied_rows` that `where` (a mask) keeps, finite values only, in depth order: a
        Series by layer name."""
        if rows is not None and where is not None: raise ValueError("pass `rows` or `where`, not both")
        rows = self.applied_rows if rows is None else rows
        values = self.column(column, rows) if values is None else np.asarray(values, np.float64)
        keep = np.isfinite(values)
        if where is not None: keep &= where
        if layers is not None: keep &= self.mask(rows, layers)
        at = self._at(rows)
        codes = self._applied_codes[at][keep]
        found = _by_code(values[keep], codes, self.position[at][keep], len(self.categories), len(self.applied), how)
        present = self._depth_codes[np.bincount(codes, minlength=len(self.categories))[self._depth_codes] > 0]
        key = present.tobytes()   # checks ask for the same layers again and again: one index for each set
        if key not in self._indexes: self._indexes[key] = pd.Index([self.categories[c] for c in present], dtype=object)
        return pd.Series(found[present], index=self._indexes[key], dtype=np.float64, copy=False)

    def _at(self, rows):
        "Where each of `rows` (some of `applied_rows`) is in `applied_rows`."
        if rows is self.applied_rows: return slice(None)
        return np.searchsorted(self._applied_labels, rows.index.to_numpy())
