"""One self-contained HTML report from saved or live runs: figures embedded as PNG, no external files.

The report opens offline and can be mailed around: summary and health table first, then for
each run its heatmap, magnitude histogram and gradient flow, then the comparisons of runs.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .health import health, summary
from .plots import compare, gradient_flow, heatmap, magnitude_hist
from .record import GradRecord

__all__ = ['run_figures', 'write_report', 'overview']

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em} h3{margin-bottom:.3em}
pre{background:#f6f8fa;padding:.8em;overflow-x:auto;font-size:.85em;white-space:pre-wrap}
table{border-collapse:collapse;font-size:.8em;margin:.5em 0} td,th{border:1px solid #ddd;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f0f0f0} tr.critical td{background:#fde2e1} tr.warning td{background:#fff4d6}
img{max-width:100%;border:1px solid #eee;margin:.5em 0} .claim{color:#555;font-style:italic} nav a{margin-right:1em}
"""


def _png(fig, path=None) -> str:
    "The figure as base64 PNG (and written to `path` when given); the figure is closed."
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=90, bbox_inches='tight')
    plt.close(fig)
    data = buffer.getvalue()
    if path is not None: Path(path).write_bytes(data)
    return base64.b64encode(data).decode('ascii')


def run_figures(record: GradRecord, name: str, figures_dir=None) -> dict:
    """The figures of one run as base64 PNG, by section name (`heatmap`, `magnitude_hist`, `gradient_flow`);
    also written as `<figures_dir>/<name>_<section>.png` when `figures_dir` is given."""
    figures = {}
    makers = {'heatmap': lambda: heatmap(record, 'grad_norm', weights_only=False).figure,
              'gradient_flow': lambda: gradient_flow(record).figure}
    if record.has_hist: makers['magnitude_hist'] = lambda: magnitude_hist(record).figure
    for section in ('heatmap', 'magnitude_hist', 'gradient_flow'):
        if section not in makers: continue
        path = None if figures_dir is None else Path(figures_dir)/f'{name}_{section}.png'
        figures[section] = _png(makers[section](), path)
    return figures


def overview(records: dict):
    "One row per run: steps recorded, first and last loss, peak total norm, and how many findings of each status."
    rows = []
    for name, record in records.items():
        steps = record.steps
        table = health(record)
        rows.append({'run': name, 'steps': len(steps), 'first_loss': float(steps['loss'].iloc[0]),
                     'last_loss': float(steps['loss'].iloc[-1]),
                     'peak_grad_norm': float(np.nanmax(np.where(np.isfinite(steps['grad_norm']), steps['grad_norm'], np.nan)))
                     if np.isfinite(steps['grad_norm']).any() else float('nan'),
                     'critical': int((table['status'] == 'critical').sum()),
                     'warning': int((table['status'] == 'warning').sum())})
    return pd.DataFrame(rows)


def _table(df, classes_from=None) -> str:
    head = ''.join(f'<th>{html.escape(str(c))}</th>' for c in df.columns)
    body = []
    for i, row in enumerate(df.itertuples(index=False)):
        cls = f' class="{html.escape(str(df[classes_from].iloc[i]))}"' if classes_from else ''
        cells = ''.join(f'<td>{html.escape(_fmt(v))}</td>' for v in row)
        body.append(f'<tr{cls}>{cells}</tr>')
    return f'<table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        return 'nan' if np.isnan(v) else f'{v:.6g}'
    if v is None or v is pd.NA: return ''
    return str(v)


def _check_records(records):
    if isinstance(records, GradRecord): records = {'run': records}
    if not isinstance(records, dict) or not records:
        raise ValueError("`records` must be a non-empty dict of run name -> GradRecord")
    for name, record in records.items():
        if not isinstance(record, GradRecord):
            raise TypeError(f"`records[{name!r}]` must be a GradRecord, got {type(record).__name__}")
        if not len(record): raise ValueError(f"run {name!r} is empty: no step was recorded")
    return records


def write_report(records, out='report.html', comparisons=None, figures_dir=None,
                 title='Gradient statistics report') -> Path:
    """Write one self-contained HTML report of `records` (a dict of run name -> GradRecord) to `out`.

    Sections: an overview, then per run its claim (if the run came from the demo), health summary
    and table, heatmap, magnitude histogram and gradient flow; then one comparison figure per pair
    in `comparisons` (default: all runs together when there are several). Figures are embedded as
    base64 PNG, and also written to `figures_dir` when given. Returns the path written."""
    records = _check_records(records)
    out = Path(out)
    if out.exists() and out.is_dir(): raise ValueError(f"`out` {str(out)!r} is a directory; give a file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    if figures_dir is not None: Path(figures_dir).mkdir(parents=True, exist_ok=True)
    if comparisons is None: comparisons = [tuple(records)] if len(records) > 1 else []
    comparisons = [c for c in comparisons if all(n in records for n in c)]
    with matplotlib.rc_context({'figure.max_open_warning': 0}):
        parts = [f'<h1>{html.escape(title)}</h1>',
                 '<nav>' + ''.join(f'<a href="#run-{html.escape(n)}">{html.escape(n)}</a>' for n in records) +
                 ('<a href="#comparisons">comparisons</a>' if comparisons else '') + '</nav>',
                 '<h2 id="overview">Overview</h2>', _table(overview(records))]
        for name, record in records.items():
            claim = record.args.get('claim')
            parts.append(f'<h2 id="run-{html.escape(name)}">{html.escape(name)}</h2>')
            if claim:
                parts.append(f'<p class="claim">Seed thread {html.escape(str(record.args.get("seed_thread", "")))}: '
                             f'{html.escape(str(claim))}</p>')
            parts.append(f'<h3>Summary</h3><pre class="summary">{html.escape(summary(record))}</pre>')
            parts.append('<h3>Health</h3>' + _table(health(record), classes_from='status'))
            for section, data in run_figures(record, name, figures_dir).items():
                parts.append(f'<h3>{section.replace("_", " ")}</h3><img alt="{html.escape(name)} {section}" '
                             f'class="figure {section}" src="data:image/png;base64,{data}">')
        if comparisons:
            parts.append('<h2 id="comparisons">Comparisons</h2>')
            for names in comparisons:
                label = ' vs '.join(names)
                fig = compare([records[n] for n in names], 'grad_rms', labels=list(names))
                path = None if figures_dir is None else Path(figures_dir)/f'compare_{"_vs_".join(names)}.png'
                parts.append(f'<h3>{html.escape(label)}</h3><img alt="compare {html.escape(label)}" class="figure compare" '
                             f'src="data:image/png;base64,{_png(fig, path)}">')
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<style>{_CSS}</style></head><body>{"".join(parts)}</body></html>')
    out.write_text(page, encoding='utf-8')
    return out
