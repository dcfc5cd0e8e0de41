"""Pictures of a record: layer x iteration heatmaps, magnitude histograms, gradient flow, curves.

Every function takes a `GradRecord` (live or loaded) or its tidy `.df` (`magnitude_hist` the record or its
`.hist`; `by_module=True` needs the record, whose layer table it reads), draws on `ax` when
given (else on a new figure), returns the Axes (or the Figure, for several panels) and never
calls `plt.show()`. Nothing here knows fastai. The same functions are methods of the record:
`record.plot_heatmap(...)` is `heatmap(record, ...)`.

One module per figure family (`heatmaps`, `histograms`, `flow`, `curves`, `comparing`) over what they share: `frames`
(what they read of a record, checked) and `axes` (axis helpers, colours, edge marks). This package re-exports their
names: `fastai_gradstats.plots.heatmap`, `.metric_table`, ... as before.
"""
from __future__ import annotations

from ..record import record_method
from .axes import MAX_LAYER_LABELS, SPECIAL_COLORS
from .frames import is_weight
from .heatmaps import heatmap, metric_table
from .histograms import hist_table, magnitude_hist
from .flow import flow_table, gradient_flow
from .curves import layer_curves, update_ratio
from .comparing import compare, compare_table, total_norm

__all__ = ['MAX_LAYER_LABELS', 'heatmap', 'magnitude_hist', 'gradient_flow', 'layer_curves', 'update_ratio', 'total_norm', 'compare',
           'metric_table', 'hist_table', 'flow_table', 'compare_table', 'is_weight', 'SPECIAL_COLORS']


# --- the same functions as methods of the record ------------------------------------------
for _func in (heatmap, magnitude_hist, gradient_flow, layer_curves, update_ratio):
    record_method(_func, f'plot_{_func.__name__}')
