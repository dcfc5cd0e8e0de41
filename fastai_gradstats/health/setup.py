"""The checks of how training is set up, read from the layer table: parameters that require a gradient and never get
one, and tensors that get gradients no optimizer parameter group uses."""
from __future__ import annotations

from .run import finding

__all__ = ['check_no_gradient', 'check_not_in_optimizer']


def check_no_gradient(run):
    "Parameters that required a gradient in the last fit and got none at any recorded step."
    layers = run.layers
    known = layers['requires_grad'].notna()
    wanted = layers[known & (layers['requires_grad'] == True)]  # noqa: E712  (None is unknown, not False)
    missing = [n for n in wanted['name'] if n not in set(run.order)]
    if not known.any():
        return [finding('no_gradient', 'ok', "which parameters require a gradient is not known (a run saved before it was "
                        "recorded)")]
    if not missing:
        return [finding('no_gradient', 'ok', 'every parameter that requires a gradient got one')]
    steps = len(run.record.steps)
    return [finding('no_gradient', 'warning', f"{name} requires a gradient but got none at any of the {steps} recorded "
                    "steps: it is not used in forward (a layer built but never called?), so the optimizer carries it for "
                    "nothing; use it, remove it, or freeze it (requires_grad_(False))", layer=name, value=0)
            for name in sorted(missing, key=lambda n: run.depth[n])]


def check_not_in_optimizer(run):
    "Tensors that get gradients but belong to no optimizer parameter group: they never train."
    if not (run.group >= 0).any():
        return [finding('not_in_optimizer', 'ok', "the optimizer's parameter groups are not known")]
    outside = [n for n in run.order if run.group[n] < 0]
    if not outside:
        return [finding('not_in_optimizer', 'ok', "every tensor with a gradient is in one of the optimizer's parameter groups")]
    return [finding('not_in_optimizer', 'critical', f"{name} gets gradients but no optimizer parameter group holds it: it "
                    "never trains, and its gradient is never zeroed (it adds up step after step); a module added after the "
                    "Learner made its optimizer, or a splitter that leaves it out: fix the splitter or call "
                    "learn.create_opt()", layer=name, value=-1)
            for name in outside]
