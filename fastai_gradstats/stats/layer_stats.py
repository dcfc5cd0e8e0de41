"""`LayerStats`: batched statistics of a fixed list of gradient tensors and their parameters, the face of this room.

It holds what is fixed for its shapes (their units, the plan's settings) and the layouts planned so far; the work is
in the functions of the other modules: `layout` plans, `reductions` reduces on the device (`graphs` replays that as
one CUDA graph), `assembly` turns the one host copy into rows, `exact` redoes in float64 what float32 cannot give,
`updates` measures how far the optimizer moved the parameters. Methods that are a room's function whole are that
function itself (`_reduce`, `_assemble_steps`, `_routine`, `_update_norms`, `refine`): no extra call on the hot path.
"""
from __future__ import annotations

import math
import operator
from typing import Sequence

import numpy as np
import torch

from ..checks import _check_shapes, _check_step, _check_tensors, _positive_int, check_zero_tol
from .assembly import _assemble_steps, _routine
from .exact import _refine
from .histogram import HIST_BINS, MagnitudeHistogram
from .layout import CHUNK_ELEMENTS, _plan_layout
from .metrics import METRICS, _rows
from .reductions import _reduce_step, _write_extra
from .updates import _keep_params, _nonempty, _update_norms

__all__ = ['LayerStats']

_SHAPE, _DTYPE = operator.attrgetter('shape'), operator.attrgetter('dtype')


class LayerStats:
    """Batched statistics of a fixed list of gradient tensors and their parameters.

    Build it once for a list of shapes, then call it every step with the current gradients and
    parameters. Statistics per tensor: the columns of `METRICS`, each defined in `fastai_gradstats.stats.metrics`.
    With `hist=True` it also counts each gradient's log10 |g| histogram, as `MagnitudeHistogram` does, on at most
    `hist_sample` fixed, evenly spread elements of each tensor (None: all of them).

    How it is fast, and which room of `fastai_gradstats.stats` does what: the package's docstring. The gradients must
    lie on one device (`ValueError` otherwise): make one per device.
    """
    _extra_room = None  # values of `extra` a layout's result keeps room for (None: 1 + len(shapes)); set before the first collect

    def __init__(self, shapes: Sequence[torch.Size], zero_tol: float = 0.0, hist: bool = False,
                 hist_sample: int | None = 2048, chunk_elements: int = CHUNK_ELEMENTS):
        self.zero_tol = check_zero_tol(zero_tol)
        if not isinstance(hist, bool): raise TypeError(f"`hist` must be True or False, got {hist!r}")
        chunk_elements = _positive_int(chunk_elements, 'chunk_elements')
        hist_sample = _positive_int(hist_sample, 'hist_sample', allow_none=True)
        self.shapes = _check_shapes(shapes)
        self.hist, self.chunk_elements = hist, chunk_elements
        self.histogram = MagnitudeHistogram(self.shapes, self.zero_tol, hist_sample) if hist else None
        self.numel = np.array([s.numel() for s in self.shapes], np.float64)
        self.rows = [_rows(s) for s in self.shapes]
        self.row_length = [s.numel() // r for s, r in zip(self.shapes, self.rows)]
        self.n_units = np.array([s[0] if len(s) >= 2 else math.nan for s in self.shapes], np.float64)
        # `refine`'s cancellation test as std < grad_norm * this (0: never for one element, whose std is NaN)
        self._cancel_scale = np.sqrt(1e-3 / np.maximum(self.numel - 1, 1)) * (self.numel > 1)
        self._nonempty = _nonempty(self.numel)
        self._layouts, self._last, self._work_bytes = {}, None, {}

    def __len__(self): return len(self.shapes)

    def __getstate__(self):
        """Pickled without its layouts (a GradStats saved by `learn.export` after an interrupted fit holds its plan): their
        buffers are scratch space, a CUDA graph cannot be pickled, plain `pickle` would copy each view of a buffer apart
        from it, and a kept copy of the parameters is as large as they are. The next `collect` plans again."""
        return {**self.__dict__, '_layouts': {}, '_last': None, '_work_bytes': {}}

    def __setstate__(self, state):
        "As `__getstate__`; an object pickled by an older version may hold layouts, which read their result differently: dropped."
        self.__dict__.update(state)
        self._layouts, self._last, self._work_bytes = {}, None, {}
        if '_nonempty' not in state:  # pickled before it existed
            self._nonempty = _nonempty(self.numel)

    @property
    def work_bytes(self) -> int:
        """Bytes of work buffer this object holds (at most `chunk_elements` elements per gradient dtype seen; besides it,
        a result of a few values per row and the zeros that pad narrow rows, at most `PAD_ELEMENTS` per block)."""
        return sum(self._work_bytes.values())

    # --- the plan ---------------------------------------------------------------------------------
    def _layout(self, grads):
        "The chunks for these gradients' dtypes and device, built once and kept (with the work buffers)."
        key = (grads[0].device, tuple(map(_DTYPE, grads)))
        if key not in self._layouts: self._layouts[key] = _plan_layout(self, grads[0].device, key[1], grads)
        self._last = self._layouts[key]
        return self._last

    # --- every step --------------------------------------------------------------------------------
    def collect(self, grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor], extra=None,
                keep_params: bool = False) -> torch.Tensor:
        """The raw reductions of one step as one flat tensor on the gradients' device, followed by the values of
        `extra` (a tensor, or a list of tensors, flattened): copy it to the host once and pass it to `assemble`.
        The tensor is float32 (float64 when a gradient is, or when there are no gradients), so `extra` values
        are rounded to that precision, and it is reused: the next `collect` overwrites it, so copy it (`.cpu()`
        from a GPU, `.clone()` on the CPU) to keep it, and do not pass a view of it as `extra`. Reads `grads`
        and `params` without changing them. With `keep_params=True` it also keeps a copy of `params` (as large as
        theirs, in float32 for half precision; reused from step to step) for `update_norms` to measure how far they move next."""
        _check_step(self.shapes, grads, params)
        if not isinstance(keep_params, bool): raise TypeError(f"`keep_params` must be True or False, got {keep_params!r}")
        extra = [] if extra is None else [extra] if isinstance(extra, torch.Tensor) else list(extra)
        _check_tensors(extra, 'extra')
        return self._collect(grads, params, extra, keep_params)

    def update_norms(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """How far each parameter moved since the last `collect(..., keep_params=True)`: the L2 norm of its value then
        minus its value now, one per tensor, as a float tensor of shape `(len(params),)` on their device (no host copy;
        pass it to the next `collect` as `extra` to bring it along). Uses up the kept copy: a second call without a
        `collect` that keeps one in between is a ValueError. On the CPU it reuses the copy `collect` makes of the
        parameters for their norms, laid out in rows: one subtraction per chunk and one norm along its rows. On the CPU the
        result is float64, and norms of float32 (or half-precision) parameters below `TINY_NORM` or above `HUGE_NORM`
        are taken again in float64, as `refine` takes the gradients': an update whose elements are below about 1e-22
        would lose its squares to float32 underflow, one above about 1e19 would overflow. On CUDA they stay float32
        (a look at them would make the host wait)."""
        _check_tensors(params, 'params')
        if len(params) != len(self.shapes) or list(map(_SHAPE, params)) != self.shapes:
            raise ValueError(f"`params` must be the {len(self.shapes)} tensors of the planned shapes, as given to `collect`")
        if not self.shapes: return torch.zeros(0)  # nothing to move
        if self._last is None or not self._last.kept:
            raise ValueError("`update_norms` needs a `collect(..., keep_params=True)` of these parameters' dtypes first, "
                             "and none since the last `update_norms`")
        return self._update_norms(params)

    _update_norms = _update_norms  # `update_norms` for a caller that passes the list it gave to `_collect(keep=True)` (updates.py)

    def _collect(self, grads, params, extra, keep=False):
        """`collect` for a caller that passes lists of tensors, `params` as many as `grads`, and `extra` a list:
        only the gradients' shapes are checked (the full check runs when they differ from the plan's, to say how).
        The layout is looked up by the gradients' dtypes and device on every call: the same tensor objects can
        change both (`Module.double()`, `.to(device)` swap their `.data`)."""
        if not grads:
            flat = [e.detach().reshape(-1).to(torch.float64) for e in extra]
            return torch.cat(flat) if flat else torch.zeros(0, dtype=torch.float64)
        if list(map(_SHAPE, grads)) != self.shapes: _check_step(self.shapes, grads, params)
        layout = self._layout(grads)
        if keep: _keep_params(self, layout, params)
        grad_mode = torch.is_grad_enabled()
        torch.set_grad_enabled(False)  # the parameters require grad: read them without recording (cheaper than `with no_grad`)
        try:
            if keep and layout.keeps_rows: self._reduce(layout, grads, params, keep=True)
            elif layout.graph is None or not layout.graph.run(self, layout, grads, params): self._reduce(layout, grads, params)
            if keep and not layout.keeps_rows: torch._foreach_copy_(layout.kept_tensors, params)
            if keep: layout.kept = True  # a collect that does not keep leaves the copy where it is
            return _write_extra(layout, extra)
        finally:
            torch.set_grad_enabled(grad_mode)

    _reduce = _reduce_step  # every reduction of one step, launched one by one: what a CUDA graph replays (reductions.py)

    def assemble(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Turn a host copy of `collect`'s result into `(values, hist)`: `values` float32 of shape
        `(len(self), len(METRICS))`, `hist` int64 of shape `(len(self), len(HIST_BINS))` (None without `hist`).
        Values of `extra` after them are ignored. Reads the layout of the last `collect`."""
        n = len(self.shapes)
        if not n: return np.zeros((0, len(METRICS)), np.float32), (np.zeros((0, len(HIST_BINS)), np.int64) if self.hist else None)
        if self._last is None: raise ValueError("`assemble` needs a `collect` of this object first")
        layout = self._last
        raw = np.asarray(raw)
        if raw.dtype != layout.host_dtype:
            raise TypeError(f"`raw` must be the {layout.host_dtype} array `collect` returned, got {raw.dtype}")
        if raw.ndim != 1 or len(raw) < layout.extra_at:
            raise ValueError(f"`raw` must be 1-D with at least {layout.extra_at} values, as `collect` returns, got shape {raw.shape}")
        values, hist = self._assemble_steps(raw[None], layout)
        return values[0], None if hist is None else hist[0]

    _assemble_steps = _assemble_steps  # `assemble` for several steps at once, unchecked (assembly.py)
    _routine = _routine                # whether a step's host copy needs nothing of `refine` (assembly.py)

    def _measure(self, grads, params, extra, to_host, keep=False):
        """One step of a caller that builds its own lists (as `_collect`): the reductions, their one host copy
        through `to_host`, and `assemble`. Returns `(values, hist, the host values of extra)`."""
        host = to_host(self._collect(grads, params, extra, keep))
        values, hist = self.assemble(host)
        return values, hist, host[len(host) - sum(e.numel() for e in extra):]

    def __call__(self, grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> torch.Tensor:
        "Statistics of `grads` and `params` as a float32 CPU tensor of shape `(len(grads), len(METRICS))` (one host copy)."
        raw = self.collect(grads, params)
        return torch.from_numpy(self.assemble(raw.cpu().numpy())[0])

    refine = _refine  # the float64 fallback for the rows float32 sums cannot give (exact.py)
