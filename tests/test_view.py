"""How a record shows itself (`fastai_gradstats.view`): its repr in a terminal and its HTML card in a notebook, with
the health verdict, the total-norm curve and the calls to go further; checked against the record's own tables, the
diagnosis, and, in a real kernel, the output Jupyter stores."""
import inspect
import re
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from fastai_gradstats import GradRecord, SAMPLE_STEPS, record_html
from fastai_gradstats.stats import METRICS

from helpers import InjectNonFinite, Repair, dead_unit_mlp, make_learner, small_dls, tiny_mlp


def fitted(model=None, cbs=(), lr=0.1, epochs=2):
    from fastai_gradstats import GradStats
    learn = make_learner(model or tiny_mlp(), small_dls(n_train=256, bs=16))
    learn.fit(epochs, lr, cbs=[GradStats(), *cbs])
    return learn.grad_stats


def test_the_repr_says_what_was_recorded_the_verdict_and_what_to_call():
    record = fitted()
    text = repr(record)
    lines = text.splitlines()
    steps = record.steps
    assert lines[0] == (f"GradRecord({len(steps)} steps from {steps['step'].iloc[0]} to {steps['step'].iloc[-1]}, "
                        f"{len(record.layers)} layers, {int(steps['skipped'].sum())} skipped)")
    verdict = record.verdict()
    word = 'healthy' if verdict['status'] == 'healthy' else verdict['status'].upper()
    assert lines[1].startswith(f"  health: {word}: ")
    norms = steps['grad_norm'].to_numpy()
    assert f"total norm: {norms.min():.3g} to {norms.max():.3g} (median {np.median(norms):.3g})" in lines[2]
    assert '.summary()' in lines[3] and '.plot_heatmap()' in lines[3]
    assert repr(GradRecord()) == 'GradRecord(no steps recorded, 0 layers)'


def test_the_html_card_holds_the_verdict_its_worst_finding_and_the_norm_curve():
    """NaN/Inf injected at steps 1 and 3: the card's verdict is critical and names nonfinite first, as summary() does;
    the curve has one red tick per step whose total norm is not finite, and one point per step for the rest."""
    record = fitted(dead_unit_mlp(), cbs=[InjectNonFinite(at={1, 3}), Repair()], epochs=1)
    card = record._repr_html_()
    assert card == record_html(record)
    status, = re.findall(r'class="gradstats-verdict" data-status="(\w+)"', card)
    assert status == 'critical' == record.verdict()['status']
    first = next(l.strip() for l in record.summary().splitlines()[1:] if l.strip().startswith('CRITICAL'))
    assert first.split(None, 1)[1][:40] in card.replace('&#x27;', "'")
    norms = record.steps['grad_norm'].to_numpy()
    ticks = re.findall(r'<line x1="([\d.]+)" y1="0"', card)
    assert len(ticks) == (~np.isfinite(norms)).sum() == 2   # 16 steps in a 240-pixel curve: a column each
    points = re.search(r'<polyline points="([^"]+)"', card).group(1).split()
    assert len(points) == np.isfinite(norms).sum()
    # y falls as log10(norm) rises: the highest point is the largest finite norm
    ys = np.array([float(p.split(',')[1]) for p in points])
    assert ys.argmin() == np.argmax(np.where(np.isfinite(norms), norms, -np.inf)[np.isfinite(norms)])
    assert '.summary()' in card and '<script' not in card and 'http' not in card.replace('http://www.w3.org/2000/svg', '')


def test_the_curve_of_a_long_run_draws_each_columns_range_and_median_of_its_finite_norms():
    """Of 1,000 steps in 240 columns (NaN/Inf at three steps and a run of twelve, a zero norm at one), each column's band spans the least
    and the largest finite log10 norm of its steps and its line passes through their median, computed here step by step."""
    from fastai_gradstats.view import CURVE_POINTS, _curve_svg
    rng = np.random.default_rng(1)
    norms = 10 ** rng.normal(0, 1, 1000)
    norms[[5, 500, 997]] = [np.nan, np.inf, np.nan]
    norms[7] = 0.0   # no log: left out of the band, as NaN/Inf are
    norms[600:612] = np.nan   # whole columns without a finite norm: no point there
    svg = _curve_svg(norms)
    columns = (np.arange(1000) * CURVE_POINTS) // 1000
    expected = {}
    for c in range(CURVE_POINTS):
        v = [np.log10(n) for n, col in zip(norms, columns) if col == c and np.isfinite(n) and n > 0]
        if v: expected[c] = (min(v), max(v), float(np.median(v)))
    lo = min(e[0] for e in expected.values()); hi = max(e[1] for e in expected.values())
    y = lambda v: 44 - 2 - (v - lo) * (44 - 4) / (hi - lo)
    line = [tuple(map(float, p.split(','))) for p in re.search(r'<polyline points="([^"]+)"', svg).group(1).split()]
    band = [tuple(map(float, p.split(','))) for p in re.search(r'<polygon points="([^"]+)"', svg).group(1).split()]
    assert [x for x, _ in line] == [c + 0.5 for c in sorted(expected)]
    np.testing.assert_allclose([v for _, v in line], [y(expected[c][2]) for c in sorted(expected)], atol=0.051)
    top, bottom = band[:len(expected)], band[len(expected):][::-1]
    np.testing.assert_allclose([v for _, v in top], [y(expected[c][1]) for c in sorted(expected)], atol=0.051)
    np.testing.assert_allclose([v for _, v in bottom], [y(expected[c][0]) for c in sorted(expected)], atol=0.051)
    ticks = re.findall(r'<line x1="([\d.]+)" y1="0"', svg)
    assert sorted(map(float, ticks)) == sorted(c + 0.5 for c in {columns[5], columns[500], columns[997], *columns[600:612]})


def long_record(n_steps, nan_at=(), n_layers=3):
    layers = [{'name': f'l{i}.weight', 'module': 'Linear', 'shape': (4, 4), 'numel': 16, 'depth': i} for i in range(n_layers)]
    record = GradRecord(layers)
    rng = np.random.default_rng(0)
    k = 1000
    for start in range(0, n_steps, k):
        values = rng.uniform(0.1, 1, (n_layers * k, len(METRICS))).astype(np.float32)
        counts = np.zeros((n_layers * k, 2), np.int64)
        for s in nan_at:
            if start <= s < start + k: values[n_layers * (s - start), 0] = np.nan; counts[n_layers * (s - start), 0] = 1
        steps = {'step': np.arange(start, start + k), 'epoch': np.zeros(k, int), 'lr': np.full(k, 1e-3),
                 'loss': np.geomspace(2.3, 0.1, n_steps)[start:start + k].astype(np.float32), 'skipped': np.zeros(k, bool)}
        record._extend(steps, np.full(k, n_layers), np.tile(record.layer_index([l['name'] for l in layers]), k), values,
                       counts)
    return record


@pytest.mark.parametrize('n_layers, sampled', [(80, 250), (400, 100)])
def test_a_long_record_of_many_tensors_is_diagnosed_on_fewer_steps(n_layers, sampled):
    """The sample is bounded to SAMPLE_ROWS (step, tensor) rows, and never below MIN_SAMPLE_STEPS steps: 20,000 / 80
    tensors = 250 steps; 20,000 / 400 = 50, so 100."""
    from fastai_gradstats.view import MIN_SAMPLE_STEPS, SAMPLE_ROWS
    assert (SAMPLE_ROWS, MIN_SAMPLE_STEPS) == (20_000, 100)
    record = long_record(3000, n_layers=n_layers)
    assert f"(diagnosed on {sampled} of its steps)" in repr(record)


def test_a_long_record_is_diagnosed_on_a_sample_that_keeps_every_nan_step():
    """20,000 steps: the view diagnoses SAMPLE_STEPS evenly spread steps plus the one NaN step (which the evenly spread
    ones miss), says so, and its verdict is the one health() gives on every step."""
    nan_step = 12_345
    record = long_record(20_000, nan_at=[nan_step])
    assert nan_step not in np.linspace(0, 19_999, SAMPLE_STEPS).round()
    text = repr(record)
    assert f"diagnosed on {SAMPLE_STEPS + 1} of its steps" in text
    assert 'CRITICAL: nonfinite' in text and f'step {nan_step}' in text
    full = record.health()
    assert full.iloc[0]['check'] == 'nonfinite' and full.iloc[0]['first_step'] == nan_step
    assert f'{SAMPLE_STEPS + 1} of its 20000 steps' in record._repr_html_()


def test_every_public_method_of_the_record_has_its_real_signature_and_docstring():
    record = fitted(epochs=1)
    for name in dir(GradRecord):
        if name.startswith('_') or isinstance(getattr(GradRecord, name), property): continue
        attribute = getattr(record, name)
        if not callable(attribute): continue
        signature = inspect.signature(attribute)
        assert not any(p.kind is p.VAR_POSITIONAL for p in signature.parameters.values()), (name, signature)
        assert attribute.__doc__, name
    assert list(inspect.signature(record.plot_heatmap).parameters)[:2] == ['metric', 'ax']
    assert list(inspect.signature(record.verdict).parameters) == ['thresholds']


def test_the_card_in_a_real_kernel(tmp_path):
    "A notebook whose last line is `learn.grad_stats`: the stored output holds text/html with the verdict, and text/plain."
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "from fastai.basics import *\nfrom fastai_gradstats import GradStats\nfrom fastai_gradstats.demo import digits_dls, mlp\n"
        "learn = Learner(digits_dls(n_train=256), mlp(1, 16), loss_func=CrossEntropyLossFlat())\n"
        "with learn.no_bar(), learn.no_logging(): learn.fit(1, 3e-3, cbs=GradStats())\nlearn.grad_stats")]
    NotebookClient(nb, timeout=300, kernel_name='python3', resources={'metadata': {'path': str(tmp_path)}}).execute()
    out, = [o for o in nb.cells[0].outputs if o.get('output_type') == 'execute_result']
    assert 'gradstats-verdict' in out['data']['text/html'] and 'data-status=' in out['data']['text/html']
    assert out['data']['text/plain'].startswith('GradRecord(4 steps from 0 to 3') and 'health:' in out['data']['text/plain']
