"""How a record shows itself: `learn.grad_stats` in a notebook (`_repr_html_`) and in a terminal (`repr`).

One glance says what was recorded, whether the run is healthy (the diagnosis' worst finding, in one line), how the
total gradient norm went (a small inline SVG curve), and what to call next. A long record is diagnosed on a sample of
evenly spread steps (and every step with NaN/Inf): `SAMPLE_STEPS` of them, fewer for a model of many parameter tensors
(at most `SAMPLE_ROWS` rows in all, and at least `MIN_SAMPLE_STEPS` steps), so that showing it stays fast (tens of
milliseconds, also for 100,000 steps); the view says so, and `record.health()` reads every step.
"""
from __future__ import annotations

import html
import math

import numpy as np

from .health import verdict
from .health.run import _by_code
from .record import GradRecord

__all__ = ['SAMPLE_STEPS', 'record_text', 'record_html']

SAMPLE_STEPS = 500
"Steps the notebook and terminal views diagnose at most (evenly spread, plus every step with NaN/Inf): `health()` reads all."
SAMPLE_ROWS = 20_000     # ... and at most this many (step, tensor) rows: 200 steps of a model of 100 parameter tensors
MIN_SAMPLE_STEPS = 100   # ... but never fewer steps than this
CURVE_POINTS = 240  # buckets of the inline curve of the total norm
CALLS = ('.summary()', '.health()', '.plot_heatmap()', '.plot_gradient_flow()', '.df', '.steps', '.save(path)')
_COLORS = {'healthy': '#1a7f37', 'warning': '#9a6700', 'critical': '#cf222e'}


def _sampled_verdict(record) -> tuple[dict, int]:
    """The record's verdict, on a sample of its steps (`_sample_size`, and those with NaN/Inf) when it is long, and how
    many steps it read; kept with the record's DataFrames until a step arrives (showing a record twice diagnoses it once)."""
    key = ('view', SAMPLE_STEPS, SAMPLE_ROWS, record.thresholds)
    if key not in record._cache: record._cache[key] = _diagnose_sample(record)
    return record._cache[key]


def _sample_size(n_tensors: int) -> int:
    "How many evenly spread steps the views diagnose of a long record of `n_tensors` parameter tensors."
    return int(min(SAMPLE_STEPS, max(MIN_SAMPLE_STEPS, SAMPLE_ROWS // max(n_tensors, 1))))


def _diagnose_sample(record):
    n, size = len(record), _sample_size(len(record.layers))
    if n <= 2 * size: return verdict(record), n
    # the steps with NaN/Inf gradients (a total norm that is not finite) are all read, up to `size` of them
    bad = np.flatnonzero(~np.isfinite(record.steps['grad_norm'].to_numpy()))[:size]
    positions = np.union1d(np.linspace(0, n - 1, size).round().astype(np.int64), bad)
    return verdict(record._subset(positions)), len(positions)


def _shown_verdict(record) -> tuple[dict, int]:
    """The verdict the views show (`verdict`'s dict, on a sample of a long record) and how many steps it read; status
    'unknown' with the error in its `line` when the diagnosis itself failed (a view never fails for it)."""
    try: return _sampled_verdict(record)
    except Exception as e:
        return {'status': 'unknown', 'line': f'the diagnosis failed: {type(e).__name__}: {e}', 'findings': 0}, 0


def _facts(record):
    "What the views show: the step table's numbers and the verdict (status 'unknown' when the diagnosis itself failed)."
    steps = record.steps
    found, read = _shown_verdict(record)
    norms = steps['grad_norm'].to_numpy(np.float64)
    finite = norms[np.isfinite(norms) & (norms > 0)]
    return {'steps': steps, 'n': len(steps), 'first': int(steps['step'].iloc[0]), 'last': int(steps['step'].iloc[-1]),
            'layers': len(record.layers), 'skipped': int(steps['skipped'].sum()), 'epochs': int(steps['epoch'].nunique()),
            'norms': norms, 'low': float(finite.min()) if len(finite) else math.nan,
            'high': float(finite.max()) if len(finite) else math.nan,
            'median': float(np.median(finite)) if len(finite) else math.nan, 'verdict': found, 'read': read}


def _plural(n, word): return f"{n} {word}{'' if n == 1 else 's'}"


def _headline(found) -> str:
    "The verdict in a line, after its status: the worst finding (or the convergence note) and the counts."
    if found['status'] == 'unknown': return found['line']
    counts = f"{_plural(found['critical'], 'critical finding')}, {_plural(found['warning'], 'warning')}"
    if found['status'] == 'healthy': return counts + (f"; {found['line']}" if found['line'] else '')
    line = found['line'].split(None, 1)[1] if ' ' in found['line'] else found['line']   # without its STATUS word
    more = found['findings'] - 1
    return f"{line} ({counts}" + (f"; {more} more in .summary()" if more > 0 else '') + ')'


def record_text(record) -> str:
    """The record in a few lines of text (its `repr`): what was recorded, the health verdict with the worst finding, the
    total norm's range, and the calls to go further."""
    if not isinstance(record, GradRecord): raise TypeError(f"`record` must be a GradRecord, got {type(record).__name__}")
    if not len(record): return f"GradRecord(no steps recorded, {len(record.layers)} layers)"
    f = _facts(record)
    sample = f" (diagnosed on {f['read']} of its steps)" if f['read'] < f['n'] else ''
    return '\n'.join([
        f"GradRecord({f['n']} steps from {f['first']} to {f['last']}, {f['layers']} layers, {f['skipped']} skipped)",
        f"  health: {f['verdict']['status'].upper() if f['verdict']['status'] != 'healthy' else 'healthy'}: "
        f"{_headline(f['verdict'])}{sample}",
        f"  total norm: {f['low']:.3g} to {f['high']:.3g} (median {f['median']:.3g}) over {f['epochs']} epoch(s)",
        f"  next: {'  '.join(CALLS)}"])


def _bucket_stats(values, bucket):
    """Of `values` (NaN: none) in the increasing `bucket` of each, per bucket that has a finite value: the bucket, and
    the least, the largest and the median value (of an even count, the mean of the two middle ones)."""
    starts = np.flatnonzero(np.diff(bucket, prepend=bucket[:1] - 1))   # where each bucket starts
    sizes = np.diff(np.append(starts, len(values)))
    code = np.repeat(np.arange(len(starts)), sizes)
    at = np.arange(len(values)) - np.repeat(starts, sizes)               # a value's place in its bucket
    keep = np.isfinite(values)
    low, high, median = (_by_code(values[keep], code[keep], at[keep], len(starts), int(sizes.max()), how)
                         for how in ('min', 'max', 'median'))
    has = np.bincount(code[keep], minlength=len(starts)) > 0
    return bucket[starts[has]].astype(np.float64), low[has], high[has], median[has]


def _curve_svg(norms, width=CURVE_POINTS, height=44) -> str:
    """The total norm per step as an inline SVG: each bucket's range of log10 norms as a band and its median as a line
    (log scale), steps whose norm is NaN/Inf as red ticks at the top."""
    n = len(norms)
    x = (np.arange(n) * width) // max(n, 1)   # the bucket (one pixel column) of each step
    bad = ~np.isfinite(norms)
    with np.errstate(divide='ignore', invalid='ignore'): logs = np.log10(np.where(~bad & (norms > 0), norms, np.nan))
    shapes = ''
    if np.isfinite(logs).any():
        cols, low, high, median = _bucket_stats(logs, x)
        lo, hi = float(low.min()), float(high.max())
        scale = (height - 4) / (hi - lo if hi > lo else 1.0)
        y = lambda v: height - 2 - (v - lo) * scale
        cols = cols + 0.5
        points = lambda cs, ys: ' '.join(f'{c:.1f},{y(v):.1f}' for c, v in zip(cs, ys))
        band = points(cols, high) + ' ' + points(cols[::-1], low[::-1])
        shapes = (f'<polygon points="{band}" fill="#9ecae1" opacity="0.6"/>'
                  f'<polyline points="{points(cols, median)}" fill="none" stroke="#08519c" stroke-width="1.2"/>')
    ticks = ''.join(f'<line x1="{c + 0.5}" y1="0" x2="{c + 0.5}" y2="6" stroke="#cf222e" stroke-width="1.5"/>'
                    for c in np.unique(x[bad]))
    return (f'<svg class="gradstats-curve" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            'xmlns="http://www.w3.org/2000/svg" role="img" aria-label="total gradient norm per step (log scale)">'
            f'<rect width="{width}" height="{height}" fill="#f6f8fa"/>{shapes}{ticks}</svg>')


def record_html(record) -> str:
    """The record as a small HTML card (its `_repr_html_`, shown by Jupyter): what was recorded, the health verdict in
    one line, the total norm per step as an inline SVG, and the calls to go further. No external resource."""
    if not isinstance(record, GradRecord): raise TypeError(f"`record` must be a GradRecord, got {type(record).__name__}")
    if not len(record):
        return f'<div class="gradstats-record"><b>GradRecord</b>: no steps recorded, {len(record.layers)} layers</div>'
    f = _facts(record)
    found = f['verdict']
    color = _COLORS.get(found['status'], '#57606a')
    sample = (f' <span style="color:#57606a">(diagnosed on {f["read"]} of its {f["n"]} steps; .health() reads all)</span>'
              if f['read'] < f['n'] else '')
    status = found['status'].upper() if found['status'] != 'healthy' else 'healthy'
    calls = ' '.join(f'<code>{html.escape(c)}</code>' for c in CALLS)
    return (
        '<div class="gradstats-record" style="font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;'
        'font-size:13px;line-height:1.45;border:1px solid #d0d7de;border-radius:6px;padding:8px 12px;max-width:760px">'
        f'<div><b>GradRecord</b> &middot; {f["n"]} steps ({f["first"]}&ndash;{f["last"]}) &middot; {f["epochs"]} '
        f'epoch(s) &middot; {f["layers"]} parameter tensors &middot; {f["skipped"]} skipped</div>'
        f'<div class="gradstats-verdict" data-status="{html.escape(found["status"])}" style="margin:4px 0">'
        f'<span style="color:#fff;background:{color};border-radius:3px;padding:0 6px;font-weight:600">{status}</span> '
        f'{html.escape(_headline(found))}{sample}</div>'
        f'<div style="display:flex;align-items:center;gap:8px">{_curve_svg(f["norms"])}'
        f'<span style="color:#57606a">total gradient norm per step (log scale): {f["low"]:.3g} to {f["high"]:.3g}, median '
        f'{f["median"]:.3g}</span></div>'
        f'<div style="color:#57606a;margin-top:4px">go further: {calls}</div></div>')


GradRecord.__repr__ = record_text
GradRecord._repr_html_ = record_html
