"""The checks of the total gradient norm: NaN/Inf, explosions, spikes, the level, and the steps the optimizer skipped.

A norm is never condemned for its level alone (the textbook's bands vary by architecture: a healthy resnet18 sits
above 100): an explosion is growth within a phase of training (a jump when more tensors start training is not),
lasting, above the healthy band, or NaN/Inf; or gradients huge from the very first step with a loss far above a
guess's."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .run import NO_APPLIED, finding, span

__all__ = ['persistent_from', 'phase_baselines', 'loss_scale_of', 'check_skipped', 'check_nonfinite',
           'check_exploding', 'check_total_norm', 'spike_mask', 'check_spikes', 'check_loss_scale']

CALIBRATION = 16  # leading skipped steps that are the grad scaler calibrating (halving 2**16 down to 1), not a finding
LASTING = 3  # bad steps in a row that make an explosion, not an isolated event (fewer: see spikes, nonfinite)


def persistent_from(bad):
    """Index of the first bad step that starts an explosion (None: none does): `LASTING` bad steps in a row, or
    most steps from there to the end bad. A single NaN or spike followed by recovery does not."""
    bad = np.asarray(bad, bool)
    if not bad.any(): return None
    bad_to_end = np.cumsum(bad[::-1])[::-1]           # bad steps from each step to the end
    steps_to_end = np.arange(len(bad), 0, -1)
    in_a_row = np.convolve(bad, np.ones(LASTING, int), 'full')[LASTING - 1:] == LASTING  # bad[i:i+LASTING] all bad
    start = np.flatnonzero(bad & (in_a_row | (2 * bad_to_end > steps_to_end)))
    return int(start[0]) if len(start) else None


def phase_baselines(run) -> np.ndarray:
    "Each applied step's reference norm: the least of the first three finite norms of its phase (NaN: none finite)."
    base = np.full(len(run.norms), np.nan)
    for phase in np.unique(run.phase):
        at = np.flatnonzero(run.phase == phase)
        finite = run.norms[at][np.isfinite(run.norms[at])]
        if len(finite): base[at] = finite[:3].min()
    return base


def loss_scale_of(run) -> float:
    "How many times a mean loss the recorded loss is, when the loss_scale check found it summed over the batch (else 1)."
    found = run.problems(['loss_scale'])
    return float(found[0]['value']) if found else 1.0


def _after_calibration(skipped):
    "Of one scaler's steps in order (`skipped`: whether each was), those after its calibration."
    return skipped[min(CALIBRATION, int(np.argmin(skipped)) if not skipped.all() else len(skipped)):]


def _calibration_words(n, ranks) -> str:
    k = len(np.unique(ranks))
    return f"its first {n} calibration step(s)" if k == 1 else f"the {n} calibration step(s) of its {k} ranks' scalers"


def check_skipped(run):
    "Steps the optimizer skipped (the fp16 grad scaler after an overflow): a few are normal; most throw the updates away."
    t, steps = run.t, run.record.steps
    skipped = steps['skipped'].to_numpy(bool) & ~np.isin(steps['step'].to_numpy(), run.stopped_steps)
    if not skipped.any(): return [finding('skipped', 'ok', 'no step was skipped by the optimizer', value=0)]
    # the scaler's first steps, halving its scale down to one that fits (at most CALIBRATION: from 2**16 to 1); each
    # rank of a merge has a scaler of its own
    ranks = steps['rank'].to_numpy() if 'rank' in steps else np.zeros(len(steps), int)
    rest = np.concatenate([_after_calibration(skipped[ranks == r]) for r in np.unique(ranks)])
    share = float(rest.mean()) if len(rest) else 0.0  # every step within the calibration: too early to tell
    first, last = span(steps['step'][skipped])
    what = (f"{int(skipped.sum())} of {len(skipped)} recorded steps were skipped by the optimizer (the fp16 grad scaler "
            f"after an overflow), {int(rest.sum())} of the {len(rest)} after {_calibration_words(len(skipped) - len(rest), ranks)}")
    if share >= t.skipped_critical:
        return [finding('skipped', 'critical', f"{what}: most updates are thrown away, the loss scale overflows again "
                        "and again; lower GradScaler's init_scale or growth_factor, look for Inf in the loss, or train "
                        "in bfloat16/float32", value=share, threshold=t.skipped_critical, first_step=first, last_step=last)]
    if share >= t.skipped_warning:
        return [finding('skipped', 'warning', f"{what}: the loss scale keeps overflowing; lower GradScaler's growth or "
                        "look for Inf in the loss", value=share, threshold=t.skipped_warning, first_step=first,
                        last_step=last)]
    return [finding('skipped', 'ok', f"{what}: normal for mixed precision", value=share, threshold=t.skipped_warning,
                    first_step=first, last_step=last)]


def _normal_before(run, index, baseline):
    "Whether the finite norms before applied step `index` stayed within `growth_factor` of their phase's reference."
    before = run.norms[:index][np.isfinite(run.norms[:index])]
    return not len(before) or bool(before.max() <= run.t.growth_factor * baseline[index - 1 if index else 0])


def check_nonfinite(run):
    "NaN or Inf in the gradients of applied steps, said where they first appear and whether they came after growth."
    df = run.df
    bad = (df['n_nan'].to_numpy() > 0) | (df['n_inf'].to_numpy() > 0)
    if bad.any(): bad &= np.isin(df['step'].to_numpy(), run.applied['step'].to_numpy())
    if not bad.any(): return [finding('nonfinite', 'ok', 'no NaN or Inf in any applied gradient', value=0)]
    bad = df[bad]
    first_step = int(bad['step'].min())
    at_first = bad[bad['step'] == first_step]
    nearest_output = max(at_first['layer'].astype(str), key=lambda n: run.depth[n])
    first, last = span(bad['step'])
    n_steps = bad['step'].nunique()
    stopped = (", where GradStats stopped training (stop_on_critical)" if bad['step'].isin(run.stopped_steps).any() else '')
    index = int(np.flatnonzero(run.applied['step'].to_numpy() == first_step)[0])
    where = (f"NaN/Inf gradients first at step {first_step} in {nearest_output} (nearest the output, where backward "
             f"starts) and in {n_steps} step(s){stopped}")
    if _normal_before(run, index, phase_baselines(run)):
        remedy = ("after normal gradients, with no growth before: NaN/Inf in the inputs or targets, or a loss that "
                  f"overflows (a log of 0, a division by 0); check the batch of step {first_step} "
                  "(torch.isfinite(x).all()) and the loss")
    else: remedy = "after the norm grew (see exploding): lower the learning rate, add GradientClip"
    return [finding('nonfinite', 'critical', f"{where}: {remedy}", layer=nearest_output, value=n_steps, threshold=0,
                    first_step=first, last_step=last)]


def check_exploding(run):
    """Gradients that explode: lasting steps whose total norm is over `growth_factor` times the one their phase started
    at (and above `total_norm_warning`), or not finite."""
    t, norms = run.t, run.norms
    if not len(norms): return [finding('exploding', 'ok', NO_APPLIED, threshold=t.growth_factor)]
    steps = run.applied['step'].to_numpy()
    finite = np.isfinite(norms)
    if not finite.any():
        first, last = span(steps)
        return [finding('exploding', 'warning', "no total norm is finite, from the first step on: an explosion cannot "
                        "be told from bad inputs, a bad loss or a bad initialisation (see nonfinite)",
                        threshold=t.growth_factor, first_step=first, last_step=last)]
    scale = loss_scale_of(run)  # a loss summed over the batch multiplies every norm: the bands hold for a mean loss
    baseline = phase_baselines(run)
    with np.errstate(invalid='ignore'):
        grown = (norms > t.growth_factor * baseline) & (norms / scale > t.total_norm_warning)
    bad = ~finite | grown
    start = persistent_from(bad)
    # NaN/Inf after normal norms, with no growth among the bad steps, is bad data or a bad loss (nonfinite), not an explosion
    if start is not None and not grown[start:].any() and _normal_before(run, start, baseline): start = None
    if start is not None:
        where = steps[start:][bad[start:]]
        tail = norms[start:][bad[start:]]
        peak = float(np.nanmax(tail)) if (~np.isnan(tail)).any() else np.inf
        base = baseline[start]
        return [finding('exploding', 'critical', f"gradients explode from step {int(where.min())}: {len(where)} applied "
                        f"step(s) up to step {int(where.max())} have a total norm over {t.growth_factor:g}x the "
                        f"{base:.3g} its phase started at (and above {t.total_norm_warning:g}), or not finite: lower the "
                        "learning rate, add GradientClip (see the clipping advice)", value=peak / base if base > 0 else np.inf,
                        threshold=t.growth_factor, first_step=int(where.min()), last_step=int(where.max()))]
    nonfinite = np.flatnonzero(~finite)
    if len(nonfinite):
        j = int(nonfinite[0])
        before = norms[:j][finite[:j]]
        rise = float(before[-1] / baseline[j - 1]) if len(before) >= 2 and baseline[j - 1] > 0 else np.nan
        if rise >= t.growth_factor and before[-1] / scale > t.total_norm_warning:
            return [finding('exploding', 'critical', f"gradients explode at step {int(steps[j])}: the total norm grew "
                            f"{rise:.3g}x from its phase's start to {before[-1]:.3g}, then turned NaN/Inf: lower the "
                            "learning rate, add GradientClip (see the clipping advice)", value=rise, threshold=t.growth_factor,
                            first_step=int(steps[j]), last_step=int(steps[j]))]
    huge = _huge_from_the_start(run, scale)
    if huge: return huge
    late_base = baseline[-1]
    growth = run.late_norm / late_base if late_base > 0 else np.nan
    if run.enough and growth >= t.growth_factor and run.late_norm / scale > t.total_norm_warning:
        first, last = span(run.late_steps)
        return [finding('exploding', 'warning', f"the total norm grew {growth:.3g}x from the start of its phase to the "
                        "last fifth of training: the run may be diverging; lower the learning rate", value=growth,
                        threshold=t.growth_factor, first_step=first, last_step=last)]
    isolated = (f"{int(bad.sum())} isolated step(s) over {t.growth_factor:g}x their phase's start or not finite, never "
                f"{LASTING} in a row nor most steps to the end (see spikes, nonfinite); otherwise " if bad.any() else '')
    phases = len(np.unique(run.phase))
    compared = f" (compared within each of its {phases} phases: the set of training tensors changed)" if phases > 1 else ''
    return [finding('exploding', 'ok', f"{isolated}the total norm does not grow {t.growth_factor:g}x and more{compared}",
                    value=growth, threshold=t.growth_factor)]


def _huge_from_the_start(run, scale):
    """Gradients that are huge from the very first step (an explosion at initialisation: nothing to grow from): a first
    norm above `total_norm_critical` with a first loss ten times a classifier's guess or more, or a first norm ten times
    `total_norm_critical` (a healthy resnet18 starts at 10-350). An empty list when not."""
    t = run.t
    first = run.norms[np.isfinite(run.norms)][:1]
    if not len(first) or first[0] / scale <= t.total_norm_critical: return []
    over_chance = run.loss_start / run.chance if run.classifier else math.nan
    if not (over_chance >= 10 or first[0] / scale > 10 * t.total_norm_critical): return []
    loss = (f" and a first loss of {run.loss_start:.3g}, {over_chance:.3g}x that of a uniform guess over "
            f"{run.classes} classes (ln {run.classes} = {run.chance:.3g})" if over_chance >= 10 else '')
    steps = run.applied['step'].to_numpy()
    above = steps[run.norms > t.total_norm_critical]
    f_step, l_step = span(above)
    return [finding('exploding', 'critical', f"gradients are huge from the first step: a total norm of {first[0]:.3g}"
                    f"{loss}: the initial weights (or the inputs) are far too large, so activations grow layer after layer "
                    "(or step after step through time); use Kaiming or PyTorch's default init, scale the inputs, keep a "
                    "recurrent weight's norm below 1", value=first[0], threshold=t.total_norm_critical,
                    first_step=f_step, last_step=l_step)]


def check_total_norm(run):
    "The level of the total norm, for the record: never a finding by itself (see exploding)."
    t, norms = run.t, run.norms
    if not len(norms): return [finding('total_norm', 'ok', NO_APPLIED, threshold=t.total_norm_warning)]
    known = norms[np.isfinite(norms)]
    if np.isnan(norms).all(): return [finding('total_norm', 'critical', 'every recorded total gradient norm is NaN')]
    if not len(known): return [finding('total_norm', 'ok', 'no total norm is finite (see nonfinite, exploding)')]
    low, high, median = float(known.min()), float(known.max()), float(np.median(known))
    band = (f"the textbook's healthy band is {t.total_norm_low:g}-{t.total_norm_warning:g}, but the level depends on the "
            "model's size and its loss, so it is judged by growth, NaN/Inf and the loss (see exploding)")
    return [finding('total_norm', 'ok', f"total gradient norm from {low:.3g} to {high:.3g} (median {median:.3g}); {band}",
                    value=high, threshold=t.total_norm_warning)]


def spike_mask(norms, phase, t):
    """Which `norms` are spikes: over `spike_factor` x the rolling median of the finite steps before them in the same
    phase and, where 5 or more follow, of those after them too (a spike comes back down; a norm that rises and stays, as
    a network's does when it starts to learn, is no spike). An Inf norm, beyond float32's range, exceeds every median;
    NaN none. Returns that mask and the medians before: two arrays."""
    series = pd.Series(np.where(np.isfinite(norms), norms, np.nan))
    window, least = int(t.spike_window), min(5, int(t.spike_window))
    median = lambda s: s.rolling(window, min_periods=least).median().shift(1)
    if len(phase) and (phase == phase[0]).all(): before, after = median(series), median(series[::-1])[::-1]   # one phase
    else: before, after = series.groupby(phase).transform(median), series[::-1].groupby(phase[::-1]).transform(median)[::-1]
    before, after = before.to_numpy(np.float64), after.to_numpy(np.float64)   # both in the order of `norms`
    with np.errstate(invalid='ignore'):
        over = (norms > t.spike_factor * before) & (np.isnan(after) | (norms > t.spike_factor * after)) & ~np.isnan(norms)
    return over, before


def check_spikes(run):
    "Steps whose total norm is over `spike_factor` times the rolling median of the steps around them (not in an explosion)."
    t = run.t
    if not len(run.norms): return [finding('spikes', 'ok', NO_APPLIED, value=0, threshold=t.spike_factor)]
    spikes, rolling = spike_mask(run.norms, run.phase, t)
    if spikes.any() and run.problems(['exploding']):
        return [finding('spikes', 'ok', f"{int(spikes.sum())} step(s) over {t.spike_factor:g}x the rolling median, in an "
                        "explosion (see exploding)", value=int(spikes.sum()), threshold=t.spike_factor)]
    if not spikes.any():
        return [finding('spikes', 'ok', f"no step's total norm exceeds {t.spike_factor:g}x the rolling median",
                        value=0, threshold=t.spike_factor)]
    steps = run.applied['step'].to_numpy()[spikes]
    first, last = span(steps)
    worst = float(np.max(run.norms[spikes] / rolling[spikes]))
    what = f"{int(spikes.sum())} step(s) with a total norm over {t.spike_factor:g}x the rolling median (worst {worst:.3g}x)"
    if spikes.sum() == 1 and worst < 10 * t.spike_factor:
        return [finding('spikes', 'ok', f"{what}: one isolated step, not a pattern", value=1, threshold=t.spike_factor,
                        first_step=first, last_step=last)]
    clip = run.record.args.get('gradient_clip')
    if clip is not None:
        return [finding('spikes', 'ok', f"{what}, which the fit's GradientClip(max_norm={clip:g}) caps (recorded before "
                        "clipping)", value=int(spikes.sum()), threshold=t.spike_factor, first_step=first, last_step=last)]
    return [finding('spikes', 'warning', f"{what}: outlier batches (inputs or labels on another scale) or a learning "
                    "rate on the edge; look at those batches, GradientClip caps them", value=int(spikes.sum()),
                    threshold=t.spike_factor, first_step=first, last_step=last)]


def check_loss_scale(run):
    """A loss summed over the batch instead of averaged: its first value is about the batch size times that of a
    uniform guess, and every gradient is as many times larger."""
    t = run.t
    batch = run.record.args.get('batch_size')
    over = run.loss_start / run.chance if run.classifier else math.nan
    if not batch or batch < 8 or not np.isfinite(over) or abs(over - batch) > t.chance_margin * batch:
        return [finding('loss_scale', 'ok', 'the first loss is on the scale of a mean over the batch'
                        + (f" ({over:.3g}x ln {run.classes})" if np.isfinite(over) else ''), value=over)]
    return [finding('loss_scale', 'warning', f"the first loss, {run.loss_start:.3g}, is {over:.3g}x that of a uniform "
                    f"guess over {run.classes} classes (ln {run.classes} = {run.chance:.3g}) and a batch holds {batch}: the "
                    f"loss is summed over the batch rather than averaged (reduction='sum'), so every gradient is {batch}x "
                    "larger and so is the learning rate's effect; use reduction='mean' (fastai's default)",
                    value=batch, threshold=over)]
