"""The diagnosis: turn a record's numbers into findings, worst first, with a remedy each.

`health(record)` returns one row per finding; `summary(record)` says the same in a few lines.
Both read only the record's DataFrames, so they work the same on a live and on a loaded run.
Thresholds come from `Thresholds` (the textbook table of `demo.SOURCES['004']`); the loss in
`record.steps` separates convergence (low flat loss, with gradients that neither explode nor stay above
the warning band) from being stuck (small gradients, high loss) and from vanishing, as the forum thread
of `demo.SOURCES['001']` asks.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .record import GradRecord, record_method
from .thresholds import Thresholds

__all__ = ['Thresholds', 'health', 'summary', 'suggest_clip', 'HEALTH_COLUMNS', 'CHECKS', 'STATUSES']

HEALTH_COLUMNS = ('check', 'layer', 'status', 'value', 'threshold', 'first_step', 'last_step', 'reason')
CHECKS = ('nonfinite', 'exploding', 'total_norm', 'spikes', 'vanishing', 'stuck', 'converged', 'layer_spread',
          'grad_param_ratio', 'zero_frac', 'dead')
STATUSES = ('critical', 'warning', 'ok')
MODEL = 'model'


def _inputs(record, thresholds):
    if not isinstance(record, GradRecord): raise TypeError(f"`record` must be a GradRecord, got {type(record).__name__}")
    if thresholds is None: thresholds = record.thresholds if record.thresholds is not None else Thresholds()
    if not isinstance(thresholds, Thresholds):
        raise TypeError(f"`thresholds` must be a fastai_gradstats.health.Thresholds, got {type(thresholds).__name__}")
    if not len(record): raise ValueError("`record` is empty: no step was recorded, nothing to diagnose")
    return record.df, record.steps, record.layers, thresholds


def _applied(steps, record):
    """Which `steps` count as applied: those the optimizer applied, and the one `GradStats(stop_on_critical=True)` stopped
    at (flagged skipped, since it was never applied, but its gradients are the finding, not an fp16 overflow)."""
    applied = ~steps['skipped'].to_numpy(bool)
    if record.stopped_steps: applied |= np.isin(steps['step'].to_numpy(), record.stopped_steps)
    return applied


def _finding(check, status, reason, layer=MODEL, value=np.nan, threshold=np.nan, first_step=None, last_step=None):
    return {'check': check, 'layer': layer, 'status': status, 'value': float(value), 'threshold': float(threshold),
            'first_step': first_step, 'last_step': last_step, 'reason': reason}


def _span(steps):
    steps = list(steps)
    return (int(min(steps)), int(max(steps))) if steps else (None, None)


class _Run:
    "What several checks share: applied steps, windows, loss context, weight layers in depth order."
    def __init__(self, df, steps, layers, t, record):
        self.t, self.df, self.layers, self.stopped_steps = t, df, layers, list(record.stopped_steps)
        applied = _applied(steps, record)
        self.applied, self.not_applied = steps[applied], steps[~applied]
        norms = self.applied['grad_norm'].to_numpy(float)
        self.norms = norms
        n = len(self.applied)
        # the start: a few steps only, so that an explosion soon after does not pass for the initial loss
        self.early = self.applied.iloc[:max(1, min(5, n // 5))]
        self.late = self.applied.iloc[n - max(1, n // 5):] if n else self.applied
        finite_loss = lambda part: part['loss'][np.isfinite(part['loss'])]
        start = finite_loss(self.applied)
        # the very first loss: the early median could already be after an explosion, or after convergence
        self.loss_early = float(start.iloc[0]) if len(start) else np.nan
        self.loss_late = float(finite_loss(self.late).median()) if len(finite_loss(self.late)) else np.nan
        late_loss = finite_loss(self.late).to_numpy(float)
        self.enough = n >= 10
        if len(late_loss) >= 2 and self.loss_early > 0:
            # flat: the late loss moves little compared with where training started (not with its own, tiny, level)
            half = len(late_loss) // 2
            self.loss_change = abs(np.median(late_loss[half:]) - np.median(late_loss[:half])) / self.loss_early
        else: self.loss_change = np.nan
        self.falling = self.loss_late < (1 - t.loss_fall) * self.loss_early
        # low and flat against the first loss only: an exploded first loss makes any later loss look low
        self.loss_settled = bool(self.enough and self.loss_late <= t.loss_converged * self.loss_early
                                 and self.loss_change <= t.loss_flat)
        early_norm = self.early['grad_norm'][np.isfinite(self.early['grad_norm'])].median()
        late_norm = self.late['grad_norm'][np.isfinite(self.late['grad_norm'])].median()
        self.early_norm, self.late_norm = float(early_norm), float(late_norm)
        depth = layers.set_index('name')['depth']
        shapes = layers.set_index('name')['shape']
        names = df['layer'].astype(str)
        self.names = names
        present = pd.unique(names)
        self.weights = sorted([n for n in present if len(shapes[n]) >= 2], key=lambda n: depth[n])
        self.order = sorted(present, key=lambda n: depth[n])
        self.applied_rows = df[df['step'].isin(self.applied['step'])]
        # the checks convergence depends on, run once here; `health` reports these same findings
        self.findings_of = {check: check(self) for check in (_check_nonfinite, _check_exploding)}
        self.unsettled = _unsettled(self)
        self.converged = self.loss_settled and not self.unsettled


def _unsettled(run):
    """Why gradients that explode, turn NaN/Inf or stay large in the late window rule out convergence, whatever the loss
    did (empty: none). An isolated NaN or spike long before, from which training recovered, does not."""
    t = run.t
    late_start = int(run.late['step'].min()) if len(run.late) else None
    why = [f"the {f['check']} check is {f['status']}" for findings in run.findings_of.values()
           for f in findings if f['status'] != 'ok' and (late_start is None or f['last_step'] is None
                                                           or f['last_step'] >= late_start)]
    if not run.late_norm <= t.total_norm_warning:  # NaN too: no finite late norm
        why.append(f"the late total norm {run.late_norm:.3g} is above {t.total_norm_warning:g} (total_norm_warning)")
    return why


def _check_nonfinite(run):
    df, t = run.df, run.t
    bad = df[(df['n_nan'] > 0) | (df['n_inf'] > 0)]
    applied_bad = bad[bad['step'].isin(run.applied['step'])]
    findings = []
    skipped = run.not_applied  # skipped by the optimizer, not stopped at by GradStats
    if len(skipped):
        first, last = _span(skipped['step'])
        findings.append(_finding('nonfinite', 'ok', f"{len(skipped)} step(s) were skipped by the optimizer (e.g. the "
                                 "fp16 grad scaler after an overflow): normal for mixed precision, nothing was applied",
                                 value=len(skipped), first_step=first, last_step=last))
    if applied_bad.empty:
        if not findings: findings.append(_finding('nonfinite', 'ok', 'no NaN or Inf in any applied gradient', value=0))
        return findings
    first_step = int(applied_bad['step'].min())
    at_first = applied_bad[applied_bad['step'] == first_step]
    depth = run.layers.set_index('name')['depth']
    nearest_output = max(at_first['layer'].astype(str), key=lambda n: depth[n])
    first, last = _span(applied_bad['step'])
    n_steps = applied_bad['step'].nunique()
    stopped = (", where GradStats stopped training (stop_on_critical)"
               if applied_bad['step'].isin(run.stopped_steps).any() else '')
    findings.append(_finding('nonfinite', 'critical',
        f"NaN/Inf gradients first at step {first_step} in {nearest_output} (nearest the output, where backward "
        f"starts) and in {n_steps} step(s){stopped}: lower the learning rate, add GradientClip, check the loss and inputs",
        layer=nearest_output, value=n_steps, threshold=0, first_step=first, last_step=last))
    return findings


NO_APPLIED = ("no applied step yet: every recorded step was skipped by the optimizer (e.g. the fp16 grad scaler), "
              "so no gradient has been used (see nonfinite)")


def _check_total_norm(run):
    t, norms = run.t, run.norms
    if not len(norms): return [_finding('total_norm', 'ok', NO_APPLIED, threshold=t.total_norm_warning)]
    known = ~np.isnan(norms)  # an Inf norm (beyond float32's range) counts as above every threshold
    if not known.any(): return [_finding('total_norm', 'critical', 'every recorded total gradient norm is NaN')]
    steps = run.applied['step'].to_numpy()
    peak = float(norms[known].max())
    if peak > t.total_norm_critical:
        where = steps[known & (norms > t.total_norm_critical)]
        return [_finding('total_norm', 'critical', f"total gradient norm reached {peak:.3g} (> {t.total_norm_critical:g}, "
                         "likely to explode): lower the learning rate or clip gradients", value=peak,
                         threshold=t.total_norm_critical, first_step=int(where.min()), last_step=int(where.max()))]
    if peak > t.total_norm_warning:
        where = steps[known & (norms > t.total_norm_warning)]
        return [_finding('total_norm', 'warning', f"total gradient norm reached {peak:.3g} (healthy up to "
                         f"{t.total_norm_warning:g}): watch for explosions, consider GradientClip", value=peak,
                         threshold=t.total_norm_warning, first_step=int(where.min()), last_step=int(where.max()))]
    median = float(np.median(norms[known]))
    return [_finding('total_norm', 'ok', f"total gradient norm stays at most {peak:.3g} (median {median:.3g})",
                     value=peak, threshold=t.total_norm_warning)]


LASTING = 3  # bad steps in a row that make an explosion, not an isolated event (fewer: see spikes, nonfinite)


def _persistent_from(bad):
    """Index of the first bad step that starts an explosion (None: none does): `LASTING` bad steps in a row, or
    most steps from there to the end bad. A single NaN or spike followed by recovery does not."""
    bad = np.asarray(bad, bool)
    if not bad.any(): return None
    bad_to_end = np.cumsum(bad[::-1])[::-1]           # bad steps from each step to the end
    steps_to_end = np.arange(len(bad), 0, -1)
    in_a_row = np.convolve(bad, np.ones(LASTING, int), 'full')[LASTING - 1:] == LASTING  # bad[i:i+LASTING] all bad
    start = np.flatnonzero(bad & (in_a_row | (2 * bad_to_end > steps_to_end)))
    return int(start[0]) if len(start) else None


def _check_exploding(run):
    t, norms = run.t, run.norms
    if not len(norms): return [_finding('exploding', 'ok', NO_APPLIED, threshold=t.total_norm_critical)]
    steps = run.applied['step'].to_numpy()
    finite = np.isfinite(norms)
    bad = ~finite | (norms > t.total_norm_critical)  # NaN and Inf norms too
    growth = run.late_norm / run.early_norm if run.early_norm > 0 else np.nan
    if not finite.any():
        first, last = _span(steps)
        return [_finding('exploding', 'warning', "no total norm is finite, from the first step on: an explosion cannot "
                         "be told from bad inputs, a bad loss or a bad initialisation (see nonfinite)",
                         threshold=t.total_norm_critical, first_step=first, last_step=last)]
    start = _persistent_from(bad)
    if start is not None:
        where = steps[start:][bad[start:]]
        tail = norms[start:][bad[start:]]
        peak = float(np.nanmax(tail)) if (~np.isnan(tail)).any() else np.nan
        value = peak if peak >= t.total_norm_critical else np.inf  # only NaN/Inf: beyond every threshold
        return [_finding('exploding', 'critical', f"gradients explode from step {int(where.min())}: "
                         f"{len(where)} applied step(s) up to step {int(where.max())} have a total norm above "
                         f"{t.total_norm_critical:g} or not finite: lower the learning rate, add GradientClip "
                         "(see the clipping advice)", value=value,  # Inf when a norm overflowed or turned NaN
                         threshold=t.total_norm_critical, first_step=int(where.min()), last_step=int(where.max()))]
    first_nonfinite = np.flatnonzero(~finite)
    if len(first_nonfinite) and run.early_norm > 0:
        j = int(first_nonfinite[0])
        before = norms[:j][finite[:j]]
        rise = float(before[-1] / run.early_norm) if len(before) >= 2 else np.nan
        if rise >= t.growth_factor and before[-1] > t.total_norm_warning:
            return [_finding('exploding', 'critical', f"gradients explode at step {int(steps[j])}: the total norm grew "
                             f"{rise:.3g}x from the start to {before[-1]:.3g}, then turned NaN/Inf: lower the learning "
                             "rate, add GradientClip (see the clipping advice)", value=rise, threshold=t.growth_factor,
                             first_step=int(steps[j]), last_step=int(steps[j]))]
    if run.enough and growth >= t.growth_factor and run.late_norm > t.total_norm_warning:
        first, last = _span(run.late['step'])
        return [_finding('exploding', 'warning', f"total norm grew {growth:.3g}x from the first to the last fifth of "
                         "training: the run may be diverging; lower the learning rate", value=growth,
                         threshold=t.growth_factor, first_step=first, last_step=last)]
    isolated = (f"{int(bad.sum())} isolated step(s) above {t.total_norm_critical:g} or not finite, never {LASTING} in a "
                "row nor most steps to the end (see spikes, nonfinite); otherwise " if bad.any() else '')
    reason = (isolated + ('the total norm neither grows steadily nor leaves the critical band' if not growth >= t.growth_factor else
              f'the total norm grew {growth:.3g}x from the start but stays below {t.total_norm_warning:g}: not exploding'))
    return [_finding('exploding', 'ok', reason, value=growth, threshold=t.growth_factor)]


def _check_spikes(run):
    t = run.t
    if not len(run.norms): return [_finding('spikes', 'ok', NO_APPLIED, value=0, threshold=t.spike_factor)]
    norms = pd.Series(run.norms, index=run.applied['step'].to_numpy())
    window = int(t.spike_window)
    rolling = norms.where(np.isfinite(norms)).rolling(window, min_periods=min(5, window)).median().shift(1)
    spikes = norms[(norms > t.spike_factor * rolling) & np.isfinite(norms)]
    if spikes.empty:
        return [_finding('spikes', 'ok', f"no step's total norm exceeds {t.spike_factor:g}x the rolling median",
                         value=0, threshold=t.spike_factor)]
    first, last = _span(spikes.index)
    worst = float((spikes / rolling[spikes.index]).max())
    return [_finding('spikes', 'warning', f"{len(spikes)} step(s) with a total norm over {t.spike_factor:g}x the rolling "
                     f"median (worst {worst:.3g}x): outliers in the data or a too-high learning rate; GradientClip "
                     "caps them", value=len(spikes), threshold=t.spike_factor, first_step=first, last_step=last)]


def _depth_profile(run):
    "Median rms gradient of each weight layer over applied steps, from input to output."
    rows = run.applied_rows
    rows = rows[rows['layer'].astype(str).isin(run.weights)]
    rms = rows.groupby(rows['layer'].astype(str))['grad_rms'].median()
    return rms.reindex(run.weights).dropna()


def _check_vanishing(run):
    t = run.t
    findings = []
    norms = run.norms[np.isfinite(run.norms)]
    steps = run.applied['step'].to_numpy()[np.isfinite(run.norms)]
    tiny = norms < t.vanishing_norm
    if tiny.any() and not run.converged:
        first, last = _span(steps[tiny])
        findings.append(_finding('vanishing', 'critical', f"total gradient norm below {t.vanishing_norm:g} at "
                                 f"{int(tiny.sum())} step(s): no learning; check the initialisation and activations",
                                 value=float(norms.min()), threshold=t.vanishing_norm, first_step=first, last_step=last))
    profile = _depth_profile(run)
    if len(profile) >= 3 and profile.iloc[-1] > 0:
        rms = profile.to_numpy(float)
        with np.errstate(divide='ignore'): ratio = float(rms[-1] / rms[0])  # Inf: no gradient at all at the input
        # a layer whose rms gradient is 0 counts as 1000x below the smallest non-zero one, for the steadiness
        log_rms = np.log(np.where(rms > 0, rms, rms[rms > 0].min() * 1e-3))
        with np.errstate(invalid='ignore', divide='ignore'):  # a flat profile has no correlation (NaN): not steady
            steady = np.corrcoef(np.arange(len(log_rms)), log_rms)[0, 1]
        if ratio >= t.depth_ratio_warning and steady >= 0.7:
            first, last = _span(run.applied['step'])
            status = 'critical' if ratio >= t.depth_ratio_critical else 'warning'
            if run.converged:
                findings.append(_finding('vanishing', 'ok', f"gradients fall {ratio:.3g}x from output to input, but the "
                                         "loss is low and flat: convergence, not vanishing", layer=profile.index[0],
                                         value=ratio, threshold=t.depth_ratio_warning))
            else:
                falls = f"{ratio:.3g}x" if np.isfinite(ratio) else 'to 0'
                findings.append(_finding('vanishing', status, f"gradients vanish with depth: rms gradient falls {falls} "
                                         f"from {profile.index[-1]} to {profile.index[0]} (input): use Kaiming init, "
                                         "ReLU-family activations, BatchNorm or residual connections",
                                         layer=profile.index[0], value=ratio, threshold=t.depth_ratio_warning
                                         if status == 'warning' else t.depth_ratio_critical, first_step=first, last_step=last))
    if not findings:
        if len(profile) >= 2 and profile.iloc[0] > 0 and profile.iloc[-1] > 0:
            findings.append(_finding('vanishing', 'ok', 'no vanishing: gradients keep their size from output to input',
                                     value=float(profile.iloc[-1] / profile.iloc[0]), threshold=t.depth_ratio_warning))
        elif len(profile) < 2:
            findings.append(_finding('vanishing', 'ok', 'fewer than two weight layers with a finite gradient: no fall '
                                     'with depth to measure', threshold=t.depth_ratio_warning))
        else:
            silent = [n for n in (profile.index[-1], profile.index[0]) if profile[n] == 0]
            findings.append(_finding('vanishing', 'ok', f"no ratio of gradients across depth: {' and '.join(silent)} "
                                     "get(s) no gradient at all (median rms 0), dead units rather than a fall with "
                                     "depth: see dead and zero_frac", threshold=t.depth_ratio_warning))
    return findings


def _check_loss_context(run):
    t = run.t
    first, last = _span(run.late['step'])
    # small in absolute terms, below the textbook's healthy band: a tenth of an exploded start is not small
    small = run.late_norm < t.total_norm_low
    if run.converged:
        small_note = (': small gradients here mean convergence, not vanishing' if small else '')
        return [_finding('converged', 'ok', f"loss fell from {run.loss_early:.3g} to {run.loss_late:.3g} and is flat "
                         f"(late total norm {run.late_norm:.3g}){small_note}",
                         value=run.loss_late, threshold=t.loss_converged * run.loss_early, first_step=first, last_step=last),
                _finding('stuck', 'ok', 'the loss fell: not stuck', value=run.late_norm, threshold=t.total_norm_low)]
    reason = ('not converged (yet): the loss is not low and flat' if not run.loss_settled else
              f"not converged: the loss fell from {run.loss_early:.3g} to {run.loss_late:.3g} and is flat, but "
              f"{'; '.join(run.unsettled)}")
    found = [_finding('converged', 'ok', reason, value=run.loss_late, threshold=t.loss_converged * run.loss_early)]
    if not (np.isfinite(run.loss_early) and np.isfinite(run.loss_late)):
        found.append(_finding('stuck', 'ok', 'the loss is not known (NaN or not recorded): stuck cannot be told apart '
                              'from converging', value=run.late_norm, threshold=t.total_norm_low))
    elif run.enough and small and not run.falling:
        found.append(_finding('stuck', 'warning', f"small gradients (late total norm {run.late_norm:.3g}) while the loss "
                              f"stays high ({run.loss_early:.3g} -> {run.loss_late:.3g}): the model is stuck; raise the "
                              "learning rate, fix the initialisation or the activations",
                              value=run.late_norm, threshold=t.total_norm_low, first_step=first, last_step=last))
    else:
        found.append(_finding('stuck', 'ok', 'not stuck: the loss falls or the gradients are not small',
                              value=run.late_norm, threshold=t.total_norm_low))
    return found


def _check_layer_spread(run):
    t = run.t
    rows = run.applied_rows
    rows = rows[rows['layer'].astype(str).isin(run.weights) & np.isfinite(rows['grad_norm']) & (rows['grad_norm'] > 0)]
    if rows['layer'].nunique() < 2:
        return [_finding('layer_spread', 'ok', 'fewer than two weight layers with gradients: no spread to measure')]
    per_step = rows.groupby('step')['grad_norm'].agg(['max', 'min'])
    spread = float((per_step['max'] / per_step['min']).median())
    status = 'critical' if spread > t.layer_spread_critical else 'warning' if spread > t.layer_spread_warning else 'ok'
    threshold = t.layer_spread_critical if status == 'critical' else t.layer_spread_warning
    reason = (f"median max/min weight-gradient norm across layers is {spread:.3g}x" +
              ('' if status == 'ok' else ': layers learn at very different speeds; check the gradient flow plot'))
    return [_finding('layer_spread', status, reason, value=spread, threshold=threshold,
                     first_step=int(per_step.index.min()) if status != 'ok' else None,
                     last_step=int(per_step.index.max()) if status != 'ok' else None)]


def _per_layer(run, column, high, low=None, only_weights=False, high_status=("warning", "critical")):
    "Median of `column` per layer over applied steps, against (warning, critical) thresholds `high` and a lower bound `low`."
    rows = run.applied_rows
    if only_weights: rows = rows[rows['layer'].astype(str).isin(run.weights)]
    rows = rows[np.isfinite(rows[column])]
    names = rows['layer'].astype(str)
    by_layer = rows.groupby(names)
    present = set(by_layer.groups)  # once: a set per layer made this quadratic in the number of layers
    med = by_layer[column].median().reindex([n for n in run.order if n in present])
    found = []
    for layer, value in med.items():
        if high[1] is not None and value > high[1]: status, threshold, above = high_status[1], high[1], True
        elif value > high[0]: status, threshold, above = high_status[0], high[0], True
        elif low is not None and value < low: status, threshold, above = 'warning', low, False
        else: continue
        part = by_layer.get_group(layer)
        where = part['step'][(part[column] > threshold) if above else (part[column] < threshold)]
        first, last = _span(where)
        found.append((layer, status, float(value), threshold, first, last))
    return found


def _ratio_reason(run, layer, value, dead):
    t = run.t
    if value > t.ratio_high:
        return (f"median grad/param ratio {value:.3g} > {t.ratio_high:g}: gradients too large for the weights; "
                "lower the learning rate")
    if dead.get(layer, 0) >= t.dead_warning:  # a larger learning rate would not revive them: it is what kills units
        return (f"median grad/param ratio {value:.3g} < {t.ratio_low:g}: no gradient ({dead[layer]:.0%} dead units), "
                "see dead")
    return (f"median grad/param ratio {value:.3g} < {t.ratio_low:g}: gradients too small to move the weights; "
            "raise the learning rate or fix the architecture")


def _check_ratio(run):
    t = run.t
    found = _per_layer(run, 'grad_param_ratio', (t.ratio_high, None), t.ratio_low, only_weights=True)
    dead = _late_dead(run)
    rows = [_finding('grad_param_ratio', status, _ratio_reason(run, layer, value, dead),
                     layer=layer, value=value, threshold=threshold, first_step=first, last_step=last)
            for layer, status, value, threshold, first, last in found]
    return rows or [_finding('grad_param_ratio', 'ok', f"every weight's median grad/param ratio is within "
                             f"[{t.ratio_low:g}, {t.ratio_high:g}]", threshold=t.ratio_high)]


def _check_zero_frac(run):
    t = run.t
    found = _per_layer(run, 'zero_frac', (t.zero_frac_warning, t.zero_frac_critical))
    rows = [_finding('zero_frac', status, f"median {value:.1%} of {layer}'s gradient elements are zero (healthy < "
                     f"{t.zero_frac_warning:.0%}): dead units upstream, unused inputs or a masked loss",
                     layer=layer, value=value, threshold=threshold, first_step=first, last_step=last)
            for layer, status, value, threshold, first, last in found]
    return rows or [_finding('zero_frac', 'ok', f"every layer's median zero fraction is below {t.zero_frac_warning:.0%}",
                             threshold=t.zero_frac_warning)]


def _second_half(run):
    "`run` restricted to the rows of the second half of its applied steps, where dead units are judged."
    rows_all = run.applied_rows
    half = run.applied['step'].iloc[len(run.applied) // 2:] if len(run.applied) else run.applied['step']
    return _Late(run, rows_all[rows_all['step'].isin(half)])


def _late_dead(run):
    "Median dead fraction of each layer over the second half of the applied steps (as the dead check sees it)."
    rows = _second_half(run).applied_rows
    rows = rows[np.isfinite(rows['dead_frac'])]
    return rows.groupby(rows['layer'].astype(str))['dead_frac'].median().to_dict()


def _check_dead(run):
    t = run.t
    found = _per_layer(_second_half(run), 'dead_frac', (t.dead_warning, t.dead_critical))
    rows = [_finding('dead', status, f"{value:.0%} of {layer}'s units get no gradient at all, and stay so through the "
                     "second half of training (dead neurons): use Kaiming init, a smaller learning rate, "
                     "LeakyReLU/GeneralRelu, or check the biases", layer=layer, value=value, threshold=threshold,
                     first_step=first, last_step=last)
            for layer, status, value, threshold, first, last in found]
    return rows or [_finding('dead', 'ok', f"no layer keeps more than {t.dead_warning:.0%} dead units",
                             threshold=t.dead_warning)]


class _Late:
    "A view of `_Run` restricted to some rows (the second half, for the dead check)."
    def __init__(self, run, rows): self.__dict__.update(run.__dict__); self.applied_rows = rows


_CHECKS = (_check_nonfinite, _check_exploding, _check_total_norm, _check_spikes, _check_vanishing,
           _check_loss_context, _check_layer_spread, _check_ratio, _check_zero_frac, _check_dead)


def health(record, thresholds: Thresholds | None = None) -> pd.DataFrame:
    """Diagnose `record` (a GradRecord, live or loaded) against `thresholds` (a `Thresholds`; None: the
    defaults): one row per finding, worst first.

    Columns: `check` (one of `CHECKS`), `layer` (a parameter name or `'model'`), `status`
    (`critical`, `warning`, `ok`), `value` (what was measured), `threshold` (what it was held
    against), `first_step`, `last_step` (where the finding holds) and `reason` (one line with a
    remedy). Every check has at least one row, `ok` when it found nothing."""
    df, steps, layers, t = _inputs(record, thresholds)
    run = _Run(df, steps, layers, t, record)
    rows = [f for check in _CHECKS for f in (run.findings_of[check] if check in run.findings_of else check(run))]
    out = pd.DataFrame(rows, columns=list(HEALTH_COLUMNS))
    out['first_step'] = out['first_step'].astype('Int64'); out['last_step'] = out['last_step'].astype('Int64')
    rank = out['status'].map({s: i for i, s in enumerate(STATUSES)})
    check_rank = out['check'].map({c: i for i, c in enumerate(CHECKS)})
    return out.assign(_r=rank, _c=check_rank).sort_values(['_r', '_c'], kind='stable').drop(columns=['_r', '_c']).reset_index(drop=True)


def suggest_clip(record, thresholds: Thresholds | None = None) -> dict:
    """A `GradientClip` max_norm for this model: the `clip_percentile` of the total norm over healthy steps
    (finite, applied, not spikes, at most `total_norm_critical`), as AutoClip does, and how many applied steps
    it would have clipped (steps the grad scaler skipped are left out of both). When no step is healthy (the
    run exploded from the start), a percentile of exploded norms would only keep the explosion: max_norm is
    then `total_norm_warning`, where the healthy band ends. `thresholds`: a `Thresholds` (None: the defaults).

    Returns a dict with `max_norm`, `n_clipped`, `n_steps` (the applied steps), `percentile`, `n_healthy`
    (the healthy steps) and `base`: `'healthy'` (max_norm is the percentile of the healthy norms) or
    `'total_norm_warning'` (no healthy step: max_norm is that threshold, `percentile` was not used)."""
    _, steps, _, t = _inputs(record, thresholds)
    norms = steps.loc[_applied(steps, record), 'grad_norm'].to_numpy(float)
    finite = norms[np.isfinite(norms)]
    if not len(finite): raise ValueError("`record` has no finite total norm to base a clipping value on")
    series = pd.Series(finite)
    rolling = series.rolling(int(t.spike_window), min_periods=min(5, int(t.spike_window))).median().shift(1)
    healthy = series[~(series > t.spike_factor * rolling) & (series <= t.total_norm_critical)]
    if len(healthy): max_norm, base = float(np.percentile(healthy, t.clip_percentile)), 'healthy'
    else: max_norm, base = float(t.total_norm_warning), 'total_norm_warning'
    return {'max_norm': max_norm, 'n_clipped': int((~(norms <= max_norm)).sum()),  # NaN and Inf would be clipped too
            'n_steps': int(len(norms)), 'percentile': float(t.clip_percentile), 'n_healthy': int(len(healthy)),
            'base': base}


def summary(record, thresholds: Thresholds | None = None, show_ok: bool = False) -> str:
    """A short text of `health`, worst first, for notebooks and terminals; with clipping advice when the
    gradients explode, spike or turn NaN/Inf. `thresholds`: a `Thresholds` (None: the defaults). `show_ok` also lists the checks that found nothing. Of several layers with
    one finding, the worst named is the one farthest from its threshold (by ratio, either way)."""
    if not isinstance(show_ok, bool): raise TypeError(f"`show_ok` must be True or False, got {show_ok!r}")
    table = health(record, thresholds)
    steps = record.steps
    counts = table['status'].value_counts()
    ranks = f" on {steps['rank'].nunique()} ranks" if 'rank' in steps else ''  # a merge: each step once per rank
    head = (f"Gradient health: {counts.get('critical', 0)} critical, {counts.get('warning', 0)} warning(s) over "
            f"{steps['step'].nunique()} recorded step(s) ({int(steps['step'].min())}-{int(steps['step'].max())}){ranks}, "
            f"{record.df['layer'].nunique()} parameter tensors")
    lines = [head]
    shown = table if show_ok else table[table['status'] != 'ok']
    # a check's findings on both sides of their thresholds (a grad/param ratio too small here, too large there) call
    # for opposite remedies: one line per side
    side = np.sign(shown['value'].to_numpy(float) - shown['threshold'].to_numpy(float))
    side = pd.Series(np.where(side > 0, 'above', np.where(side < 0, 'below', '')), index=shown.index)
    for (status, check, _), group in shown.groupby([shown['status'], shown['check'], side], sort=False):
        worst = group.iloc[_distance(group).argmax()] if len(group) > 1 else group.iloc[0]
        first, last = group['first_step'].min(), group['last_step'].max()
        where = '' if pd.isna(first) else f" [step {first}]" if first == last else f" [steps {first}-{last}]"
        if len(group) > 1:
            names = list(group['layer'])
            listed = ', '.join(names[:4]) + (f' and {len(names) - 4} more' if len(names) > 4 else '')
            lines.append(f"  {status.upper():8} {check} in {len(names)} layers ({listed}); worst {worst['layer']}: "
                         f"{worst['reason']}{where}")
        else:
            layer = '' if worst['layer'] == MODEL else f" {worst['layer']}"
            lines.append(f"  {status.upper():8} {check}{layer}: {worst['reason']}{where}")
    converged = table[(table['check'] == 'converged') & table['reason'].str.startswith('loss fell')]
    if len(converged) and not show_ok: lines.append(f"  ok       converged: {converged.iloc[0]['reason']}")
    bad = table[table['check'].isin(['exploding', 'spikes', 'nonfinite']) & (table['status'] != 'ok')]
    if len(bad):
        try:
            clip = suggest_clip(record, thresholds)
            t = Thresholds() if thresholds is None else thresholds
            base = (f"the {clip['percentile']:g}th percentile of the {clip['n_healthy']} healthy total norms"
                    if clip['base'] == 'healthy' else
                    f"total_norm_warning, the top of the healthy band: no applied step's total norm is healthy, i.e. "
                    f"finite, at most {t.total_norm_critical:g} and not a spike, so none can give a percentile")
            lines.append(f"  advice: GradientClip(max_norm={clip['max_norm']:.3g}) ({base}) would have clipped "
                         f"{clip['n_clipped']} of {clip['n_steps']} steps")
        except ValueError as e: lines.append(f"  advice: no clipping value: {e}")
    return '\n'.join(lines)


def _distance(findings) -> np.ndarray:
    "How far each finding's value lies from its threshold, |log(value / threshold)| (0 where either is unknown)."
    with np.errstate(divide='ignore', invalid='ignore'):
        far = np.abs(np.log(findings['value'].to_numpy(float) / findings['threshold'].to_numpy(float)))
    return np.nan_to_num(far, nan=0.0, posinf=np.inf)


record_method(health)
record_method(summary)
record_method(suggest_clip)
