"""`GradStats`, the fastai callback: the only room that knows fastai's training loop (with the companion callbacks of
`export` and `live`, which read its record).

At `before_step` it hands the final gradients of one optimizer step to `fastai_gradstats.stats.LayerStats`, copies the
one result tensor to the host and appends it to a `GradRecord`, which stays at `learn.grad_stats` after the callback is
removed. The rooms: `gradstats` (`GradStats`: the events and their order), `learner` (the model as it reads it),
`steps` (a recorded step, the steps waiting, the update norms), `alerts` (the live warnings and `stop_on_critical`)
and `fit_scope` (when a fit starts and ends). This package re-exports their names: `fastai_gradstats.callback.GradStats`,
`.GradientAlert`, `.input_to_output`, ... as before.
"""
from __future__ import annotations

from .fit_scope import _FitScope
from .learner import input_to_output
from .alerts import PHASE_START, GradientAlert
from .steps import WAITING_BYTES, _Waiting   # _Waiting: the class pickles made before the split name here
from .gradstats import GradStats

__all__ = ['GradStats', 'GradientAlert', 'input_to_output']

MAX_WAITING = 16
"""Most recorded steps that wait to be assembled together; read when `GradStats` makes room for them (set it here
before a fit: `fastai_gradstats.callback.MAX_WAITING = 1` assembles every step as it comes)."""
