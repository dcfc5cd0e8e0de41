"""One self-contained HTML report from saved or live runs: figures embedded as PNG, no external files.

The report opens offline and can be mailed around. It opens with the questions the runs answer (each with its
verdict, its numbers and its figure), then an overview of the runs, then each run's details folded under a readable
title (summary, health table, heatmap, magnitude histogram, gradient flow), then the comparisons of runs, folded.
"""
from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .health import health, summary
from .plots import compare, gradient_flow, heatmap, magnitude_hist
from .record import GradRecord

__all__ = ['run_figures', 'write_report', 'overview', 'Comparison']
_SECTIONS = ('heatmap', 'magnitude_hist', 'gradient_flow')
_FIGURE_TITLES = {'heatmap': 'Gradient norm per layer and step', 'magnitude_hist': 'Gradient magnitudes (log10 |g|) per step',
                  'gradient_flow': 'Gradient flow from input to output'}

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em} h3{margin-bottom:.3em}
pre{background:#f6f8fa;padding:.8em;overflow-x:auto;font-size:.85em;white-space:pre-wrap}
table{border-collapse:collapse;font-size:.8em;margin:.5em 0} td,th{border:1px solid #ddd;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f0f0f0} tr.critical td{background:#fde2e1} tr.warning td{background:#fff4d6}
img{max-width:100%;border:1px solid #eee;margin:.5em 0} .claim{color:#555} nav a{margin-right:1em}
section.question{border-left:4px solid #d0d7de;padding-left:1em;margin:1.5em 0} .source{color:#57606a;margin:.2em 0}
.verdict,.status{color:#fff;border-radius:3px;padding:0 .4em;font-weight:600;font-size:.9em}
.verdict.confirmed,.status.healthy{background:#1a7f37} .verdict.partly-confirmed,.status.warning{background:#9a6700}
.verdict.not-confirmed,.status.critical{background:#cf222e} .status.unknown{background:#57606a}
details{border:1px solid #d0d7de;border-radius:6px;padding:.4em .8em;margin:.5em 0} summary{cursor:pointer;font-weight:600}
summary .name{color:#57606a;font-weight:400} h4{margin:.8em 0 .3em}
"""


def _png(fig, path=None) -> str:
    "The figure as base64 PNG (and written to `path` when given); the figure is closed."
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=90, bbox_inches='tight')
    plt.close(fig)
    data = buffer.getvalue()
    if path is not None: Path(path).write_bytes(data)
    return base64.b64encode(data).decode('ascii')


def _check_record(record, name='record') -> GradRecord:
    "`record` when it is a GradRecord with at least one recorded step; else a TypeError or ValueError naming `name`."
    if not isinstance(record, GradRecord):
        raise TypeError(f"`{name}` must be a GradRecord, got {type(record).__name__}")
    if not len(record): raise ValueError(f"`{name}` is empty: no step was recorded")
    return record


def _check_drawable(record, name='record') -> GradRecord:
    "`_check_record`, and not a merge of several ranks, whose figures would draw the ranks over each other."
    _check_record(record, name)
    if record.multi_rank:
        raise ValueError(f"`{name}` is a merge of several ranks, which one figure cannot show: give each rank's own "
                         "record (the records that were merged) as a run of its own")
    return record


def _check_records(records) -> dict:
    """`records` (a dict of run name (a non-empty str) -> GradRecord with at least one step, or one GradRecord,
    then named 'run') as a dict; else a TypeError or ValueError naming `records`."""
    if isinstance(records, GradRecord): records = {'run': records}
    if not isinstance(records, dict):
        raise TypeError(f"`records` must be a dict of run name -> GradRecord, got {type(records).__name__}")
    if not records: raise ValueError("`records` must hold at least one run, got an empty dict")
    for name, record in records.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"`records` must be keyed by run names (non-empty str), got the key {name!r}")
        _check_record(record, f'records[{name!r}]')
    return records


def _check_path(value, name, allow_none=False):
    "`value` as a Path (or None when `allow_none`); else a TypeError naming `name`."
    if value is None and allow_none: return None
    if not isinstance(value, (str, Path)):
        kind = 'a str or Path, or None' if allow_none else 'a str or Path'
        raise TypeError(f"`{name}` must be {kind}, got {type(value).__name__}")
    return Path(value)


def _safe_stem(name: str) -> str:
    "`name` for a file name: every character outside [A-Za-z0-9._ -] (path separators included) replaced with '_'."
    return re.sub(r'[^A-Za-z0-9._ -]', '_', name)


def _unique(stem: str, used: set, files) -> str:
    """`stem`, or `stem_2`, `stem_3`, ... the first whose file names `files(stem)` are all unused in `used`
    (compared case-insensitively, as on macOS and Windows); adds them to `used`."""
    candidate, k = stem, 1
    while any(f.lower() in used for f in files(candidate)):
        k += 1
        candidate = f'{stem}_{k}'
    used.update(f.lower() for f in files(candidate))
    return candidate


def run_figures(record: GradRecord, name: str, figures_dir=None) -> dict:
    """The figures of one run as base64 PNG, by section name (`heatmap`, `gradient_flow`, and `magnitude_hist` when
    the record keeps histograms); also written as `<figures_dir>/<name>_<section>.png` when `figures_dir` is given
    (the folder is created if needed; characters of `name` outside [A-Za-z0-9._ -], path separators included,
    become '_'). A merge of several ranks is refused (ValueError): draw each rank's own record."""
    _check_drawable(record)
    if not isinstance(name, str) or not name: raise TypeError(f"`name` must be a non-empty str, got {name!r}")
    figures_dir = _check_path(figures_dir, 'figures_dir', allow_none=True)
    if figures_dir is not None: figures_dir.mkdir(parents=True, exist_ok=True)
    stem = _safe_stem(name)
    figures = {}
    makers = {'heatmap': lambda: heatmap(record, 'grad_norm', weights_only=False).figure,
              'gradient_flow': lambda: gradient_flow(record).figure}
    if record.has_hist: makers['magnitude_hist'] = lambda: magnitude_hist(record).figure
    for section in _SECTIONS:
        if section not in makers: continue
        path = None if figures_dir is None else figures_dir/f'{stem}_{section}.png'
        figures[section] = _png(makers[section](), path)
    return figures


def overview(records: dict):
    """One row per run of `records` (a dict of run name -> GradRecord, or one GradRecord, named 'run'): steps
    recorded, first and last loss, peak total norm, and how many findings are critical and how many warnings."""
    records = _check_records(records)
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


class Comparison(tuple):
    """One entry of `write_report`'s `comparisons`: a tuple of two or more run names (it unpacks and compares as
    the plain tuple does) that also names the `metric` its figure compares (a column of the runs' `.df`)."""
    def __new__(cls, names, metric: str = 'grad_rms'):
        self = super().__new__(cls, names)
        self.metric = metric
        return self

    def __repr__(self): return f'Comparison({tuple(self)!r}, metric={self.metric!r})'


def _check_comparisons(comparisons, records) -> list:
    """`comparisons` as a list of `Comparison`s of run names of `records` (a plain tuple compares 'grad_rms'); else a
    TypeError or ValueError naming `comparisons`."""
    if comparisons is None: return [Comparison(tuple(records))] if len(records) > 1 else []
    expected = "`comparisons` must be a list of tuples of two or more run names"
    if not isinstance(comparisons, (list, tuple)):
        raise TypeError(f"{expected}, got {type(comparisons).__name__} {comparisons!r}")
    out = []
    for names in comparisons:
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise TypeError(f"{expected}, got the entry {names!r} (one comparison: put it in a list, [('a', 'b')])")
        if len(names) < 2: raise ValueError(f"{expected}, got the entry {tuple(names)!r}")
        unknown = [n for n in names if n not in records]
        if unknown: raise ValueError(f"`comparisons` names unknown run(s) {unknown}; the runs are {list(records)}")
        metric = getattr(names, 'metric', 'grad_rms')
        if not isinstance(metric, str):
            raise TypeError(f"`comparisons` entry {tuple(names)!r} has a `metric` that is not a column name: {metric!r}")
        lacking = [n for n in names if metric not in records[n].df.columns]
        if lacking: raise ValueError(f"`comparisons` entry {tuple(names)!r} compares {metric!r}, which run(s) {lacking} lack")
        out.append(Comparison(names, metric))
    return out


def write_report(records, out='report.html', comparisons=None, figures_dir=None,
                 title='Gradient statistics report', skipped=None, questions=None) -> Path:
    """Write one self-contained HTML report of `records` (a dict of run name -> GradRecord, or one GradRecord,
    named 'run') to `out` (a str or Path).

    It opens with `questions`, a list of `(Question, Answer)` pairs (`questions.answer(records)` gives them for the runs
    of `gradstats demo`; None or []: none): per question its source, the claim tested, the verdict (confirmed, partly
    confirmed, not confirmed) with the numbers behind it, and the figure that shows it. Then an overview (one row per
    run), the runs that could not be made (`skipped`, a dict of run name -> reason), and each run's details, folded
    (`<details>`), under its readable title (`record.args['title']`, else its name) with its verdict: claim, health
    summary and table, heatmap, gradient flow and, when the run keeps histograms, magnitude histogram. Last, folded too,
    one comparison figure per entry of `comparisons`, a list of tuples of two or more run names drawn together
    (default: all runs in one figure when there are several; `[]`: none), comparing `grad_rms`, or the `metric` of a
    `Comparison` entry (`Comparison(('a', 'b'), metric='dead_frac')`). Figures are embedded as base64 PNG, and also
    written to `figures_dir` when given, as `<name>_<section>.png`, `compare_<a>_vs_<b>.png` and
    `question_<source>.png`, where characters outside [A-Za-z0-9._ -] become '_' and a name whose files would clash
    with another's gets `_2`, `_3`, ...; the report shows the names as given. `title` heads the page. A merge of
    several ranks is refused (ValueError): give each rank's own record as a run. Returns the path written."""
    records = _check_records(records)
    for name, record in records.items(): _check_drawable(record, f'records[{name!r}]')
    comparisons = _check_comparisons(comparisons, records)
    out = _check_path(out, 'out')
    figures_dir = _check_path(figures_dir, 'figures_dir', allow_none=True)
    if not isinstance(title, str): raise TypeError(f"`title` must be a str, got {type(title).__name__}")
    skipped = {} if skipped is None else skipped
    if not isinstance(skipped, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in skipped.items()):
        raise TypeError(f"`skipped` must be a dict of run name -> reason (str), or None, got {skipped!r}")
    questions = _check_questions(questions)
    if out.exists() and out.is_dir(): raise ValueError(f"`out` {str(out)!r} is a directory; give a file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    if figures_dir is not None: figures_dir.mkdir(parents=True, exist_ok=True)
    used = set()   # figure file names taken, lower case
    stems = {name: _unique(_safe_stem(name), used, lambda s: [f'{s}_{section}.png' for section in _SECTIONS])
             for name in records}
    compare_stems = [_unique('compare_' + '_vs_'.join(stems[n] for n in names), used, lambda s: [f'{s}.png'])
                     for names in comparisons]
    question_stems = [_unique(f'question_{_safe_stem(q.source)}', used, lambda s: [f'{s}.png']) for q, _ in questions]
    with matplotlib.rc_context({'figure.max_open_warning': 0}):
        nav = ([('#questions', 'questions')] if questions else []) + [('#overview', 'overview'), ('#runs', 'runs')] + (
            [('#comparisons', 'comparisons')] if comparisons else [])
        parts = [f'<h1>{html.escape(title)}</h1>',
                 '<nav>' + ''.join(f'<a href="{href}">{label}</a>' for href, label in nav) + '</nav>']
        if questions:
            parts.append('<h2 id="questions">What the runs answer</h2>')
            for (question, found), stem in zip(questions, question_stems):
                path = None if figures_dir is None else figures_dir/f'{stem}.png'
                parts.append(_question_section(question, found, _png(found.figure, path)))
        parts += ['<h2 id="overview">Overview</h2>', _table(overview(records))]
        if skipped:
            parts.append('<h2 id="skipped">Skipped runs</h2><ul class="skipped">' + ''.join(
                f'<li><b>{html.escape(name)}</b>: {html.escape(reason)}</li>' for name, reason in skipped.items()) + '</ul>')
        parts.append('<h2 id="runs">The runs</h2>')
        for name, record in records.items():
            parts.append(_run_section(name, record, run_figures(record, stems[name], figures_dir)))
        if comparisons:
            parts.append('<h2 id="comparisons">Comparisons</h2>')
            for names, stem in zip(comparisons, compare_stems):
                label = ' vs '.join(names)
                fig = compare([records[n] for n in names], names.metric, labels=list(names))
                path = None if figures_dir is None else figures_dir/f'{stem}.png'
                parts.append(f'<details class="comparison"><summary>{html.escape(label)} ({html.escape(names.metric)})'
                             f'</summary><img alt="compare {html.escape(label)}" class="figure compare" '
                             f'src="data:image/png;base64,{_png(fig, path)}"></details>')
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<style>{_CSS}</style></head><body>{"".join(parts)}</body></html>')
    out.write_text(page, encoding='utf-8')
    return out


def _check_questions(questions) -> list:
    "`questions` as a list of (question, answer) pairs with what the report reads of them; else a TypeError naming it."
    if questions is None: return []
    needed = ('source', 'question', 'claim', 'runs')
    if not isinstance(questions, (list, tuple)) or not all(
            isinstance(pair, (list, tuple)) and len(pair) == 2 and all(hasattr(pair[0], k) for k in needed)
            and all(hasattr(pair[1], k) for k in ('verdict', 'numbers', 'figure')) for pair in questions):
        raise TypeError("`questions` must be a list of (Question, Answer) pairs, as `fastai_gradstats.questions.answer` "
                        f"returns, or None; got {questions!r}")
    return list(questions)


def _question_section(question, found, png) -> str:
    "One question: its source, the claim, the verdict with its numbers, and its figure."
    source = getattr(question, 'source_name', question.source)
    verdict = html.escape(found.verdict)
    return (f'<section class="question" id="question-{html.escape(question.source)}">'
            f'<h3>{html.escape(question.question)}</h3>'
            f'<p class="source">From the {html.escape(str(source))}.</p>'
            f'<p class="claim"><b>Claim tested:</b> {html.escape(question.claim)}</p>'
            f'<p class="answer"><span class="verdict {verdict.replace(" ", "-")}">{verdict}</span> '
            f'{html.escape(found.numbers)}</p>'
            f'<img alt="{html.escape(question.question)}" class="figure question" src="data:image/png;base64,{png}">'
            f'<p class="runs">Runs: {", ".join(html.escape(r) for r in question.runs)} (details below).</p></section>')


def _run_section(name, record, figures) -> str:
    "One run, folded: its title and verdict; inside, its claim, summary, health table and figures."
    from .health import verdict as run_verdict
    found = run_verdict(record)
    title = str(record.args.get('title') or name)
    status = found['status']
    heading = html.escape(title) + ('' if title == name else f' <span class="name">({html.escape(name)})</span>')
    if status not in ('healthy', 'unknown') and found['line']:  # the worst finding, by its check's name
        heading += f' <span class="why">&mdash; {html.escape(found["line"].split()[1].rstrip(":"))}</span>'
    parts = [f'<details class="run" id="run-{html.escape(name)}"><summary><span class="status {status}">'
             f'{html.escape(status)}</span> {heading}</summary>']
    claim = record.args.get('claim')
    if claim:
        source = record.args.get('source') or f'seed thread {record.args.get("seed_thread", "")}'
        parts.append(f'<p class="claim">{html.escape(str(claim))} (from the {html.escape(str(source))})</p>')
    parts.append(f'<h4>Summary</h4><pre class="summary">{html.escape(summary(record))}</pre>')
    parts.append('<h4>Health</h4>' + _table(health(record), classes_from='status'))
    for section, data in figures.items():
        parts.append(f'<h4>{_FIGURE_TITLES[section]}</h4><img alt="{html.escape(name)} {section}" '
                     f'class="figure {section}" src="data:image/png;base64,{data}">')
    return ''.join(parts) + '</details>'
