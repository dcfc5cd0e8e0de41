"Make a network's gradients visible while it trains: a fastai callback, its record, plots and diagnosis."
from importlib.metadata import PackageNotFoundError, version as _version

try: __version__ = _version('fastai_gradstats')  # settings.ini is the one source; pip wrote it into the metadata
except PackageNotFoundError: __version__ = 'unknown'

from .stats import METRICS, LayerStats, count_nonfinite
from .record import GradRecord, load
from .callback import GradStats, GradientAlert

__all__ = ['GradStats', 'GradientAlert', 'GradRecord', 'load', 'LayerStats', 'count_nonfinite', 'METRICS', '__version__']
from . import plots
from .plots import heatmap, magnitude_hist, gradient_flow, layer_curves, update_ratio, compare
from .aggregate import combine, by_module, by_param_group

__all__ += ['plots', 'heatmap', 'magnitude_hist', 'gradient_flow', 'layer_curves', 'update_ratio', 'compare',
            'combine', 'by_module', 'by_param_group']
from . import health as _health_module
from .thresholds import Thresholds
from .health import health, summary, suggest_clip

__all__ += ['Thresholds', 'health', 'summary', 'suggest_clip']
from .export import TensorBoardGradStats, WandbGradStats

__all__ += ['TensorBoardGradStats', 'WandbGradStats']
