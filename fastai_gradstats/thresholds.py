"""`Thresholds`: the numbers the diagnosis holds the record against, in one documented place.

Defaults follow the summary table of the textbook section on gradient statistics (section 8.3,
"Gradient Statistics", `demo.SOURCES['004']`: gradient norm healthy 0.1-10, warning 10-100, critical >100 or NaN; zero ratio
<5%, 5-20%, >20%; layer spread <10x, 10-100x, >100x; gradient-to-parameter ratio around 1e-3,
>1 too large, <1e-6 too small; vanishing below 1e-7; dead neurons warning >20%, critical >50%).
The textbook says its norm bands "vary by architecture": the diagnosis never condemns a norm for its level alone
(a healthy resnet18 sits above 100), it reads growth within a phase of training, NaN/Inf and the loss; the bands
set the floors those readings need (see `fastai_gradstats.health`). The rest (spikes, trends, loss context, steps,
skipped steps, symmetric units) are this package's choices, documented per field.
Pure Python: the callback uses it for live alerts, `health` for the diagnosis.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields

__all__ = ['Thresholds']


@dataclass(frozen=True)
class Thresholds:
    "Thresholds of the gradient health checks (see the module docstring for their sources)."
    total_norm_low: float = 0.1          # textbook: total gradient norm healthy from 0.1 ...
    total_norm_warning: float = 10.0     # ... to 10; warning from 10 ...
    total_norm_critical: float = 100.0   # ... critical above 100 (likely to explode)
    vanishing_norm: float = 1e-7         # textbook: a norm below 1e-7 is vanishing, no learning
    zero_frac_warning: float = 0.05      # textbook: zero ratio healthy < 5% ...
    zero_frac_critical: float = 0.20     # ... critical > 20%
    layer_spread_warning: float = 10.0   # textbook: max/min layer norm healthy < 10x ...
    layer_spread_critical: float = 100.0 # ... critical > 100x
    ratio_high: float = 1.0              # textbook: grad/param ratio > 1: gradients too large (reduce LR)
    ratio_low: float = 1e-6              # textbook: grad/param ratio < 1e-6: too small (raise LR or fix the architecture)
    dead_warning: float = 0.20           # textbook: dead neurons warning > 20% ...
    dead_critical: float = 0.50          # ... critical > 50% (model not learning)
    depth_ratio_warning: float = 10.0    # vanishing with depth: output-most / input-most weight rms gradient ...
    depth_ratio_critical: float = 100.0  # ... with norms falling steadily towards the input
    growth_factor: float = 10.0          # exploding: late median total norm / early median total norm
    spike_factor: float = 10.0           # spike: a step's total norm over this many times the rolling median
    spike_window: int = 20               # steps in the rolling median of the spike check
    loss_fall: float = 0.1               # the loss "is falling" when the late loss is this fraction below the early one
    loss_converged: float = 0.5          # "converged": the late loss is at most this fraction of the early loss ...
    loss_flat: float = 0.05              # ... and moves across the late window by at most this fraction of the first loss
    clip_percentile: float = 95.0        # clipping advice: this percentile of the total norm over healthy steps
    chance_margin: float = 0.25          # a first loss within this fraction of ln(classes) is a uniform guess (chance)
    step_low: float = 1e-5               # a step that moves the weights by less than this fraction of their size is too small
    update_high: float = 1.0             # update_ratio above this: a step larger than the weights themselves
    skipped_warning: float = 0.1         # steps skipped by the grad scaler (after its first calibration) ...
    skipped_critical: float = 0.5        # ... most of them: the updates are thrown away
    symmetric_spread: float = 1e-3       # units whose gradients differ by less than this (unit_spread) are copies of one another

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            # any real number (Python or numpy: numpy registers its floating and integer types as numbers.Real), not a bool
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"Thresholds.{f.name} must be a real number, got {type(value).__name__} {value!r}")
            if math.isnan(value): raise ValueError(f"Thresholds.{f.name} must not be NaN")
            if value <= 0: raise ValueError(f"Thresholds.{f.name} must be > 0, got {value!r}")
            if f.type == 'int' and not (math.isfinite(value) and value == int(value)):
                raise TypeError(f"Thresholds.{f.name} must be a whole number, got {value!r}")
            object.__setattr__(self, f.name, int(value) if f.type == 'int' else float(value))  # plain Python numbers
        pairs = [('total_norm_low', 'total_norm_warning'), ('total_norm_warning', 'total_norm_critical'),
                 ('zero_frac_warning', 'zero_frac_critical'), ('layer_spread_warning', 'layer_spread_critical'),
                 ('ratio_low', 'ratio_high'), ('dead_warning', 'dead_critical'),
                 ('depth_ratio_warning', 'depth_ratio_critical'), ('skipped_warning', 'skipped_critical')]
        for low, high in pairs:
            if getattr(self, low) > getattr(self, high):
                raise ValueError(f"Thresholds.{low} ({getattr(self, low)}) must not exceed Thresholds.{high} ({getattr(self, high)})")
        for name in ('zero_frac_warning', 'zero_frac_critical', 'dead_warning', 'dead_critical', 'loss_fall',
                     'loss_converged', 'loss_flat', 'chance_margin', 'skipped_warning', 'skipped_critical'):
            if getattr(self, name) > 1: raise ValueError(f"Thresholds.{name} is a fraction and must be <= 1, got {getattr(self, name)}")
        if self.clip_percentile > 100: raise ValueError(f"Thresholds.clip_percentile must be <= 100, got {self.clip_percentile}")
        if self.spike_window < 3 or self.spike_window != int(self.spike_window):
            raise ValueError(f"Thresholds.spike_window must be a whole number >= 3, got {self.spike_window}")
        if self.growth_factor <= 1 or self.spike_factor <= 1:
            raise ValueError("Thresholds.growth_factor and Thresholds.spike_factor must be > 1")
