"""The saved-run format: a directory of parquet files and a small JSON file, no pickle, so a run from someone else is
safe to open and other tools read it. `save` writes it; `fastai_gradstats.record.loading.load` reads it back."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from ..stats import METRICS
from .columns import DERIVED_COLUMNS

__all__ = []


FORMAT_VERSION = 1


_FILES = {'meta': 'meta.json', 'steps': 'steps.parquet', 'stats': 'stats.parquet'}


_HIST_FILE = 'hist.parquet'  # present when the run kept magnitude histograms, rows aligned with stats.parquet


_LRS_FILE = 'lrs.parquet'    # the parameter groups' learning rates (`lrs`), when any step has them


class _Saving:
    "`GradRecord.save`."

    def save(self, path) -> Path:
        """Write the record to the directory `path` (created if needed) and return it.

        The directory holds `stats.parquet` (the `df` less the columns `load` derives again: `grad_param_ratio`,
        `grad_rms`, `update_ratio`), `steps.parquet` (the `steps` less its total `grad_norm`), `hist.parquet` (the
        histogram counts, when the record keeps them), `lrs.parquet` (each parameter group's learning rate) and
        `meta.json` (format and package version, `args`, the thresholds, the layer table). `args` holds what the
        callback recorded with (`every`, `zero_tol`, `hist`, `hist_sample`, `update_ratio`, `keep_last`), what the
        last fit trained with (`batch_size`, `gradient_clip`: a GradientClip's max_norm or None) and whatever was added
        to it. `load` reads it back with the same `keep_last` and `every`."""
        if not isinstance(path, (str, Path)): raise TypeError(f"`path` must be a str or Path, got {type(path).__name__}")
        path = Path(path)
        if path.exists() and not path.is_dir(): raise ValueError(f"`path` {str(path)!r} exists and is not a directory")
        path.mkdir(parents=True, exist_ok=True)
        from .. import __version__
        meta = {'format': 'fastai_gradstats.record', 'format_version': FORMAT_VERSION, 'version': __version__,
                'args': self.args, 'extra_columns': self.value_columns[len(METRICS):], 'rank': self.rank,
                'multi_rank': self.multi_rank, 'stopped_steps': list(self.stopped_steps),
                'thresholds': None if self.thresholds is None else dataclasses.asdict(self.thresholds),
                'hist_dtype': None if self._hist is None else self._hist.data.dtype.name,
                'layers': [dict(l, shape=list(l['shape'])) for l in self._layers]}
        (path/_FILES['meta']).write_text(json.dumps(meta, indent=1, default=_json_default))
        df = self.df.copy()
        df['layer'] = df['layer'].astype(str)
        df.drop(columns=[c for c in (*DERIVED_COLUMNS, 'update_ratio') if c in df]).to_parquet(path/_FILES['stats'], index=False)
        self.steps.drop(columns=['grad_norm']).to_parquet(path/_FILES['steps'], index=False)
        if self._hist is not None:  # with its step and layer, which `load` checks against stats.parquet's rows
            hist = self.hist.drop(columns=['numel'])
            hist['layer'] = hist['layer'].astype(str)
            hist.to_parquet(path/_HIST_FILE, index=False)
        elif (path/_HIST_FILE).exists(): (path/_HIST_FILE).unlink()
        if len(self.lrs): self.lrs.to_parquet(path/_LRS_FILE, index=False)
        elif (path/_LRS_FILE).exists(): (path/_LRS_FILE).unlink()
        return path


def _json_default(o):
    if isinstance(o, (np.integer,)): return int(o)
    if isinstance(o, (np.floating,)): return float(o)
    return repr(o)
