"""What `GradStats` reads of the Learner: the model's parameters under the names the user's model gives them (through
DDP's, DataParallel's and `torch.compile`'s wrappers), each one's module, its depth from the input (read from the
autograd graph behind the loss: `input_to_output`), the gradients of a step, the process's rank and how the fit trains
(batch size, gradient clipping)."""
from __future__ import annotations

import math

import torch
from torch import nn
from fastai.callback.training import GradientClip

__all__ = ['input_to_output']


def input_to_output(loss: torch.Tensor, params) -> list:
    """Ids of the `params` that `loss` depends on, ordered from the input to the output of the network.

    Reads the autograd graph behind `loss` (it outlives backward): a parameter's depth is its longest
    distance from the loss, the farthest being the input side. Needs no hook on the model."""
    if not isinstance(loss, torch.Tensor): raise TypeError(f"`loss` must be a tensor, got {type(loss).__name__}")
    if loss.grad_fn is None:
        raise ValueError("`loss` has no autograd graph (its grad_fn is None): pass a loss computed from the parameters "
                         "with gradients enabled")
    root = loss.grad_fn
    post_order, seen, stack = [], {root}, [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded: post_order.append(node); continue
        stack.append((node, True))
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                seen.add(child); stack.append((child, False))
    distance = {root: 0}
    for node in reversed(post_order):  # a topological order: every node before the nodes it feeds
        d = distance.get(node, 0)
        for child, _ in node.next_functions:
            if child is not None and distance.get(child, -1) < d + 1: distance[child] = d + 1
    wanted = {id(p) for p in params}
    found = {id(n.variable): d for n, d in distance.items() if hasattr(n, 'variable') and id(n.variable) in wanted}
    return sorted(found, key=lambda pid: -found[pid])


_WRAPPER_ATTRIBUTE = '_orig_mod'  # where `torch.compile`'s OptimizedModule keeps the module it compiled


def _unwrapped(model: nn.Module) -> nn.Module:
    "The user's model inside the wrappers that rename its parameters: DDP's and DataParallel's `module`, `torch.compile`'s."
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)): model = model.module
        elif isinstance(getattr(model, _WRAPPER_ATTRIBUTE, None), nn.Module): model = getattr(model, _WRAPPER_ATTRIBUTE)
        else: return model


def _user_name(name: str) -> str:
    "A parameter's name as the user's model spells it: without the `_orig_mod.` of a submodule `torch.compile`d in place."
    return '.'.join(part for part in name.split('.') if part != _WRAPPER_ATTRIBUTE)


def _rank():
    "This process's rank under torch.distributed, or None outside it."
    if torch.distributed.is_available() and torch.distributed.is_initialized(): return torch.distributed.get_rank()
    return None


def _training_setup(learn) -> dict:
    """What the diagnosis reads of how a fit trains, beside the gradients: the training batch size (a loss summed over
    the batch is that many times a mean's) and the `max_norm` of a `GradientClip` among its callbacks (None: none)."""
    clip = [cb.max_norm for cb in learn.cbs if isinstance(cb, GradientClip)]
    dl = getattr(getattr(learn, 'dls', None), 'train', None)
    return {'batch_size': getattr(dl, 'bs', None), 'gradient_clip': float(clip[0]) if clip else None}


_STRIDED = torch.strided


def _read_model(cb):
    "The model's parameters by name, each one's module, and the layer table in the record."
    model = _unwrapped(cb.learn.model)
    cb._params = [(_user_name(n), p) for n, p in model.named_parameters()]
    cb._module_of = {}
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            cb._module_of[_user_name(f'{mod_name}.{p_name}' if mod_name else p_name)] = module
    _describe_layers(cb, order=None)


def _describe_layers(cb, order):
    """Describe every parameter; `depth` runs from input to output: from `order` (parameter ids, input first)
    where known; without an `order`, the depth the record already knows (from an earlier fit); else the
    registration order of `model.named_parameters()`."""
    named_order = {n: i for i, (n, _) in enumerate(cb._params)}
    if order is not None:
        rank = {pid: i for i, pid in enumerate(order)}
        by_depth = sorted(cb._params, key=lambda item: (rank.get(id(item[1]), len(rank)), named_order[item[0]]))
    else:
        known = cb.record.depth_of()
        by_depth = sorted(cb._params, key=lambda item: (known.get(item[0], math.inf), named_order[item[0]]))
    cb._params = by_depth
    opt = getattr(cb.learn, 'opt', None)
    groups = getattr(opt, 'param_lists', None) or [g['params'] for g in getattr(opt, 'param_groups', [])]
    group_of = {id(p): i for i, group in enumerate(groups) for p in group}
    cb.record.set_layers([{'name': n, 'module': type(cb._module_of[n]).__name__, 'shape': tuple(p.shape),
                           'numel': p.numel(), 'depth': d, 'group': group_of.get(id(p), -1),
                           'requires_grad': p.requires_grad} for d, (n, p) in enumerate(by_depth)])
    cb._plan_key, cb._plan_params = None, None


def _with_grads(params) -> list:
    """(name, parameter, gradient) of the parameters with a gradient this step (frozen ones may keep a stale one),
    in depth order; each `.grad` read once. A sparse gradient (`nn.Embedding(sparse=True)`) is measured dense."""
    return [(n, p, g if g.layout is _STRIDED else g.to_dense())
            for n, p in params if (g := p.grad) is not None and p.requires_grad]


def _place_by_depth(cb, key):
    """Read the depth of every parameter from this step's autograd graph (the loss outlives backward): at the first
    recorded step of a fit, and again when parameters first get a gradient later in it (gradual unfreezing, a
    branch used late), since frozen parameters are not in the graph."""
    loss = getattr(cb.learn, 'loss_grad', None)
    if isinstance(loss, torch.Tensor) and loss.grad_fn is not None:
        _describe_layers(cb, input_to_output(loss, [p for _, p in cb._params]))
    cb._placed = cb._placed | set(key)  # also when there is no graph to read: try once per parameter
