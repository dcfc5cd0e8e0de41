"""The diagnosis: turn a record's numbers into findings, causes first, with a remedy each.

`health(record)` returns one row per finding; `summary(record)` says the same in a few lines. Both read only the
record's DataFrames, so they work the same on a live and on a loaded run, and hold it against the thresholds it was
recorded with (`GradStats(thresholds=...)`) unless others are passed. Each family of checks has a module of its own:
`norms` (NaN/Inf, explosions, spikes, skipped steps, the loss's scale), `flow` (vanishing with depth, layer spread,
grad/param ratio), `units` (dead and symmetric units, zero gradients attributed), `setup` (parameters without a
gradient or outside the optimizer), `progress` (the loss read with the gradients: converged, a learning rate far too
low, weights that do not move, nothing learned, stuck); `run` holds what they all read. The thresholds come from
`Thresholds` (the textbook table of `demo.SOURCES['004']`), but no norm is condemned for its level alone, as the
textbook's bands "vary by architecture"; the loss in `record.steps` separates convergence from being stuck and from
vanishing, as the forum thread of `demo.SOURCES['001']` asks.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..record import record_method
from ..thresholds import Thresholds
# every name of the check families reaches this package (its `__all__` is the diagnosis' own)
from .flow import check_grad_param_ratio, check_layer_spread, check_vanishing, depth_profile, live_rms
from .norms import (check_exploding, check_loss_scale, check_nonfinite, check_skipped, check_spikes, check_total_norm,
                    loss_scale_of, persistent_from, phase_baselines, spike_mask)
from .progress import (check_converged, check_lr_too_low, check_not_learning, check_stuck, check_update_ratio, explanations,
                       step_sizes, unsettled)
from .run import HEALTH_COLUMNS, MODEL, STATUSES, Run, applied_mask, check_inputs, finding, span
from .setup import check_no_gradient, check_not_in_optimizer
from .units import check_dead, check_symmetric, check_zero_frac, dead_fractions, second_half

__all__ = ['Thresholds', 'health', 'summary', 'suggest_clip', 'verdict', 'HEALTH_COLUMNS', 'CHECKS', 'STATUSES']

# the order of the findings of one status: causes before the symptoms they explain, notes last
_ORDER = (check_skipped, check_not_in_optimizer, check_no_gradient, check_loss_scale, check_symmetric, check_lr_too_low,
          check_update_ratio, check_exploding, check_nonfinite, check_vanishing, check_dead, check_spikes,
          check_not_learning, check_stuck, check_total_norm, check_converged, check_layer_spread, check_grad_param_ratio,
          check_zero_frac)
def _name(check) -> str: return check.__name__[len('check_'):]


CHECKS = tuple(map(_name, _ORDER))
"The checks `health` runs, in the order its findings of one status are listed: causes before the symptoms they explain."
# the order they run in: each reads the findings of those before it (loss_scale -> exploding -> converged -> ...)
_RUN = (check_skipped, check_not_in_optimizer, check_no_gradient, check_loss_scale, check_symmetric, check_nonfinite,
        check_exploding, 'converged', check_vanishing, check_dead, check_spikes, check_lr_too_low, check_update_ratio,
        check_total_norm, check_layer_spread, check_grad_param_ratio, check_zero_frac, check_not_learning, check_stuck,
        check_converged)


def _diagnose(record, thresholds) -> Run:
    "Every check on `record`, in dependency order; the run with its `findings` by check."
    run = Run(record, check_inputs(record, thresholds))
    for check in _RUN:
        if check == 'converged': run.converged = run.loss_settled and not unsettled(run)
        else: run.findings[_name(check)] = check(run)
    return run


def health(record, thresholds: Thresholds | None = None) -> pd.DataFrame:
    """Diagnose `record` (a GradRecord, live or loaded) against `thresholds` (a `Thresholds`; None: those the record
    was made with, else the defaults): one row per finding, worst first, and of one status causes first (`CHECKS`).

    Columns: `check` (one of `CHECKS`), `layer` (a parameter name or `'model'`), `status`
    (`critical`, `warning`, `ok`), `value` (what was measured), `threshold` (what it was held
    against), `first_step`, `last_step` (where the finding holds) and `reason` (one line with a
    remedy). Every check has at least one row, `ok` when it found nothing."""
    run = _diagnose(record, thresholds)
    return _table(run)


def _table(run) -> pd.DataFrame:
    # worst status first, and of one status in the order of `_ORDER` (a stable sort keeps a check's own order)
    rows = sorted((f for check in _ORDER for f in run.findings[_name(check)]), key=lambda f: _STATUS_RANK[f['status']])
    columns = {c: [f[c] for f in rows] for c in HEALTH_COLUMNS}
    for c in ('value', 'threshold'): columns[c] = np.array(columns[c], np.float64)
    for c in ('first_step', 'last_step'): columns[c] = pd.array(columns[c], dtype='Int64')
    return pd.DataFrame(columns)


_STATUS_RANK = {s: i for i, s in enumerate(STATUSES)}


def suggest_clip(record, thresholds: Thresholds | None = None) -> dict:
    """A `GradientClip` max_norm for this model: the `clip_percentile` of the total norm over healthy steps
    (finite, applied, not spikes within their phase, at most `total_norm_critical`), as AutoClip does, and how many
    applied steps it would have clipped (steps the grad scaler skipped are left out of both). When no step is healthy
    (the run exploded from the start), a percentile of exploded norms would only keep the explosion: max_norm is then
    `total_norm_warning`, where the healthy band ends. `thresholds`: a `Thresholds` (None: those the record was made
    with, else the defaults). Norms are those of the tensors the optimizer holds.

    Returns a dict with `max_norm`, `n_clipped`, `n_steps` (the applied steps), `percentile`, `n_healthy`
    (the healthy steps) and `base`: `'healthy'` (max_norm is the percentile of the healthy norms) or
    `'total_norm_warning'` (no healthy step: max_norm is that threshold, `percentile` was not used)."""
    run = Run(record, check_inputs(record, thresholds))
    return _clip(run)


def _clip(run) -> dict:
    t, norms = run.t, run.norms
    if not np.isfinite(norms).any(): raise ValueError("`record` has no finite total norm to base a clipping value on")
    spikes, _ = spike_mask(norms, run.phase, t)
    healthy = norms[np.isfinite(norms) & ~spikes & (norms <= t.total_norm_critical)]
    if len(healthy): max_norm, base = float(np.percentile(healthy, t.clip_percentile)), 'healthy'
    else: max_norm, base = float(t.total_norm_warning), 'total_norm_warning'
    return {'max_norm': max_norm, 'n_clipped': int((~(norms <= max_norm)).sum()),  # NaN and Inf would be clipped too
            'n_steps': int(len(norms)), 'percentile': float(t.clip_percentile), 'n_healthy': int(len(healthy)),
            'base': base}


def summary(record, thresholds: Thresholds | None = None, show_ok: bool = False) -> str:
    """A short text of `health`, worst first and of one status causes first, for notebooks and terminals; with clipping
    advice when the gradients explode or spike. `thresholds`: a `Thresholds` (None: those the record was made with, else
    the defaults). `show_ok` also lists the checks that found nothing. Of several layers with one finding, the worst
    named is the one farthest from its threshold (by ratio, either way)."""
    if not isinstance(show_ok, bool): raise TypeError(f"`show_ok` must be True or False, got {show_ok!r}")
    run = _diagnose(record, thresholds)
    table = _table(run)
    steps = record.steps
    counts = table['status'].value_counts()
    ranks = f" on {steps['rank'].nunique()} ranks" if 'rank' in steps else ''  # a merge: each step once per rank
    head = (f"Gradient health: {counts.get('critical', 0)} critical, {counts.get('warning', 0)} warning(s) over "
            f"{steps['step'].nunique()} recorded step(s) ({int(steps['step'].min())}-{int(steps['step'].max())}){ranks}, "
            f"{record.df['layer'].nunique()} parameter tensors")
    lines = [head] + [f"  {line}" for line in _lines(table if show_ok else table[table['status'] != 'ok'])]
    converged = _converged(table)
    if converged and not show_ok: lines.append(f"  ok       converged: {converged}")
    if len(run.problems(['exploding', 'spikes'])):
        try:
            clip = _clip(run)
            t = run.t
            base = (f"the {clip['percentile']:g}th percentile of the {clip['n_healthy']} healthy total norms"
                    if clip['base'] == 'healthy' else
                    f"total_norm_warning, the top of the healthy band: no applied step's total norm is healthy, i.e. "
                    f"finite, at most {t.total_norm_critical:g} and not a spike, so none can give a percentile")
            lines.append(f"  advice: GradientClip(max_norm={clip['max_norm']:.3g}) ({base}) would have clipped "
                         f"{clip['n_clipped']} of {clip['n_steps']} steps")
        except ValueError as e: lines.append(f"  advice: no clipping value: {e}")
    return '\n'.join(lines)


def _lines(shown) -> list:
    """One line per (status, check, side) of the health rows `shown`, in their order: `STATUS   check layer: reason [steps]`,
    or `STATUS   check in N layers (a, b, ...); worst x: reason` for several layers."""
    lines = []
    value, threshold = shown['value'].to_numpy(float), shown['threshold'].to_numpy(float)
    # a check's findings on both sides of their thresholds (steps too small here, too large there) call for opposite
    # remedies: one line per side
    side = np.sign(value - threshold)
    groups = {}   # (status, check, side) -> the positions of its rows, in the order they first appear
    for i, key in enumerate(zip(shown['status'], shown['check'], side > 0, side < 0)): groups.setdefault(key, []).append(i)
    layers, reasons = shown['layer'].tolist(), shown['reason'].tolist()
    firsts, lasts = shown['first_step'].tolist(), shown['last_step'].tolist()
    far = _distance(value, threshold)
    for (status, check, _, _), at in groups.items():
        worst = at[int(np.argmax(far[at]))]
        known_first = [firsts[i] for i in at if not pd.isna(firsts[i])]
        known_last = [lasts[i] for i in at if not pd.isna(lasts[i])]
        first, last = (min(known_first), max(known_last)) if known_first and known_last else (None, None)
        where = '' if first is None else f" [step {first}]" if first == last else f" [steps {first}-{last}]"
        if len(at) > 1:
            names = [layers[i] for i in at]
            listed = ', '.join(names[:4]) + (f' and {len(names) - 4} more' if len(names) > 4 else '')
            lines.append(f"{status.upper():8} {check} in {len(names)} layers ({listed}); worst {layers[worst]}: "
                         f"{reasons[worst]}{where}")
        else:
            layer = '' if layers[worst] == MODEL else f" {layers[worst]}"
            lines.append(f"{status.upper():8} {check}{layer}: {reasons[worst]}{where}")
    return lines


def _converged(table) -> str:
    "The converged check's reason when the run converged, else ''."
    found = table[(table['check'] == 'converged') & table['reason'].str.startswith('loss fell')]
    return found.iloc[0]['reason'] if len(found) else ''


def verdict(record, thresholds: Thresholds | None = None) -> dict:
    """The diagnosis in one line, for a headline: `status` ('critical', 'warning' or 'healthy'), the numbers of
    `critical` and `warning` findings, `line` (the first problem line of `summary`, or the convergence note, or ''),
    and `findings` (how many problem lines `summary` has). `thresholds` as for `health`."""
    table = health(record, thresholds)
    counts = table['status'].value_counts()
    problems = _lines(table[table['status'] != 'ok'])
    status = 'critical' if counts.get('critical', 0) else 'warning' if counts.get('warning', 0) else 'healthy'
    line = problems[0] if problems else (f"converged: {_converged(table)}" if _converged(table) else '')
    return {'status': status, 'critical': int(counts.get('critical', 0)), 'warning': int(counts.get('warning', 0)),
            'line': ' '.join(line.split()), 'findings': len(problems)}


def _distance(value, threshold) -> np.ndarray:
    "How far each finding's value lies from its threshold, |log(value / threshold)| (0 where either is unknown)."
    with np.errstate(divide='ignore', invalid='ignore'):
        far = np.abs(np.log(value / threshold))
    return np.nan_to_num(far, nan=0.0, posinf=np.inf)


record_method(health)
record_method(summary)
record_method(suggest_clip)
record_method(verdict)
