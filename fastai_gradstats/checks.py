"""Argument checks that every room may import: each returns the value as the package uses it, or raises a TypeError
or ValueError whose message names the argument and the bad value (as Lightning's `grad_norm` does).

Nothing here knows the rest of the package; it sits below `stats` and everything above it."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

__all__ = ['check_zero_tol']


def check_zero_tol(zero_tol) -> float:
    "`zero_tol` as a float, or a TypeError (not a number) / ValueError (negative, NaN, Inf) naming it."
    if isinstance(zero_tol, bool) or not isinstance(zero_tol, (int, float, np.floating, np.integer)):
        raise TypeError(f"`zero_tol` must be a number, got {type(zero_tol).__name__}")
    if not math.isfinite(zero_tol) or zero_tol < 0:
        raise ValueError(f"`zero_tol` must be a finite number >= 0, got {zero_tol!r}")
    return float(zero_tol)


def _is_int(value) -> bool:
    "Whether `value` is an integer, Python or numpy, and not a bool."
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _positive_int(value, name: str, allow_none: bool = False) -> int | None:
    """`value` as an int when it is a positive integer (Python or numpy; not a bool), or None when `allow_none`;
    else a TypeError (not an integer) or ValueError (below 1) naming the argument `name`."""
    if value is None and allow_none: return None
    if not _is_int(value):
        kind = 'a positive int or None' if allow_none else 'a positive int'
        raise TypeError(f"`{name}` must be {kind}, got {type(value).__name__} {value!r}")
    if value < 1: raise ValueError(f"`{name}` must be >= 1, got {value!r}")
    if value > _INT64_MAX: raise ValueError(f"`{name}` must be at most 2**63 - 1 (it is stored as an int64), got {value!r}")
    return int(value)


_INT64_MAX = 2 ** 63 - 1


def _check_shapes(shapes) -> list:
    "`shapes` (a list or tuple of tensor shapes, each a sequence of ints >= 0) as a list of `torch.Size`."
    if isinstance(shapes, (torch.Tensor, str)) or not isinstance(shapes, Sequence):
        raise TypeError(f"`shapes` must be a list or tuple of tensor shapes, got {type(shapes).__name__}")
    out = []
    for s in shapes:
        if isinstance(s, (torch.Tensor, str)) or not isinstance(s, Sequence) or \
                not all(map(_is_int, s)):
            raise TypeError(f"`shapes` must hold shapes (sequences of ints, as `tensor.shape`), got {s!r}")
        if any(d < 0 for d in s): raise ValueError(f"`shapes` must hold sizes >= 0, got {tuple(s)!r}")
        out.append(torch.Size(int(d) for d in s))
    return out


def _check_tensors(tensors, argname):
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
        raise TypeError(f"`{argname}` must be a list or tuple of tensors, got {type(tensors).__name__}")
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"`{argname}` must hold tensors only, got {type(t).__name__}")


def _check_step(shapes, grads, params):
    "`grads` and `params` of one step: lists of tensors, as many as the planned `shapes` (torch.Size), each of its shape."
    _check_tensors(grads, 'grads'); _check_tensors(params, 'params')
    if len(grads) != len(shapes) or len(params) != len(shapes):
        raise ValueError(f"`grads` and `params` must hold {len(shapes)} tensors each (the planned shapes), "
                         f"got {len(grads)} and {len(params)}")
    for i, (g, p, s) in enumerate(zip(grads, params, shapes)):
        if g.shape != s: raise ValueError(f"`grads[{i}]` has shape {tuple(g.shape)} where {tuple(s)} was planned")
        if p.shape != s: raise ValueError(f"`params` must have their gradients' shapes: got {tuple(p.shape)} for {tuple(s)}")
