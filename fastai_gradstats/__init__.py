"Make a network's gradients visible while it trains: a fastai callback, its record, plots and diagnosis."
from importlib.metadata import PackageNotFoundError, version as _version


def _checkout_version() -> str:
    "The version in the settings.ini beside this package, for a checkout imported without installing it; else 'unknown'."
    from configparser import ConfigParser
    from pathlib import Path
    config = ConfigParser(delimiters=['='])
    config.read(Path(__file__).resolve().parent.parent/'settings.ini', encoding='utf-8')
    defaults = config['DEFAULT']
    return defaults.get('version', 'unknown') if defaults.get('lib_name') == 'fastai_gradstats' else 'unknown'


try: __version__ = _version('fastai_gradstats')  # settings.ini is the one source; pip wrote it into the metadata
except PackageNotFoundError: __version__ = _checkout_version()

from .stats import METRICS, HIST_BINS, HIST_DECADES, LayerStats, MagnitudeHistogram, count_nonfinite, check_zero_tol
from .record import GradRecord, load, merge, record_method, LAYER_COLUMNS, STEP_COLUMNS, COUNT_COLUMNS, EXTRA_COLUMNS
from .thresholds import Thresholds
from .callback import GradStats, GradientAlert, input_to_output
from .aggregate import combine, by_module, by_param_group, module_of
from . import plots
from .plots import (heatmap, magnitude_hist, gradient_flow, layer_curves, update_ratio, compare, metric_table, hist_table,
                    flow_table, compare_table, is_weight, SPECIAL_COLORS, MAX_LAYER_LABELS, total_norm)
from .health import summary, suggest_clip, verdict, HEALTH_COLUMNS, CHECKS, STATUSES
from . import health  # the module (fastai_gradstats.health.Thresholds); its function is `record.health()`
from .report import write_report, run_figures, overview, Comparison
from .export import TensorBoardGradStats, WandbGradStats, step_scalars, log10_histogram, SCALARS, STEP_SCALAR_COLUMNS
from .live import ShowGradStats, live_figure
from .live_picture import live_png
from .view import SAMPLE_STEPS, record_text, record_html

__all__ = ['__version__',
           # record while training
           'GradStats', 'GradientAlert', 'GradRecord', 'load', 'merge', 'Thresholds',
           'LAYER_COLUMNS', 'STEP_COLUMNS', 'COUNT_COLUMNS', 'EXTRA_COLUMNS',
           # compute
           'METRICS', 'HIST_BINS', 'HIST_DECADES', 'LayerStats', 'MagnitudeHistogram', 'count_nonfinite', 'check_zero_tol',
           'input_to_output',
           'record_method', 'combine', 'by_module', 'by_param_group', 'module_of',
           # draw and diagnose
           'plots', 'heatmap', 'magnitude_hist', 'gradient_flow', 'layer_curves', 'update_ratio', 'total_norm', 'compare', 'metric_table',
           'hist_table', 'flow_table', 'compare_table', 'is_weight', 'SPECIAL_COLORS', 'MAX_LAYER_LABELS', 'health', 'summary',
           'suggest_clip',
           'verdict', 'HEALTH_COLUMNS', 'CHECKS', 'STATUSES', 'SAMPLE_STEPS', 'record_text', 'record_html',
           # report and export
           'write_report', 'run_figures', 'overview', 'Comparison', 'TensorBoardGradStats', 'WandbGradStats', 'step_scalars', 'log10_histogram',
           'SCALARS', 'STEP_SCALAR_COLUMNS',
           # watch while training
           'ShowGradStats', 'live_figure', 'live_png']
