"""Statistics of groups of parameter tensors (a module's weight and bias, an optimizer parameter group),
derived exactly from a record's per-tensor rows, without re-training."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .record import GradRecord

__all__ = ['combine', 'by_module', 'by_param_group', 'module_of']


def module_of(name: str) -> str:
    "The module that owns the parameter called `name`: `'body.0.weight'` -> `'body.0'` (`'(model)'` for a top-level one)."
    if not isinstance(name, str): raise TypeError(f"`name` must be a parameter name (str), got {type(name).__name__} {name!r}")
    return name.rsplit('.', 1)[0] if '.' in name else '(model)'


def combine(record: GradRecord, groups: dict) -> pd.DataFrame:
    """Combine the per-tensor rows of `record` into one row per (step, group).

    `groups` maps each parameter name to its group's name (parameters not in it are left out).
    Norms combine as the square root of the sum of squares, `grad_max` as the max, counts as sums,
    `grad_mean`, `zero_frac` weighted by elements, `grad_std` pooled, `dead_frac` weighted by units
    (NaN when no tensor of the group has units), `update_norm` as the norm of the group's step and `update_ratio` as
    ||Δw|| / ||w||; `shared_zero_frac` and `unit_spread`, which are about the units of one tensor, are a group's when it
    holds one tensor and NaN otherwise (they cannot be derived for several). NaN and Inf
    propagate (a NaN in one tensor makes the group's norm NaN), as they would in the concatenated gradient.
    Returns a DataFrame with the columns of `record.df`, ordered by step and then by the group's first
    parameter from input to output (the smallest `depth` of its parameters in `record.layers`). In a merge of
    data-parallel ranks (`merge`) each rank's tensors are combined apart, and the rows keep their `rank`
    (ordered by step, rank, group)."""
    if not isinstance(record, GradRecord): raise TypeError(f"`record` must be a GradRecord, got {type(record).__name__}")
    if not isinstance(groups, dict): raise TypeError(f"`groups` must be a dict of parameter name -> group name, got {type(groups).__name__}")
    bad = {k: v for k, v in groups.items() if not isinstance(v, str)}
    if bad: raise TypeError(f"`groups` must map parameter names to group names (str), got {bad}")
    df = record.df
    if df.empty: raise ValueError("`record` is empty: no step was recorded")
    layers = record.layers.set_index('name')
    names = df['layer'].astype(str)
    keep = names.isin(groups.keys()).to_numpy()
    df, names = df[keep], names[keep]
    if df.empty: raise ValueError("`groups` names none of the record's parameters")
    numel = layers.loc[names, 'numel'].to_numpy(np.float64)
    units = np.array([s[0] if len(s) >= 2 else 0 for s in layers.loc[names, 'shape']], np.float64)
    group = names.map(groups).to_numpy()
    f = lambda c: df[c].to_numpy(np.float64)
    work = pd.DataFrame({
        'step': df['step'].to_numpy(), 'epoch': df['epoch'].to_numpy(), 'layer': group,
        'g2': f('grad_norm') ** 2, 'p2': f('param_norm') ** 2, 'grad_max': f('grad_max'),
        'numel': numel, 'sum': f('grad_mean') * numel,
        'ss_within': np.where(numel > 1, (numel - 1) * f('grad_std') ** 2, 0.0),
        'zeros': f('zero_frac') * numel, 'units': units, 'dead': np.nan_to_num(f('dead_frac')) * units,
        'n_nan': df['n_nan'].to_numpy(), 'n_inf': df['n_inf'].to_numpy(), 'tensors': np.ones(len(df)),
        'mean_i': f('grad_mean'), 'shared_zero_frac': f('shared_zero_frac'), 'unit_spread': f('unit_spread')})
    if 'update_norm' in df: work['d2'] = f('update_norm') ** 2
    # a group's place is its first parameter's depth, not when it was first recorded (a frozen body comes in later)
    depth = {}
    for name, g in groups.items():
        if name in layers.index: depth[g] = min(depth.get(g, math.inf), layers.at[name, 'depth'])
    # a merge of ranks (`merge`): each rank's tensors are combined apart, as each rank's gradients are its own
    ids = ['rank', 'step', 'layer'] if 'rank' in df else ['step', 'layer']
    if 'rank' in df: work.insert(0, 'rank', df['rank'].to_numpy())
    keys = [work[c] for c in ids]
    per_unit = ('shared_zero_frac', 'unit_spread')  # about the rows of one tensor: a group's own only when it is one tensor
    sums = _reduce_groups(work[[c for c in work.columns
                                if c not in ('rank', 'step', 'epoch', 'layer', 'grad_max', 'mean_i', *per_unit)]], keys, 'sum')
    out = pd.DataFrame(index=sums.index)
    out['epoch'] = work.groupby(keys, sort=False)['epoch'].first()
    out['grad_norm'] = np.sqrt(sums['g2'])
    out['param_norm'] = np.sqrt(sums['p2'])
    out['grad_max'] = _reduce_groups(work[['grad_max']], keys, 'max')['grad_max']
    out['grad_mean'] = sums['sum'] / sums['numel']
    # pooled variance: within-tensor sums of squares plus between-tensor spread of the means
    work['between'] = work['numel'] * (work['mean_i'] - (out['grad_mean'].reindex(pd.MultiIndex.from_frame(work[ids])).to_numpy())) ** 2
    between = _reduce_groups(work[['between']], keys, 'sum')['between']
    out['grad_std'] = np.sqrt((sums['ss_within'] + between) / (sums['numel'] - 1))
    out['zero_frac'] = sums['zeros'] / sums['numel']
    with np.errstate(divide='ignore', invalid='ignore'):
        out['dead_frac'] = np.where(sums['units'] > 0, sums['dead'] / sums['units'], np.nan)
        out['grad_param_ratio'] = out['grad_norm'] / out['param_norm']
    out['grad_rms'] = out['grad_norm'] / np.sqrt(sums['numel'])
    out['n_nan'], out['n_inf'] = sums['n_nan'].astype(np.int64), sums['n_inf'].astype(np.int64)
    alone = (sums['tensors'] == 1).to_numpy()
    firsts = work.groupby(keys, sort=False)[list(per_unit)].first()
    for column in per_unit: out[column] = np.where(alone, firsts[column].to_numpy(np.float64), np.nan)
    if 'd2' in sums:
        out['update_norm'] = np.sqrt(sums['d2'])
        with np.errstate(divide='ignore', invalid='ignore'): out['update_ratio'] = out['update_norm'] / out['param_norm']
    out = out.reset_index()
    out['order'] = out['layer'].map(depth)
    out = out.sort_values(['step'] + ids[:-2] + ['order'], kind='stable').drop(columns='order').reset_index(drop=True)
    columns = ids[:-2] + ['step', 'epoch', 'layer'] + [c for c in record.df.columns if c in out and c not in ('rank', 'step', 'epoch', 'layer')]
    return out[columns]


def _reduce_groups(frame: pd.DataFrame, keys: list, how: str) -> pd.DataFrame:
    """The columns of `frame` grouped by `keys` (in order of first appearance) and reduced by `how` ('sum' or 'max'),
    NaN for a group that holds a NaN, as for the concatenated tensors (pandas before 3.0 has no `skipna=False` for
    grouped reductions: they skip NaN)."""
    reduced = getattr(frame.groupby(keys, sort=False), how)()
    return reduced.mask(frame.isna().groupby(keys, sort=False).any())


def by_module(record) -> pd.DataFrame:
    "`combine` with one group per module: each module's weight, bias, ... together, named after the module."
    if isinstance(record, pd.DataFrame):
        raise TypeError("`by_module` needs the GradRecord (it reads the layer table), not its DataFrame")
    if not isinstance(record, GradRecord): raise TypeError(f"`record` must be a GradRecord, got {type(record).__name__}")
    return combine(record, {n: module_of(n) for n in record.layers['name']})


def by_param_group(record) -> pd.DataFrame:
    """`combine` with one group per optimizer parameter group (as used by discriminative learning rates),
    named `group 0`, `group 1`, ...; parameters outside the optimizer are left out. A last column `lr` holds the
    group's learning rate at that step (from `record.lrs`; NaN where it was not recorded)."""
    if not isinstance(record, GradRecord): raise TypeError(f"`record` must be a GradRecord, got {type(record).__name__}")
    layers = record.layers
    groups = {n: f'group {g}' for n, g in zip(layers['name'], layers['group']) if g >= 0}
    if not groups: raise ValueError("`record` knows no optimizer parameter groups (recorded by an older version?)")
    out = combine(record, groups)
    keys = ['rank', 'step', 'layer'] if 'rank' in out else ['step', 'layer']
    lrs = record.lrs.assign(layer=lambda t: 'group ' + t['group'].astype(str))
    out['lr'] = pd.MultiIndex.from_frame(out[keys]).map(lrs.set_index(keys)['lr'].to_dict()).to_numpy(np.float64) \
        if len(lrs) else np.nan
    return out
