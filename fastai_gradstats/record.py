"""What `GradStats` recorded: compact per-step arrays, tidy DataFrames on demand, save and load.

The record knows nothing of fastai. It holds float32 arrays that grow by a quarter at a time while
training; `.df` and `.steps` build pandas DataFrames from them when asked and cache them
until the next step arrives. Saved runs are a directory of parquet files and a small JSON
file (no pickle), so a run from someone else is safe to open and other tools read it.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from .checks import _is_int, _positive_int
from .stats import HIST_BINS, METRICS
from .thresholds import Thresholds

__all__ = ['GradRecord', 'load', 'merge', 'record_method', 'LAYER_COLUMNS', 'STEP_COLUMNS', 'COUNT_COLUMNS', 'EXTRA_COLUMNS']

DERIVED_COLUMNS = ('grad_param_ratio', 'grad_rms')
"Per-layer columns derived when `df` is built: grad_norm / param_norm, and grad_norm / sqrt(numel)."
EXTRA_COLUMNS = ('update_norm',)
"""Optional stored per-layer columns: `update_norm` is ||w_after - w_before||, the size of the step the
optimizer took (0 on a skipped step); `df` then also derives `update_ratio` = update_norm / param_norm
(`param_norm` is measured before the step)."""
COUNT_COLUMNS = ('n_nan', 'n_inf')
"Integer per-layer columns: how many gradient elements are NaN, and how many are ±Inf."
LAYER_COLUMNS = ('name', 'module', 'shape', 'numel', 'depth', 'group', 'requires_grad')
"""Columns of `GradRecord.layers`: one row per parameter tensor, `depth` 0 nearest the input, `group` the
optimizer's parameter group (-1: not in the optimizer or unknown), `requires_grad` whether it required a gradient
in the last fit (None: unknown, as in runs saved before it was recorded)."""
STEP_COLUMNS = ('step', 'epoch', 'lr', 'loss', 'grad_norm', 'skipped', 'kept_every')
"""Columns of `GradRecord.steps`: one row per recorded optimizer step; `kept_every` is the stride at which
steps around this one are kept (`every`, or more where `keep_last` thinned old steps)."""
ADDED_METRICS = ('shared_zero_frac', 'unit_spread')
"Statistics of `METRICS` added after format 1 was first written: a run saved without them loads with NaN there."
FORMAT_VERSION = 1
_FILES = {'meta': 'meta.json', 'steps': 'steps.parquet', 'stats': 'stats.parquet'}
_HIST_FILE = 'hist.parquet'  # present when the run kept magnitude histograms, rows aligned with stats.parquet
_LRS_FILE = 'lrs.parquet'    # the parameter groups' learning rates (`lrs`), when any step has them


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


def _rows(value, dtype, width: int, name: str, n_rows: int | None = None) -> np.ndarray:
    "`value` as an array of rows of `width` (`n_rows` of them when given); else a TypeError or ValueError naming `name`."
    try: array = np.asarray(value, dtype)
    except (TypeError, ValueError) as e: raise TypeError(f"`{name}` must be an array of numbers: {e}") from None
    if array.size % width or (n_rows is not None and array.size != n_rows * width):
        raise ValueError(f"`{name}` must have {'' if n_rows is None else f'{n_rows} rows of '}{width} columns, "
                         f"got shape {array.shape}")
    return array.reshape(-1, width)


def _group_lrs(lr) -> np.ndarray:
    "`lr` (one learning rate, or a sequence of one per parameter group) as a 1-D float64 array; else a TypeError naming `lr`."
    if isinstance(lr, (str, bytes)) or not (hasattr(lr, '__len__') or np.ndim(lr) == 0):
        raise TypeError(f"`lr` must be a number or a list of numbers (one per parameter group), got {lr!r}")
    try: lrs = np.asarray(lr, np.float64).reshape(-1)
    except (TypeError, ValueError): raise TypeError(f"`lr` must be a number or a list of numbers, got {lr!r}") from None
    if np.ndim(lr) > 1 or not len(lrs):
        raise ValueError(f"`lr` must be a number or a non-empty flat list of numbers (one per parameter group), got {lr!r}")
    return lrs


def _scalar(value, kind, name: str):
    "`value` as an int or float (`kind`); else a TypeError naming `name`."
    if kind is int and not _is_int(value): raise TypeError(f"`{name}` must be an int, got {value!r}")
    try: return kind(value)
    except (TypeError, ValueError): raise TypeError(f"`{name}` must be a number, got {value!r}") from None


class GradRecord:
    """Per-layer gradient statistics of a training run, one entry per recorded optimizer step.

    `GradStats` fills it while training and leaves it at `learn.grad_stats`; `load` reads a
    saved one back. Read it through:

    - `df`: tidy DataFrame, one row per (recorded step, parameter tensor), ordered by step and
      then from input to output; columns `step`, `epoch`, `layer`, the statistics of
      `fastai_gradstats.stats.METRICS`, `grad_param_ratio`, `grad_rms` (root mean square of the
      gradient's elements), `n_nan`, `n_inf`, and `update_norm`, `update_ratio` when they were recorded
      (and first a `rank` column in a merge of several ranks);
    - `steps`: one row per recorded step: `step`, `epoch`, `lr`, `loss`, `grad_norm` (the L2 norm
      over all recorded parameters), `skipped` (the optimizer did not apply this step), `kept_every`
      (the stride at which steps around this one are kept: `every`, or more where `keep_last` thinned
      old steps), and first a `rank` column in a merge of several ranks (`merge`);
    - `layers`: one row per parameter tensor: `name`, `module`, `shape`, `numel`, `depth`, `group`
      (the optimizer's parameter group, -1 when unknown), `requires_grad` (in the last fit; None when unknown);
    - `lrs`: one row per (recorded step, optimizer parameter group): `step`, `group`, `lr`, so discriminative
      learning rates show (`steps['lr']` is the last group's);
    - `stopped_steps`: the steps at which `GradStats(stop_on_critical=True)` stopped training (recorded, flagged
      `skipped`, never applied; the diagnosis reads their gradients), a list, empty when it never stopped;
    - `thresholds`: the `Thresholds` the run was recorded with (`GradStats(thresholds=...)`; None: the defaults),
      which `health`, `summary` and the report use unless given others; `save` and `load` keep them.

    Arguments: `layers`, the layer table (dicts with the `layers` columns, or set later with `set_layers`);
    `args`, a dict of the callback's arguments (saved with the run); `extra_columns`, value columns after
    `METRICS` (only `'update_norm'`); `hist_dtype`, an integer numpy dtype (`GradStats` uses uint16 or int64)
    that makes the record keep magnitude histograms of that dtype; `keep_last`, keep every step of the last
    `keep_last` recorded and thin older ones geometrically (None: keep all); `every`, the stride at which
    the steps are recorded (the `kept_every` of steps that were not thinned).
    """
    thresholds = None  # the `Thresholds` the run was recorded with (None: the defaults); older records lack their own
    _deferred = None  # records pickled before `set_last_later` existed have no such attribute of their own
    stopped_steps = ()  # nor before `stopped_steps`
    _waiting = None   # nor before `hold` existed
    _pending_last = False

    def __init__(self, layers=(), args=None, extra_columns=(), hist_dtype=None, keep_last=None, every=1):
        self.keep_last, self.every = _positive_int(keep_last, 'keep_last', allow_none=True), _positive_int(every, 'every')
        self.rank = None        # the process rank under data parallel (None: one process)
        self.multi_rank = False # a merge of several ranks: `df` and `steps` get a `rank` column
        self.stopped_steps = []  # where `GradStats(stop_on_critical=True)` stopped training (recorded, not applied)
        self._unthinned = 0
        self._layers = []
        self._index = {}
        if args is not None and not isinstance(args, Mapping):
            raise TypeError(f"`args` must be a dict of the callback's arguments or None, got {type(args).__name__} {args!r}")
        self.args = dict(args or {})
        if hist_dtype is not None:   # histograms hold counts of elements
            try: kind = np.dtype(hist_dtype).kind
            except (TypeError, ValueError): kind = None
            if kind is None or kind not in 'iu':
                raise TypeError(f"`hist_dtype` must be None or an integer numpy dtype (uint16, int64, ...), got {hist_dtype!r}")
            hist_dtype = np.dtype(hist_dtype)
        unknown = set(extra_columns) - set(EXTRA_COLUMNS)
        if unknown: raise ValueError(f"`extra_columns` has unknown names {sorted(unknown)}; known: {list(EXTRA_COLUMNS)}")
        self.value_columns = list(METRICS) + [c for c in EXTRA_COLUMNS if c in extra_columns]
        self._values = _Growable(np.float32, len(self.value_columns))
        self._hist = None if hist_dtype is None else _Growable(hist_dtype, len(HIST_BINS))
        self._counts = _Growable(np.int64, len(COUNT_COLUMNS))
        self._row_layer = _Growable(np.int32)
        self._step_cols = {'step': _Growable(np.int64), 'epoch': _Growable(np.int32), 'lr': _Growable(np.float64),
                           'loss': _Growable(np.float32), 'skipped': _Growable(np.bool_), 'n_rows': _Growable(np.int64),
                           'kept_every': _Growable(np.int64), 'rank': _Growable(np.int32), 'n_groups': _Growable(np.int32)}
        self._lrs = _Growable(np.float64)  # every parameter group's learning rate, `n_groups` of them per step
        self._cache = {}
        self.pending_last = False
        self._deferred = None  # (column, fetch): where the pending values are, fetched when something reads them
        self._waiting = None   # what adds the steps recorded but not added yet (`hold`)
        self.set_layers(layers)

    # --- filling -------------------------------------------------------------------------
    def set_layers(self, layers):
        """Add the parameter tensors described by `layers` (dicts with the keys of `LAYER_COLUMNS`).

        A layer already known by name keeps its index and takes the new description, unless its shape changed
        after steps were recorded (a replaced head, one callback on another model): then it is another tensor,
        added as a new layer, and the rows recorded so far stay with the old one, renamed `'<name> (<shape>)'`
        (e.g. `'2.weight (2x16)'`), so that their `grad_rms` and the like keep its size."""
        self._add_waiting()  # the steps waiting refer to the layers as they are
        for layer in layers:
            missing = set(LAYER_COLUMNS) - set(layer) - {'group', 'requires_grad'}
            if missing: raise ValueError(f"`layers` entry {layer!r} lacks {sorted(missing)}")
            entry = {k: layer.get(k, -1) for k in LAYER_COLUMNS}
            entry['requires_grad'] = layer.get('requires_grad')
            if entry['requires_grad'] is not None and not isinstance(entry['requires_grad'], (bool, np.bool_)):
                raise TypeError(f"`layers` entry {layer!r}: `requires_grad` must be True, False or None")
            if entry['requires_grad'] is not None: entry['requires_grad'] = bool(entry['requires_grad'])
            if not isinstance(entry['name'], str): raise TypeError(f"`layers` entry {layer!r}: `name` must be a str")
            for key in ('numel', 'depth', 'group'):
                if not _is_int(entry[key]):
                    raise TypeError(f"`layers` entry {layer!r}: `{key}` must be an int")
                entry[key] = int(entry[key])
            shape = entry['shape']
            if isinstance(shape, (str, bytes)) or not hasattr(shape, '__iter__') or \
                    not all(map(_is_int, shape)):
                raise TypeError(f"`layers` entry {layer!r}: `shape` must be a sequence of ints")
            entry['shape'] = tuple(int(d) for d in shape)
            known = self._index.get(entry['name'])
            if known is not None and (self._layers[known]['shape'] == entry['shape'] or
                                      not (self._row_layer.view == known).any()):
                self._layers[known] = entry
            else:
                if known is not None: self._rename_layer(known)
                self._index[entry['name']] = len(self._layers)
                self._layers.append(entry)
        self._cache.clear()

    def _rename_layer(self, index):
        "Give the layer at `index` the name `'<name> (<shape>)'`, free of any other layer's, and its name to the next."
        old = self._layers[index]
        base = f"{old['name']} ({'x'.join(map(str, old['shape']))})"
        name, k = base, 1
        while name in self._index: k += 1; name = f'{base} #{k}'
        del self._index[old['name']]
        self._layers[index] = dict(old, name=name)
        self._index[name] = index

    def depth_of(self) -> dict:
        "The known layers' depths, by name."
        return {l['name']: l['depth'] for l in self._layers}

    def layer_index(self, names):
        "Indices of the layers called `names`, for `add_step`."
        codes = pd.Categorical(np.asarray(names, dtype=object), categories=[l['name'] for l in self._layers]).codes
        if (codes < 0).any():
            unknown = np.asarray(names, dtype=object)[codes < 0][0]
            raise ValueError(f"unknown layer {unknown!r}; add it with `set_layers` first")
        return codes.astype(np.int32)

    def add_step(self, step, epoch, lr, loss, layer_index, values, counts=None, skipped=False, hist=None, pending=False):
        """Append one recorded optimizer step.

        `step` (an int, larger than the last step's) and `epoch` number it; `lr` is the learning rate of that
        step, one number or one per optimizer parameter group (a list; `steps['lr']` is the last group's, `lrs` all of
        them); `loss` its loss; `skipped`: the optimizer did not apply it.
        `layer_index` (from `layer_index`) says which layer each row of `values` belongs to;
        `values` has one column per entry of `value_columns` (NaN for an extra column not known
        yet, see `set_last`); `counts` one per `COUNT_COLUMNS` (zeros when omitted); `hist`, when
        the record keeps histograms, one per `HIST_BINS`; `pending`: its extra columns come later (`set_last`).
        Nothing is added when an argument is wrong (a TypeError or ValueError naming it)."""
        self._add_waiting()
        values = _rows(values, np.float32, len(self.value_columns), 'values')
        layer_index = self._check_layer_index(layer_index)
        if len(layer_index) != len(values):
            raise ValueError(f"`layer_index` has {len(layer_index)} entries for {len(values)} rows of `values`")
        counts = (np.zeros((len(values), len(COUNT_COLUMNS)), np.int64) if counts is None
                  else _rows(counts, np.int64, len(COUNT_COLUMNS), 'counts', len(values)))
        if (hist is None) != (self._hist is None):
            raise ValueError("`hist` must be given exactly when the record keeps histograms (`hist_dtype` set)")
        if hist is not None: hist = _rows(hist, self._hist.data.dtype, len(HIST_BINS), 'hist', len(values))
        # scalars first: a bad one must fail before any column grows
        step, epoch = _scalar(step, int, 'step'), _scalar(epoch, int, 'epoch')
        group_lrs = _group_lrs(lr)
        lr, loss, skipped = float(group_lrs[-1]), _scalar(loss, float, 'loss'), bool(skipped)
        if self._deferred is not None: self.fetch_pending()  # they belong to the step before this one
        columns = self._step_cols
        if len(columns['step']):
            last = columns['step'].data[columns['step'].n - 1]
            if step < last or (step == last and not self.multi_rank):  # a merge of ranks holds each step once per rank
                raise ValueError(f"`step` must increase: got {step} after {last}")
        self._extend_rows(layer_index, values, counts, hist)
        for name, value in (('step', step), ('epoch', epoch), ('lr', lr), ('loss', loss), ('skipped', skipped),
                            ('n_rows', len(values)), ('kept_every', self.every), ('rank', self.rank or 0),
                            ('n_groups', len(group_lrs))):
            columns[name].append(value)
        self._lrs.extend(group_lrs)
        self._grew(1)
        self.pending_last = bool(pending)

    def _check_layer_index(self, layer_index) -> np.ndarray:
        "`layer_index` as int32, each an index of a known layer; else a TypeError or ValueError naming it."
        array = np.asarray(layer_index).reshape(-1)
        if array.size and array.dtype.kind not in 'iu':
            raise TypeError(f"`layer_index` must hold integer layer indices (from `layer_index()`), got {array.dtype} values")
        if array.size and (array.min() < 0 or array.max() >= len(self._layers)):
            raise ValueError(f"`layer_index` must hold indices of the {len(self._layers)} known layers (0 to "
                             f"{len(self._layers) - 1}), got {array.min()} to {array.max()}")
        return array.astype(np.int32)

    def _extend_rows(self, layer_index, values, counts, hist):
        "Append per-layer rows: their layers, values, NaN/Inf counts and histograms (when the record keeps them)."
        self._values.extend(values); self._counts.extend(counts); self._row_layer.extend(layer_index)
        if self._hist is not None: self._hist.extend(hist)

    def _grew(self, n_steps):
        "After `n_steps` new steps: drop cached DataFrames, and thin when `keep_last` asks for it."
        self._cache.clear()
        self._unthinned += n_steps
        if self.keep_last is not None and self._unthinned >= max(1, self.keep_last // 4): self.thin()

    def hold(self, add):
        """Some recorded steps are not added yet: `add()` adds them (with `add_step` or `_extend`). The record calls
        it once, before anything reads or changes it (`len`, `df`, `steps`, `last`, `save`, `set_last`, ...) and
        when pickled, so no reader ever misses a step. `GradStats` holds the steps it records this way and
        assembles them up to 16 at a time, which costs less than one step at a time."""
        if not callable(add): raise TypeError(f"`add` must be callable, got {type(add).__name__}")
        self._waiting = add

    def _add_waiting(self):
        "Add the steps `hold` said are waiting, if any (their `add` runs once)."
        if self._waiting is None: return
        add, self._waiting = self._waiting, None
        add()

    def _extend(self, steps, n_rows, layer_index, values, counts, hist=None):
        "Append several steps at once: `steps` maps step columns to sequences, `n_rows` rows per step."
        self._add_waiting()
        new_steps = np.asarray(steps['step'], np.int64)
        last = self._step_cols['step'].view[-1:]
        # a merge of ranks holds each step once per rank, ordered by (step, rank)
        if len(new_steps) and np.any(np.diff(np.concatenate([last, new_steps])) < (0 if self.multi_rank else 1)):
            raise ValueError(f"`step` must increase: got {new_steps.tolist()[:5]} after {last.tolist()}")
        self._extend_rows(layer_index, values, counts, hist)
        for name in ('step', 'epoch', 'lr', 'loss', 'skipped'): self._step_cols[name].extend(np.asarray(steps[name]))
        # each step's parameter groups' learning rates (`lrs`, a list per step; without it: none known, only `lr`)
        group_lrs = [np.asarray(lrs, np.float64).reshape(-1) for lrs in steps['lrs']] if 'lrs' in steps else []
        self._step_cols['n_groups'].extend([len(lrs) for lrs in group_lrs] if group_lrs else np.zeros(len(new_steps)))
        if group_lrs: self._lrs.extend(np.concatenate(group_lrs))
        self._step_cols['n_rows'].extend(n_rows)
        self._step_cols['kept_every'].extend(np.asarray(steps['kept_every']) if 'kept_every' in steps
                                             else np.full(len(new_steps), self.every))
        self._step_cols['rank'].extend(np.asarray(steps['rank']) if 'rank' in steps
                                       else np.full(len(new_steps), self.rank or 0))
        self._grew(len(new_steps))

    # --- bounded memory --------------------------------------------------------------------
    def thin(self):
        """Apply `keep_last`: keep every recorded step of the last `keep_last * every` optimizer steps and
        thin older ones geometrically: a step whose age (in optimizer steps, from the last recorded
        one) lies in [K * 2**k, K * 2**(k+1)), with K = keep_last * every, is kept only if its number
        is a multiple of every * 2**(k+1). The last two recorded steps are always kept (with `update_ratio` a
        step is complete only once the next one arrives: an exporter sends it then). `steps['kept_every']` says
        at which stride each kept step's neighbourhood survives. Kept steps are never changed. Called
        automatically, when a quarter of `keep_last` new steps arrived and whenever the record is read (`len`,
        `df`, `steps`, `hist`, `save`, `merge`); `last(back=...)` sees the steps held before that."""
        self._add_waiting()
        self._unthinned = 0
        if self.keep_last is None or not self._n_steps(): return
        steps = self._step_cols['step'].view
        window = self.keep_last * self.every
        age = steps[-1] - steps
        old = age >= window
        old[-2:] = False
        if not old.any(): return
        band = np.zeros(len(steps), np.int64)
        band[old] = np.floor(np.log2(age[old] / window)).astype(np.int64)
        stride = np.where(old, self.every * 2 ** (band + 1), self.every)
        keep = (steps % stride == 0) | ~old
        kept_every = self._step_cols['kept_every'].view
        np.maximum(kept_every, np.where(keep, stride, kept_every), out=kept_every)
        if keep.all(): return
        rows = np.repeat(keep, self._step_cols['n_rows'].view)
        for growable in (self._values, self._counts, self._row_layer, self._hist):
            if growable is not None: growable.compress(rows)
        self._lrs.compress(np.repeat(keep, self._step_cols['n_groups'].view))
        for growable in self._step_cols.values(): growable.compress(keep)
        self._cache.clear()

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

    def __getstate__(self):
        "Pickling (`learn.export`, `copy.deepcopy`) takes the steps waiting and the values left to fetch with it, added first."
        self.fetch_pending()
        return {**self.__dict__, '_waiting': None}

    def __setstate__(self, state):
        if 'pending_last' in state: state['_pending_last'] = state.pop('pending_last')  # pickled by an older version
        self.__dict__.update(state)
        if '_lrs' not in state:  # pickled before the groups' learning rates were kept: none known for its steps
            self._lrs = _Growable(np.float64)
            self._step_cols['n_groups'] = _Growable(np.int32)
            self._step_cols['n_groups'].extend(np.zeros(len(self._step_cols['step']), np.int32))

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

    def last(self, complete: bool = False, back: int = 0) -> dict | None:
        """The last recorded step straight from the record's arrays (no DataFrame, no device access):
        `step`, `epoch`, `lr`, `loss`, `grad_norm` (total), `skipped`, `layers` (names), `values`
        (rows x `value_columns`), `counts` (rows x `COUNT_COLUMNS`) and `hist` (rows x `HIST_BINS`, or None).
        With `complete=True`, the last step whose every column is known: the one before while the last
        one's `update_norm` is still to come (`pending_last`). `back` steps before that one (an int >= 0),
        counted among the steps held now: with `keep_last`, old steps the next read thins are still there.
        None if there is no such step."""
        n_steps = self._n_steps()
        if not n_steps: raise ValueError("no step recorded yet")
        if not _is_int(back) or back < 0: raise ValueError(f"`back` must be an int >= 0, got {back!r}")
        back += 1 if complete and self.pending_last else 0
        if back >= n_steps: return None
        n_rows = self._step_cols['n_rows'].view
        end = len(self._values) - int(n_rows[n_steps - back:].sum())
        rows = slice(end - int(n_rows[-1 - back]), end)
        values = self._values.view[rows]
        names = [self._layers[i]['name'] for i in self._row_layer.view[rows]]
        out = {k: self._step_cols[k].view[-1 - back].item() for k in ('step', 'epoch', 'lr', 'loss', 'skipped')}
        out.update(layers=names, values=values, counts=self._counts.view[rows],
                   hist=None if self._hist is None else self._hist.view[rows],
                   grad_norm=float(np.sqrt(np.sum(values[:, METRICS.index('grad_norm')].astype(np.float64) ** 2))))
        return out

    # --- reading -------------------------------------------------------------------------
    def __len__(self):
        "The number of recorded steps kept (after `keep_last` thinned old ones), as in `steps`."
        self._thin_if_due()
        return len(self._step_cols['step'])

    def _n_steps(self) -> int:
        "The number of steps held now, steps waiting added, without thinning (for the per-step paths)."
        self._add_waiting()
        return len(self._step_cols['step'])

    def _thin_if_due(self):
        "Add the steps waiting, then apply `keep_last` if steps arrived since it last was."
        self._add_waiting()
        if self._unthinned and self.keep_last is not None: self.thin()

    @property
    def metrics(self):
        "Names of the per-layer statistics in `df`."
        extra = self.value_columns[len(METRICS):]
        return list(METRICS) + list(DERIVED_COLUMNS) + list(COUNT_COLUMNS) + extra + (['update_ratio'] if extra else [])

    @property
    def layers(self) -> pd.DataFrame:
        "One row per parameter tensor seen, with `name`, `module`, `shape`, `numel`, `depth`, `group` and `requires_grad`."
        if 'layers' not in self._cache:
            self._cache['layers'] = pd.DataFrame(self._layers, columns=list(LAYER_COLUMNS))
        return self._cache['layers']

    def _subset(self, positions) -> 'GradRecord':
        """A new record of the steps at `positions` (indices into `steps`, increasing), with the same layers, arguments,
        thresholds and stops: a sample of a long run that reads like the run (its `steps`, `df`, `lrs`)."""
        self._thin_if_due()
        positions = np.asarray(positions, np.int64)
        out = GradRecord(self._layers, self.args, self.value_columns[len(METRICS):],
                         None if self._hist is None else self._hist.data.dtype, every=self.every)
        out.rank, out.multi_rank, out.thresholds = self.rank, self.multi_rank, self.thresholds
        out.stopped_steps = list(self.stopped_steps)
        n_rows = self._step_cols['n_rows'].view
        starts = np.cumsum(n_rows) - n_rows
        rows = _ranges(starts[positions], n_rows[positions])
        columns = {k: self._step_cols[k].view[positions] for k in ('step', 'epoch', 'lr', 'loss', 'skipped', 'kept_every', 'rank')}
        groups = self._step_cols['n_groups'].view
        group_starts = np.cumsum(groups) - groups
        columns['lrs'] = [self._lrs.view[group_starts[p]:group_starts[p] + groups[p]] for p in positions]
        out._extend(columns, n_rows[positions], self._row_layer.view[rows], self._values.view[rows], self._counts.view[rows],
                    None if self._hist is None else self._hist.view[rows])
        return out

    def _row_step(self):
        return np.repeat(np.arange(len(self._step_cols['step'])), self._step_cols['n_rows'].view)

    @property
    def df(self) -> pd.DataFrame:
        "Tidy DataFrame, one row per (recorded step, parameter tensor); see the class docstring."
        self.fetch_pending()
        self._thin_if_due()
        if 'df' not in self._cache:
            row_step = self._row_step()
            values = self._values.view
            cols = {'rank': self._step_cols['rank'].view[row_step]} if self.multi_rank else {}
            cols |= {'step': self._step_cols['step'].view[row_step],
                    'epoch': self._step_cols['epoch'].view[row_step],
                    'layer': pd.Categorical.from_codes(self._row_layer.view, [l['name'] for l in self._layers])}
            for i, name in enumerate(METRICS): cols[name] = values[:, i]
            numel = np.array([l['numel'] for l in self._layers], np.float32)[self._row_layer.view]
            with np.errstate(divide='ignore', invalid='ignore'):
                cols['grad_param_ratio'] = values[:, METRICS.index('grad_norm')] / values[:, METRICS.index('param_norm')]
                cols['grad_rms'] = values[:, METRICS.index('grad_norm')] / np.sqrt(numel)
            for i, name in enumerate(COUNT_COLUMNS): cols[name] = self._counts.view[:, i]
            for i, name in enumerate(self.value_columns[len(METRICS):], len(METRICS)): cols[name] = values[:, i]
            if 'update_norm' in cols:
                with np.errstate(divide='ignore', invalid='ignore'):
                    cols['update_ratio'] = cols['update_norm'] / values[:, METRICS.index('param_norm')]
            self._cache['df'] = pd.DataFrame(cols, copy=False)
        return self._cache['df']

    @property
    def has_hist(self) -> bool:
        "Whether the record keeps magnitude histograms (`GradStats(hist=True)`)."
        return self._hist is not None

    @property
    def hist(self) -> pd.DataFrame:
        """Magnitude histograms: one row per (recorded step, layer), as in `df`, with `step`, `layer` (first `rank` in
        a merge of several ranks), `numel` (the layer's number of elements: the counts cover `hist_sample` of them
        at most) and one count column per bin of `fastai_gradstats.stats.HIST_BINS`."""
        if self._hist is None: raise ValueError("this record has no histograms: record with `GradStats(hist=True)`")
        df = self.df  # first: it adds the steps waiting and thins, which clears the cache
        if 'hist' not in self._cache:
            counts = pd.DataFrame(self._hist.view, columns=list(HIST_BINS))
            keys = ['rank', 'step', 'layer'] if self.multi_rank else ['step', 'layer']
            numel = pd.Series(np.array([l['numel'] for l in self._layers], np.int64)[self._row_layer.view], name='numel')
            self._cache['hist'] = pd.concat([df[keys], numel, counts], axis=1)
        return self._cache['hist']

    @property
    def steps(self) -> pd.DataFrame:
        """One row per recorded step: `step`, `epoch`, `lr`, `loss`, `grad_norm` (total), `skipped`, `kept_every`
        (the columns of `STEP_COLUMNS`), preceded by `rank` in a merge of several ranks."""
        self._thin_if_due()
        if 'steps' not in self._cache:
            sq = self._values.view[:, METRICS.index('grad_norm')].astype(np.float64) ** 2
            total = np.sqrt(np.bincount(self._row_step(), weights=sq, minlength=len(self._step_cols['step'])))
            cols = {k: self._step_cols[k].view.copy() for k in ('step', 'epoch', 'lr', 'loss')}
            cols['grad_norm'] = total
            cols['skipped'] = self._step_cols['skipped'].view.copy()
            cols['kept_every'] = self._step_cols['kept_every'].view.copy()
            if self.multi_rank: cols = {'rank': self._step_cols['rank'].view.copy(), **cols}
            self._cache['steps'] = pd.DataFrame(cols, columns=(['rank'] if self.multi_rank else []) + list(STEP_COLUMNS))
        return self._cache['steps']

    @property
    def lrs(self) -> pd.DataFrame:
        """The learning rate of every optimizer parameter group at each recorded step: one row per (step, group), with
        `step`, `group` (the index `layers['group']` refers to) and `lr` (first `rank` in a merge of several ranks).
        Discriminative learning rates (`fine_tune`, `lr=slice(...)`) show here; `steps['lr']` is the last group's.
        Runs saved before this was recorded have no rows for their steps."""
        self._thin_if_due()
        if 'lrs' not in self._cache:
            n_groups = self._step_cols['n_groups'].view
            step_of = np.repeat(np.arange(len(n_groups)), n_groups)
            starts = np.cumsum(n_groups) - n_groups
            cols = {'rank': self._step_cols['rank'].view[step_of]} if self.multi_rank else {}
            cols |= {'step': self._step_cols['step'].view[step_of],
                     'group': (np.arange(len(step_of)) - np.repeat(starts, n_groups)).astype(np.int64),
                     'lr': self._lrs.view.copy()}
            self._cache['lrs'] = pd.DataFrame(cols)
        return self._cache['lrs']

    def __repr__(self):
        if not len(self): return f"GradRecord(no steps recorded, {len(self._layers)} layers)"
        s = self._step_cols['step'].view
        return (f"GradRecord({len(self)} steps from {s[0]} to {s[-1]}, {len(self._layers)} layers, "
                f"{int(self._step_cols['skipped'].view.sum())} skipped)")

    # --- save and load -------------------------------------------------------------------
    def save(self, path) -> Path:
        """Write the record to the directory `path` (created if needed) and return it.

        The directory holds `stats.parquet` (the `df` less the columns `load` derives again: `grad_param_ratio`,
        `grad_rms`, `update_ratio`), `steps.parquet` (the `steps` less its total `grad_norm`), `hist.parquet` (the
        histogram counts, when the record keeps them), `lrs.parquet` (each parameter group's learning rate) and
        `meta.json` (format and package version, `args`, the thresholds, the layer table). `args` holds what the
        callback recorded with (`every`, `zero_tol`, `hist`, `hist_sample`, `update_ratio`, `keep_last`), what the
        last fit trained with (`batch_size`, `gradient_clip`: a GradientClip's max_norm or None) and whatever was added
        to it. `load` reads it back with the same `keep_last` and `every`."""
        if not isinstance(path, (str, Path)): raise TypeError(f"`path` must be a str or Path, got {type(path).__name__}")
        path = Path(path)
        if path.exists() and not path.is_dir(): raise ValueError(f"`path` {str(path)!r} exists and is not a directory")
        path.mkdir(parents=True, exist_ok=True)
        from . import __version__
        meta = {'format': 'fastai_gradstats.record', 'format_version': FORMAT_VERSION, 'version': __version__,
                'args': self.args, 'extra_columns': self.value_columns[len(METRICS):], 'rank': self.rank,
                'multi_rank': self.multi_rank, 'stopped_steps': list(self.stopped_steps),
                'thresholds': None if self.thresholds is None else dataclasses.asdict(self.thresholds),
                'hist_dtype': None if self._hist is None else self._hist.data.dtype.name,
                'layers': [dict(l, shape=list(l['shape'])) for l in self._layers]}
        (path/_FILES['meta']).write_text(json.dumps(meta, indent=1, default=_json_default))
        df = self.df.copy()
        df['layer'] = df['layer'].astype(str)
        df.drop(columns=[c for c in (*DERIVED_COLUMNS, 'update_ratio') if c in df]).to_parquet(path/_FILES['stats'], index=False)
        self.steps.drop(columns=['grad_norm']).to_parquet(path/_FILES['steps'], index=False)
        if self._hist is not None:  # with its step and layer, which `load` checks against stats.parquet's rows
            hist = self.hist.drop(columns=['numel'])
            hist['layer'] = hist['layer'].astype(str)
            hist.to_parquet(path/_HIST_FILE, index=False)
        elif (path/_HIST_FILE).exists(): (path/_HIST_FILE).unlink()
        if len(self.lrs): self.lrs.to_parquet(path/_LRS_FILE, index=False)
        elif (path/_LRS_FILE).exists(): (path/_LRS_FILE).unlink()
        return path


def record_method(func, name=None):
    """Make `func(record, ...)` available as the method `name` (default: its own name) of `GradRecord`.

    The modules above the record (plots, health) add their functions this way, so the record
    itself imports none of them."""
    @functools.wraps(func)  # its signature and docstring: Shift-Tab and help() show them, less the record
    def method(self, *args, **kwargs): return func(self, *args, **kwargs)
    method.__name__ = name or func.__name__
    method.__qualname__ = f'GradRecord.{method.__name__}'
    setattr(GradRecord, method.__name__, method)
    return func


def _json_default(o):
    if isinstance(o, (np.integer,)): return int(o)
    if isinstance(o, (np.floating,)): return float(o)
    return repr(o)


def load(path) -> GradRecord:
    """Read a record written by `GradRecord.save` from the directory `path`.

    The result has the same `df`, `steps` and `layers` as the saved one and works with every
    plot and check that a live record does."""
    if not isinstance(path, (str, Path)): raise TypeError(f"`path` must be a str or Path, got {type(path).__name__}")
    path = Path(path)
    if not path.is_dir(): raise FileNotFoundError(f"no saved GradStats run at {str(path)!r}: not a directory")
    missing = [f for f in _FILES.values() if not (path/f).is_file()]
    if missing: raise FileNotFoundError(f"{str(path)!r} is not a saved GradStats run: missing {', '.join(missing)}")
    try:
        meta = json.loads((path/_FILES['meta']).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(path/_FILES['meta'])!r} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get('format') != 'fastai_gradstats.record':
        raise ValueError(f"{str(path)!r} is not a saved GradStats run (meta.json has no GradStats format)")
    version = meta.get('format_version', 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"{str(path/_FILES['meta'])!r} has an invalid `format_version`: {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(f"{str(path)!r} was written by a newer fastai_gradstats (format {meta['format_version']})")
    layers = meta.get('layers')
    if not isinstance(layers, list) or not all(isinstance(l, dict) for l in layers):
        raise ValueError(f"{str(path/_FILES['meta'])!r} has no valid layer table (`layers`)")
    args = meta.get('args')
    try:
        thinning = {'keep_last': args.get('keep_last'), 'every': args.get('every', 1)} if isinstance(args, dict) else {}
        record = GradRecord(layers, args, meta.get('extra_columns', ()), meta.get('hist_dtype'), **thinning)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{str(path/_FILES['meta'])!r} is not a valid GradStats run: {e}") from None
    record.rank, record.multi_rank = meta.get('rank'), bool(meta.get('multi_rank', False))
    record.stopped_steps = [int(s) for s in meta.get('stopped_steps', [])]
    record.thresholds = _thresholds_of(meta.get('thresholds'), path)
    try:
        stats, steps = pd.read_parquet(path/_FILES['stats']), pd.read_parquet(path/_FILES['steps'])
        hist = pd.read_parquet(path/_HIST_FILE) if record.has_hist else None
        lrs = pd.read_parquet(path/_LRS_FILE) if (path/_LRS_FILE).is_file() else None
    except Exception as e:
        raise ValueError(f"{str(path)!r} holds an unreadable parquet file: {e}") from None
    for column in ADDED_METRICS:  # runs saved before these statistics existed: not measured, NaN
        if column not in stats: stats[column] = np.float32(np.nan)
    need_stats = {'step', 'epoch', 'layer', *record.value_columns, *COUNT_COLUMNS} - set(stats.columns)
    need_steps = {'step', 'epoch', 'lr', 'loss', 'skipped'} - set(steps.columns)
    if need_stats or need_steps:
        raise ValueError(f"{str(path)!r} is not a complete GradStats run: missing columns "
                         f"{sorted(need_stats) + sorted(need_steps)}")
    keys = ['rank', 'step'] if record.multi_rank else ['step']
    if 'rank' in keys and 'rank' not in steps or 'rank' in keys and 'rank' not in stats:
        raise ValueError(f"{str(path)!r} is a merge of ranks whose parquet files lack the `rank` column")
    if steps.duplicated(keys).any():
        raise ValueError(f"{str(path)!r}: steps.parquet holds a step twice ({steps[keys][steps.duplicated(keys)].iloc[0].tolist()})")
    if hist is not None:
        missing_bins = [b for b in HIST_BINS if b not in hist]
        if missing_bins or len(hist) != len(stats):
            raise ValueError(f"{str(path)!r}: hist.parquet does not match stats.parquet ({len(hist)} rows for {len(stats)}"
                             + (f", missing bins {missing_bins[:3]}" if missing_bins else '') + ")")
        # written with its step and layer since 0.1: they must be the rows of stats.parquet
        if {'step', 'layer'} <= set(hist) and not (hist['step'].to_numpy() == stats['step'].to_numpy()).all() or \
                'layer' in hist and not (hist['layer'].astype(str).to_numpy() == stats['layer'].astype(str).to_numpy()).all():
            raise ValueError(f"{str(path)!r}: hist.parquet's rows are not those of stats.parquet (steps or layers differ)")
    try:
        step_pos = pd.MultiIndex.from_frame(steps[keys]).get_indexer(pd.MultiIndex.from_frame(stats[keys]))
        if (step_pos < 0).any(): raise ValueError(f"{str(path)!r}: stats.parquet has steps that steps.parquet lacks")
        order = np.argsort(step_pos, kind='stable')
        stats = stats.iloc[order]
        columns = {c: steps[c] for c in steps.columns}
        if lrs is not None: columns['lrs'] = _lrs_of_steps(lrs, steps, keys, path)
        record._extend(columns, np.bincount(step_pos, minlength=len(steps)), record.layer_index(stats['layer']),
                       stats[record.value_columns].to_numpy(np.float32), stats[list(COUNT_COLUMNS)].to_numpy(np.int64),
                       None if hist is None else hist.iloc[order][list(HIST_BINS)].to_numpy())
    except ValueError: raise
    except Exception as e:  # anything else a damaged file can raise inside pandas or numpy
        raise ValueError(f"{str(path)!r} is not a valid GradStats run: {type(e).__name__}: {e}") from None
    return record


def _thresholds_of(saved, path):
    """The `Thresholds` saved in meta.json (None: none saved). Fields this version does not know are left out, and
    those the run's version did not know take their defaults."""
    if saved is None: return None
    if not isinstance(saved, dict): raise ValueError(f"{str(path)!r}: meta.json's `thresholds` is not a table of thresholds")
    known = {f.name for f in dataclasses.fields(Thresholds)}
    try: return Thresholds(**{k: v for k, v in saved.items() if k in known})
    except (TypeError, ValueError) as e: raise ValueError(f"{str(path)!r}: meta.json's `thresholds` are invalid: {e}") from None


def _lrs_of_steps(lrs: pd.DataFrame, steps: pd.DataFrame, keys: list, path) -> list:
    "The learning rates of each row of `steps` from a saved `lrs` table (groups 0, 1, ... of every step), checked."
    if not {*keys, 'group', 'lr'} <= set(lrs.columns):
        raise ValueError(f"{str(path)!r}: {_LRS_FILE} lacks columns {sorted({*keys, 'group', 'lr'} - set(lrs.columns))}")
    at = pd.MultiIndex.from_frame(steps[keys]).get_indexer(pd.MultiIndex.from_frame(lrs[keys]))
    if (at < 0).any(): raise ValueError(f"{str(path)!r}: {_LRS_FILE} has steps that steps.parquet lacks")
    lrs = lrs.assign(_at=at).sort_values(['_at', 'group'], kind='stable')
    out = [[] for _ in range(len(steps))]
    for i, group, lr in zip(lrs['_at'], lrs['group'], lrs['lr']):
        if group != len(out[i]): raise ValueError(f"{str(path)!r}: {_LRS_FILE} does not hold groups 0, 1, ... of each step")
        out[i].append(float(lr))
    return out


def merge(records) -> GradRecord:
    """One record from the records of several data-parallel ranks (`GradStats(all_ranks=True)`), live,
    loaded, or given as paths of saved runs. `df` and `steps` get a `rank` column and hold each step
    once per rank, ordered by step and then rank, so per-rank divergence shows side by side. A record's rank is
    its `rank` (else its place in `records`); a merge among `records` keeps the ranks of its steps. A rank given
    twice is a ValueError."""
    if isinstance(records, (str, Path, GradRecord)) or not hasattr(records, '__iter__'):
        got = f"{type(records).__name__} {str(records)!r}" if isinstance(records, (str, Path)) else type(records).__name__
        raise TypeError(f"`records` must be a list of GradRecords or paths of saved runs (one run: put it in a list), got {got}")
    records = [load(r) if isinstance(r, (str, Path)) else r for r in records]
    if not records or not all(isinstance(r, GradRecord) for r in records):
        raise TypeError("`records` must be a non-empty list of GradRecords or paths of saved runs")
    for r in records: r.fetch_pending(); r._thin_if_due()
    first = records[0]
    for r in records[1:]:
        if r.value_columns != first.value_columns or (r._hist is None) != (first._hist is None):
            raise ValueError("`records` were recorded with different options (columns or histograms) and cannot merge")
    # a merge given again keeps the ranks of its steps; another record is its `rank` (or its place in `records`)
    ranks = [r._step_cols['rank'].view if r.multi_rank else np.full(r._n_steps(), r.rank if r.rank is not None else i)
             for i, r in enumerate(records)]
    held = [sorted(set(r_ranks.tolist())) if r.multi_rank else [r.rank if r.rank is not None else i]
            for i, (r, r_ranks) in enumerate(zip(records, ranks))]
    flat = [k for h in held for k in h]
    if len(set(flat)) != len(flat): raise ValueError(f"`records` come from the same rank twice: {held}")
    layers = {l['name']: l for r in records for l in r._layers}
    out = GradRecord(list(layers.values()), first.args, first.value_columns[len(METRICS):],
                     None if first._hist is None else first._hist.data.dtype)
    out.multi_rank = True
    out.stopped_steps = sorted({s for r in records for s in r.stopped_steps})
    out.thresholds = first.thresholds  # the ranks of one run share them
    parts = []
    for r_ranks, r in zip(ranks, records):
        n_rows = r._step_cols['n_rows'].view
        starts = np.concatenate([[0], np.cumsum(n_rows)[:-1]])
        names = np.array([l['name'] for l in r._layers], dtype=object)
        for i, step in enumerate(r._step_cols['step'].view):
            parts.append((int(step), int(r_ranks[i]), r, i, slice(starts[i], starts[i] + n_rows[i]), names))
    parts.sort(key=lambda p: (p[0], p[1]))
    cols = {k: [] for k in ('step', 'epoch', 'lr', 'loss', 'skipped', 'kept_every', 'rank')}
    cols['lrs'] = []
    lr_starts = {id(r): np.cumsum(r._step_cols['n_groups'].view) - r._step_cols['n_groups'].view for r in records}
    rows, layer_index, values, counts, hist = [], [], [], [], []
    for step, rank, r, i, rows_of, names in parts:
        for k in cols:
            if k != 'lrs': cols[k].append(rank if k == 'rank' else r._step_cols[k].view[i])
        start = lr_starts[id(r)][i]
        cols['lrs'].append(r._lrs.view[start:start + r._step_cols['n_groups'].view[i]])
        rows.append(rows_of.stop - rows_of.start)
        layer_index.append(out.layer_index(names[r._row_layer.view[rows_of]]))
        values.append(r._values.view[rows_of]); counts.append(r._counts.view[rows_of])
        if r._hist is not None: hist.append(r._hist.view[rows_of])
    out._extend(cols, rows, np.concatenate(layer_index) if layer_index else [], 
                np.concatenate(values) if values else np.empty((0, len(out.value_columns))),
                np.concatenate(counts) if counts else np.empty((0, 2)), np.concatenate(hist) if hist else None)
    return out
