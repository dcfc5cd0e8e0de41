"""Filling a record: its layer table (`set_layers`), one step at a time (`add_step`, with every argument checked before
any array grows) or several at once (`_extend`, the path of `GradStats`' waiting steps, of `load` and `merge`)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..checks import _is_int
from ..stats import HIST_BINS
from .arrays import _step_squares
from .columns import COUNT_COLUMNS, LAYER_COLUMNS

__all__ = []


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


class _Filling:
    """`GradRecord`'s methods that add layers and steps to its arrays (`_values`, `_counts`, `_row_layer`, `_hist`,
    `_step_cols`, `_lrs`, set up by `GradRecord.__init__`)."""

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
                            ('n_groups', len(group_lrs)), ('grad_sq', _step_squares(values, [len(values)])[0])):
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
        n_rows = np.asarray(n_rows, np.int64)
        self._step_cols['grad_sq'].extend(_step_squares(self._values.view[len(self._values) - int(n_rows.sum()):], n_rows))
        self._step_cols['kept_every'].extend(np.asarray(steps['kept_every']) if 'kept_every' in steps
                                             else np.full(len(new_steps), self.every))
        self._step_cols['rank'].extend(np.asarray(steps['rank']) if 'rank' in steps
                                       else np.full(len(new_steps), self.rank or 0))
        self._grew(len(new_steps))
