"""The live view's picture, drawn straight to a PNG: the total gradient norm per step beside the layer x step heatmap of
`grad_norm`, titled with the record's verdict (its worst finding) and any alert raised while training.

`ShowGradStats` redraws it while a fit runs, so it has to be cheap: it is drawn with Pillow (a dependency of matplotlib)
at twice its size and reduced, which smooths its lines and text, in a few tens of milliseconds; its short text (layer
names, ticks, labels), most of the cost of a draw, is rendered once and kept for the next draws (`_text_mask`), and
the PNG is written by `_png_bytes`. Rendering the same picture as a matplotlib figure (`live_figure`, kept for saving
and editing) takes about ten times as long, mostly for its text. The title reads the notebook card's verdict
(`view._shown_verdict`: a sample of a long record, cached until a step arrives), so a redraw costs the same on the
100th epoch as on the first.
"""
from __future__ import annotations

import functools
import math
import re
import struct
import textwrap
import zlib
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .plots import SPECIAL_COLORS
from .plots.axes import _wants_log
from .record import GradRecord
from .thresholds import Thresholds
from .view import _bucket_stats, _shown_verdict

__all__ = ['live_png']

_ALERT_NAMES = {'nonfinite': 'NaN/Inf gradients', 'exploding': 'exploding gradients'}
"What each kind of `GradientAlert` (the kinds `GradStats` keeps in `_alerted`) is called in the title."
_STATUS_COLORS = {'critical': '#b00000', 'warning': '#a05000', 'ok': '#1b7a1b'}
_TITLE_CHARS = 160    # a longer finding is shortened: the whole text is in `record.summary()`
_MAX_COLUMNS = 250    # the heatmap draws at most this many steps: every k-th, back from the last
_SCALE = 2            # drawn at twice the size, then reduced
_DPI = 90             # pixels per inch of the sizes below, as `live_figure` draws at
_FONTS = Path(matplotlib.get_data_path()) / 'fonts' / 'ttf'
_CACHED_CHARS = 64    # text up to this long (names, ticks, labels) is rendered once and kept (`_text_mask`)


# --- what the picture says -----------------------------------------------------------------------
def _plain_number(value, _position=None) -> str:
    """A tick label a newcomer reads at once: 0.01, 1, 100, 1e5, 1e-5 (not matplotlib's mathtext 10^5, which is
    also slower to draw)."""
    if value == 0 or 1e-3 <= abs(value) < 1e4: return f'{value:g}'
    mantissa, exponent = f'{value:.0e}'.split('e')
    return f'{mantissa}e{int(exponent)}'


def _check_alerts(alerts) -> tuple:
    "`alerts` as a tuple of alert kinds (keys of `_ALERT_NAMES`); else a TypeError or ValueError naming it."
    if isinstance(alerts, str) or not hasattr(alerts, '__iter__'):
        raise TypeError(f"`alerts` must be a collection of alert kinds ({', '.join(_ALERT_NAMES)}), got {alerts!r}")
    alerts = tuple(alerts)
    unknown = [a for a in alerts if a not in _ALERT_NAMES]
    if unknown: raise ValueError(f"unknown `alerts` {unknown}; known: {', '.join(_ALERT_NAMES)}")
    return alerts


def _worst(record) -> tuple[str, str, str, int]:
    """The worst finding, from the card's verdict (the first problem line of `record.summary()`): (its status 'critical',
    'warning' or 'ok', its words 'CRITICAL check layer' or 'CRITICAL check in N layers; worst layer', its reason, how
    many more problem lines `summary()` has); ('ok', 'healthy so far', '', 0) when nothing is wrong."""
    found, _ = _shown_verdict(record)
    if found['status'] == 'healthy': return 'ok', 'healthy so far', '', 0
    if found['status'] == 'unknown': return 'ok', 'no diagnosis', found['line'], 0
    words, _, reason = found['line'].partition(': ')   # 'CRITICAL check layer', and the reason [steps]
    words = re.sub(r' in (\d+) layers \(.*\); worst ', r' in \1 layers; worst ', words)   # the names are in the reason's line
    return found['status'], words, reason, found['findings'] - 1


def _title(record, alerts) -> tuple[str, str, str]:
    """The title of the live view: (headline, detail, status). The headline names the alerts raised while training,
    then the worst finding (`_worst`) and how many more lines `record.summary()` has; the detail is that finding's
    reason, shortened; the status ('critical', 'warning', 'ok') sets the colour."""
    status, headline, detail, more = _worst(record)
    if more: headline += f" (+{more} more findings: record.summary())"
    if alerts:
        headline = 'ALERT ' + ', '.join(_ALERT_NAMES[kind] for kind in sorted(alerts)) + ' | ' + headline
        status = 'critical'
    return headline, textwrap.shorten(detail, _TITLE_CHARS, placeholder=' ...') if detail else '', status


def _checked(record, alerts):
    """The `steps` of `record` and the `alerts` the live view's pictures (`live_png`, `live_figure`) draw; a TypeError
    or ValueError naming the argument for anything else (a merge of several ranks would draw over each other)."""
    if not isinstance(record, GradRecord):
        raise TypeError(f"`record` must be a GradRecord (live or loaded), got {type(record).__name__}")
    alerts = _check_alerts(alerts)
    steps = record.steps
    if 'rank' in steps and steps['rank'].nunique() > 1:
        raise ValueError(f"`record` is a merge of {steps['rank'].nunique()} ranks, which would draw over each other: "
                         "draw one rank's saved run")
    return steps, alerts


def _heatmap_columns(n_steps) -> np.ndarray:
    """The positions (in `steps`) of the steps the heatmap draws, increasing: all of them, or of more than `_MAX_COLUMNS`
    every k-th back from the last one (evenly spaced as the steps are): narrower columns would hardly show."""
    if n_steps <= _MAX_COLUMNS: return np.arange(n_steps)
    return np.arange(n_steps - 1, -1, -math.ceil(n_steps / _MAX_COLUMNS))[::-1]


def _size_of(n_layers, n_steps) -> tuple[float, float]:
    "The picture's size in inches: a heatmap row per layer, as tall as its name; one line of text without steps."
    return (11.5, min(9.0, max(3.8, 0.15 * n_layers + 2.0)) if n_steps else 1.2)


def _layer_table(record, positions) -> tuple[list, np.ndarray, np.ndarray]:
    """What the heatmap draws of `record` at the steps at `positions`: the layers (input to output), their
    `grad_norm` (layers x steps, NaN where not recorded) and whether each was recorded at that step."""
    part = record if len(positions) == len(record) else record._subset(positions)
    df = part.df
    codes = df['layer'].cat.codes.to_numpy()
    names = list(df['layer'].cat.categories)
    depth = dict(zip(record.layers['name'].tolist(), record.layers['depth'].tolist()))
    present = np.unique(codes[codes >= 0])
    order = sorted(present, key=lambda c: depth.get(names[c], math.inf))
    row_of = np.full(len(names), -1)
    row_of[order] = np.arange(len(order))
    column = np.searchsorted(part.steps['step'].to_numpy(), df['step'].to_numpy())
    table = np.full((len(order), len(positions)), np.nan)
    recorded = np.zeros(table.shape, bool)
    table[row_of[codes], column] = df['grad_norm'].to_numpy(np.float64)
    recorded[row_of[codes], column] = True
    return [names[c] for c in order], table, recorded


# --- drawing -------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _font(size, bold=False):
    return ImageFont.truetype(str(_FONTS / ('DejaVuSans-Bold.ttf' if bold else 'DejaVuSans.ttf')), round(size * _SCALE))


@functools.lru_cache(maxsize=512)   # at most a few MB: labels of up to `_CACHED_CHARS` characters
def _text_mask(text, size, bold, anchor, vertical=False) -> tuple[tuple[int, int], Image.Image]:
    """`text` rendered once (at `_SCALE` times `size` points, placed by `anchor` as Pillow places it) as a mask, and the
    offset of its top left corner from the anchor point: most of a picture's text (names, ticks, labels) is the same
    from one redraw to the next, and rendering it is most of the cost of drawing. `vertical`: turned to read from bottom
    to top (with a pixel of margin; the offset is then unused)."""
    font = _font(size, bold)
    left, top, right, bottom = font.getbbox(text, anchor=anchor)
    if vertical: left, top, right, bottom = left - 1, top - 1, right + 1, bottom + 1
    mask = Image.new('L', (max(1, right - left), max(1, bottom - top)), 0)
    ImageDraw.Draw(mask).text((-left, -top), text, font=font, fill=255, anchor=anchor)
    return (left, top), mask.rotate(90, expand=True) if vertical else mask


@functools.lru_cache(maxsize=None)
def _viridis() -> np.ndarray:
    "matplotlib's viridis as 256 RGB rows (uint8), as `plots.heatmap` colours its cells."
    return (matplotlib.colormaps['viridis'](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)


def _rgb(color) -> tuple:
    return tuple(int(color[i:i + 2], 16) for i in (1, 3, 5))


class _Canvas:
    "A white picture of `width` x `height` pixels, drawn at `_SCALE` times that: coordinates are in its own pixels."
    def __init__(self, width, height):
        self.width, self.height = int(width), int(height)
        self.image = Image.new('RGB', (self.width * _SCALE, self.height * _SCALE), 'white')
        self.draw = ImageDraw.Draw(self.image)

    def line(self, points, color, width=1.0):
        if len(points) >= 2:
            self.draw.line([(x * _SCALE, y * _SCALE) for x, y in points], fill=color, width=max(1, round(width * _SCALE)),
                           joint='curve')

    def dashed(self, start, end, color, width=1.0, dash=(4, 3)):
        "A straight line from `start` to `end` in dashes of `dash` (on, off) pixels."
        (x0, y0), (x1, y1) = start, end
        length = math.hypot(x1 - x0, y1 - y0)
        at = 0.0
        while at < length:
            a, b = at / length, min(at + dash[0], length) / length
            self.line([(x0 + a * (x1 - x0), y0 + a * (y1 - y0)), (x0 + b * (x1 - x0), y0 + b * (y1 - y0))], color, width)
            at += dash[0] + dash[1]

    def rect(self, box, fill=None, outline=None, width=1.0):
        x0, y0, x1, y1 = box
        self.draw.rectangle([x0 * _SCALE, y0 * _SCALE, x1 * _SCALE, y1 * _SCALE], fill=fill, outline=outline,
                            width=max(1, round(width * _SCALE)))

    def polygon(self, points, fill):
        if len(points) >= 3: self.draw.polygon([(x * _SCALE, y * _SCALE) for x, y in points], fill=fill)

    def text(self, xy, text, size=9.0, color='#222222', anchor='la', bold=False):
        if len(text) > _CACHED_CHARS:   # a title or a finding: new at each draw, not worth keeping
            self.draw.text((xy[0] * _SCALE, xy[1] * _SCALE), text, font=_font(size, bold), fill=color, anchor=anchor)
            return
        (left, top), mask = _text_mask(text, size, bold, anchor)
        self.draw.bitmap((round(xy[0] * _SCALE) + left, round(xy[1] * _SCALE) + top), mask, fill=color)

    def width_of(self, text, size=9.0, bold=False) -> float:
        return _font(size, bold).getlength(text) / _SCALE

    def vertical_text(self, centre, text, size=9.0, color='#222222'):
        "`text` read from bottom to top, centred on `centre`."
        _, label = _text_mask(text, size, False, 'la', vertical=True)
        at = (round(centre[0] * _SCALE - label.width / 2), round(centre[1] * _SCALE - label.height / 2))
        self.draw.bitmap(at, label, fill=color)

    def cells(self, rgb, box):
        "An array of RGB cells (rows x columns x 3, uint8) stretched over `box`, each cell one flat colour."
        x0, y0, x1, y1 = (round(v * _SCALE) for v in box)
        cells = Image.fromarray(rgb, 'RGB').resize((max(1, x1 - x0), max(1, y1 - y0)), Image.Resampling.NEAREST)
        self.image.paste(cells, (x0, y0))

    def png(self) -> bytes:
        return _png_bytes(np.asarray(self.image.reduce(_SCALE)))


def _png_bytes(rgb: np.ndarray) -> bytes:
    """`rgb` (height x width x 3, uint8) as a PNG file: each row stored as its difference from the row above (PNG's
    'Up' filter: the picture's flat areas become zeros) and deflated fast. Pillow's encoder takes two to three times as
    long for the same size, choosing a filter per row."""
    height, width, _ = rgb.shape
    rows = np.empty((height, 1 + 3 * width), np.uint8)
    rows[:, 0] = 2   # the filter of each row: Up
    rows[:, 1:] = rgb.reshape(height, -1)
    rows[1:, 1:] -= rgb[:-1].reshape(height - 1, 3 * width)   # uint8 arithmetic wraps, as the filter is defined
    def chunk(kind, data): return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    header = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)   # 8 bits a channel, RGB, no interlace
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(rows.tobytes(), 1))
            + chunk(b'IEND', b''))


def _nice_ticks(low, high, count=6, integer=False) -> list:
    "Round numbers (1, 2 or 5 times a power of ten) from `low` to `high`, about `count` of them."
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low: return [low] if math.isfinite(low) else []
    raw = (high - low) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    if integer: step = max(1, round(step))
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _log_ticks(low, high) -> list:
    "Log10 positions of ticks from `low` to `high` (log10 values): whole decades, or round numbers within less than two."
    decades = list(range(math.ceil(low - 1e-9), math.floor(high + 1e-9) + 1))
    if len(decades) >= 2:
        every = math.ceil(len(decades) / 7)
        return [float(d) for d in decades[::every]]
    return [math.log10(v) for v in _nice_ticks(10 ** low, 10 ** high, 4) if v > 0]


def _frame(canvas, box):
    canvas.rect(box, outline='#333333', width=0.8)


def _y_ticks(canvas, box, ticks, to_y, label):
    x0 = box[0]
    for value in ticks:
        y = to_y(value)
        canvas.line([(x0 - 4, y), (x0, y)], '#333333', 0.8)
        canvas.text((x0 - 6, y), label(value), 9, anchor='rm')


def _x_ticks(canvas, box, positions, labels):
    y1 = box[3]
    for x, text in zip(positions, labels):
        canvas.line([(x, y1), (x, y1 + 4)], '#333333', 0.8)
        canvas.text((x, y1 + 6), text, 9, anchor='mt')


def _curve(canvas, box, steps, thresholds):
    "The total gradient norm per recorded step in `box`: the healthy band shaded, NaN/Inf steps marked at the top edge."
    x0, y0, x1, y1 = box
    x, norms = steps['step'].to_numpy(np.float64), steps['grad_norm'].to_numpy(np.float64)
    finite = np.isfinite(norms)
    log = bool(finite.any() and (norms[finite] > 0).all())
    low, high, critical = thresholds.total_norm_low, thresholds.total_norm_warning, thresholds.total_norm_critical
    over = bool(finite.any() and norms[finite].max() > high)
    scale = (lambda v: np.log10(v)) if log else (lambda v: np.asarray(v, np.float64))
    # the range holds the norms, the healthy band and (when drawn) the textbook's line, as matplotlib's autoscale does
    shown = np.concatenate([scale(norms[finite]), scale(np.array([low, high] + ([critical] if over else [])))])
    lo, hi = float(shown.min()), float(shown.max())
    pad = (hi - lo) * 0.05 or 0.5
    lo, hi = lo - pad, hi + pad
    first, last = (float(x.min()), float(x.max())) if len(x) > 1 else (float(x[0]) - 1, float(x[0]) + 1)
    margin = (last - first) * 0.04
    first, last = first - margin, last + margin
    to_x = lambda s: x0 + (s - first) / (last - first) * (x1 - x0)
    to_y = lambda v: y1 - (v - lo) / (hi - lo) * (y1 - y0)
    clip = lambda y: min(max(y, y0), y1)
    canvas.rect((x0, clip(to_y(float(scale(high)))), x1, clip(to_y(float(scale(low))))), fill='#e3f1e3')
    if over and lo <= float(scale(critical)) <= hi:
        y = to_y(float(scale(critical)))
        canvas.dashed((x0, y), (x1, y), '#d62728', 1.0)
    epochs = steps['epoch'].to_numpy()
    for start in x[1:][np.diff(epochs) != 0]:
        canvas.dashed((to_x(start), y0), (to_x(start), y1), '#999999', 0.6, dash=(1.5, 2))
    values = np.where(finite, scale(np.where(finite, norms, 1.0)), np.nan)
    if len(x) > (x1 - x0) * _SCALE:   # more steps than pixels: each pixel column's range as a band, its median as the line
        column = np.round((x - first) / (last - first) * (x1 - x0) * _SCALE).astype(np.int64)
        if finite.any():
            cols, least, most, median = _bucket_stats(values, column)
            px = x0 + cols / _SCALE
            canvas.polygon(list(zip(px, to_y(most))) + list(zip(px[::-1], to_y(least)[::-1])), '#a9c0e3')
            canvas.line(list(zip(px, to_y(median))), '#1f4e9c', 1.2)
    else:
        for run in np.split(np.arange(len(x)), np.flatnonzero(np.diff(finite.astype(np.int8)) != 0) + 1):
            if finite[run[0]]: canvas.line(list(zip(to_x(x[run]), to_y(values[run]))), '#1f4e9c', 1.2)
        if len(x) < 40:
            for s, v in zip(x[finite], values[finite]):
                canvas.draw.ellipse([(to_x(s) - 1.6) * _SCALE, (to_y(v) - 1.6) * _SCALE, (to_x(s) + 1.6) * _SCALE,
                                     (to_y(v) + 1.6) * _SCALE], fill='#1f4e9c')
    bad = x[~finite]
    for s in np.unique(np.round(to_x(bad))) if len(bad) else ():
        canvas.polygon([(s - 4, y0 - 7), (s + 4, y0 - 7), (s, y0)], SPECIAL_COLORS['nan'])
    _frame(canvas, box)
    if log: _y_ticks(canvas, box, [t for t in _log_ticks(lo, hi)], to_y, lambda v: _plain_number(float(f'{10 ** v:.3g}')))
    else: _y_ticks(canvas, box, _nice_ticks(lo, hi, 5), to_y, lambda v: _plain_number(float(f'{v:.3g}')))
    ticks = [t for t in _nice_ticks(first, last, 7, integer=True) if first <= t <= last]
    _x_ticks(canvas, box, [to_x(t) for t in ticks], [str(int(t)) for t in ticks])
    canvas.text(((x0 + x1) / 2, y1 + 22), 'step (dotted: a new epoch)', 10, anchor='mt')
    canvas.vertical_text((x0 - 48, (y0 + y1) / 2), 'total gradient norm', 10)
    canvas.text(((x0 + x1) / 2, y0 - 9), f'total gradient norm, step {int(x[-1])}', 9.5, anchor='md')
    entries = [('line', '#1f4e9c', 'total norm'), ('patch', '#cfe6cf', f'textbook: healthy {low:g}-{high:g}')]
    if over: entries.append(('dash', '#d62728', f'textbook: may explode > {critical:g}'))
    if len(bad): entries.append(('mark', SPECIAL_COLORS['nan'], 'NaN/Inf (top edge)'))
    _legend(canvas, (x1 - 4, y0 + 4), entries)


def _legend(canvas, top_right, entries):
    "A small legend box whose top right corner is at `top_right`: (kind, colour, text) per entry."
    width = 30 + max(canvas.width_of(text, 7.5) for _, _, text in entries)
    x1, y0 = top_right
    x0 = x1 - width
    canvas.rect((x0, y0, x1, y0 + 6 + 12 * len(entries)), fill='#ffffff', outline='#cccccc', width=0.6)
    for i, (kind, color, text) in enumerate(entries):
        y = y0 + 9 + 12 * i
        if kind == 'line': canvas.line([(x0 + 5, y), (x0 + 22, y)], color, 1.2)
        elif kind == 'dash': canvas.dashed((x0 + 5, y), (x0 + 22, y), color, 1.0, dash=(3, 2))
        elif kind == 'patch': canvas.rect((x0 + 5, y - 3.5, x0 + 22, y + 3.5), fill=color)
        else: canvas.polygon([(x0 + 9.5, y - 3.5), (x0 + 17.5, y - 3.5), (x0 + 13.5, y + 3.5)], color)
        canvas.text((x0 + 26, y), text, 7.5, anchor='lm')


def _heatmap(canvas, box, steps, positions, names, table, recorded):
    """The layer x step heatmap of `grad_norm` in `box` (the cells and the colour bar; the layer names left of it) of
    the steps at `positions` (`_layer_table`'s `names`, `table` and `recorded`): coloured as `plots.heatmap` colours
    them (viridis, a log scale when the norms span two decades or more; NaN, Inf and, on a log scale, zeros in
    `SPECIAL_COLORS`; blank where a layer was not recorded)."""
    x0, y0, x1, y1 = box
    canvas.text(((x0 + x1) / 2, y0 - 9), 'gradient norm per layer (input at top) and step', 9.5, anchor='md')
    if not names:   # steps at which no parameter had a gradient (all frozen)
        _frame(canvas, box)
        canvas.text(((x0 + x1) / 2, (y0 + y1) / 2), 'no parameter had a gradient', 10, anchor='mm')
        return
    log = _wants_log(table, None)
    finite = np.isfinite(table)
    hidden = ~finite | ((table <= 0) if log else False)
    shown = table[~hidden]
    scale = np.log10 if log else (lambda v: v)
    lo, hi = (float(scale(shown.min())), float(scale(shown.max()))) if len(shown) else (0.0, 1.0)
    span = hi - lo if hi > lo else 1.0
    with np.errstate(divide='ignore', invalid='ignore'):
        index = np.clip(np.round((scale(np.where(hidden, 1.0, table)) - lo) / span * 255), 0, 255).astype(np.int64)
    rgb = _viridis()[index]
    special = {'nan': np.isnan(table) & recorded, 'inf': np.isinf(table), 'zero': finite & (table <= 0) if log else None}
    for kind, where in special.items():
        if where is not None: rgb[where] = _rgb(SPECIAL_COLORS[kind])
    rgb[~recorded] = 255
    bar = (x1 + 14, y0, x1 + 26, y1)
    canvas.cells(rgb, box)
    _frame(canvas, box)
    # the layer names, thinned to one per 10 pixels, 8 points (7 beyond 20 layers)
    size = 8 if len(names) <= 20 else 7
    row = (y1 - y0) / len(names)
    every = max(1, math.ceil(len(names) / max(1, int((y1 - y0) / 10))))
    for i in range(0, len(names), every):
        y = y0 + (i + 0.5) * row
        canvas.line([(x0 - 3, y), (x0, y)], '#333333', 0.8)
        canvas.text((x0 - 5, y), names[i], size, anchor='rm')
    canvas.vertical_text((x0 - 14 - max(canvas.width_of(n, size) for n in names[::every]), (y0 + y1) / 2),
                         'layer (input at top)', 10)
    # the steps: round numbers where the columns are evenly spaced, else the columns' own steps
    drawn = steps['step'].to_numpy()[positions].astype(np.float64)
    width = (x1 - x0) / len(drawn)
    gaps = np.diff(drawn)
    if len(drawn) == 1 or np.allclose(gaps, gaps[0]):
        gap = gaps[0] if len(gaps) else 1.0
        ticks = [t for t in _nice_ticks(drawn[0], drawn[-1], 7, integer=True) if drawn[0] <= t <= drawn[-1]] or [drawn[0]]
        _x_ticks(canvas, box, [x0 + ((t - drawn[0]) / gap + 0.5) * width for t in ticks], [str(int(t)) for t in ticks])
    else:
        at = np.unique(np.linspace(0, len(drawn) - 1, 7).round().astype(np.int64))
        _x_ticks(canvas, box, [x0 + (i + 0.5) * width for i in at], [str(int(drawn[i])) for i in at])
    canvas.text(((x0 + x1) / 2, y1 + 22), 'step', 10, anchor='mt')
    # the colour bar, its ticks and the cells it cannot show
    canvas.cells(_viridis()[::-1][:, None, :].copy(), bar)
    _frame(canvas, bar)
    to_y = lambda v: bar[3] - (v - lo) / span * (bar[3] - bar[1])
    ticks = _log_ticks(lo, hi) if log else _nice_ticks(lo, hi, 5)
    for value in [t for t in ticks if lo - 1e-9 <= t <= hi + 1e-9]:
        y = to_y(value)
        canvas.line([(bar[2], y), (bar[2] + 3, y)], '#333333', 0.8)
        canvas.text((bar[2] + 5, y), _plain_number(float(f'{(10 ** value if log else value):.3g}')), 9, anchor='lm')
    canvas.vertical_text((bar[2] + 52, (y0 + y1) / 2), f"grad_norm{' (log scale)' if log else ''}", 10)
    marks = [(kind, label) for kind, label in (('zero', 'zero'), ('nan', 'NaN'), ('inf', 'Inf'))
             if special[kind] is not None and special[kind].any()]
    for i, (kind, label) in enumerate(marks):
        y = y1 + 22 + 12 * i
        canvas.rect((bar[0], y - 4, bar[0] + 10, y + 4), fill=SPECIAL_COLORS[kind])
        canvas.text((bar[0] + 14, y), label, 8, anchor='lm')


def live_png(record, alerts=()) -> bytes:
    """The picture `ShowGradStats` shows, for `record` (a GradRecord, live or loaded), as PNG bytes: the total gradient
    norm per step (log scale when every finite norm is positive, the healthy band of the record's thresholds shaded,
    NaN/Inf steps marked at the top) beside the layer x step heatmap of `grad_norm`, titled with the worst finding (the
    card's verdict: on a sample of a long record) and how many more `record.summary()` lists, or 'healthy so far'. Of
    more than 250 steps, the heatmap draws every k-th step back from the last, the curve all of them (as each pixel
    column's range and median where there are more steps than pixels). `alerts` names the kinds of `GradientAlert`
    raised while training (`'nonfinite'`, `'exploding'`), put first in the title. `live_figure` draws the same as a
    matplotlib Figure. A record without steps gets a picture that says so."""
    steps, alerts = _checked(record, alerts)
    positions = _heatmap_columns(len(steps))
    names, table, recorded = _layer_table(record, positions) if len(steps) else ([], None, None)
    width, height = (round(inches * _DPI) for inches in _size_of(len(names), len(steps)))
    canvas = _Canvas(width, height)
    if not len(steps):
        canvas.text((width / 2, height / 2), 'no step recorded yet', 12, '#555555', anchor='mm')
        return canvas.png()
    headline, detail, status = _title(record, alerts)
    canvas.text((width / 2, 14), headline, 11.5, _STATUS_COLORS[status], anchor='mt', bold=True)
    if detail: canvas.text((width / 2, 36), detail, 8.5, '#333333', anchor='mt')
    curve, cells = _boxes(width, height, names)
    _curve(canvas, curve, steps, record.thresholds or Thresholds())
    _heatmap(canvas, cells, steps, positions, names, table, recorded)
    return canvas.png()


def _boxes(width, height, names) -> tuple[tuple, tuple]:
    """Where the curve's axes and the heatmap's cells go in a picture of `width` x `height` pixels, as (left, top,
    right, bottom): below the titles, above the step axis; the heatmap right of its layer `names`."""
    top, bottom = 2 + 1.07 * _DPI, height - 0.55 * _DPI - 4
    names_room = min(190, 12 + max(_font(8).getlength(n) / _SCALE for n in names)) if names else 12
    return (70, top, 405, bottom), (max(520, 455 + names_room), top, width - 115, bottom)
