"""Records made from others: `load` reads one back from a saved run (checking every file against the others), `merge`
joins the records of several data-parallel ranks (live, loaded, or paths of saved runs)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..stats import HIST_BINS, METRICS
from ..thresholds import Thresholds
from .columns import ADDED_METRICS, COUNT_COLUMNS
from .grad_record import GradRecord
from .saved import _FILES, _HIST_FILE, _LRS_FILE, FORMAT_VERSION

__all__ = ['load', 'merge']


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
