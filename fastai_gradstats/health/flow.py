"""How gradients flow through the depth of the network: vanishing towards the input, the spread between layers, and
the gradient-to-weight ratio. Weights are the 2+-D tensors other than embedding tables (whose rows of categories not
in a batch get no gradient); a layer's size is its live units' (a dead unit's zeros are the dead check's)."""
from __future__ import annotations

import numpy as np

from .norms import persistent_from
from .run import finding, span

__all__ = ['live_rms', 'depth_profile', 'check_vanishing', 'check_layer_spread', 'check_grad_param_ratio']


def live_rms(run, rows=None):
    "Root mean square gradient of each of `rows` (default: the applied rows) over its live units' elements (dead units left out)."
    rows = run.applied_rows if rows is None else rows
    numel = run.of_rows(rows, run.numel).astype(np.float64)
    live = 1 - np.nan_to_num(run.column('dead_frac', rows))
    with np.errstate(divide='ignore', invalid='ignore'):
        return run.column('grad_norm', rows) / np.sqrt(numel * live)


def depth_profile(run):
    "Median live rms gradient of each weight over the applied steps, from input to output."
    return run.per_layer('live_rms', run.weights, values=live_rms(run)).dropna()


def check_vanishing(run):
    """A total gradient norm below `vanishing_norm` (unless the run converged), or weights' rms gradients falling
    steadily with depth towards the input."""
    t = run.t
    findings = []
    finite = np.isfinite(run.norms)
    norms, steps = run.norms[finite], run.applied['step'].to_numpy()[finite]
    tiny = norms < t.vanishing_norm
    start = persistent_from(tiny)   # lasting, as an explosion must be: one empty batch (a fully masked loss) is none
    if start is not None and not run.converged:
        tiny[:start] = False
        first, last = span(steps[tiny])
        cause = ('after the explosion (see exploding), the network is dead' if run.problems(['exploding']) else
                 'check the initialisation and activations')
        findings.append(finding('vanishing', 'critical', f"total gradient norm below {t.vanishing_norm:g} at "
                                f"{int(tiny.sum())} step(s): no learning; {cause}",
                                value=float(norms.min()), threshold=t.vanishing_norm, first_step=first, last_step=last))
    profile = depth_profile(run)
    if len(profile) >= 3 and profile.iloc[-1] > 0:
        rms = profile.to_numpy(float)
        with np.errstate(divide='ignore'): ratio = float(rms[-1] / rms[0])  # Inf: no gradient at all at the input
        # a layer whose rms gradient is 0 counts as 1000x below the smallest non-zero one, for the steadiness
        log_rms = np.log(np.where(rms > 0, rms, rms[rms > 0].min() * 1e-3))
        with np.errstate(invalid='ignore', divide='ignore'):  # a flat profile has no correlation (NaN): not steady
            steady = np.corrcoef(np.arange(len(log_rms)), log_rms)[0, 1] >= 0.7
        falls = f"{ratio:.3g}x" if np.isfinite(ratio) else 'to 0'
        what = (f"rms gradient falls {falls} from {profile.index[-1]} to {profile.index[0]} (input), "
                f"{ratio ** (1 / (len(rms) - 1)):.3g}x per layer" if np.isfinite(ratio) else
                f"rms gradient falls to 0 from {profile.index[-1]} to {profile.index[0]} (input)")
        stuck = not run.falling
        loss = (f"and the loss is stuck ({run.loss_start:.3g} -> {run.loss_end:.3g})" if stuck else
                f"but the loss falls ({run.loss_start:.3g} -> {run.loss_end:.3g}): the layers near the input learn slowly")
        first, last = span(run.applied['step'])
        if steady and ratio >= t.depth_ratio_warning and run.converged:
            findings.append(finding('vanishing', 'ok', f"{what}, but the loss is low and flat: convergence, not vanishing",
                                    layer=profile.index[0], value=ratio, threshold=t.depth_ratio_warning))
        elif steady and (ratio >= t.depth_ratio_critical or (ratio >= t.depth_ratio_warning and stuck)):
            status = 'critical' if ratio >= t.depth_ratio_critical and stuck else 'warning'
            findings.append(finding('vanishing', status, f"gradients vanish with depth: {what}, {loss}; use Kaiming init, "
                                    "ReLU-family activations, BatchNorm or residual connections", layer=profile.index[0],
                                    value=ratio, threshold=t.depth_ratio_critical if status == 'critical' else
                                    t.depth_ratio_warning, first_step=first, last_step=last))
    if findings: return findings
    if len(profile) >= 2 and profile.iloc[0] > 0 and profile.iloc[-1] > 0:
        ratio = float(profile.iloc[-1] / profile.iloc[0])
        return [finding('vanishing', 'ok', f"no vanishing: the rms gradient of the output-most weight is {ratio:.3g}x the "
                        "input-most's" + ('' if len(profile) >= 3 else ' (two weights: no trend with depth to read)'),
                        value=ratio, threshold=t.depth_ratio_warning)]
    if len(profile) < 2:
        silent = [n for n in run.weights if n not in profile.index]
        why = f": {', '.join(silent[:4])} get(s) no gradient at all (see dead)" if silent else ''
        return [finding('vanishing', 'ok', f"fewer than two weights with a finite gradient{why}: no fall with depth to "
                        "measure", threshold=t.depth_ratio_warning)]
    silent = [n for n in (profile.index[-1], profile.index[0]) if profile[n] == 0]
    return [finding('vanishing', 'ok', f"no ratio of gradients across depth: {' and '.join(silent)} get(s) no gradient "
                    "at all (median rms 0), dead units rather than a fall with depth: see dead",
                    threshold=t.depth_ratio_warning)]


def check_layer_spread(run):
    "Max over min weight-gradient norm across layers, per step: a note, and a warning only when extreme and unexplained."
    t = run.t
    norms = run.column('grad_norm')
    with np.errstate(invalid='ignore'):
        keep = run.mask(run.applied_rows, run.weights) & np.isfinite(norms) & (norms > 0)
    if len(np.unique(run.codes(run.applied_rows)[keep])) < 2:
        return [finding('layer_spread', 'ok', 'fewer than two weights with gradients: no spread to measure')]
    steps, norms = run.applied['step'].to_numpy()[run.position[keep]], norms[keep]
    order = np.argsort(steps, kind='stable')   # a step's rows together (of all ranks, in a merge)
    steps, norms = steps[order], norms[order]
    starts = np.flatnonzero(np.r_[True, steps[1:] != steps[:-1]])   # each step with such a gradient
    spread = float(np.median(np.maximum.reduceat(norms, starts) / np.minimum.reduceat(norms, starts)))
    explained = run.problems(['vanishing', 'dead'])
    if spread > t.layer_spread_critical and not explained:
        first, last = span(steps[starts])
        return [finding('layer_spread', 'warning', f"median max/min weight-gradient norm across layers is {spread:.3g}x "
                        f"(over {t.layer_spread_critical:g}x): some layers get far less gradient than others and learn far "
                        "slower; check the gradient flow plot", value=spread, threshold=t.layer_spread_critical,
                        first_step=first, last_step=last)]
    note = ' (see vanishing, dead)' if explained else (
        ': layers differ in size and place, so their norms differ; a steady fall towards the input is the vanishing check')
    return [finding('layer_spread', 'ok', f"median max/min weight-gradient norm across layers is {spread:.3g}x{note}",
                    value=spread, threshold=t.layer_spread_critical)]


def check_grad_param_ratio(run):
    """The gradient-to-weight ratio of each weight, for the record: with SGD a step moves a weight by about lr x this
    ratio; adaptive optimizers (Adam) and BatchNorm's scale invariance change that, so it is no finding by itself (the
    steps themselves are: see lr_too_low and, with `update_ratio=True`, update_ratio)."""
    t = run.t
    ratio = run.per_layer('grad_param_ratio', run.weights)
    ratio = ratio[np.isfinite(ratio)]
    if not len(ratio): return [finding('grad_param_ratio', 'ok', 'no weight with a finite grad/param ratio')]
    low, high = ratio.idxmin(), ratio.idxmax()
    return [finding('grad_param_ratio', 'ok', f"median grad/param ratio from {ratio[low]:.3g} ({low}) to {ratio[high]:.3g} "
                    f"({high}); the textbook calls above {t.ratio_high:g} too large and below {t.ratio_low:g} too small for "
                    "SGD, where a step is about lr x this ratio (Adam normalises it, BatchNorm makes it scale-free)",
                    value=float(ratio[high]), threshold=t.ratio_high)]
