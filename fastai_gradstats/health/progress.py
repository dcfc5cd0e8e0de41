"""The checks of progress, reading the loss with the gradients and the steps: converged, a learning rate far too low,
weights that do not move, nothing learned, stuck. A flat loss is explained before it is reported: `not_learning` and
`stuck` speak only when no finding of another check accounts for it."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .norms import loss_scale_of
from .run import finding, span

__all__ = ['explanations', 'step_sizes', 'check_lr_too_low', 'check_update_ratio', 'check_not_learning',
           'check_stuck', 'unsettled', 'check_converged']

RECURRENT = ('RNN', 'LSTM', 'GRU')  # modules whose gradients add up over time steps

# findings that account for a loss that does not fall (of these, `dead` only when critical)
EXPLAINS_A_FLAT_LOSS = ('skipped', 'not_in_optimizer', 'symmetric', 'lr_too_low', 'update_ratio', 'exploding',
                        'nonfinite', 'vanishing')


def explanations(run) -> list:
    "The findings of other checks that account for a loss that does not fall."
    return run.problems(EXPLAINS_A_FLAT_LOSS) + [f for f in run.problems(['dead']) if f['status'] == 'critical']


def step_sizes(run):
    """Per weight, the median over applied steps of how far a step moves it, as a fraction of its size: the recorded
    `update_ratio` when there is one; else an upper bound from the learning rate, lr x max(10 x grad/param, 1 / rms(w)),
    which holds for SGD (with momentum up to 0.9) and for Adam-like optimizers (a step of about lr per element)."""
    rows = run.applied_rows
    if 'update_ratio' in rows: return run.per_layer('update_ratio', run.weights), 'update_ratio'
    lr = _group_lrs(run, rows, run.position)
    numel = run.of_rows(rows, run.numel).astype(np.float64)
    with np.errstate(divide='ignore', invalid='ignore'):
        bound = lr * np.maximum(10 * run.column('grad_param_ratio'), np.sqrt(numel) / run.column('param_norm'))
    return run.per_layer('bound', run.weights, values=bound), 'bound'


def _group_lrs(run, rows, position) -> np.ndarray:
    """The learning rate of each of `rows` (applied steps `position`): its parameter group's at that step (`record.lrs`),
    else the step's (the last group's)."""
    step_lr = run.applied['lr'].to_numpy(np.float64)[position]
    lrs = run.record.lrs
    if not len(lrs): return step_lr
    if 'rank' not in lrs:   # one process: (step, group) as one increasing number, looked up by bisection
        groups = int(lrs['group'].max()) + 2
        known = lrs['step'].to_numpy(np.int64) * groups + lrs['group'].to_numpy(np.int64)
        group = run.of_rows(rows, run.group).astype(np.int64)
        wanted = run.applied['step'].to_numpy(np.int64)[position] * groups + np.where(group >= 0, group, groups - 1)
        at = np.minimum(np.searchsorted(known, wanted), len(known) - 1)
        found = (known[at] == wanted) & (group >= 0)   # no rate of its own where the group is unknown (-1)
        return np.where(found, lrs['lr'].to_numpy(np.float64)[at], step_lr)
    keys = ['rank', 'step']
    table = lrs.set_index([*keys, 'group'])['lr']
    at = pd.MultiIndex.from_arrays([run.applied[c].to_numpy()[position] for c in keys] + [run.of_rows(rows, run.group)])
    lr = table.reindex(at).to_numpy(np.float64)  # NaN where the group has no rate of its own (-1)
    return np.where(np.isfinite(lr), lr, step_lr)


def check_lr_too_low(run):
    "A flat loss while every step moves the weights by less than `step_low` of their size: a learning rate far too low."
    t = run.t
    sizes, kind = step_sizes(run)
    sizes = sizes[np.isfinite(sizes)]
    if not len(sizes): return [finding('lr_too_low', 'ok', 'no weight whose steps can be measured', threshold=t.step_low)]
    largest = float(sizes.max())
    what = ('each step moved the weights by' if kind == 'update_ratio' else 'the learning rate lets a step move the weights by')
    lrs = run.applied['lr'].to_numpy(np.float64)
    lr = float(np.median(lrs[~np.isnan(lrs)])) if (~np.isnan(lrs)).any() else float('nan')   # as pandas' median
    if run.flat and largest < t.step_low:
        first, last = span(run.applied['step'])
        return [finding('lr_too_low', 'critical', f"the loss stays at {run.loss_end:.3g} (from {run.loss_start:.3g}) while "
                        f"{what} at most {largest:.2g} of their size (median lr {lr:.2g}): the learning rate is far too "
                        "low; raise it (learn.lr_find() suggests one)", layer=sizes.idxmax(), value=largest,
                        threshold=t.step_low, first_step=first, last_step=last)]
    return [finding('lr_too_low', 'ok', f"{what} up to {largest:.2g} of their size per step (median lr {lr:.2g})",
                    value=largest, threshold=t.step_low)]


def check_update_ratio(run):
    """With `GradStats(update_ratio=True)`: weights that do not move although they get gradients (their group's learning
    rate is 0, or the optimizer leaves them out), and steps larger than the weights themselves."""
    t = run.t
    if 'update_ratio' not in run.df:
        return [finding('update_ratio', 'ok', 'not recorded (GradStats(update_ratio=True) records it)')]
    ratio = run.per_layer('update_ratio', run.weights)
    grads = run.per_layer('grad_norm', run.weights)
    moving = ratio[ratio >= t.step_low]
    still = [n for n, r in ratio.items() if r < t.step_low and grads.get(n, 0) > 0]
    rows = []
    if still and len(moving):  # all weights still is the lr_too_low check's
        status = 'critical' if run.flat else 'warning'
        for layer in still:
            rows.append(finding('update_ratio', status, f"{layer} does not move (median update ratio {ratio[layer]:.2g}) "
                                f"although its gradient does not vanish (median norm {grads[layer]:.3g}), while "
                                f"{len(moving)} other weight(s) move by up to {moving.max():.2g} per step: its parameter "
                                "group's learning rate is 0 or the optimizer skips it; check learn.opt.hypers and the "
                                "splitter" + (f", and the loss is stuck ({run.loss_start:.3g} -> {run.loss_end:.3g})"
                                              if run.flat else ''),
                                layer=layer, value=ratio[layer], threshold=t.step_low))
    for layer, r in ratio.items():
        if r > t.update_high:
            rows.append(finding('update_ratio', 'warning', f"a step moves {layer} by {r:.3g}x its own size (median "
                                "update ratio): steps far too large for the weights; lower the learning rate",
                                layer=layer, value=r, threshold=t.update_high))
    return rows or [finding('update_ratio', 'ok', f"every weight moves, by {ratio.min():.2g} to {ratio.max():.2g} of its "
                            "size per step (median update ratio)" if len(ratio) else 'no weight with an update ratio',
                            threshold=t.step_low)]


def check_not_learning(run):
    "A loss that does not fall, with normal gradients and steps, and nothing else to account for it."
    t = run.t
    if not run.flat: return [finding('not_learning', 'ok', 'the loss falls (or is not known)', value=run.loss_end)]
    because = explanations(run)
    if because:
        return [finding('not_learning', 'ok', f"the loss does not fall ({run.loss_start:.3g} -> {run.loss_end:.3g}): see "
                        f"{', '.join(dict.fromkeys(f['check'] for f in because))}", value=run.loss_end)]
    if not run.late_norm >= t.total_norm_low: return [finding('not_learning', 'ok', 'the loss does not fall and the '
                                                               'gradients are small: see stuck', value=run.loss_end)]
    first, last = span(run.applied['step'])
    chance = (f", a uniform guess over {run.classes} classes (ln {run.classes} = {run.chance:.3g})" if run.at_chance else '')
    status = 'critical' if run.at_chance else 'warning'
    recurrent = sorted(set(run.module[run.module.isin(RECURRENT)]))
    through_time = (f"; or, in this recurrent network ({', '.join(recurrent)}), the gradient vanishes through time before "
                    "it reaches the early steps (GradStats sees each weight's gradient summed over the time steps, so it "
                    "cannot show that fall): keep the recurrent weight's norm near 1, use an LSTM/GRU, or shorten the "
                    "sequences" if recurrent else '')
    return [finding('not_learning', status, f"the loss stays at {run.loss_end:.3g} (from {run.loss_start:.3g}{chance}) "
                    f"while the gradients are normal (late total norm {run.late_norm:.3g}) and the steps are not small: "
                    "nothing is being learned; the labels may carry no signal (shuffled, or not matched to their inputs), "
                    f"or the inputs may not reach the model: check a batch (learn.dls.one_batch()){through_time}",
                    value=run.loss_end, threshold=run.chance, first_step=first, last_step=last)]


def check_stuck(run):
    "A loss that does not fall with small gradients (not converged), and nothing else to account for it."
    t = run.t
    small = run.late_norm < t.total_norm_low
    if not (np.isfinite(run.loss_start) and np.isfinite(run.loss_end)):
        return [finding('stuck', 'ok', 'the loss is not known (NaN or not recorded): stuck cannot be told apart from '
                        'converging', value=run.late_norm, threshold=t.total_norm_low)]
    if run.converged: return [finding('stuck', 'ok', 'the loss fell: not stuck', value=run.late_norm, threshold=t.total_norm_low)]
    if not (run.flat and small):
        return [finding('stuck', 'ok', 'not stuck: the loss falls or the gradients are not small', value=run.late_norm,
                        threshold=t.total_norm_low)]
    because = explanations(run)
    if because:
        return [finding('stuck', 'ok', f"small gradients and a loss that does not fall: see "
                        f"{', '.join(dict.fromkeys(f['check'] for f in because))}", value=run.late_norm, threshold=t.total_norm_low)]
    first, last = span(run.late_steps)
    return [finding('stuck', 'warning', f"small gradients (late total norm {run.late_norm:.3g}, below "
                    f"{t.total_norm_low:g}) while the loss stays high ({run.loss_start:.3g} -> {run.loss_end:.3g}): the "
                    "model is stuck; check the initialisation and the activations (saturated sigmoid or tanh?)",
                    value=run.late_norm, threshold=t.total_norm_low, first_step=first, last_step=last)]


def unsettled(run) -> list:
    """Why the late gradients rule out convergence, whatever the loss did: an explosion or NaN/Inf that reaches the last
    fifth, or a late total norm above the healthy band (NaN too). An isolated NaN or spike long before does not."""
    t = run.t
    late_start = int(run.late_steps.min()) if len(run.late_steps) else None
    why = [f"the {f['check']} check is {f['status']}" for f in run.problems(['nonfinite', 'exploding'])
           if late_start is None or f['last_step'] is None or f['last_step'] >= late_start]
    if not run.late_norm / loss_scale_of(run) <= t.total_norm_warning:
        why.append(f"the late total norm {run.late_norm:.3g} is above {t.total_norm_warning:g} (total_norm_warning)")
    return why


def check_converged(run):
    "Whether the loss fell and settled (a note, never a problem: small gradients then mean convergence)."
    t = run.t
    first, last = span(run.late_steps)
    if run.converged:
        small = (': small gradients here mean convergence, not vanishing' if run.late_norm < t.total_norm_low else '')
        return [finding('converged', 'ok', f"loss fell from {run.loss_start:.3g} to {run.loss_end:.3g} and is flat "
                        f"(late total norm {run.late_norm:.3g}){small}", value=run.loss_end,
                        threshold=t.loss_converged * run.loss_start, first_step=first, last_step=last)]
    reason = ('not converged (yet): the loss is not low and flat' if not run.loss_settled else
              f"not converged: the loss fell from {run.loss_start:.3g} to {run.loss_end:.3g} and is flat, but "
              f"{'; '.join(unsettled(run))}")
    return [finding('converged', 'ok', reason, value=run.loss_end, threshold=t.loss_converged * run.loss_start)]
