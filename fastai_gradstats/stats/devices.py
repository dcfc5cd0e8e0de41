"""Parameters on several devices (a model split between GPUs, or between the CPU and a GPU): one `LayerStats` per
device, each reducing its own gradients with one host copy per step (`_PerDevice`)."""
from __future__ import annotations

import numpy as np
import torch

from .histogram import HIST_BINS
from .layer_stats import LayerStats
from .metrics import METRICS

__all__ = []


class _PerDevice:
    """`LayerStats`' per-step work for parameters on several devices (a model split between GPUs, or between the
    CPU and a GPU): one `LayerStats` per device, so each device reduces its own gradients and makes one host copy
    per step. `devices[i]` is the device of the i-th gradient; rows come back in the order of the gradients."""
    def __init__(self, devices, shapes, zero_tol, hist, hist_sample):
        by_device = {}
        for i, device in enumerate(devices): by_device.setdefault(device, []).append(i)
        self.groups = [(np.array(index), LayerStats([shapes[i] for i in index], zero_tol, hist, hist_sample))
                       for index in by_device.values()]
        self.groups[0][1]._extra_room = 1 + len(shapes)  # the first device's copy carries `extra` for every tensor
        self.n, self.hist, self._order = len(shapes), hist, None

    def gather(self, values):
        """`values` (one 0-d tensor per gradient, each on its gradient's device) as one tensor on the first device, in
        their order: stacked per device and moved once per other device (not once per value)."""
        device = values[self.groups[0][0][0]].device
        parts = torch.cat([torch.stack([values[i] for i in index]).to(device) for index, _ in self.groups])
        if self._order is None or self._order.device != device:
            self._order = torch.from_numpy(np.argsort(np.concatenate([index for index, _ in self.groups]))).to(device)
        return parts[self._order]

    def __len__(self): return self.n

    def _measure(self, grads, params, extra, to_host, keep=False):
        "As `LayerStats._measure`; `extra` travels with the first device's copy."
        values = np.empty((self.n, len(METRICS)), np.float32)
        hist = np.empty((self.n, len(HIST_BINS)), np.int64) if self.hist else None
        for k, (index, stats) in enumerate(self.groups):
            part, part_hist, part_extra = stats._measure([grads[i] for i in index], [params[i] for i in index],
                                                         extra if k == 0 else [], to_host, keep)
            values[index] = part
            if hist is not None: hist[index] = part_hist
            if k == 0: host_extra = part_extra
        return values, hist, host_extra

    def _update_norms(self, params):
        "As `LayerStats.update_norms`, each device's by its own `LayerStats`, gathered on the first device."
        moved = [None] * self.n
        for index, stats in self.groups:
            for i, norm in zip(index, stats._update_norms([params[i] for i in index]).unbind()): moved[i] = norm
        return self.gather(moved)

    def refine(self, values, grads, params):
        "As `LayerStats.refine`, each device's rows by its own `LayerStats`."
        values, counts = np.array(values, np.float32).reshape(self.n, len(METRICS)), np.zeros((self.n, 2), np.int64)
        for index, stats in self.groups:
            values[index], counts[index] = stats.refine(values[index], [grads[i] for i in index], [params[i] for i in index])
        return values, counts
