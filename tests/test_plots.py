"""Plots (issue 4): the picture holds the data.

Every array drawn (image data, bar heights, line data) is compared with one computed here
independently, from the raw gradients and weights captured during the fit or from the record's
tables with plain numpy; NaN/Inf cells are checked on the rendered pixels; every figure is saved
as PNG so that a broken renderer fails.
"""
import math
import warnings

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from fastai.basics import Adam, Callback, CrossEntropyLossFlat, DataLoaders, Learner, MSELossFlat, SGD, set_seed
from matplotlib.axes import Axes
from matplotlib.colors import to_rgb
from torch import nn

import fastai_gradstats
from fastai_gradstats import GradientAlert, GradRecord, GradStats, load, plots
from fastai_gradstats.demo import digits_dls, mlp
from helpers import Repair, digits, hist_counts
from fastai_gradstats.stats import HIST_BINS, METRICS

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


# --- helpers ---------------------------------------------------------------------------------
class Capture(Callback):
    """Keeps, for every optimizer step, the gradients and weights as the optimizer sees them (after
    backward) and the weights after the step, as float32 numpy arrays by parameter name."""
    order = GradStats.order + 0.2

    def before_fit(self):
        self.grads, self.before, self.after = [], [], []

    def after_backward(self):
        ps = list(self.learn.model.named_parameters())
        self.grads.append({n: p.grad.detach().cpu().numpy().copy() for n, p in ps if p.grad is not None})
        self.before.append({n: p.detach().cpu().numpy().copy() for n, p in ps})

    def after_step(self):
        self.after.append({n: p.detach().cpu().numpy().copy() for n, p in self.learn.model.named_parameters()})


def fit(model, dls, lr=1e-3, epochs=1, opt=Adam, loss=None, cbs=(), seed=0, **gradstats):
    set_seed(seed)
    learn = Learner(dls, model, loss_func=loss or CrossEntropyLossFlat(), opt_func=opt)
    cap = Capture()
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
        warnings.simplefilter('ignore', GradientAlert)
        learn.fit(epochs, lr, cbs=[GradStats(**{'hist': True, **gradstats}), cap, *cbs])   # histograms on: most plots here use them
    return learn, cap


def regression_dls(n=64, n_in=4, n_out=4, bs=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_in, generator=g)
    y = torch.randn(n, n_out, generator=g)
    set_seed(seed)   # the DataLoader draws its shuffling seed when it is made
    return DataLoaders.from_dsets(list(zip(x, y)), list(zip(x[:bs], y[:bs])), bs=bs, device=torch.device('cpu'))


def depth_order(record):
    "Layer names from input to output, from the layer table."
    return list(record.layers.sort_values('depth')['name'])


def pivot(record, column, names=None):
    "layer x step array of a df column, built with numpy (rows in depth order)."
    df = record.df
    names = depth_order(record) if names is None else names
    steps = np.unique(df['step'].to_numpy())
    out = np.full((len(names), len(steps)), np.nan)
    layer = df['layer'].astype(str).to_numpy()
    values = df[column].to_numpy(float)
    step_pos = {s: j for j, s in enumerate(steps)}
    name_pos = {n: i for i, n in enumerate(names)}
    for l, s, v in zip(layer, df['step'].to_numpy(), values):
        if l in name_pos: out[name_pos[l], step_pos[s]] = v
    return out, steps


def image_values(image):
    "The image's data with masked cells as NaN."
    arr = image.get_array()
    return np.ma.filled(np.ma.asarray(arr).astype(float), np.nan)


def save_png(fig, tmp_path, name):
    path = tmp_path/f'{name}.png'
    fig.savefig(path)
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
    plt.close(fig)
    return path


def pixel(fig, ax, x, y):
    "RGB colour (0-1) of the rendered pixel at data coordinates (x, y) of `ax`."
    fig.canvas.draw()
    buf = np.asarray(fig.canvas.buffer_rgba())
    px, py = ax.transData.transform((x, y))
    return buf[int(round(buf.shape[0] - py)), int(round(px)), :3] / 255.0


def check_heatmap_image(ax, expected, steps, log):
    image = ax.images[0]
    drawn = image_values(image)
    assert drawn.shape == expected.shape
    hidden = ~np.isfinite(expected) | ((expected <= 0) if log else False)
    assert np.array_equal(np.ma.getmaskarray(image.get_array()), hidden)
    np.testing.assert_allclose(drawn[~hidden], expected[~hidden], rtol=1e-6)
    # column j is centred on step j, row i on i (input at the top)
    x0, x1, bottom, top = image.get_extent()
    width = (x1 - x0) / len(steps)
    np.testing.assert_allclose(x0 + width * (np.arange(len(steps)) + 0.5), steps)
    assert (top, bottom) == (-0.5, len(expected) - 0.5)


# --- fixtures --------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def close_figures():
    plt.close('all')
    yield
    plt.close('all')


@pytest.fixture(scope='module')
def run():
    "A real fit on the digits with exact histograms and the update ratio."
    learn, cap = fit(mlp(2, 32), digits(n_train=256), lr=3e-3, epochs=2, hist=True, hist_sample=None,
                     update_ratio=True)
    return learn.grad_stats, cap


@pytest.fixture(scope='module')
def run2():
    "A second fit of the same architecture (other seed and learning rate), for comparisons."
    learn, cap = fit(mlp(2, 32), digits(n_train=256), lr=1e-2, epochs=1, seed=1)
    return learn.grad_stats, cap


@pytest.fixture(scope='module')
def saved(run, tmp_path_factory):
    record, _ = run
    return load(record.save(tmp_path_factory.mktemp('run')/'saved'))


class InjectNonfinite(Callback):
    "Puts NaN into the output bias gradient at step 1 and +Inf into one input weight element at step 3."
    order = GradStats.order - 0.3

    def before_fit(self): self.n = 0

    def after_backward(self):
        m = self.learn.model
        if self.n == 1: m[-1].bias.grad.fill_(float('nan'))
        if self.n == 3: m[0].weight.grad[0, 0] = float('inf')
        self.n += 1


@pytest.fixture(scope='module')
def nonfinite_run():
    learn, cap = fit(mlp(1, 16), digits(n_train=192), lr=1e-3, epochs=2, cbs=[InjectNonfinite(), Repair()],
                     hist=True, hist_sample=None)
    return learn.grad_stats, cap


# --- heatmap ---------------------------------------------------------------------------------
@pytest.mark.parametrize('metric', ['grad_norm', 'grad_param_ratio', 'zero_frac', 'grad_mean'])
def test_heatmap_draws_the_layer_step_table(run, metric, tmp_path):
    record, cap = run
    names = depth_order(record)
    if metric == 'grad_norm':   # recomputed from the raw gradients in float64
        expected = np.array([[np.linalg.norm(g[n].astype(np.float64)) for g in cap.grads] for n in names])
        steps = np.arange(len(cap.grads))
        assert list(record.steps['step']) == list(steps)
    else:
        expected, steps = pivot(record, metric)
    ax = plots.heatmap(record, metric)
    log = isinstance(ax.images[0].norm, matplotlib.colors.LogNorm)
    finite = expected[np.isfinite(expected)]
    if (finite > 0).all():   # a positive metric: log colours exactly when it spans two decades
        assert log == (finite.max() / finite.min() >= 100)
    check_heatmap_image(ax, expected, steps, log)
    assert [t.get_text() for t in ax.get_yticklabels()] == names
    assert metric in ax.figure.axes[-1].get_ylabel()   # the labelled colour bar
    save_png(ax.figure, tmp_path, metric)


def test_heatmap_log_scale_spans_the_data(run):
    record, cap = run
    ax = plots.heatmap(record, 'grad_norm', log=True)
    norm = ax.images[0].norm
    values = np.array([[np.linalg.norm(g[n].astype(np.float64)) for g in cap.grads] for n in depth_order(record)])
    assert isinstance(norm, matplotlib.colors.LogNorm)
    np.testing.assert_allclose([norm.vmin, norm.vmax], [values.min(), values.max()], rtol=1e-5)
    plt.close(ax.figure)
    ax = plots.heatmap(record, 'grad_norm', log=False)
    assert not isinstance(ax.images[0].norm, matplotlib.colors.LogNorm)
    plt.close(ax.figure)


def test_heatmap_weights_only_and_by_module(run, tmp_path):
    record, cap = run
    names = depth_order(record)
    weights = [n for n in names if n.endswith('weight')]
    ax = plots.heatmap(record, 'grad_norm', weights_only=True)
    expected = np.array([[np.linalg.norm(g[n].astype(np.float64)) for g in cap.grads] for n in weights])
    check_heatmap_image(ax, expected, np.arange(len(cap.grads)), log=True)
    assert [t.get_text() for t in ax.get_yticklabels()] == weights
    save_png(ax.figure, tmp_path, 'weights_only')

    modules = list(dict.fromkeys(n.rsplit('.', 1)[0] for n in names))
    expected = np.array([[math.sqrt(sum(float((g[n].astype(np.float64) ** 2).sum()) for n in g if n.rsplit('.', 1)[0] == m))
                          for g in cap.grads] for m in modules])
    ax = plots.heatmap(record, 'grad_norm', by_module=True)
    check_heatmap_image(ax, expected, np.arange(len(cap.grads)), log=True)
    assert [t.get_text() for t in ax.get_yticklabels()] == modules
    save_png(ax.figure, tmp_path, 'by_module')

    # a module's row holds its weight and bias together, so keeping only weights cannot apply to it
    with pytest.raises(ValueError, match='weights_only.*by_module'):
        plots.heatmap(record, 'grad_norm', weights_only=True, by_module=True)
    with pytest.raises(ValueError, match='weights_only.*by_module'):
        plots.metric_table(record, 'grad_norm', weights_only=True, by_module=True)


def test_heatmap_dead_frac_leaves_out_the_layers_without_units(run, tmp_path):
    "dead_frac is NaN by definition for 1-D tensors (biases): their rows are left out, not painted as NaN gradients."
    record, _ = run
    shapes = dict(zip(record.layers['name'], record.layers['shape']))
    with_units = [n for n in depth_order(record) if len(shapes[n]) >= 2]
    assert len(with_units) < len(record.layers)
    expected, steps = pivot(record, 'dead_frac', with_units)
    assert np.isfinite(expected).all()
    ax = plots.heatmap(record, 'dead_frac')
    check_heatmap_image(ax, expected, steps, log=False)
    assert [t.get_text() for t in ax.get_yticklabels()] == with_units
    assert len(ax.images) == 1 and ax.get_legend() is None   # no cell is called NaN
    assert list(plots.metric_table(record, 'dead_frac').index) == with_units
    save_png(ax.figure, tmp_path, 'dead_frac')


def test_heatmap_dead_frac_nan_cells_in_the_nan_colour(tmp_path):
    "A weight whose dead_frac is NaN at one step keeps its row, that cell in the NaN colour; a record of biases only is refused."
    dead = METRICS.index('dead_frac')
    record = GradRecord([{'name': 'a.weight', 'module': 'Linear', 'shape': (2, 2), 'numel': 4, 'depth': 0},
                         {'name': 'a.bias', 'module': 'Linear', 'shape': (2,), 'numel': 2, 'depth': 1}])
    for step, weight_dead in enumerate([0.25, 0.5, 0.0, np.nan]):
        values = np.full((2, len(METRICS)), 0.5)
        values[:, dead] = [weight_dead, np.nan]   # a 1-D tensor has no units: NaN
        record.add_step(step, 0, 1e-3, 1.0, record.layer_index(['a.weight', 'a.bias']), values)
    df = record.df
    dead_frac = df['dead_frac'].to_numpy(float)
    weight = (df['layer'].astype(str) == 'a.weight').to_numpy()
    assert np.isfinite(dead_frac[weight][:3]).all() and np.isnan(dead_frac[weight][3])
    ax = plots.heatmap(record, 'dead_frac')
    assert [t.get_text() for t in ax.get_yticklabels()] == ['a.weight']   # a.bias is NaN at every step
    special = np.ma.asarray(ax.images[1].get_array())
    assert special.shape == (1, 4) and list(np.ma.getmaskarray(special)[0]) == [True, True, True, False]
    np.testing.assert_allclose(pixel(ax.figure, ax, 3, 0), to_rgb(plots.SPECIAL_COLORS['nan']), atol=2 / 255)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ['NaN']
    save_png(ax.figure, tmp_path, 'dead_frac_nan')
    biases = GradRecord([{'name': 'a.bias', 'module': 'Linear', 'shape': (2,), 'numel': 2, 'depth': 0}])
    values = np.full((1, len(METRICS)), 0.5)
    values[:, dead] = np.nan   # as recorded for a 1-D tensor
    for step in (0, 1): biases.add_step(step, 0, 1e-3, 1.0, biases.layer_index(['a.bias']), values)
    with pytest.raises(ValueError, match='dead_frac'): plots.heatmap(biases, 'dead_frac')


def test_heatmap_nan_and_inf_gradients(nonfinite_run, tmp_path):
    record, cap = nonfinite_run
    names = depth_order(record)
    expected = np.array([[np.linalg.norm(g[n].astype(np.float64)) for g in cap.grads] for n in names])
    nan_cells = np.argwhere(np.isnan(expected))
    inf_cells = np.argwhere(np.isinf(expected))
    out_bias, in_weight = names.index('2.bias'), names.index('0.weight')
    assert {tuple(c) for c in nan_cells} == {(out_bias, 1)} and {tuple(c) for c in inf_cells} == {(in_weight, 3)}
    ax = plots.heatmap(record, 'grad_norm')
    check_heatmap_image(ax, expected, np.arange(len(cap.grads)), log=True)
    special = np.ma.asarray(ax.images[1].get_array())
    assert special[out_bias, 1] == 1 and special[in_weight, 3] == 2
    np.testing.assert_allclose(pixel(ax.figure, ax, 1, out_bias), to_rgb(plots.SPECIAL_COLORS['nan']), atol=2 / 255)
    np.testing.assert_allclose(pixel(ax.figure, ax, 3, in_weight), to_rgb(plots.SPECIAL_COLORS['inf']), atol=2 / 255)
    assert {'NaN', 'Inf'} <= {t.get_text() for t in ax.get_legend().get_texts()}
    save_png(ax.figure, tmp_path, 'nonfinite')
    # and the record counted them
    df = record.df
    row = df[(df['step'] == 1) & (df['layer'].astype(str) == '2.bias')]
    assert int(row['n_nan'].iloc[0]) == int(np.isnan(cap.grads[1]['2.bias']).sum()) == cap.grads[1]['2.bias'].size
    row = df[(df['step'] == 3) & (df['layer'].astype(str) == '0.weight')]
    assert int(row['n_inf'].iloc[0]) == 1


def test_heatmap_zero_cells_on_a_log_scale(tmp_path):
    "An exact zero cannot be drawn on a log scale: it is drawn in the zero colour."
    layers = [{'name': f'{i}.weight', 'module': 'Linear', 'shape': (2, 2), 'numel': 4, 'depth': i} for i in range(2)]
    record = GradRecord(layers)
    idx = record.layer_index(['0.weight', '1.weight'])
    for step, norms in enumerate([(1e-3, 1.0), (0.0, 2.0), (1e-2, 10.0)]):
        values = np.full((2, len(METRICS)), 0.5)
        values[:, METRICS.index('grad_norm')] = norms
        record.add_step(step, 0, 1e-3, 1.0, idx, values)
    ax = plots.heatmap(record, 'grad_norm')
    assert isinstance(ax.images[0].norm, matplotlib.colors.LogNorm)
    expected = np.array([[1e-3, 0.0, 1e-2], [1.0, 2.0, 10.0]])
    check_heatmap_image(ax, expected, np.arange(3), log=True)
    np.testing.assert_allclose(pixel(ax.figure, ax, 1, 0), to_rgb(plots.SPECIAL_COLORS['zero']), atol=2 / 255)
    save_png(ax.figure, tmp_path, 'zero')


# --- magnitude histogram ---------------------------------------------------------------------
def test_gradstats_hist_counts_every_element(run):
    record, cap = run
    hist = record.hist
    assert len(hist) == len(record.df)
    for step, grads in enumerate(cap.grads):
        for name, g in grads.items():
            row = hist[(hist['step'] == step) & (hist['layer'].astype(str) == name)]
            assert len(row) == 1
            np.testing.assert_array_equal(row[list(HIST_BINS)].to_numpy(np.int64)[0], hist_counts(g), err_msg=f'{name} step {step}')


def test_gradstats_hist_counts_nan_and_inf(nonfinite_run):
    record, cap = nonfinite_run
    hist = record.hist
    for step, grads in enumerate(cap.grads):
        for name, g in grads.items():
            row = hist[(hist['step'] == step) & (hist['layer'].astype(str) == name)]
            np.testing.assert_array_equal(row[list(HIST_BINS)].to_numpy(np.int64)[0], hist_counts(g))
    assert hist.loc[(hist['step'] == 1) & (hist['layer'].astype(str) == '2.bias'), 'nan'].iloc[0] == 10
    assert hist.loc[(hist['step'] == 3) & (hist['layer'].astype(str) == '0.weight'), 'inf'].iloc[0] == 1


def test_gradstats_hist_with_tensors_smaller_than_the_sample():
    "The default sample (2048) is larger than every tensor here, so the counts are exact."
    learn, cap = fit(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)), regression_dls(), loss=MSELossFlat(),
                     epochs=2)
    record = learn.grad_stats
    assert record.args['hist_sample'] == 2048
    for step, grads in enumerate(cap.grads):
        for name, g in grads.items():
            row = record.hist[(record.hist['step'] == step) & (record.hist['layer'].astype(str) == name)]
            np.testing.assert_array_equal(row[list(HIST_BINS)].to_numpy(np.int64)[0], hist_counts(g))


def expected_fractions(record, layer=None):
    "bins x steps fractions of all gradient elements: each layer's (sampled) counts scaled to its numel."
    hist = record.hist
    numel = dict(zip(record.layers['name'], record.layers['numel']))
    steps = np.unique(hist['step'])
    out = np.zeros((len(HIST_BINS), len(steps)))
    for j, s in enumerate(steps):
        rows = hist[hist['step'] == s]
        total = 0.0
        for _, r in rows.iterrows():
            name = str(r['layer'])
            if layer is not None and name != layer: continue
            c = r[list(HIST_BINS)].to_numpy(float)
            out[:, j] += numel[name] * c / c.sum()
            total += numel[name]
        out[:, j] /= total
    return out, steps


def check_hist_image(ax, expected):
    image = ax.images[0]
    drawn = image_values(image)
    assert drawn.shape == expected.shape
    assert np.array_equal(np.ma.getmaskarray(image.get_array()), ~(expected > 0))
    np.testing.assert_allclose(drawn[expected > 0], expected[expected > 0], rtol=1e-9)


def test_magnitude_hist_draws_element_fractions(run, tmp_path):
    record, cap = run
    # from the raw gradients: fraction of all elements in each bin at each step
    expected = np.stack([sum(hist_counts(g) for g in grads.values()) / sum(g.size for g in grads.values())
                         for grads in cap.grads], axis=1)
    ax = plots.magnitude_hist(record)
    check_hist_image(ax, expected)
    assert ax.images[0].origin == 'lower'   # row 0 (zero) at the bottom
    one = [l for l in ax.lines if l.get_label() == '|g| = 1']
    assert len(one) == 1 and np.allclose(one[0].get_ydata(), HIST_BINS.index('1e0') - 0.5)
    save_png(ax.figure, tmp_path, 'hist')


def test_magnitude_hist_of_one_layer(run, tmp_path):
    record, cap = run
    expected = np.stack([hist_counts(grads['0.weight']) / grads['0.weight'].size for grads in cap.grads], axis=1)
    ax = plots.magnitude_hist(record, layer='0.weight')
    check_hist_image(ax, expected)
    assert '0.weight' in ax.get_title()
    save_png(ax.figure, tmp_path, 'hist_layer')


def test_magnitude_hist_scales_sampled_counts_to_numel(tmp_path):
    learn, cap = fit(mlp(1, 32), digits(n_train=128), epochs=1, hist_sample=100)
    record = learn.grad_stats
    counted = record.hist[list(HIST_BINS)].sum(axis=1).to_numpy()
    numel = record.layers.set_index('name').loc[record.hist['layer'].astype(str), 'numel'].to_numpy()
    np.testing.assert_array_equal(counted, np.minimum(numel, 100))
    for step, grads in enumerate(cap.grads):   # the tensors below the sample size are counted exactly
        for name, g in grads.items():
            if g.size <= 100:
                row = record.hist[(record.hist['step'] == step) & (record.hist['layer'].astype(str) == name)]
                np.testing.assert_array_equal(row[list(HIST_BINS)].to_numpy(np.int64)[0], hist_counts(g))
    expected, _ = expected_fractions(record)
    ax = plots.magnitude_hist(record)
    check_hist_image(ax, expected)
    save_png(ax.figure, tmp_path, 'sampled')


def test_magnitude_hist_on_the_bare_hist_frame(run, tmp_path):
    record, _ = run
    ax = plots.magnitude_hist(record.hist)
    expected, _ = expected_fractions(record)
    check_hist_image(ax, expected)
    save_png(ax.figure, tmp_path, 'hist_df')


# --- gradient flow ---------------------------------------------------------------------------
def flow_expected(record, cap, steps, names):
    rms = [np.mean([np.linalg.norm(cap.grads[s][n].astype(np.float64)) / math.sqrt(cap.grads[s][n].size) for s in steps])
           for n in names]
    mx = [max(np.abs(cap.grads[s][n]).max() for s in steps) for n in names]
    return np.array(rms), np.array(mx)


def bars(ax, label):
    container = [c for c in ax.containers if c.get_label() == label]
    assert len(container) == 1
    return np.array([p.get_height() for p in container[0].patches])


@pytest.mark.parametrize('which', ['all', 'step', 'window'])
def test_gradient_flow_bar_heights(run, which, tmp_path):
    record, cap = run
    names = depth_order(record)
    n = len(cap.grads)
    kwargs, steps = {'all': ({}, range(n)), 'step': ({'step': 3}, [3]), 'window': ({'steps': (2, 5)}, range(2, 6))}[which]
    rms, mx = flow_expected(record, cap, steps, names)
    ax = plots.gradient_flow(record, **kwargs)
    np.testing.assert_allclose(bars(ax, 'rms |g|'), rms, rtol=1e-5)
    np.testing.assert_allclose(bars(ax, 'max |g|'), mx, rtol=1e-6)
    assert [t.get_text() for t in ax.get_xticklabels()] == names
    assert ax.get_yscale() == 'log'
    save_png(ax.figure, tmp_path, which)


def test_gradient_flow_weights_only(run, tmp_path):
    record, cap = run
    weights = [n for n in depth_order(record) if n.endswith('weight')]
    rms, mx = flow_expected(record, cap, range(len(cap.grads)), weights)
    ax = plots.gradient_flow(record, weights_only=True)
    np.testing.assert_allclose(bars(ax, 'rms |g|'), rms, rtol=1e-5)
    np.testing.assert_allclose(bars(ax, 'max |g|'), mx, rtol=1e-6)
    save_png(ax.figure, tmp_path, 'flow_w')


def test_gradient_flow_bad_step(run):
    record, _ = run
    with pytest.raises(ValueError, match='999'):
        plots.gradient_flow(record, step=999)


# --- curves ----------------------------------------------------------------------------------
def test_layer_curves_line_data(run, tmp_path):
    record, cap = run
    layers = ['2.weight', '0.weight']
    ax = plots.layer_curves(record, layers=layers, metrics='grad_norm')
    assert [l.get_label() for l in ax.lines] == ['0.weight', '2.weight']   # input to output
    for line in ax.lines:
        np.testing.assert_array_equal(line.get_xdata(), np.arange(len(cap.grads)))
        expected = [np.linalg.norm(g[line.get_label()].astype(np.float64)) for g in cap.grads]
        np.testing.assert_allclose(line.get_ydata(), expected, rtol=1e-5)
    save_png(ax.figure, tmp_path, 'curves')


def test_layer_curves_several_metrics(run, tmp_path):
    record, cap = run
    fig = plots.layer_curves(record, metrics=['grad_max', 'zero_frac'])
    assert isinstance(fig, matplotlib.figure.Figure) and len(fig.axes) == 2
    names = depth_order(record)
    for ax, metric in zip(fig.axes, ['grad_max', 'zero_frac']):
        assert ax.get_ylabel() == metric
        assert [l.get_label() for l in ax.lines] == names
        for line in ax.lines:
            g = [c[line.get_label()] for c in cap.grads]
            expected = [np.abs(x).max() for x in g] if metric == 'grad_max' else [np.mean(x == 0) for x in g]
            np.testing.assert_allclose(line.get_ydata(), expected, rtol=1e-6)
    save_png(fig, tmp_path, 'curves2')
    with pytest.raises(ValueError):
        plots.layer_curves(record, metrics=['grad_max', 'zero_frac'], ax=plt.subplots()[1])
    plt.close('all')


def test_layer_curves_unknown_layer(run):
    record, _ = run
    with pytest.raises(ValueError, match=r"nope") as e:
        plots.layer_curves(record, layers=['nope'])
    assert all(n in str(e.value) for n in depth_order(record))


def test_gradstats_update_ratio_column(run):
    "update_ratio equals ||w_after - w_before|| / ||w_before|| of weights captured around each step."
    record, cap = run
    df = record.df
    assert len(cap.before) == len(cap.after) == len(record)
    for step, (before, after) in enumerate(zip(cap.before, cap.after)):
        for name in before:
            b, a = before[name].astype(np.float64), after[name].astype(np.float64)
            expected = np.linalg.norm(a - b) / np.linalg.norm(b)
            got = df.loc[(df['step'] == step) & (df['layer'].astype(str) == name), 'update_ratio'].iloc[0]
            np.testing.assert_allclose(got, expected, rtol=1e-4, err_msg=f'{name} step {step}')


def test_update_ratio_plot(run, tmp_path):
    record, cap = run
    ax = plots.update_ratio(record)
    names = depth_order(record)
    layer_lines = [l for l in ax.lines if l.get_label() in names]
    assert [l.get_label() for l in layer_lines] == names
    for line in layer_lines:
        n = line.get_label()
        expected = [np.linalg.norm(a[n].astype(np.float64) - b[n]) / np.linalg.norm(b[n].astype(np.float64))
                    for b, a in zip(cap.before, cap.after)]
        np.testing.assert_array_equal(line.get_xdata(), np.arange(len(cap.before)))
        np.testing.assert_allclose(line.get_ydata(), expected, rtol=1e-4)
    assert ax.get_yscale() == 'log'
    assert any(l.get_label() not in names and np.allclose(l.get_ydata(), 1e-3) for l in ax.lines)  # the 1e-3 line
    save_png(ax.figure, tmp_path, 'update')


def test_update_ratio_plot_needs_the_column(run2):
    record, _ = run2
    with pytest.raises(ValueError, match='update_ratio'):
        plots.update_ratio(record)


# --- comparing runs --------------------------------------------------------------------------
def test_compare_line_data(run, run2, tmp_path):
    (r1, c1), (r2, c2) = run, run2
    fig = plots.compare([r1, r2], labels=['a', 'b'])
    assert isinstance(fig, matplotlib.figure.Figure) and len(fig.axes) == 3
    weights = [n for n in depth_order(r1) if n.endswith('weight')]
    for cap, label in ((c1, 'a'), (c2, 'b')):
        rms = np.array([[np.linalg.norm(g[n].astype(np.float64)) / math.sqrt(g[n].size) for g in cap.grads] for n in weights])
        mean = [l for l in fig.axes[0].lines if l.get_label() == label][0]
        median = [l for l in fig.axes[1].lines if l.get_label() == label][0]
        np.testing.assert_allclose(mean.get_ydata(), rms.mean(1), rtol=1e-5)
        np.testing.assert_allclose(median.get_ydata(), np.median(rms, 1), rtol=1e-5)
        every = np.array([[np.linalg.norm(g[n].astype(np.float64)) / math.sqrt(g[n].size) for n in g] for g in cap.grads])
        across = [l for l in fig.axes[2].lines if l.get_label() == label][0]
        np.testing.assert_array_equal(across.get_xdata(), np.arange(len(cap.grads)))
        np.testing.assert_allclose(across.get_ydata(), np.median(every, 1), rtol=1e-5)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == weights
    save_png(fig, tmp_path, 'compare')


def test_compare_aligns_different_architectures_by_position(run, tmp_path):
    r1, c1 = run
    learn, c3 = fit(nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)), digits(n_train=128), epochs=1)
    r3 = learn.grad_stats
    fig = plots.compare([r1, r3], labels=['mlp', 'small'])
    w1 = [n for n in depth_order(r1) if n.endswith('weight')]
    w3 = [n for n in depth_order(r3) if n.endswith('weight')]
    assert len(w3) < len(w1)
    for cap, names, label in ((c1, w1, 'mlp'), (c3, w3, 'small')):
        mean = [l for l in fig.axes[0].lines if l.get_label() == label][0]
        expected = [np.mean([np.linalg.norm(g[w].astype(np.float64)) / math.sqrt(g[w].size) for g in cap.grads]) for w in names]
        # every layer of the deeper run is kept; the shallower one's missing layers are NaN
        assert len(mean.get_ydata()) == len(w1)
        np.testing.assert_allclose(mean.get_ydata()[:len(names)], expected, rtol=1e-5)
        assert np.isnan(mean.get_ydata()[len(names):]).all()
    save_png(fig, tmp_path, 'compare_arch')


def test_compare_table_weights_only_needs_weights_in_every_run(run):
    "A run without weights keeps all its layers, and then so do the others: a weight never lines up with a bias."
    r1, c1 = run
    df = r1.df
    no_weights = df[~df['layer'].astype(str).str.endswith('weight')].copy()
    no_weights['layer'] = no_weights['layer'].astype(str).str.replace('bias', 'shift')
    table = plots.compare_table([r1, no_weights], metric='grad_norm', labels=['a', 'b'])
    names = depth_order(r1)
    shifts = [n for n in names if n.endswith('bias')]
    assert len(table) == len(names)
    expected = [np.mean([np.linalg.norm(g[n].astype(np.float64)) for g in c1.grads]) for n in names]
    np.testing.assert_allclose(table[('a', 'mean')].to_numpy(float), expected, rtol=1e-5)
    expected = [np.mean([np.linalg.norm(g[n].astype(np.float64)) for g in c1.grads]) for n in shifts]
    np.testing.assert_allclose(table[('b', 'mean')].to_numpy(float)[:len(shifts)], expected, rtol=1e-5)
    assert np.isnan(table[('b', 'mean')].to_numpy(float)[len(shifts):]).all()


def test_compare_needs_two_runs(run):
    record, _ = run
    with pytest.raises(ValueError):
        plots.compare([record])


# --- one step, one layer, many layers --------------------------------------------------------
def render_all(record, tmp_path, prefix):
    for name, make in [('heatmap', lambda: plots.heatmap(record).figure),
                       ('hist', lambda: plots.magnitude_hist(record).figure),
                       ('flow', lambda: plots.gradient_flow(record).figure),
                       ('curves', lambda: plots.layer_curves(record).figure)]:
        save_png(make(), tmp_path, f'{prefix}_{name}')


def test_one_step_renders(tmp_path):
    learn, cap = fit(mlp(1, 8, n_in=4, n_out=4), regression_dls(n=32, bs=32), loss=MSELossFlat(), epochs=1)
    record = learn.grad_stats
    assert len(record) == 1
    ax = plots.heatmap(record)
    expected = np.array([[np.linalg.norm(cap.grads[0][n].astype(np.float64))] for n in depth_order(record)])
    check_heatmap_image(ax, expected, np.array([0]), log=ax.images[0].norm.__class__ is matplotlib.colors.LogNorm)
    plt.close(ax.figure)
    render_all(record, tmp_path, 'one_step')


def test_one_layer_renders(tmp_path):
    learn, cap = fit(nn.Linear(4, 4, bias=False), regression_dls(), loss=MSELossFlat(), epochs=2)
    record = learn.grad_stats
    assert list(record.layers['name']) == ['weight']
    ax = plots.heatmap(record)
    expected = np.array([[np.linalg.norm(g['weight'].astype(np.float64)) for g in cap.grads]])
    check_heatmap_image(ax, expected, np.arange(len(cap.grads)),
                        log=ax.images[0].norm.__class__ is matplotlib.colors.LogNorm)
    plt.close(ax.figure)
    render_all(record, tmp_path, 'one_layer')


def test_many_layers_render(tmp_path):
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(110)])
    with torch.no_grad():   # identity layers: gradients keep their size through the 110 layers
        for m in model: nn.init.eye_(m.weight); nn.init.zeros_(m.bias)
    learn, cap = fit(model, regression_dls(), loss=MSELossFlat(), lr=1e-4, epochs=1)
    record = learn.grad_stats
    names = depth_order(record)
    assert len(names) == 220
    assert names[:2] == ['0.weight', '0.bias'] and names[-1] == '109.bias'
    ax = plots.heatmap(record)
    expected = np.array([[np.linalg.norm(g[n].astype(np.float64)) for g in cap.grads] for n in names])
    check_heatmap_image(ax, expected, np.arange(len(cap.grads)),
                        log=ax.images[0].norm.__class__ is matplotlib.colors.LogNorm)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert 1 < len(labels) <= plots.MAX_LAYER_LABELS   # readable: a subset of labels, in depth order ...
    ticks = ax.get_yticks()
    assert labels == [names[int(t)] for t in ticks]
    _, boxes, sizes = text_boxes(ax, 'y')            # ... that do not overlap
    assert min(sizes) >= 7 and all(a.y0 >= b.y1 or b.y0 >= a.y1 for a, b in zip(boxes, boxes[1:]))
    save_png(ax.figure, tmp_path, 'many_heatmap')
    render_all(record, tmp_path, 'many')


@pytest.mark.parametrize('scale', [1e-30, 1e25], ids=['tiny', 'huge'])
def test_heatmap_shows_the_size_of_tiny_and_huge_gradients(scale, tmp_path):
    """Vanishing gradients of 1e-30 are not zero, and finite gradients of 1e25 are not infinite: the heatmap
    (and the record) must show their norm, which float32 holds (1.2e-38 to 3.4e38)."""
    mse = MSELossFlat()
    learn, cap = fit(nn.Linear(4, 4), regression_dls(), loss=lambda out, y: mse(out, y) * scale, epochs=1)
    record = learn.grad_stats
    names = depth_order(record)
    expected = np.array([[np.linalg.norm(g[n].astype(np.float64)) for g in cap.grads] for n in names])
    assert np.isfinite(expected).all() and (expected > 0).all()
    assert all(np.isfinite(g[n]).all() for g in cap.grads for n in g)
    ax = plots.heatmap(record, 'grad_norm')
    drawn = image_values(ax.images[0])
    np.testing.assert_allclose(drawn, expected, rtol=1e-4)
    save_png(ax.figure, tmp_path, 'scale')


# --- record methods, loaded records, bare DataFrames -----------------------------------------
def test_record_methods_are_the_plot_functions(run, tmp_path):
    record, _ = run
    pairs = [(record.plot_heatmap('grad_param_ratio'), plots.heatmap(record, 'grad_param_ratio')),
             (record.plot_magnitude_hist(layer='2.weight'), plots.magnitude_hist(record, layer='2.weight'))]
    for a, b in pairs:
        np.testing.assert_array_equal(image_values(a.images[0]), image_values(b.images[0]))
    a, b = record.plot_gradient_flow(steps=(1, 3)), plots.gradient_flow(record, steps=(1, 3))
    np.testing.assert_array_equal(bars(a, 'rms |g|'), bars(b, 'rms |g|'))
    for a, b in [(record.plot_layer_curves(metrics='grad_std'), plots.layer_curves(record, metrics='grad_std')),
                 (record.plot_update_ratio(), plots.update_ratio(record))]:
        assert len(a.lines) == len(b.lines)
        for la, lb in zip(a.lines, b.lines): np.testing.assert_array_equal(la.get_ydata(), lb.get_ydata())
    for i, fig in enumerate(map(plt.figure, plt.get_fignums())): save_png(fig, tmp_path, f'method{i}')


def test_loaded_record_draws_the_same(run, saved, tmp_path):
    record, cap = run
    names = depth_order(record)
    expected = np.array([[np.linalg.norm(g[n].astype(np.float64)) for g in cap.grads] for n in names])
    ax = saved.plot_heatmap('grad_norm')
    check_heatmap_image(ax, expected, np.arange(len(cap.grads)), log=True)
    assert [t.get_text() for t in ax.get_yticklabels()] == names
    save_png(ax.figure, tmp_path, 'loaded_heatmap')
    ax = saved.plot_magnitude_hist()
    check_hist_image(ax, np.stack([sum(hist_counts(g) for g in gr.values()) / sum(g.size for g in gr.values())
                                   for gr in cap.grads], axis=1))
    save_png(ax.figure, tmp_path, 'loaded_hist')
    rms, mx = flow_expected(saved, cap, range(len(cap.grads)), names)
    ax = saved.plot_gradient_flow()
    np.testing.assert_allclose(bars(ax, 'rms |g|'), rms, rtol=1e-5)
    save_png(ax.figure, tmp_path, 'loaded_flow')
    ax = saved.plot_update_ratio(layers=['0.weight'])
    expected = [np.linalg.norm(a['0.weight'].astype(np.float64) - b['0.weight']) / np.linalg.norm(b['0.weight'].astype(np.float64))
                for b, a in zip(cap.before, cap.after)]
    np.testing.assert_allclose([l for l in ax.lines if l.get_label() == '0.weight'][0].get_ydata(), expected, rtol=1e-4)
    save_png(ax.figure, tmp_path, 'loaded_update')
    fig = plots.compare([saved, record])
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), fig.axes[0].lines[1].get_ydata())
    save_png(fig, tmp_path, 'loaded_compare')


def test_bare_df_draws_the_same(run, tmp_path):
    record, cap = run
    df = record.df
    names = depth_order(record)
    expected = np.array([[np.linalg.norm(g[n].astype(np.float64)) for g in cap.grads] for n in names])
    ax = plots.heatmap(df, 'grad_norm')
    check_heatmap_image(ax, expected, np.arange(len(cap.grads)), log=True)
    assert [t.get_text() for t in ax.get_yticklabels()] == names
    save_png(ax.figure, tmp_path, 'df_heatmap')
    rms, mx = flow_expected(record, cap, range(len(cap.grads)), names)
    ax = plots.gradient_flow(df)
    np.testing.assert_allclose(bars(ax, 'rms |g|'), rms, rtol=1e-5)
    np.testing.assert_allclose(bars(ax, 'max |g|'), mx, rtol=1e-6)
    save_png(ax.figure, tmp_path, 'df_flow')
    ax = plots.layer_curves(df, layers=['0.weight'])
    np.testing.assert_allclose(ax.lines[0].get_ydata(), expected[names.index('0.weight')], rtol=1e-5)
    save_png(ax.figure, tmp_path, 'df_curves')
    ax = plots.update_ratio(df)
    assert [l.get_label() for l in ax.lines if l.get_label() in names] == names
    save_png(ax.figure, tmp_path, 'df_update')
    fig = plots.compare([df, record])
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), fig.axes[0].lines[1].get_ydata())
    save_png(fig, tmp_path, 'df_compare')


def test_package_exports_the_plot_functions():
    for name in ('heatmap', 'magnitude_hist', 'gradient_flow', 'layer_curves', 'update_ratio', 'compare'):
        assert getattr(fastai_gradstats, name) is getattr(plots, name)


# --- errors ----------------------------------------------------------------------------------
def empty_record(**kw):
    layers = [{'name': '0.weight', 'module': 'Linear', 'shape': (2, 2), 'numel': 4, 'depth': 0}]
    return GradRecord(layers, **kw)


@pytest.mark.parametrize('func', ['heatmap', 'magnitude_hist', 'gradient_flow', 'layer_curves', 'update_ratio'])
def test_empty_record_is_a_clear_error(func):
    record = empty_record(hist_dtype=np.uint16, extra_columns=('update_norm',))
    with pytest.raises(ValueError, match='empty'):
        getattr(plots, func)(record)
    if func != 'magnitude_hist':
        with pytest.raises(ValueError, match='empty'):
            getattr(plots, func)(record.df)
    with pytest.raises(ValueError, match='empty'):
        getattr(record, f'plot_{func}')()
    plt.close('all')


def test_empty_record_in_compare(run):
    with pytest.raises(ValueError, match='empty'):
        plots.compare([run[0], empty_record()])


@pytest.mark.parametrize('call', [lambda r: plots.heatmap(r, 'grad_nrom'), lambda r: r.plot_heatmap('grad_nrom'),
                                  lambda r: plots.heatmap(r.df, 'grad_nrom'),
                                  lambda r: plots.layer_curves(r, metrics='grad_nrom'),
                                  lambda r: plots.layer_curves(r, metrics=['grad_norm', 'grad_nrom']),
                                  lambda r: plots.compare([r, r], metric='grad_nrom')],
                         ids=['heatmap', 'method', 'df', 'curves', 'curves_list', 'compare'])
def test_unknown_metric_names_it_and_lists_the_available(run, call):
    record, _ = run
    with pytest.raises(ValueError) as e:
        call(record)
    message = str(e.value)
    assert 'grad_nrom' in message
    for metric in record.metrics:
        assert metric in message, metric
    plt.close('all')


def test_unknown_hist_layer(run):
    record, _ = run
    with pytest.raises(ValueError, match='nope') as e:
        plots.magnitude_hist(record, layer='nope')
    assert all(n in str(e.value) for n in depth_order(record))


def test_magnitude_hist_without_histograms(run2):
    record, _ = run2
    learn, _ = fit(mlp(1, 8), digits(n_train=64), epochs=1, hist=False)
    with pytest.raises(ValueError, match='hist'):
        plots.magnitude_hist(learn.grad_stats)


def test_plots_draw_on_a_given_ax_and_never_show(run, monkeypatch, tmp_path):
    record, _ = run
    monkeypatch.setattr(plt, 'show', lambda *a, **k: pytest.fail('plt.show() called'))
    fig, axes = plt.subplots(2, 2)
    got = [plots.heatmap(record, ax=axes[0, 0]), plots.magnitude_hist(record, ax=axes[0, 1]),
           plots.gradient_flow(record, ax=axes[1, 0]), plots.layer_curves(record, ax=axes[1, 1])]
    assert [g is a for g, a in zip(got, axes.ravel())] == [True] * 4
    save_png(fig, tmp_path, 'grid')


def test_histograms_are_opt_in():
    "`GradStats()` records no histogram (it would cost about as much as every other statistic): a clear error says how."
    learn, _ = fit(mlp(1, 8, n_in=4, n_out=4), regression_dls(n=32, bs=32), loss=MSELossFlat(), epochs=1, hist=False)
    record = learn.grad_stats
    assert GradStats().hist is False and not record.has_hist and record.args['hist'] is False
    with pytest.raises(ValueError, match=r'hist=True'): record.hist
    with pytest.raises(ValueError, match=r'hist=True'): record.plot_magnitude_hist()


def update_record(update_norms):
    "A hand-built record with `update_norm`: `update_norms[layer]` per step, param_norm 2 everywhere."
    names = list(update_norms)
    layers = [{'name': n, 'module': 'Linear', 'shape': (2, 2), 'numel': 4, 'depth': i} for i, n in enumerate(names)]
    record = GradRecord(layers, extra_columns=('update_norm',))
    idx = record.layer_index(names)
    for step in range(len(update_norms[names[0]])):
        values = np.full((len(names), len(METRICS) + 1), 1.0)
        values[:, METRICS.index('param_norm')] = 2.0
        values[:, -1] = [update_norms[n][step] for n in names]
        record.add_step(step, 0, 1e-3, 1.0, idx, values)
    return record


def test_update_ratio_scale_follows_the_drawn_layers(tmp_path):
    "A layer whose update is always 0 draws (linear scale) even when other layers have positive ratios."
    record = update_record({'a.weight': [0.0, 0.0, 0.0], 'b.weight': [2e-3, 2e-2, 2e-4]})
    ax = plots.update_ratio(record, layers=['a.weight'])
    assert ax.get_yscale() == 'linear'
    line, = [l for l in ax.lines if l.get_label() == 'a.weight']
    np.testing.assert_array_equal(line.get_ydata(), [0.0, 0.0, 0.0])
    save_png(ax.figure, tmp_path, 'update_zero')
    ax = plots.update_ratio(record, layers=['b.weight'])   # positive ratios: log scale, values / param_norm
    assert ax.get_yscale() == 'log'
    line, = [l for l in ax.lines if l.get_label() == 'b.weight']
    np.testing.assert_allclose(line.get_ydata(), np.array([2e-3, 2e-2, 2e-4]) / 2.0, rtol=1e-6)


def test_update_ratio_band(tmp_path):
    record = update_record({'a.weight': [2e-3, 2e-2, 2e-4]})
    ax = plots.update_ratio(record, band=(1e-5, 1e-1))
    span, = [p for p in ax.patches if 'healthy' in p.get_label()]
    np.testing.assert_allclose([span.get_y(), span.get_y() + span.get_height()], [1e-5, 1e-1], rtol=1e-9)
    ax = plots.update_ratio(record, band=None)
    assert not [p for p in ax.patches if 'healthy' in p.get_label()]
    assert [l.get_label() for l in ax.lines if not l.get_label().startswith('_')] == ['a.weight']
    for bad, error in [((1,), ValueError), ((1e-4, 1e-2, 1e-1), ValueError), ((1e-2, 1e-4), ValueError),
                       ((0, 1e-2), ValueError), ((-1e-3, 1e-2), ValueError), ((1e-4, math.inf), ValueError),
                       ((1e-4, math.nan), ValueError), (1e-3, TypeError), ('ab', TypeError),
                       (('a', 'b'), TypeError), ((True, 2), TypeError)]:
        with pytest.raises(error, match='`band`'):
            plots.update_ratio(record, band=bad)
    plt.close('all')


@pytest.mark.parametrize('bad, error', [(0, ValueError), (-1, ValueError), (2.0, TypeError), ('40', TypeError),
                                        (True, TypeError), (None, TypeError)])
def test_heatmap_max_labels_must_be_a_positive_int(run, bad, error):
    record, _ = run
    with pytest.raises(error, match='`max_labels`'):
        plots.heatmap(record, max_labels=bad)
    plt.close('all')


def test_heatmap_max_labels_caps_the_labels(run):
    record, _ = run
    names = depth_order(record)
    ax = plots.heatmap(record, max_labels=np.int64(1))
    assert [t.get_text() for t in ax.get_yticklabels()] == [names[0]]
    ax = plots.heatmap(record, max_labels=2)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    every = math.ceil(len(names) / 2)
    assert labels == names[::every] and len(labels) <= 2


def _hand_record(steps_of_layer, names=('a.weight', 'a.bias')):
    "A record where layer `names[i]` is recorded at the steps `steps_of_layer[i]`, grad_norm = step + 1 + i / 10."
    layers = [{'name': n, 'module': 'Linear', 'shape': (2, 2) if n.endswith('weight') else (2,), 'numel': 4, 'depth': i}
              for i, n in enumerate(names)]
    record = GradRecord(layers)
    for step in sorted(set().union(*steps_of_layer)):
        here = [n for n, steps in zip(names, steps_of_layer) if step in steps]
        values = np.full((len(here), len(METRICS)), 0.5)
        values[:, METRICS.index('grad_norm')] = [step + 1 + names.index(n) / 10 for n in here]
        record.add_step(step, 0, 1e-3, 1.0, record.layer_index(here), values)
    return record


def test_a_layer_not_recorded_at_a_step_is_blank_not_nan():
    "a.bias appears from step 1 on: its step-0 cell is neither drawn nor called NaN; a real NaN still is."
    record = _hand_record([{0, 1, 2}, {1, 2}])
    ax = plots.heatmap(record)
    assert len(ax.images) == 1 and ax.get_legend() is None   # no special cell at all
    drawn = ax.images[0].get_array()
    assert drawn.mask[1, 0] and not drawn.mask[1, 1:].any()
    np.testing.assert_allclose(drawn[1, 1:].data, [2.1, 3.1])
    values = np.full((2, len(METRICS)), 0.5)
    values[:, METRICS.index('grad_norm')] = [np.nan, 4.1]
    record.add_step(3, 0, 1e-3, 1.0, record.layer_index(['a.weight', 'a.bias']), values)
    ax = plots.heatmap(record)
    special = ax.images[1].get_array()
    assert special[0, 3] == 1 and special.mask[1, 0]   # the recorded NaN is marked; the unrecorded cell is not
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ['NaN']
    plt.close('all')


def test_unevenly_spaced_steps_are_labelled_under_their_columns():
    "Steps 0, 1, 2, 10 (as thinned by keep_last): four equal columns, each labelled with its own step number."
    record = _hand_record([{0, 1, 2, 10}, {0, 1, 2, 10}])
    ax = plots.heatmap(record)
    assert ax.images[0].get_extent()[:2] == [-0.5, 3.5]
    assert list(ax.get_xticks()) == [0, 1, 2, 3] and [t.get_text() for t in ax.get_xticklabels()] == ['0', '1', '2', '10']
    even = plots.heatmap(_hand_record([{0, 2, 4}, {0, 2, 4}]))
    assert even.images[0].get_extent()[:2] == [-1.0, 5.0]   # evenly spaced: centred on the step numbers, as before
    plt.close('all')


def test_a_merge_of_ranks_is_drawn_one_rank_at_a_time():
    record = fastai_gradstats.merge([_hand_record([{0, 1}, {0, 1}]), _hand_record([{0, 1}, {0, 1}])])
    for draw in (plots.heatmap, plots.layer_curves, plots.gradient_flow):
        with pytest.raises(ValueError, match='merge of 2 ranks'): draw(record)
    df = record.df
    ax = plots.heatmap(df[df['rank'] == 1])
    np.testing.assert_allclose(ax.images[0].get_array().data, [[1.0, 2.0], [1.1, 2.1]])
    plt.close('all')


def test_a_merge_of_ranks_with_histograms_is_drawn_one_rank_at_a_time():
    "Histogram counts of two ranks are not added together: refused whole, drawn per rank from `.hist`'s `rank` column."
    from fastai_gradstats.stats import HIST_BINS
    def one_rank(bin_index):
        record = GradRecord([{'name': 'a.weight', 'module': 'Linear', 'shape': (2, 2), 'numel': 4, 'depth': 0}],
                            args={'hist_sample': None}, hist_dtype=np.int64)
        counts = np.zeros((1, len(HIST_BINS)), np.int64)
        counts[0, bin_index] = 4
        for step in (0, 1):
            record.add_step(step, 0, 1e-3, 1.0, record.layer_index(['a.weight']), np.full((1, len(METRICS)), 0.5), hist=counts)
        return record
    record = fastai_gradstats.merge([one_rank(3), one_rank(5)])
    hist = record.hist
    assert list(hist.columns[:3]) == ['rank', 'step', 'layer'] and list(hist['rank']) == [0, 1, 0, 1]
    for draw in (plots.magnitude_hist, plots.hist_table):
        with pytest.raises(ValueError, match='merge of 2 ranks'): draw(record)
        with pytest.raises(ValueError, match='merge of 2 ranks'): draw(hist)
    table = plots.hist_table(hist[hist['rank'] == 1])
    expected = np.zeros((len(HIST_BINS), 2))
    expected[5] = 1.0   # rank 1 put every element of both steps in bin 5
    np.testing.assert_allclose(table.to_numpy(float), expected)
    plt.close('all')


def test_plot_arguments_of_the_wrong_kind_are_named():
    record = _hand_record([{0, 1, 2}, {0, 1, 2}])
    cases = [(plots.layer_curves, {'layers': 5}, TypeError, '`layers`'),
             (plots.layer_curves, {'layers': (l for l in ['a.weight'])}, TypeError, '`layers`'),
             (plots.layer_curves, {'layers': []}, ValueError, '`layers`'),
             (plots.layer_curves, {'metrics': None}, TypeError, '`metrics`'),
             (plots.layer_curves, {'metrics': 5}, TypeError, '`metrics`'),
             (plots.layer_curves, {'ax': 'x'}, TypeError, '`ax`'),
             (plots.heatmap, {'ax': 'x'}, TypeError, '`ax`'),
             (plots.gradient_flow, {'ax': 'x'}, TypeError, '`ax`'),
             (plots.heatmap, {'log': 'no'}, TypeError, '`log`'),
             (plots.layer_curves, {'log': 1}, TypeError, '`log`')]
    for draw, kwargs, error, name in cases:
        with pytest.raises(error, match=name): draw(record, **kwargs)
    for labels, error in (('ab', TypeError), (['a', 'a'], ValueError), ([1, 2], TypeError)):
        with pytest.raises(error, match='`labels`'): plots.compare_table([record, record], labels=labels)
    ax = plots.layer_curves(record, layers=('a.bias',), log=False)   # a tuple of names is fine
    assert [l.get_label() for l in ax.lines] == ['a.bias'] and ax.get_yscale() == 'linear'
    plt.close('all')


# --- layer order when steps hold different layers --------------------------------------------
def test_layer_order_after_fine_tune():
    """fastai's fine_tune trains the head (and the BatchNorm) first, the whole model after: the body's layers are
    recorded later than the head's, yet every table runs from input to output (the layer table's depth)."""
    import fastai.callback.schedule  # noqa: F401  (Learner.fine_tune)
    from fastai_gradstats import by_module
    set_seed(0)
    body = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())
    learn = Learner(digits(n_train=128), nn.Sequential(body, nn.Linear(16, 10)), loss_func=CrossEntropyLossFlat(),
                    opt_func=Adam, splitter=lambda m: [list(m[0].parameters()), list(m[1].parameters())])
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
        warnings.simplefilter('ignore', GradientAlert)
        learn.fine_tune(1, 1e-2, freeze_epochs=1, cbs=GradStats())
    record = learn.grad_stats
    names = depth_order(record)
    modules = list(dict.fromkeys(n.rsplit('.', 1)[0] for n in names))   # names run by depth: modules by their first
    assert list(dict.fromkeys(record.df['layer'].astype(str))) != names   # the body came in later
    assert list(plots.metric_table(record.df).index) == names
    assert list(plots.flow_table(record.df).index) == names
    assert list(plots.metric_table(record, by_module=True).index) == modules
    ax = plots.heatmap(record, by_module=True)
    assert [t.get_text() for t in ax.get_yticklabels()] == modules and ax.get_ylabel() == 'layer (input at top)'
    for step, rows in by_module(record).groupby('step'):
        places = [modules.index(m) for m in rows['layer']]
        assert places == sorted(places), step
    plt.close('all')


def _steps_frame(steps_layers):
    "A tidy DataFrame whose step i holds the layers `steps_layers[i]`, in that row order."
    rows = [(step, name) for step, names in enumerate(steps_layers) for name in names]
    return pd.DataFrame(rows, columns=['step', 'layer']).assign(grad_norm=1.0, grad_rms=1.0, grad_max=1.0)


def test_df_layer_order_merges_the_orders_of_the_steps():
    "A DataFrame's layers follow every step's row order, whichever step came first; steps that contradict fall back."
    rng = np.random.default_rng(0)
    names = [f'{i}.weight' for i in range(8)]
    steps = [[names[i] for i in sorted(rng.choice(8, size=rng.integers(2, 6), replace=False))] for _ in range(40)]
    order = list(plots.metric_table(_steps_frame(steps)).index)
    assert sorted(order) == sorted({n for s in steps for n in s})
    for held in steps:
        places = [order.index(n) for n in held]
        assert places == sorted(places), held
    # frozen then unfrozen, and the same rows with the last step first
    frozen = _steps_frame([names[5:], names[5:], names, names])
    assert list(plots.metric_table(frozen).index) == names
    late_first = frozen.sort_values('step', ascending=False, kind='stable')
    assert list(plots.metric_table(late_first).index) == names
    assert list(plots.flow_table(late_first).index) == names
    # b before a in one step, after it in another: those left follow in order of first appearance
    assert list(plots.metric_table(_steps_frame([['x', 'b', 'a'], ['a', 'b', 'c']])).index) == ['x', 'b', 'a', 'c']
    plt.close('all')


def test_df_layer_order_of_a_long_run_is_quick():
    "100,000 steps of 100 layers, the first 30 frozen for the first half: ordered in well under a few seconds."
    import time
    names = [f'{i}.weight' for i in range(100)]
    half = 50_000
    codes = np.concatenate([np.tile(np.arange(30, 100), half), np.tile(np.arange(100), half)])
    steps = np.concatenate([np.repeat(np.arange(half), 70), np.repeat(np.arange(half, 2 * half), 100)])
    df = pd.DataFrame({'step': steps, 'layer': pd.Categorical.from_codes(codes, names)})
    start = time.perf_counter()
    _, order = plots.frames._frame(df)
    assert time.perf_counter() - start < 10
    assert order == names


# --- histograms of sampled layers from a DataFrame -------------------------------------------
def unscaled_fractions(hist):
    "bins x steps fractions of the counted elements, the counts added as they are."
    steps = np.unique(hist['step'])
    counts = np.stack([hist.loc[hist['step'] == s, list(HIST_BINS)].to_numpy(float).sum(axis=0) for s in steps], axis=1)
    return counts / counts.sum(axis=0)


def test_hist_table_of_a_hist_frame_scales_by_its_numel_column(tmp_path):
    """A `.hist` DataFrame with `numel` is scaled as the record is (counts of at most `hist_sample` elements weighted by
    numel / counted; a row with nothing counted weighs nothing); one without `numel` is added unscaled."""
    learn, _ = fit(mlp(1, 32), digits(n_train=128), epochs=1, hist_sample=100)
    record = learn.grad_stats
    expected, _ = expected_fractions(record)
    numel = dict(zip(record.layers['name'], record.layers['numel']))
    counts = record.hist[['step', 'layer'] + list(HIST_BINS)].copy()
    counts['layer'] = counts['layer'].astype(str)
    assert (counts[list(HIST_BINS)].sum(axis=1) < counts['layer'].map(numel)).any()   # some layers were sampled
    with_numel = counts.assign(numel=counts['layer'].map(numel))
    np.testing.assert_allclose(plots.hist_table(with_numel).to_numpy(float), expected, rtol=1e-9)
    nothing = with_numel.iloc[:1].copy()
    nothing[list(HIST_BINS)] = 0
    nothing['numel'] = 10 ** 6
    np.testing.assert_allclose(plots.hist_table(pd.concat([nothing, with_numel])).to_numpy(float), expected, rtol=1e-9)
    np.testing.assert_allclose(plots.hist_table(counts).to_numpy(float), unscaled_fractions(counts), rtol=1e-9)
    assert not np.allclose(unscaled_fractions(counts), expected)   # the scaling matters here
    np.testing.assert_allclose(plots.hist_table(record.hist).to_numpy(float), expected, rtol=1e-9)
    # a merge of ranks is drawn rank by rank from its `.hist`: as the rank's own record
    merged = fastai_gradstats.merge([record, load(record.save(tmp_path / 'rank1'))])
    one_rank = merged.hist[merged.hist['rank'] == 0]
    np.testing.assert_allclose(plots.hist_table(one_rank).to_numpy(float), expected, rtol=1e-9)
    ax = plots.magnitude_hist(one_rank)
    check_hist_image(ax, expected)
    save_png(ax.figure, tmp_path, 'merged_rank_hist')


# --- non-finite layers in the gradient flow --------------------------------------------------
def _flow_record():
    "Four layers over five steps; 1.weight overflows (Inf) at step 3, 1.bias is NaN at every step."
    layers = [{'name': n, 'module': 'Linear', 'shape': s, 'numel': int(np.prod(s)), 'depth': d}
              for d, (n, s) in enumerate([('0.weight', (4, 3)), ('0.bias', (4,)), ('1.weight', (2, 4)), ('1.bias', (2,))])]
    record = GradRecord(layers)
    rng = np.random.default_rng(0)
    norm, top = METRICS.index('grad_norm'), METRICS.index('grad_max')
    for step in range(5):
        values = rng.uniform(0.1, 2.0, size=(4, len(METRICS)))
        if step == 3: values[2, [norm, top]] = np.inf
        values[3, [norm, top]] = np.nan
        record.add_step(step, 0, 1e-3, 1.0, record.layer_index([l['name'] for l in layers]), values)
    return record


def test_gradient_flow_marks_inf_and_nan_layers(tmp_path):
    "A layer with an Inf (at any step) or NaN at every step has no bar: a full-height band in its special colour is drawn."
    record = _flow_record()
    df = record.df
    names = depth_order(record)
    inf, nan = [], []
    for name in names:
        values = df.loc[df['layer'].astype(str) == name, ['grad_rms', 'grad_max']].to_numpy(float)
        inf.append(np.isinf(values).any())
        nan.append(not inf[-1] and np.isnan(values).all(axis=0).any())
    assert inf == [False, False, True, False] and nan == [False, False, False, True]
    ax = plots.gradient_flow(record)
    bar_patches = {id(p) for c in ax.containers for p in c.patches}
    bands = [p for p in ax.patches if id(p) not in bar_patches]
    for kind, marked in (('inf', inf), ('nan', nan)):
        mine = [p for p in bands if np.allclose(p.get_facecolor()[:3], to_rgb(plots.SPECIAL_COLORS[kind]))]
        centres = sorted(p.get_x() + p.get_width() / 2 for p in mine)
        np.testing.assert_allclose(centres, [i for i, m in enumerate(marked) if m])
        assert all(p.get_y() == 0 and p.get_height() == 1 for p in mine)   # axes coordinates: the full height
    assert len(bands) == sum(inf) + sum(nan)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert 'Inf' in legend and 'NaN' in legend
    finite = [i for i in range(len(names)) if not (inf[i] or nan[i])]
    expected = [df.loc[df['layer'].astype(str) == names[i], 'grad_max'].max() for i in finite]
    np.testing.assert_allclose(bars(ax, 'max |g|')[finite], expected, rtol=1e-6)
    assert ax.get_yscale() == 'log'
    save_png(ax.figure, tmp_path, 'flow_nonfinite')


# --- compare: the y scale -----------------------------------------------------------------------
def test_compare_log_scale_ignores_missing_layers_and_nan_steps(tmp_path):
    "A shallower run's missing layers (NaN) and a NaN step do not turn the log axes of positive metrics linear."
    shallow = _hand_record([{0, 1, 2}, {0, 1, 2}], names=('a.weight', 'b.weight'))
    deep = _hand_record([{0, 1, 2}] * 4, names=('a.weight', 'b.weight', 'c.weight', 'd.weight'))
    values = np.full((4, len(METRICS)), 0.5)
    values[:, METRICS.index('grad_norm')] = [np.nan, 1.0, 2.0, 3.0]
    deep.add_step(3, 0, 1e-3, 1.0, deep.layer_index(['a.weight', 'b.weight', 'c.weight', 'd.weight']), values)
    table = plots.compare_table([shallow, deep])
    assert table.isna().to_numpy().any()
    for metric in ('grad_rms', 'grad_norm'):
        drawn = np.concatenate([r.df[metric].to_numpy(float) for r in (shallow, deep)])
        finite = drawn[np.isfinite(drawn)]
        assert len(finite) and (finite > 0).all() and np.isnan(drawn).any()
        fig = plots.compare([shallow, deep], metric=metric)
        assert [a.get_yscale() for a in fig.axes] == ['log', 'log', 'log']
    save_png(fig, tmp_path, 'compare_nan')


# --- arguments that cannot work are named ----------------------------------------------------------
def test_more_bad_plot_arguments_are_named(run):
    record = _hand_record([{0, 1, 2}, {0, 1, 2}])
    for steps in (('a', 'b'), (2, None), (True, 2)):
        with pytest.raises(TypeError, match='`steps`'): plots.gradient_flow(record, steps=steps)
    df = record.df
    biases = df[df['layer'].astype(str).str.endswith('bias')]
    with pytest.raises(ValueError, match='weights_only'): plots.gradient_flow(biases, weights_only=True)
    with pytest.raises(TypeError, match=r'`layer`.*got int 0') as error: plots.magnitude_hist(run[0], layer=0)
    assert '[0]' not in str(error.value)
    for bad in (3, None, ['a.weight']):
        with pytest.raises(TypeError, match='`name`'): plots.is_weight(bad)
    plt.close('all')


def test_merged_ranks_by_module_message_gives_a_call_that_works():
    "heatmap(merge, by_module=True) is refused; the call its message suggests draws rank 0's modules."
    import re
    merged = fastai_gradstats.merge([_hand_record([{0, 1}, {0, 1}]), _hand_record([{0, 1}, {0, 1}])])
    with pytest.raises(ValueError, match='merge of 2 ranks') as error: plots.heatmap(merged, by_module=True)
    calls = re.findall(r'`(heatmap\(.*?\))`', str(error.value))
    assert calls, str(error.value)
    ax = eval(calls[0], {'heatmap': plots.heatmap, 'by_module': fastai_gradstats.by_module, 'record': merged})
    # module a: the weight's and the bias's norms (step + 1 and step + 1.1) combined
    expected = [[math.hypot(step + 1, step + 1.1) for step in (0, 1)]]
    np.testing.assert_allclose(ax.images[0].get_array().data, expected, rtol=1e-6)
    plt.close('all')


# --- legibility: scales, legends, colour bars, marks (the visual review) ------------------------
def _norm_record(norms, extra=()):
    "A hand-built record whose grad_norm of layer `name` at step i is `norms[name][i]` (every other metric 0.5)."
    names = list(norms)
    layers = [{'name': n, 'module': 'Linear', 'shape': (2, 2) if n.endswith('weight') else (2,), 'numel': 4, 'depth': i}
              for i, n in enumerate(names)]
    record = GradRecord(layers)
    for step in range(len(norms[names[0]])):
        values = np.full((len(names), len(METRICS)), 0.5)
        values[:, METRICS.index('grad_norm')] = [norms[n][step] for n in names]
        for column, per_layer in extra:
            values[:, METRICS.index(column)] = [per_layer[n][step] for n in names]
        record.add_step(step, 0, 1e-3, 1.0, record.layer_index(names), values)
    return record


def _clear(fig, legend, *others):
    "Whether the drawn `legend` overlaps none of `others`: an Axes' data area, an Axis with its tick labels and label."
    fig.canvas.draw()
    box = legend.get_window_extent()
    renderer = fig.canvas.get_renderer()
    for other in others:
        if isinstance(other, Axes): other = other.get_window_extent()
        elif not isinstance(other, matplotlib.transforms.BboxBase): other = other.get_tightbbox(renderer)
        assert not box.overlaps(other), (box, other)
    return True


def _colorbar_axes(fig, ax):
    "The colour bar axes of `fig` beside `ax` (the axes other than `ax` that hold a colour bar mesh)."
    return [a for a in fig.axes if a is not ax and any(isinstance(c, matplotlib.collections.QuadMesh) for c in a.collections)]


def _integer_ticks(ax):
    lo, hi = sorted(ax.get_xlim())
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    return len(ticks) >= 2 and all(float(t).is_integer() for t in ticks)



def test_compare_shows_zero_medians_on_a_log_like_scale(tmp_path):
    "Dead layers (zero medians) do not turn the axes linear: symlog, linear below the smallest positive decade, zeros in view."
    alive = _norm_record({'a.weight': [2e-3, 3e-3, 4e-3], 'b.weight': [1e-3, 1e-2, 5e-2], 'c.weight': [1e-2, 1e-1, 1.0]})
    dead = _norm_record({'a.weight': [0.0, 0.0, 0.0], 'b.weight': [0.0, 0.0, 0.0], 'c.weight': [0.1, 0.2, 0.3]})
    fig = plots.compare([alive, dead], metric='grad_norm', labels=['alive', 'dead'])
    for ax in fig.axes:
        assert ax.get_yscale() == 'symlog'
        assert ax.yaxis.get_transform().linthresh <= 2e-3
        assert ax.get_ylim()[0] < 0 < ax.get_ylim()[1]   # the zeros on the chart, not below it
    fig.canvas.draw()
    ax = fig.axes[1]
    dead_line, = [l for l in ax.lines if l.get_label() == 'dead']
    y0, y1 = ax.bbox.y0, ax.bbox.y1
    zero_y = ax.transData.transform((0, 0.0))[1]
    small_y, big_y = (ax.transData.transform((0, v))[1] for v in (3e-3, 0.2))
    assert y0 < zero_y < small_y < big_y < y1
    # and log spacing above the threshold: one decade as tall as the next
    d0, d1, d2 = (ax.transData.transform((0, v))[1] for v in (1e-3, 1e-2, 1e-1))
    assert math.isclose(d1 - d0, d2 - d1, rel_tol=1e-6)
    np.testing.assert_allclose(dead_line.get_ydata(), [0.0, 0.0, 0.2], rtol=1e-6)
    assert _integer_ticks(fig.axes[2])
    save_png(fig, tmp_path, 'compare_dead')


def test_magnitude_hist_legend_beside_the_cells_and_every_special_bin_named(run, tmp_path):
    record, _ = run
    ax = plots.magnitude_hist(record)
    fig = ax.figure
    bar, = _colorbar_axes(fig, ax)
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ['|g| = 1', 'no elements']
    assert _clear(fig, legend, ax, bar, bar.yaxis, ax.xaxis, ax.yaxis)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert {'zero', 'tiny', '1e0', 'huge', 'inf', 'nan'} <= set(labels)
    assert [HIST_BINS[int(t)] for t in ax.get_yticks()] == labels
    save_png(fig, tmp_path, 'hist_legend')


def test_magnitude_hist_empty_bins_are_a_distinct_grey(run):
    record, _ = run
    ax = plots.magnitude_hist(record)
    empty = np.array(ax.get_facecolor()[:3])
    assert np.ptp(empty) < 1e-6 and 0.3 < empty[0] < 0.7   # a neutral mid grey
    colors = ax.images[0].get_cmap()(np.linspace(0, 1, 256))[:, :3]
    assert np.linalg.norm(colors - empty, axis=1).min() > 0.3   # far from every colour of the scale
    patch, = [h for h in ax.get_legend().legend_handles if isinstance(h, matplotlib.patches.Patch)]
    np.testing.assert_allclose(patch.get_facecolor()[:3], empty)
    rgb = pixel(ax.figure, ax, 0, HIST_BINS.index('1e-16'))   # no element of 1e-16 in a real fit
    np.testing.assert_allclose(rgb, empty, atol=2 / 255)


def test_layer_curves_mark_nan_inf_and_log_zeros_at_the_edges(tmp_path):
    record = _norm_record({'a.weight': [1e-3, np.nan, 1e-1, 0.0, 1.0], 'b.weight': [1.0, 2.0, np.inf, 4.0, -np.inf]})
    ax = plots.layer_curves(record, log=False)
    fig = ax.figure
    marks = {c.get_label(): c for c in ax.collections}
    assert set(marks) == {'NaN (top edge)', 'Inf (top edge)', '-Inf (bottom edge)'}
    record = _norm_record({'a.weight': [1e-3, np.nan, 1e-1, 0.0, 1.0], 'b.weight': [1.0, 2.0, np.inf, 4.0, 5.0]})
    ax = plots.layer_curves(record, log=True)
    fig = ax.figure
    fig.canvas.draw()
    marks = {c.get_label(): c for c in ax.collections}
    assert set(marks) == {'NaN (top edge)', 'Inf (top edge)', 'zero (bottom edge)'}
    for label, kind, step, edge in (('NaN (top edge)', 'nan', 1, ax.bbox.y1), ('Inf (top edge)', 'inf', 2, ax.bbox.y1),
                                    ('zero (bottom edge)', 'zero', 3, ax.bbox.y0)):
        mark = marks[label]
        np.testing.assert_allclose(mark.get_facecolor()[0][:3], to_rgb(plots.SPECIAL_COLORS[kind]))
        x, y = mark.get_offset_transform().transform(mark.get_offsets())[0]
        assert math.isclose(y, edge, abs_tol=0.5) and math.isclose(x, ax.transData.transform((step, 1))[0], abs_tol=0.5)
    assert {'NaN (top edge)', 'Inf (top edge)', 'zero (bottom edge)'} <= {t.get_text() for t in ax.get_legend().get_texts()}
    low, high = ax.get_ylim()
    assert 0 < low < 1e-3 and 5.0 < high < 1e3   # the marks do not stretch the scale
    a_line, = [l for l in ax.lines if l.get_label() == 'a.weight']   # the data stays as recorded
    np.testing.assert_allclose(a_line.get_ydata(), [1e-3, np.nan, 1e-1, 0.0, 1.0], rtol=1e-6)
    assert _clear(fig, ax.get_legend(), ax)
    save_png(fig, tmp_path, 'curves_marks')


def _many(n=14, steps=4):
    names = [f'{i}.weight' for i in range(n)]
    return names, {name: [10.0 ** -(i / 4) * (1 + s) for s in range(steps)] for i, name in enumerate(names)}


@pytest.mark.parametrize('draw', ['layer_curves', 'update_ratio'])
def test_many_layers_get_a_depth_colour_bar(draw, tmp_path):
    names, norms = _many()
    if draw == 'layer_curves': ax = plots.layer_curves(_norm_record(norms))
    else: ax = plots.update_ratio(update_record({n: [v * 1e-3 for v in vs] for n, vs in norms.items()}))
    fig = ax.figure
    bar, = _colorbar_axes(fig, ax)
    assert bar.get_xlabel() == 'layer depth (0 = input)'
    mesh, = [c for c in bar.collections if isinstance(c, matplotlib.collections.QuadMesh)]
    assert mesh.cmap.name == 'viridis' and (mesh.norm.vmin, mesh.norm.vmax) == (0, len(names) - 1)
    assert [t.get_text() for t in bar.get_xticklabels()] == [names[0], names[-1]]
    lines = [l for l in ax.lines if l.get_label() in names]
    np.testing.assert_allclose(to_rgb(lines[-1].get_color()), mesh.cmap(1.0)[:3])
    fig.canvas.draw()
    assert not bar.get_tightbbox().overlaps(ax.get_window_extent())
    if ax.get_legend() is not None:   # the band's legend (update_ratio): no layer named, clear of the bar
        assert not set(t.get_text() for t in ax.get_legend().get_texts()) & set(names)
        assert _clear(fig, ax.get_legend(), ax, bar, bar.xaxis)
    save_png(fig, tmp_path, f'many_{draw}')


def test_heatmap_special_legend_clear_of_the_colour_bar_in_a_narrow_figure(tmp_path):
    record = _hand_record([{0, 1, 2, 3}, {0, 1, 2, 3}])
    values = np.full((2, len(METRICS)), 0.5)
    values[:, METRICS.index('grad_norm')] = [np.nan, np.inf]
    record.add_step(4, 0, 1e-3, 1.0, record.layer_index(['a.weight', 'a.bias']), values)
    for figsize, grid in (((5, 3), (1, 1)), ((10, 4), (1, 2))):
        fig, axes = plt.subplots(*grid, figsize=figsize, squeeze=False)
        for ax in axes.ravel(): plots.heatmap(record, ax=ax)
        fig.tight_layout()
        bars = [b for ax in axes.ravel() for b in _colorbar_axes(fig, ax) if b not in axes.ravel()]
        for ax in axes.ravel():
            legend = ax.get_legend()
            assert [t.get_text() for t in legend.get_texts()] == ['NaN', 'Inf']
            assert _clear(fig, legend, *axes.ravel(), *bars, *[b.yaxis for b in bars], ax.yaxis)
        save_png(fig, tmp_path, f'heat_legend_{grid[1]}')


def test_gradient_flow_width_is_capped_and_the_legend_clear_of_the_bars():
    n = 160
    df = pd.DataFrame([(s, f'l{i}.weight', 10 ** (-i / 40), 5 * 10 ** (-i / 40)) for s in range(3) for i in range(n)],
                      columns=['step', 'layer', 'grad_rms', 'grad_max'])
    ax = plots.gradient_flow(df)
    assert ax.figure.get_size_inches()[0] <= 16
    assert 1 < len(ax.get_xticklabels()) <= plots.MAX_LAYER_LABELS
    _, boxes, sizes = text_boxes(ax, 'x')   # the names thinned so that they do not overlap
    assert min(sizes) >= 7 and all(a.x0 >= b.x1 or b.x0 >= a.x1 for a, b in zip(boxes, boxes[1:]))
    assert _clear(ax.figure, ax.get_legend(), ax)
    ax = plots.gradient_flow(_flow_record())
    assert {'Inf', 'NaN', 'max |g|', 'rms |g|'} == {t.get_text() for t in ax.get_legend().get_texts()}
    assert _clear(ax.figure, ax.get_legend(), ax)


def test_step_axes_tick_whole_steps():
    record = _hand_record([set(range(20)), set(range(20))])   # matplotlib's own ticks would be 2.5, 7.5, ...
    assert _integer_ticks(plots.heatmap(record))
    assert _integer_ticks(plots.layer_curves(record))
    counts = np.zeros((20, len(HIST_BINS)))
    counts[:, HIST_BINS.index('1e-3')] = 4
    hist = pd.DataFrame(counts, columns=list(HIST_BINS)).assign(step=range(20), layer='a.weight')
    assert _integer_ticks(plots.magnitude_hist(hist))
    thinned = _hand_record([{0, 1, 2, 10}, {0, 1, 2, 10}])   # unevenly spaced: each column named by its step
    assert [t.get_text() for t in plots.heatmap(thinned).get_xticklabels()] == ['0', '1', '2', '10']


def test_update_ratio_without_a_band_draws_no_reference_line():
    record = update_record({'a.weight': [2e-3, 2e-2, 2e-4]})
    ax = plots.update_ratio(record, band=None)
    assert [l.get_label() for l in ax.lines] == ['a.weight'] and not ax.patches
    ax = plots.update_ratio(record)
    reference = [l for l in ax.lines if np.allclose(l.get_ydata(), 1e-3)]
    assert len(reference) == 1
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts[0] == 'healthy ~1e-3 (0.0001-0.01)' and texts[1:] == ['a.weight']


def test_heatmap_signed_metric_diverges_around_zero():
    record = _norm_record({'a.weight': [1.0, 2.0, 3.0], 'b.weight': [1.0, 1.0, 1.0]},
                          extra=[('grad_mean', {'a.weight': [-3e-3, 1e-3, 2e-3], 'b.weight': [-1e-3, 0.0, 5e-4]})])
    image = plots.heatmap(record, 'grad_mean').images[0]
    assert image.get_cmap().name == 'RdBu_r' and isinstance(image.norm, matplotlib.colors.TwoSlopeNorm)
    assert image.norm.vcenter == 0
    np.testing.assert_allclose([image.norm.vmin, image.norm.vmax], [-3e-3, 2e-3], rtol=1e-6)
    image = plots.heatmap(record, 'grad_mean', cmap='viridis').images[0]   # a cmap given is kept, with a plain scale
    assert image.get_cmap().name == 'viridis' and type(image.norm) is matplotlib.colors.Normalize
    image = plots.heatmap(record, 'grad_norm').images[0]   # one sign: sequential, as before
    assert image.get_cmap().name == 'viridis' and not isinstance(image.norm, matplotlib.colors.TwoSlopeNorm)
    plt.close('all')


# --- many layers: a resnet18's 66 tensors ------------------------------------------------------------
def many_layer_record(n_layers=66, n_steps=12):
    "A hand-built record of `n_layers` parameter tensors named like a resnet18's, half of them recorded from step 6 on."
    names = [f'0.{i // 6}.{i % 6}.conv{i % 3}.{"weight" if i % 2 == 0 else "bias"}' for i in range(n_layers)]
    layers = [{'name': n, 'module': 'Conv2d', 'shape': (8, 8, 3, 3) if i % 2 == 0 else (8,), 'numel': 576 if i % 2 == 0 else 8,
               'depth': i, 'group': 0} for i, n in enumerate(names)]
    record = GradRecord(layers)
    rng = np.random.default_rng(0)
    for step in range(n_steps):
        present = names if step >= n_steps // 2 else names[n_layers // 2:]   # a frozen body, then all of it
        values = rng.uniform(0.01, 1, (len(present), len(METRICS))).astype(np.float32)
        record.add_step(step, 0, 1e-3, 1.0, record.layer_index(present), values)
    return record, names


def text_boxes(ax, axis):
    "The rendered extents of the layer names on the `axis` of `ax`, in pixels, and their font sizes."
    ax.figure.canvas.draw()
    renderer = ax.figure.canvas.get_renderer()
    labels = [t for t in (ax.get_yticklabels() if axis == 'y' else ax.get_xticklabels()) if t.get_text()]
    return [t.get_text() for t in labels], [t.get_window_extent(renderer) for t in labels], [t.get_fontsize() for t in labels]


@pytest.mark.parametrize('figure', ['heatmap', 'gradient_flow'])
def test_sixty_six_layers_are_each_named_without_overlap(figure):
    """A resnet18 has 62-66 tensors with a gradient: every one is named on the axis, at 7 points at least, and no two
    names overlap on the rendered figure (they were thinned to every other layer at 6 points)."""
    record, names = many_layer_record()
    ax = plots.heatmap(record) if figure == 'heatmap' else plots.gradient_flow(record)
    axis = 'y' if figure == 'heatmap' else 'x'
    shown, boxes, sizes = text_boxes(ax, axis)
    assert shown == names and min(sizes) >= 7
    for a, b in zip(boxes, boxes[1:]):
        overlap = (a.y0 < b.y1 and b.y0 < a.y1) if axis == 'y' else (a.x0 < b.x1 and b.x0 < a.x1)
        assert not overlap, (a, b)
    plt.close(ax.figure)


def test_total_norm_draws_each_runs_steps_with_the_textbooks_bands():
    "One line per run whose y data are its .steps total norms (NaN where not finite, marked at the top), and the bands."
    record, _ = many_layer_record(n_layers=4, n_steps=12)
    other, _ = many_layer_record(n_layers=4, n_steps=12)
    other.add_step(12, 0, 1e-3, 1.0, other.layer_index(list(other.layers['name'])),
                   np.full((4, len(METRICS)), np.nan, np.float32))
    ax = plots.total_norm([record, other.steps], labels=['a', 'b'])
    lines = [l for l in ax.lines if l.get_label() in ('a', 'b')]
    np.testing.assert_allclose(lines[0].get_ydata(), record.steps['grad_norm'], rtol=1e-12)
    expected = other.steps['grad_norm'].to_numpy()
    np.testing.assert_allclose(lines[1].get_ydata()[:-1], expected[:-1], rtol=1e-12)
    assert np.isnan(lines[1].get_ydata()[-1]) and any(l.get_label() == 'b: NaN/Inf' for l in ax.lines)
    assert len(ax.patches) == 2 and {t.get_text() for t in ax.get_legend().get_texts()} >= {'healthy 0.1-10', 'over 100'}
    plt.close(ax.figure)
    for bad, error in ((record, TypeError), ([record], ValueError)):
        with pytest.raises(error, match='`records`|`labels`'):
            plots.total_norm(bad) if error is TypeError else plots.total_norm(bad, labels=['a', 'b'])
    with pytest.raises(ValueError, match='`bands`'): plots.total_norm([record], bands=(10, 1, 100))
