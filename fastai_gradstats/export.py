"""Send what `GradStats` records to TensorBoard or Weights & Biases, from the record's host arrays.

The exporters are small companion callbacks: add them next to `GradStats` and they read the step
it just recorded (no extra device-to-host copy), write the per-step scalars under the names people
expect (`grad_norm/<layer>`, `grad_norm/total`, ...) and, every `hist_every` recorded steps, the
log10 |g| histograms. Neither tensorboard nor wandb is required: install the one you use
(`pip install tensorboard`, or the extra from a clone: `pip install -c constraints.txt -e ".[tensorboard]"`).
"""
from __future__ import annotations

import math

import numpy as np
from fastai.callback.core import Callback
from fastcore.basics import store_attr

from .callback import GradStats
from .callback.fit_scope import _FitScope
from .record import COUNT_COLUMNS
from .checks import _positive_int
from .stats import HIST_BINS, HIST_DECADES, METRICS

__all__ = ['TensorBoardGradStats', 'WandbGradStats', 'step_scalars', 'log10_histogram', 'SCALARS', 'STEP_SCALAR_COLUMNS']

SCALARS = ('grad_norm', 'grad_param_ratio', 'dead_frac', 'n_nan', 'n_inf', 'update_ratio')
"Per-layer columns sent every recorded step, as `<column>/<layer>`; plus `grad_norm/total`, `loss`, `lr`."


def _ratio(a, b) -> float:
    "`a / b` as `GradRecord.df` divides (numpy's float division): inf over zero, NaN for 0 / 0 or a NaN."
    with np.errstate(divide='ignore', invalid='ignore'): return float(np.float64(a) / np.float64(b))


STEP_SCALAR_COLUMNS = (*METRICS, 'grad_param_ratio', *COUNT_COLUMNS, 'update_ratio')
"The per-layer columns `step_scalars` can send: `SCALARS` plus the other stored metrics (`param_norm`, ...)."
_LAST_KEYS = ('grad_norm', 'loss', 'lr', 'layers', 'values', 'counts')


def step_scalars(last: dict, columns=SCALARS) -> dict:
    """The scalars of one recorded step: `{'grad_norm/total': ..., 'loss': ..., 'lr': ..., 'grad_norm/<layer>': ...}`.

    `last` is the dict `GradRecord.last()` returns (not `record.df`, nor the None of `last(complete=True)`
    when no step is complete). `columns` is a list or tuple of per-layer columns to send as `<column>/<layer>`,
    each one of `STEP_SCALAR_COLUMNS`; `update_ratio` is sent only when the record has `update_norm`,
    and `dead_frac` not where it is NaN (1-D parameters)."""
    if not isinstance(last, dict):
        raise TypeError(f"`last` must be the dict of one recorded step (`GradRecord.last()`), got {type(last).__name__}")
    missing = [k for k in _LAST_KEYS if k not in last]
    if missing: raise ValueError(f"`last` lacks {missing}: pass the dict of one recorded step (`GradRecord.last()`)")
    if not isinstance(columns, (list, tuple)):
        raise TypeError(f"`columns` must be a list or tuple of column names, got {type(columns).__name__} {columns!r}")
    unknown = [c for c in columns if c not in STEP_SCALAR_COLUMNS]
    if unknown: raise ValueError(f"unknown `columns` {unknown}; known: {', '.join(STEP_SCALAR_COLUMNS)}")
    values, counts = last['values'], last['counts']
    out = {'grad_norm/total': last['grad_norm'], 'loss': last['loss'], 'lr': last['lr']}
    width = values.shape[1]
    for i, layer in enumerate(last['layers']):
        row = dict(zip(METRICS, values[i, :len(METRICS)].tolist()))
        norm, pnorm = row['grad_norm'], row['param_norm']
        row['grad_param_ratio'] = _ratio(norm, pnorm)
        row['n_nan'], row['n_inf'] = int(counts[i, 0]), int(counts[i, 1])
        if width > len(METRICS): row['update_ratio'] = _ratio(values[i, len(METRICS)], pnorm)
        for column in columns:
            if column in row and not (column == 'dead_frac' and math.isnan(row[column])):
                out[f'{column}/{layer}'] = row[column]
    return out


def log10_histogram(counts: np.ndarray):
    """The finite, non-zero part of a `HIST_BINS` count row as a histogram of log10 |g|: (edges, counts),
    with the `tiny` and `huge` bins as the open ends."""
    lo, hi = HIST_DECADES[0], HIST_DECADES[-1]
    edges = np.arange(lo - 1, hi + 3, dtype=np.float64)       # tiny, one per decade, huge
    inner = counts[HIST_BINS.index('tiny'):HIST_BINS.index('huge') + 1]
    return edges, np.asarray(inner, np.float64)


class _Exporter(_FitScope, Callback):
    """Reads the step `GradStats` just recorded (after its `after_step`) and hands it to `send`; opens at the start of
    a fit and closes at its end (`validate` and `get_preds`, which send `before_fit`/`after_fit` too, open nothing)."""
    order = GradStats.order + 1
    run_valid = False
    _sent = -1          # the last step sent, kept from fit to fit (the record counts on) ...
    _sent_from = None   # ... of this record
    _n_sent = 0
    _active = False     # in a fit it sends from (not lr_find's)

    def start_fit(self):
        # lr_find trains a throwaway copy, and a data-parallel rank where GradStats does not record (it records on rank 0
        # unless `all_ranks`) has nothing to send: open nothing there
        recorder = getattr(self.learn, 'grad_stats_cb', None)
        self._active = not hasattr(self.learn, 'lr_finder') and (recorder is None or recorder._active)
        if not self._active: return
        record = getattr(self.learn, 'grad_stats', None)
        if record is not None and record is not self._sent_from:  # send what this fit records, not what came before
            self._sent_from, self._sent = record, record.last()['step'] if record._n_steps() else -1
        self.open()

    def after_step(self):
        if self._active: self._send_new()

    def _send_new(self):
        """Send the complete steps not sent yet, oldest first (with `update_ratio` on, a step completes one step later;
        a step another callback cancelled completes with the next one)."""
        record = getattr(self.learn, 'grad_stats', None)
        if record is None or not record._n_steps(): return  # (no thinning: it sends steps `keep_last` drops later)
        if record is not self._sent_from: self._sent, self._sent_from = -1, record  # a record that came in mid-fit: all of it
        new = []
        while (step := record.last(complete=True, back=len(new))) is not None and step['step'] > self._sent:
            new.append(step)
        for last in reversed(new):
            self._sent = last['step']
            hist = last['hist'] if last['hist'] is not None and self._n_sent % self.hist_every == 0 else None
            self._n_sent += 1
            self.send(last['step'], step_scalars(last), None if hist is None else dict(zip(last['layers'], hist)))

    def end_fit(self):
        if not self._active: return
        self._send_new()  # GradStats (earlier in order) has completed the last step by now
        self.close()


def _need(module, extra, who):
    try: return __import__(module, fromlist=['_'])
    except ImportError as e:
        package = extra  # the extra is named after the package it installs (torch.utils.tensorboard needs tensorboard)
        raise ImportError(f"{who} needs {package}: `pip install {package}`, or from a clone of fastai_gradstats "
                          f"`pip install -c constraints.txt -e \".[{extra}]\"` (the constraints keep torch pinned)") from e


class TensorBoardGradStats(_Exporter):
    "Write `GradStats`' per-step scalars and, every `hist_every` recorded steps, log10 |g| histograms to TensorBoard"
    def __init__(self,
        log_dir=None,        # TensorBoard log directory (default: SummaryWriter's runs/...)
        hist_every:int=10,   # Send the histograms every this many recorded steps
        writer=None,         # Or an open `torch.utils.tensorboard.SummaryWriter` to write to
    ):
        hist_every = _positive_int(hist_every, 'hist_every')
        if writer is not None and not all(callable(getattr(writer, m, None)) for m in ('add_scalar', 'add_histogram_raw')):
            raise TypeError(f"`writer` must be None or a SummaryWriter (with add_scalar and add_histogram_raw), "
                            f"got {type(writer).__name__}")
        self._summary_writer = _need('torch.utils.tensorboard', 'tensorboard', 'TensorBoardGradStats').SummaryWriter
        store_attr('log_dir,hist_every,writer')
        self._own = writer is None

    def open(self):
        "At the start of a fit: open a `SummaryWriter` on `log_dir` unless one was given."
        if self.writer is None: self.writer = self._summary_writer(self.log_dir)

    def send(self, step, scalars, hists):
        "Write one recorded step: `scalars` (tag -> number, from `step_scalars`) and `hists` (layer -> bin counts, or None)."
        for tag, value in scalars.items(): self.writer.add_scalar(tag, value, step)
        for layer, counts in (hists or {}).items():
            for name in ('zero', 'inf', 'nan'): self.writer.add_scalar(f'hist_{name}/{layer}', float(counts[HIST_BINS.index(name)]), step)
            edges, inner = log10_histogram(counts)
            if inner.sum() == 0: continue   # nothing finite and non-zero to draw (an all-zero or all-NaN layer)
            centres = (edges[:-1] + edges[1:]) / 2
            self.writer.add_histogram_raw(f'grad_log10_abs/{layer}', min=float(edges[0]), max=float(edges[-1]),
                                          num=int(inner.sum()), sum=float((centres * inner).sum()),
                                          sum_squares=float((centres ** 2 * inner).sum()),
                                          bucket_limits=edges[1:].tolist(), bucket_counts=inner.tolist(), global_step=step)

    def close(self):
        "At the end of a fit: flush the writer, and close it when this callback opened it."
        if callable(getattr(self.writer, 'flush', None)): self.writer.flush()
        if self._own: self.writer.close(); self.writer = None


class WandbGradStats(_Exporter):
    "Log `GradStats`' per-step scalars and, every `hist_every` recorded steps, log10 |g| histograms with `wandb.log`"
    def __init__(self,
        hist_every:int=10,   # Send the histograms every this many recorded steps
        wandb_run=None,      # The wandb run to log to (default: the active `wandb.run`, which must exist)
    ):
        hist_every = _positive_int(hist_every, 'hist_every')
        self._wandb = _need('wandb', 'wandb', 'WandbGradStats')
        store_attr('hist_every,wandb_run')  # not `run`: fastai's Callback.run switches a callback off

    def open(self):
        "At the start of a fit: check there is a wandb run to log to (ValueError otherwise)."
        if self.wandb_run is None and self._wandb.run is None:
            raise ValueError("WandbGradStats needs a wandb run: call wandb.init(...) first or pass `wandb_run=`")

    def send(self, step, scalars, hists):
        "Log one recorded step: `scalars` (tag -> number, from `step_scalars`) and `hists` (layer -> bin counts, or None)."
        run = self.wandb_run or self._wandb.run
        data = dict(scalars)
        for layer, counts in (hists or {}).items():
            edges, inner = log10_histogram(counts)
            data[f'grad_log10_abs/{layer}'] = self._wandb.Histogram(np_histogram=(inner.tolist(), edges.tolist()))
        run.log(data, step=int(step))

    def close(self):
        "At the end of a fit: nothing to do (the wandb run belongs to the caller, who finishes it)."
