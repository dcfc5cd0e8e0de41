"""Reading a record: tidy pandas DataFrames built from its arrays when asked (`df`, `steps`, `layers`, `lrs`, `hist`)
and cached until the next step arrives, and `last`, the last step straight from the arrays (no DataFrame)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..checks import _is_int
from ..stats import HIST_BINS, METRICS
from .columns import COUNT_COLUMNS, DERIVED_COLUMNS, LAYER_COLUMNS, STEP_COLUMNS

__all__ = []


class _Tables:
    """`GradRecord`'s readers: its DataFrames (each built once, kept in `_cache` until a step arrives) and `last`."""

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
                   grad_norm=float(np.sqrt(self._step_cols['grad_sq'].view[-1 - back])))
        return out

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
            cols = {k: self._step_cols[k].view.copy() for k in ('step', 'epoch', 'lr', 'loss')}
            cols['grad_norm'] = np.sqrt(self._step_cols['grad_sq'].view)  # kept per step as they arrive
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
