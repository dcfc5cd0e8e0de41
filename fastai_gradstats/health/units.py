"""The checks of units (rows of a weight: neurons, channels): dead units, symmetric units, and what the zero
gradient elements are. Zeros are attributed before they are judged: whole rows are dead units (the dead check);
positions that every live unit shares (`shared_zero_frac`: inputs that are always zero, like the digits' border pixels,
units upstream that are off, kernel positions outside a small feature map) are the data or the architecture; rows of an
embedding table are categories not in the batch. Only the remaining, scattered zeros could point elsewhere."""
from __future__ import annotations

import numpy as np

from .run import finding, span

__all__ = ['second_half', 'dead_fractions', 'check_dead', 'check_symmetric', 'check_zero_frac']


def second_half(run) -> np.ndarray:
    """Which applied rows (a mask over `run.applied_rows`) are of the second half of the applied steps (at least 3
    steps), where units are judged dead."""
    steps = run.applied['step'].to_numpy()
    return np.isin(run.applied_rows['step'].to_numpy(), steps[len(steps) - max(3, len(steps) // 2):])


def dead_fractions(run, half=None):
    """Per weight, the least dead fraction over the second half of the applied steps (`half`: `second_half(run)`, when
    already made): at most this share of its units got no gradient at every one of those steps (a unit off for one
    batch, or a few, is not dead)."""
    return run.per_layer('dead_frac', run.weights, where=second_half(run) if half is None else half, how='min')


def check_dead(run):
    "Weights whose units got no gradient at any step of the second half of training (dead neurons)."
    t = run.t
    half = second_half(run)
    dead = dead_fractions(run, half)
    rows = []
    after = '' if not run.problems(['exploding']) else ' (they died in the explosion: see exploding)'
    first, last = span(np.unique(run.applied_rows['step'].to_numpy()[half]))
    for layer, value in dead.items():
        if value < t.dead_warning: continue
        status, threshold = ('critical', t.dead_critical) if value >= t.dead_critical else ('warning', t.dead_warning)
        units = run.shape[layer][0]
        rows.append(finding('dead', status, f"{value:.0%} of {layer}'s {units} units got no gradient at any step of the "
                            f"second half of training (dead neurons){after}: use Kaiming init, LeakyReLU/GeneralRelu, a "
                            "smaller learning rate, or check the biases", layer=layer, value=value, threshold=threshold,
                            first_step=first, last_step=last))
    return rows or [finding('dead', 'ok', f"no weight keeps {t.dead_warning:.0%} or more of its units dead through the second "
                            "half of training", value=float(dead.max()) if len(dead) else np.nan, threshold=t.dead_warning)]


def check_symmetric(run):
    "Units that get the same gradient at every step: copies of one another, from weights initialised to one constant."
    t = run.t
    spread = run.per_layer('unit_spread', run.weights)
    norms = run.per_layer('grad_norm', run.weights)
    rows = []
    for layer, value in spread.items():
        if value >= t.symmetric_spread or not norms.get(layer, 0) > 0: continue  # no gradient at all is the dead check's
        units = run.shape[layer][0]
        rows.append(finding('symmetric', 'critical', f"the {units} units of {layer} get the same gradient (median "
                            f"unit_spread {value:.2g}): they are copies of one another, so the layer acts as one unit "
                            "(weights initialised to one constant, e.g. zeros or fill_); initialise them randomly "
                            "(PyTorch's default, or Kaiming)", layer=layer, value=value, threshold=t.symmetric_spread,
                            first_step=span(run.applied['step'])[0], last_step=span(run.applied['step'])[1]))
    return rows or [finding('symmetric', 'ok', 'the units of every weight get gradients of their own', threshold=t.symmetric_spread)]


def check_zero_frac(run):
    """Zero gradient elements, attributed: dead units, positions every live unit shares, embedding rows not in the
    batch, and the scattered rest; only a large scattered rest in a weight warns."""
    t = run.t
    rows = run.applied_rows
    zero = run.column('zero_frac')
    dead = np.nan_to_num(run.column('dead_frac'))
    shared = (1 - dead) * np.nan_to_num(run.column('shared_zero_frac'))
    scattered = np.maximum(zero - dead - shared, 0)
    medians = run.per_layer('zero_frac')
    attributed = [n for n, z in medians.items() if z > t.zero_frac_warning]   # only these are told apart
    parts = {name: run.per_layer('zero_frac', attributed, rows=rows, values=v).to_dict() if attributed else {}
             for name, v in (('dead', dead), ('shared', shared), ('scattered', scattered))}
    out = []
    for layer, z in medians.items():
        if z <= t.zero_frac_warning: continue
        if run.module[layer] == 'Embedding':
            out.append(finding('zero_frac', 'ok', f"median {z:.1%} of {layer}'s gradient elements are zero: rows of an "
                               "embedding table whose categories are not in the batch get none, which is how embeddings learn",
                               layer=layer, value=z, threshold=t.zero_frac_warning))
            continue
        if len(run.shape[layer]) < 2:
            out.append(finding('zero_frac', 'ok', f"median {z:.1%} of {layer}'s gradient elements are zero (a 1-D "
                               "parameter: the units it belongs to got none, see dead)", layer=layer, value=z,
                               threshold=t.zero_frac_warning))
            continue
        d, s, r = (float(parts[k].get(layer, 0.0)) for k in ('dead', 'shared', 'scattered'))
        what = (f"median {z:.1%} of {layer}'s gradient elements are zero: {d:.1%} in dead units (see dead), {s:.1%} at "
                "fan-in positions no live unit got a gradient through (inputs that are always zero, units upstream that are "
                f"off, kernel positions outside a small feature map), {r:.1%} scattered")
        if r > t.zero_frac_critical:
            over = run.mask(rows, [layer]) & (scattered > t.zero_frac_critical)
            first, last = span(rows['step'][over])
            out.append(finding('zero_frac', 'warning', f"{what}: scattered zeros inside live units point to gradients that "
                               "underflow (fp16 without a loss scale?) or a loss that masks most outputs", layer=layer,
                               value=r, threshold=t.zero_frac_critical, first_step=first, last_step=last))
        else:
            out.append(finding('zero_frac', 'ok', f"{what}: the data or the architecture, not a problem by itself",
                               layer=layer, value=r, threshold=t.zero_frac_critical))
    return out or [finding('zero_frac', 'ok', f"every layer's median zero fraction is at most {t.zero_frac_warning:.0%}",
                           threshold=t.zero_frac_warning)]
