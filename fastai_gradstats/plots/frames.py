"""What the figures read: a record (live or loaded) or its tidy DataFrame, its layers from input to output (merged
across steps that hold different layers), one rank's rows only, and the metrics and layers a caller names, checked."""
from __future__ import annotations

import heapq
import math

import numpy as np
import pandas as pd

from ..record import GradRecord

__all__ = ['is_weight']


_NOT_METRICS = {'step', 'epoch', 'layer', 'rank'}


def _frame(record, what='record'):
    "The tidy DataFrame and the layer order (input to output) of `record` (a GradRecord or its df)."
    if isinstance(record, GradRecord):
        df = record.df
        depth = record.layers.set_index('name')['depth']
        present = pd.unique(df['layer'].astype(str))
        order = sorted(present, key=lambda n: depth.get(n, math.inf))
    elif isinstance(record, pd.DataFrame):
        df = record
        if 'layer' not in df or 'step' not in df:
            raise ValueError(f"`{what}` must be a GradRecord or its `.df` (with `step` and `layer` columns)")
        order = _merged_order(df)
    else:
        raise TypeError(f"`{what}` must be a GradRecord or a DataFrame, got {type(record).__name__}")
    if df.empty: raise ValueError(f"`{what}` is empty: no step was recorded")
    _check_one_rank(df, what, 'df')
    return df, order


def _merged_order(df):
    """The layers of a tidy DataFrame from input to output. Each step's rows run from input to output, but a step
    need not hold every layer (a frozen body, a layer added later): the steps' orders are merged (a stable
    topological sort, ties by first appearance); where they contradict each other, the layers left over follow in
    order of first appearance."""
    codes, names = pd.factorize(df['layer'])  # numbered by first appearance
    names = [str(n) for n in names]
    steps = df['step'].to_numpy()
    if (codes < 0).any(): codes, steps = codes[codes >= 0], steps[codes >= 0]  # rows without a layer name
    if len(steps) > 1 and (np.diff(steps) < 0).any():  # rows sorted otherwise: each step's rows in their own order
        by_step = np.argsort(steps, kind='stable')
        codes, steps = codes[by_step], steps[by_step]
    # the order of a step is the chain of its neighbouring rows; the distinct links of all steps make the graph
    same = (steps[1:] == steps[:-1]) & (codes[1:] != codes[:-1])
    links = pd.unique(codes[:-1][same].astype(np.int64) * len(names) + codes[1:][same])
    before, after = np.divmod(links, len(names))
    incoming = np.bincount(after, minlength=len(names))
    successors = pd.Series(after).groupby(before).agg(list).to_dict() if len(links) else {}
    ready = [i for i in range(len(names)) if incoming[i] == 0]
    heapq.heapify(ready)
    order, placed = [], np.zeros(len(names), bool)
    while ready:
        i = heapq.heappop(ready)
        order.append(i); placed[i] = True
        for j in successors.get(i, ()):
            incoming[j] -= 1
            if incoming[j] == 0: heapq.heappush(ready, j)
    order += [i for i in range(len(names)) if not placed[i]]  # a cycle: the steps disagree
    return [names[i] for i in order]


def _check_one_rank(df, what, table, example=None):
    "Refuse the rows of several ranks, which would be drawn over (or added to) each other."
    if 'rank' in df and df['rank'].nunique() > 1:
        example = example or f"`{table}[{table}['rank'] == 0]` of its `.{table}`"
        raise ValueError(f"`{what}` is a merge of {df['rank'].nunique()} ranks, which would draw over each other: draw one "
                         f"rank's rows, e.g. {example}")


def is_weight(name: str) -> bool:
    "Whether the parameter called `name` is a weight (`fc.weight`, `rnn.weight_hh_l0`), not a bias or a buffer-like scale."
    if not isinstance(name, str): raise TypeError(f"`name` must be a parameter name (str), got {type(name).__name__} {name!r}")
    return name.rsplit('.', 1)[-1].startswith('weight')


def _metrics_of(df):
    return [c for c in df.columns if c not in _NOT_METRICS and pd.api.types.is_numeric_dtype(df[c])]


def _check_metric(df, metric, argname='metric'):
    available = _metrics_of(df)
    if not isinstance(metric, str) or metric not in available:
        raise ValueError(f"unknown `{argname}` {metric!r}; available: {', '.join(available)}")


def _select_layers(order, layers, argname='layers'):
    "The layers of `order` named in `layers` (None: all; one name or a list of names), in `order`'s order."
    if layers is None: return order
    if isinstance(layers, str): layers = [layers]
    if not isinstance(layers, (list, tuple)) or not all(isinstance(l, str) for l in layers):
        raise TypeError(f"`{argname}` must be None, a layer name or a list of layer names, got {layers!r}")
    if not layers: raise ValueError(f"`{argname}` is empty: give at least one layer, or None for all")
    unknown = [l for l in layers if l not in order]
    if unknown: raise ValueError(f"unknown `{argname}` {unknown}; recorded layers: {', '.join(order)}")
    return [l for l in order if l in set(layers)]
