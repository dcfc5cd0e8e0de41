"""The live alerts: a warning (`GradientAlert`, once per kind) when NaN/Inf gradients or an explosion first appear while
training, and with `stop_on_critical` a stop before the optimizer applies that step. An explosion is read as the
diagnosis reads one: growth within a phase of the same tensors training, not a level alone."""
from __future__ import annotations

import math
import warnings

import numpy as np
from fastai.callback.core import CancelFitException

from ..stats import METRICS
from ..thresholds import Thresholds

__all__ = ['GradientAlert']


class GradientAlert(UserWarning):
    "Warned (once per kind) when a critical gradient condition first appears while training."


PHASE_START = 3
"The first recorded total norms of a phase (the same tensors training) that the explosion alert measures growth from."


def _alert_limit(phase_start: list, t: Thresholds) -> float:
    """The total norm above which a step is an explosion the alerts warn of (see `_explodes`), given the first norms
    of its phase so far: `total_norm_critical` and `growth_factor` times the least of them, or `total_norm_critical`
    alone when the phase's first step was already over ten times it (inf: no finite norm to grow from yet)."""
    start = [n for n in phase_start if math.isfinite(n)]
    if not start: return math.inf
    if start[0] > 10 * t.total_norm_critical: return t.total_norm_critical
    return max(t.total_norm_critical, t.growth_factor * min(start))


def _explodes(total: float, phase_start: list, t: Thresholds) -> str:
    """Why a step's total norm is an explosion the alerts warn of ('' when it is not), as the diagnosis reads one: above
    `total_norm_critical` and `growth_factor` times the least of the first norms of its phase, or ten times
    `total_norm_critical` from the phase's first step (a level alone is not one: a healthy resnet18 starts above 100)."""
    if not math.isfinite(total) or total <= _alert_limit(phase_start, t): return ''
    start = min(n for n in phase_start if math.isfinite(n))
    if total > t.growth_factor * start:
        return f"{total / start:.3g}x the {start:.3g} its phase started at, above {t.total_norm_critical:g}"
    return f"huge from the phase's first step, over 10x {t.total_norm_critical:g}"


def _note_phase_start(cb, total):
    "Keep this step's total norm (`total()`) among the first `PHASE_START` of its phase, once per step."
    if len(cb._phase_start) < PHASE_START and cb._phase_noted != cb.step_count:
        cb._phase_start.append(total())
        cb._phase_noted = cb.step_count


def _alert(cb, values, counts):
    """Warn once per kind when a critical condition first appears (NaN/Inf gradients, or an explosion, see
    `_explodes`); stop before the optimizer step if asked."""
    names = cb._plan_key
    norms = values[:, METRICS.index('grad_norm')]
    total = math.sqrt(np.square(norms, dtype=np.float64).sum())  # float64: squares of large float32 norms overflow
    _note_phase_start(cb, lambda: total)
    problems = []
    if counts.any():
        bad_rows = np.flatnonzero(counts.sum(1) > 0)
        problems.append(('nonfinite', f"NaN/Inf gradients at step {cb.step_count}, nearest the output in "
                         f"{names[bad_rows[-1]]} ({int(counts[:, 0].sum())} NaN, {int(counts[:, 1].sum())} Inf)"))
    exploding = _explodes(total, cb._phase_start, cb.thresholds)
    if exploding:
        problems.append(('exploding', f"total gradient norm {total:.3g} at step {cb.step_count} ({exploding}), "
                         f"largest in {names[int(np.argmax(norms))]}"))
    if not problems: return
    for kind, message in problems:
        if cb.alerts and kind not in cb._alerted:
            cb._alerted.add(kind)
            warnings.warn(f"GradStats: {message}" + (': stopping before this step is applied' if cb.stop_on_critical else ''),
                          GradientAlert, stacklevel=2)
    if cb.stop_on_critical:
        cb.stopped_at = cb.step_count
        cb.record.stopped_steps = [*cb.record.stopped_steps, cb.step_count]  # a new list: older pickles hold a tuple
        cb._stopping = True
        raise CancelFitException()
