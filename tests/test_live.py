"""ShowGradStats: one line per epoch in a plain process, one picture updated in place in a notebook kernel, nothing for
validation or lr_find, a bounded share of the fit's time, and never a change to the record."""
import json
import re
import sys
import types
import warnings

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from fastai.basics import CancelFitException, Callback, DataLoaders, set_seed
from matplotlib.figure import Figure
from nbclient import NotebookClient

import fastai_gradstats
from fastai_gradstats import GradRecord, GradStats, ShowGradStats, live_figure, load
from fastai_gradstats import callback, live, live_picture
from fastai_gradstats.demo import TensorPairs, mlp
from helpers import InjectNonFinite, Repair, make_learner, small_dls, tiny_mlp

LAYERS = ['0.weight', '0.bias', '2.weight', '2.bias']   # tiny_mlp's parameters, from the input to the output
LINE = re.compile(r'GradStats epoch (\d+): (\d+) steps, total norm \S+-\S+ \(median \S+\)(, worst: .+)?$')


def _fit(*cbs, epochs=2, n_train=64, bs=16, gradstats=None, lr=1e-2, model=None, dls=None):
    "A seeded fit of tiny_mlp on `n_train // bs` batches per epoch; GradStats first unless `gradstats` is False."
    set_seed(0)
    dls = small_dls(n_train=n_train, bs=bs) if dls is None else dls
    first = [] if gradstats is False else [gradstats or GradStats()]
    learn = make_learner(tiny_mlp() if model is None else model, dls=dls, cbs=first)
    learn.fit(epochs, lr, cbs=list(cbs))
    return learn


class FakeNotebook:
    """A notebook kernel's shell and `display`, counting what is displayed: `shown` holds (display_id, bundle) per
    display or update, `at` the fake clock's time of each (when a clock is given, a draw takes `cost` seconds of it)."""
    def __init__(self, clock=None, cost=0.0):
        self.kernel, self.execution_count, self.shown, self.at = object(), 1, [], []
        self.clock, self.cost, self.handles = clock, cost, 0

    def _show(self, display_id, bundle):
        assert set(bundle) == {'image/png', 'text/plain'} and bundle['image/png'].startswith(b'\x89PNG')
        if self.clock is not None: self.clock.t += self.cost
        self.shown.append((display_id, bundle)); self.at.append(None if self.clock is None else self.clock.t)

    def display(self, bundle, raw=False, display_id=None):
        assert raw   # a mime bundle, not an object to format
        if display_id is None: return self._show(None, bundle)
        self.handles += 1
        handle = types.SimpleNamespace(id=f'display-{self.handles}')
        def update(new, raw=False):
            assert raw
            self._show(handle.id, new)
        handle.update = update
        self._show(handle.id, bundle)
        return handle


@pytest.fixture
def notebook(monkeypatch):
    fake = FakeNotebook()
    monkeypatch.setattr(live, '_notebook', lambda: (fake, fake.display))
    return fake


def _lines(text):
    return [l for l in text.splitlines() if l.strip()]


def _assert_same_record(got, expected):
    pd.testing.assert_frame_equal(got.df, expected.df)
    pd.testing.assert_frame_equal(got.steps, expected.steps)
    pd.testing.assert_frame_equal(got.lrs, expected.lrs)
    if expected.has_hist: pd.testing.assert_frame_equal(got.hist, expected.hist)


# --- a plain process -------------------------------------------------------------------------------
def test_plain_process_prints_one_line_per_epoch_and_leaves_the_record_as_it_is(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, 'IPython', None)  # not importable
    learn = _fit(ShowGradStats(), epochs=3, n_train=96)
    lines = _lines(capsys.readouterr().out)
    assert len(lines) == 3, lines
    for epoch, line in enumerate(lines):
        match = LINE.match(line)
        assert match, line
        assert int(match[1]) == epoch and int(match[2]) == 96 // 16   # every training batch is a step
    assert ', worst: ' in lines[-1]   # the last epoch's line always has the diagnosis
    _assert_same_record(learn.grad_stats, _fit(epochs=3, n_train=96).grad_stats)


@pytest.mark.parametrize('ipython', ['a plain IPython module, no shell', 'get_ipython fails', 'IPython.display missing'])
def test_without_a_working_notebook_it_falls_back_to_the_line(ipython, capsys, monkeypatch):
    fake = types.ModuleType('IPython')
    fake.version_info = (8, 30)   # matplotlib reads it when it makes a canvas
    shell = types.SimpleNamespace(kernel=object(), execution_count=1)
    fake.get_ipython = {'a plain IPython module, no shell': lambda: None, 'get_ipython fails': lambda: 1 / 0,
                        'IPython.display missing': lambda: shell}[ipython]
    monkeypatch.setitem(sys.modules, 'IPython', fake)
    monkeypatch.setitem(sys.modules, 'IPython.display', None)
    _fit(ShowGradStats(every=0, max_share=1), epochs=2)
    assert [int(LINE.match(l)[2]) for l in _lines(capsys.readouterr().out)] == [4, 4]
    assert isinstance(ShowGradStats.replay(_fit(epochs=1).grad_stats), Figure)


def test_a_fit_cut_short_gets_the_line_of_its_last_epoch(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, 'IPython', None)

    class StopAt(Callback):
        order = GradStats.order + 2
        def after_batch(self):
            if self.training and self.epoch == 1 and self.iter == 1: raise CancelFitException()

    _fit(ShowGradStats(), StopAt(), epochs=3)
    assert [(int(m[1]), int(m[2])) for m in map(LINE.match, _lines(capsys.readouterr().out))] == [(0, 4), (1, 2)]


def test_the_second_fit_counts_its_own_steps(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, 'IPython', None)
    learn = _fit(ShowGradStats(), epochs=1)
    learn.fit(2, 1e-2)   # ShowGradStats is gone (a fit's callback); GradStats stays in learn.cbs
    learn.fit(1, 1e-2, cbs=ShowGradStats())
    assert [(int(m[1]), int(m[2])) for m in map(LINE.match, _lines(capsys.readouterr().out))] == [(0, 4), (0, 4)]
    assert len(learn.grad_stats) == 16


# --- a notebook ------------------------------------------------------------------------------------
@pytest.mark.parametrize('gradstats', [{}, {'update_ratio': True, 'hist': True, 'keep_last': 2}], ids=['defaults', 'every option'])
def test_drawing_after_every_batch_leaves_the_record_as_it_is(gradstats, notebook, capsys):
    learn = _fit(ShowGradStats(every=0, max_share=1), gradstats=GradStats(**gradstats), epochs=2, n_train=32)
    assert len(notebook.shown) == 2 * 2 + 1 and capsys.readouterr().out == ''   # no line printed in a notebook
    _assert_same_record(learn.grad_stats, _fit(gradstats=GradStats(**gradstats), epochs=2, n_train=32).grad_stats)


def test_one_output_updated_in_place_and_nothing_for_validation_or_lr_find(notebook):
    learn = make_learner(tiny_mlp(), dls=small_dls(n_train=32), cbs=[GradStats(), ShowGradStats(every=0, max_share=1)])
    learn.fit(2, 1e-2)
    # a draw after each of the 2 x 2 training batches, none for the 2 validation passes, and the final one
    assert len(notebook.shown) == 2 * 2 + 1
    assert {display_id for display_id, _ in notebook.shown} == {'display-1'}   # one output, updated in place
    learn.validate()
    learn.get_preds()
    assert len(notebook.shown) == 5
    with learn.no_logging(): learn.lr_find(num_it=6, show_plot=False)
    assert len(notebook.shown) == 5
    learn.fit(1, 1e-2)   # a new fit: a new output
    assert len(notebook.shown) == 5 + 2 + 1 and notebook.shown[-1][0] == 'display-2'


def test_the_title_names_the_worst_finding_and_the_alerts(notebook):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', fastai_gradstats.GradientAlert)
        learn = _fit(InjectNonFinite([1]), Repair(), ShowGradStats(every=0, max_share=1), epochs=1, n_train=48)
    titles = [bundle['text/plain'] for _, bundle in notebook.shown]
    # NaN/Inf written into the gradients of step 1 (the second): from the draw after it on, the alert; at the end, the finding
    assert len(titles) == 3 + 1 and 'ALERT' not in titles[0]
    assert all(t.startswith('<ShowGradStats: ALERT NaN/Inf gradients | ') for t in titles[1:]), titles
    assert 'CRITICAL nonfinite' in titles[-1] and learn.grad_stats_cb._alerted == {'nonfinite'}


def test_a_healthy_run_says_so(notebook):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 64, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()   # Gaussian inputs: no always-zero pixel as in the digits
    dls = DataLoaders.from_dsets(TensorPairs(x[:64], y[:64]), TensorPairs(x[64:], y[64:]), bs=16, device=torch.device('cpu'))
    set_seed(0)
    learn = _fit(ShowGradStats(), dls=dls, model=mlp(depth=1, width=16, act=nn.Tanh))
    assert (learn.grad_stats.health()['status'] == 'ok').all()
    assert notebook.shown[-1][1]['text/plain'] == '<ShowGradStats: healthy so far>'


class Clock:
    "A fake clock: training batches and draws take the time the test says."
    def __init__(self): self.t = 0.0
    def __call__(self): return self.t


class Tick(Callback):
    "Each training batch takes `seconds` of the fake clock."
    order = -10
    def __init__(self, clock, seconds): self.clock, self.seconds = clock, seconds
    def after_batch(self):
        if self.training: self.clock.t += self.seconds


def test_drawing_keeps_to_its_share_of_the_fit_and_draws_at_the_end(monkeypatch):
    clock = Clock()
    fake = FakeNotebook(clock, cost=0.08)   # each draw takes 0.08 s, each batch 1 s
    monkeypatch.setattr(live, '_notebook', lambda: (fake, fake.display))
    monkeypatch.setattr(live, '_now', clock)
    # the fake clock times the draws: skip drawing them
    monkeypatch.setattr(live, 'live_png', lambda record, alerts=(): b'\x89PNG')
    _fit(Tick(clock, 1.0), ShowGradStats(every=0, max_share=0.02), epochs=5)   # 20 batches
    drawing = 0.08 * len(fake.shown)
    assert len(fake.shown) >= 3 and drawing <= 0.02 * clock.t, (fake.at, clock.t)
    assert fake.at[-1] == pytest.approx(20 * 1.0 + drawing)   # the final draw, after the last batch

    # a fit too short for any draw within the share still gets the final one
    clock.t, fake.shown, fake.at = 0.0, [], []
    _fit(Tick(clock, 1.0), ShowGradStats(every=0, max_share=0.02), epochs=1)
    assert fake.at == [pytest.approx(4 * 1.0 + 0.08)]

    # the share left free: a draw at most every `every` seconds
    clock.t, fake.shown, fake.at = 0.0, [], []
    _fit(Tick(clock, 1.0), ShowGradStats(every=1.9, max_share=1), epochs=2)   # 8 batches, 8 s
    starts = np.array(fake.at) - 0.08
    assert len(fake.shown) == 4 + 1 and (np.diff(starts[:-1]) >= 1.9).all(), fake.at


def test_without_gradstats_a_message_once_and_nothing_drawn(notebook, capsys):
    show = ShowGradStats(every=0, max_share=1)
    with pytest.warns(UserWarning, match=r'GradStats\(\), ShowGradStats\(\)'):
        learn = _fit(show, gradstats=False)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        learn.fit(1, 1e-2, cbs=show)   # once only
    assert notebook.shown == [] and capsys.readouterr().out == ''


def test_a_failing_draw_stops_the_view_not_the_fit(notebook, monkeypatch):
    def broken(*args, **kwargs): raise RuntimeError('no figure today')
    monkeypatch.setattr(live, 'live_png', broken)
    with pytest.warns(UserWarning, match='ShowGradStats stopped showing .RuntimeError: no figure today') as caught:
        learn = _fit(ShowGradStats(every=0, max_share=1))
    assert len([w for w in caught if 'ShowGradStats' in str(w.message)]) == 1 and notebook.shown == []
    _assert_same_record(learn.grad_stats, _fit().grad_stats)


def test_a_rank_where_gradstats_does_not_record_shows_nothing(notebook, capsys, monkeypatch):
    monkeypatch.setattr(callback.gradstats, '_rank', lambda: 1)   # a data-parallel rank 1: GradStats records on rank 0 only
    learn = _fit(ShowGradStats(every=0, max_share=1))
    assert len(learn.grad_stats) == 0 and notebook.shown == [] and capsys.readouterr().out == ''
    monkeypatch.setattr(live, '_notebook', lambda: None)
    _fit(ShowGradStats())
    assert capsys.readouterr().out == ''


# --- the picture -----------------------------------------------------------------------------------
def _image_and_pivot(fig, record_df, order=LAYERS):
    image = np.ma.filled(fig.axes[1].images[0].get_array().astype(float), np.nan)
    expected = record_df.pivot(index='layer', columns='step', values='grad_norm')
    expected.index = expected.index.astype(str)
    return image, expected.reindex(order).to_numpy(float)


def test_replay_of_a_saved_run_draws_its_norms(tmp_path):
    record = _fit(epochs=3).grad_stats
    loaded = load(record.save(tmp_path/'run'))
    fig = ShowGradStats.replay(loaded)
    assert isinstance(fig, Figure)
    image, expected = _image_and_pivot(fig, record.df)
    np.testing.assert_array_equal(image, expected)
    curve = fig.axes[0].lines[0]
    np.testing.assert_array_equal(curve.get_xdata(), record.steps['step'].to_numpy())
    np.testing.assert_array_equal(curve.get_ydata(), record.steps['grad_norm'].to_numpy())
    first = record.health().iloc[0]
    expected_title = 'healthy so far' if first['status'] == 'ok' else f"{first['status'].upper()} {first['check']}"
    assert fig.get_suptitle().startswith(expected_title)


def test_a_long_run_draws_every_kth_step_back_from_the_last():
    record = _fit(epochs=5, n_train=64, bs=1).grad_stats   # 320 steps, more than the heatmap's 250 columns
    assert live_picture._MAX_COLUMNS == 250
    fig = live_figure(record)
    df = record.df
    kept = sorted(range(319, -1, -2))    # every 2nd step, back from the last one
    image, expected = _image_and_pivot(fig, df[df['step'].isin(kept)])
    assert image.shape == (4, 160)
    np.testing.assert_array_equal(image, expected)
    np.testing.assert_array_equal(fig.axes[0].lines[0].get_ydata(), record.steps['grad_norm'].to_numpy())  # all steps


def test_a_figure_is_redrawn_on_and_an_empty_record_says_so():
    record = _fit(epochs=1).grad_stats
    fig = live_figure(record)
    assert live_figure(record, fig) is fig and len(fig.axes) == 3   # curve, heatmap, its colour bar: no leftovers
    empty = live_figure(GradRecord())
    assert not empty.axes and 'no step recorded yet' in [t.get_text() for t in empty.texts]


def test_argument_errors_name_the_argument():
    record = _fit(epochs=1).grad_stats
    for kwargs, error, name in [({'every': -1}, ValueError, 'every'), ({'every': float('nan')}, ValueError, 'every'),
                                ({'every': '3'}, TypeError, 'every'), ({'every': True}, TypeError, 'every'),
                                ({'max_share': 0}, ValueError, 'max_share'), ({'max_share': 1.5}, ValueError, 'max_share'),
                                ({'max_share': None}, TypeError, 'max_share')]:
        with pytest.raises(error, match=f'`{name}`'): ShowGradStats(**kwargs)
    with pytest.raises(TypeError, match='`record`'): live_figure(record.df)
    with pytest.raises(TypeError, match='`record`'): ShowGradStats.replay('run')
    with pytest.raises(TypeError, match='`fig`'): live_figure(record, fig='figure')
    with pytest.raises(TypeError, match='`alerts`'): live_figure(record, alerts='nonfinite')
    with pytest.raises(ValueError, match='`alerts`'): live_figure(record, alerts=['boom'])


# --- a real notebook kernel ------------------------------------------------------------------------
KERNEL_CELLS = [
    """%matplotlib inline
import torch
from fastai.basics import CrossEntropyLossFlat, Learner, set_seed
from fastai_gradstats import GradStats, ShowGradStats
from fastai_gradstats.demo import digits_dls, mlp
import IPython.display
updates = []   # counted here, in the kernel, apart from the messages the client counts
_update = IPython.display.DisplayHandle.update
def counted_update(self, *args, **kwargs):
    updates.append(self.display_id)
    return _update(self, *args, **kwargs)
IPython.display.DisplayHandle.update = counted_update
torch.set_num_threads(1)
set_seed(0)
learn = Learner(digits_dls(n_train=256, bs=32), mlp(), loss_func=CrossEntropyLossFlat())""",
    "learn.fit(3, 1e-2, cbs=[GradStats(), ShowGradStats(every=0.2, max_share=1)])",
    "import json; print(json.dumps({display_id: updates.count(display_id) for display_id in set(updates)}))",
    "ShowGradStats.replay(learn.grad_stats)",
]


class CountingClient(NotebookClient):
    "nbclient's client, keeping every message's (cell, type, display_id, holds a PNG) as the kernel sends them."
    def process_message(self, msg, cell, cell_index):
        content = msg['content']
        transient = content.get('transient') or {}
        self.messages.append((cell_index, msg['msg_type'], transient.get('display_id'), 'image/png' in content.get('data', {})))
        return super().process_message(msg, cell, cell_index)


def test_a_notebook_kernel_shows_one_picture_updated_while_fit_runs(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in KERNEL_CELLS])
    client = CountingClient(nb, timeout=300, kernel_name='python3', resources={'metadata': {'path': str(tmp_path)}})
    client.messages = []
    client.execute()
    errors = [o for c in nb.cells for o in c.outputs if o['output_type'] == 'error']
    assert not errors, errors
    fit = [m[1:] for m in client.messages if m[0] == 1 and 'display' in m[1]]
    pictures = [display_id for kind, display_id, png in fit if kind == 'display_data' and png]
    assert len(pictures) == 1 and pictures[0], fit   # one picture, with a display_id (the progress bars have their own)
    updates = [png for kind, display_id, png in fit if kind == 'update_display_data' and display_id == pictures[0]]
    assert len(updates) >= 2 and all(updates), fit   # redrawn in place while fit ran, and at its end
    image_outputs = [o for o in nb.cells[1].outputs if o['output_type'] == 'display_data' and 'image/png' in o['data']]
    assert len(image_outputs) == 1
    counted = json.loads(nb.cells[2].outputs[0]['text'])
    assert counted[pictures[0]] == len(updates)   # DisplayHandle.update, counted in the kernel
    replayed = [o for o in nb.cells[3].outputs if 'image/png' in o.get('data', {})]
    assert len(replayed) == 1, nb.cells[3].outputs   # displayed once, though the cell also returns the figure


class WithUnused(nn.Module):
    "tiny_mlp and two Linear layers that forward never uses: four tensors without a gradient, one summary() line."
    def __init__(self):
        super().__init__()
        self.body, self.unused = tiny_mlp(), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))

    def forward(self, x): return self.body(x)


def test_the_title_counts_more_findings_as_summary_lists_them():
    """A check found in several layers is one line of `record.summary()` (and of the card); the live title's
    '(+N more findings)' counts those lines, not the rows of health() (it said +4 where summary() had 1 more)."""
    record = _fit(model=WithUnused()).grad_stats
    problems = [l for l in record.summary().splitlines()[1:] if l.strip().split(' ', 1)[0] in ('CRITICAL', 'WARNING')]
    assert len(problems) >= 1
    assert len(record.health().query("status != 'ok'")) > len(problems)   # the case: several rows, fewer lines
    headline, _, _ = live._title(record, ())
    more = re.search(r'\+(\d+) more findings', headline)
    assert (int(more.group(1)) if more else 0) == len(problems) - 1


# --- the picture the live view shows (live_png) ----------------------------------------------------
def _pixels(png):
    from PIL import Image
    import io
    image = Image.open(io.BytesIO(png))
    assert image.format == 'PNG'
    return np.asarray(image.convert('RGB')).astype(int)


def _cell_centres(png, names, n_columns):
    "The pixel at the centre of each heatmap cell (layers x columns x RGB), where `live_picture._boxes` puts the cells."
    pixels = _pixels(png)
    height, width, _ = pixels.shape
    _, (x0, y0, x1, y1) = live_picture._boxes(width, height, names)
    xs = np.floor(x0 + (np.arange(n_columns) + 0.5) * (x1 - x0) / n_columns).astype(int)
    ys = np.floor(y0 + (np.arange(len(names)) + 0.5) * (y1 - y0) / len(names)).astype(int)
    return pixels[ys[:, None], xs[None, :]]


def test_the_live_picture_colours_each_cell_as_the_heatmap_does():
    """Each heatmap cell of the live view's PNG has the colour matplotlib's viridis gives its layer's grad_norm at that
    step, on a log scale between the least and the largest norm when they span two decades (else linear)."""
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm, Normalize
    record = _fit(epochs=3).grad_stats
    png = live_picture.live_png(record)
    expected = record.df.pivot(index='layer', columns='step', values='grad_norm')
    expected.index = expected.index.astype(str)
    values = expected.reindex(LAYERS).to_numpy(float)
    norm = (LogNorm if values.max() / values.min() >= 100 else Normalize)(values.min(), values.max())
    colours = np.round(colormaps['viridis'](norm(values))[..., :3] * 255)
    got = _cell_centres(png, LAYERS, values.shape[1])
    assert np.abs(got - colours).max() <= 4, np.abs(got - colours).max()


def test_the_live_picture_marks_what_a_colour_scale_cannot_show():
    """NaN (magenta), Inf (orange) and, on a log scale, zero (black) cells in SPECIAL_COLORS; a layer not recorded at a
    step stays white; a step whose total norm is NaN/Inf gets a magenta mark above the curve, none without."""
    from fastai_gradstats import SPECIAL_COLORS
    layers = [{'name': f'l{i}.weight', 'module': 'Linear', 'shape': (4, 4), 'numel': 16, 'depth': i} for i in range(3)]
    def record_with(special):
        record = GradRecord(layers)
        for step in range(6):
            names = [f'l{i}.weight' for i in range(3) if not (special and step == 5 and i == 2)]   # l2 missing at step 5
            values = np.full((len(names), len(fastai_gradstats.METRICS)), 1.0, np.float32)
            values[:, 0] = [10.0 ** -(i + step % 2) for i in range(len(names))]   # grad_norm 1e-3 to 1: a log scale
            if special and step == 2: values[0, 0] = np.nan
            if special and step == 3: values[1, 0] = np.inf
            if special and step == 4: values[2, 0] = 0.0
            record.add_step(step, 0, 0.1, 1.0, record.layer_index(names), values)
        return record
    rgb = lambda c: [int(c[i:i + 2], 16) for i in (1, 3, 5)]
    png = live_picture.live_png(record_with(special=True))
    cells = _cell_centres(png, [l['name'] for l in layers], 6)
    assert cells[0, 2].tolist() == rgb(SPECIAL_COLORS['nan']) and cells[1, 3].tolist() == rgb(SPECIAL_COLORS['inf'])
    assert cells[2, 4].tolist() == rgb(SPECIAL_COLORS['zero']) and cells[2, 5].tolist() == [255, 255, 255]
    def marks(png):
        pixels = _pixels(png)
        (x0, y0, x1, _), _ = live_picture._boxes(pixels.shape[1], pixels.shape[0], [l['name'] for l in layers])
        strip = pixels[int(y0) - 7:int(y0), int(x0):int(x1)]
        return (np.abs(strip - rgb(SPECIAL_COLORS['nan'])).sum(axis=2) < 60).sum()
    assert marks(png) > 0 and marks(live_picture.live_png(record_with(special=False))) == 0


def test_the_live_picture_of_an_empty_record_says_so_and_bad_input_is_named():
    pixels = _pixels(live_picture.live_png(GradRecord()))
    assert pixels.shape[:2] == (108, 1035) and (pixels < 128).any()   # one line of text
    record = _fit(epochs=1).grad_stats
    with pytest.raises(TypeError, match='`record`'): live_picture.live_png(record.df)
    with pytest.raises(TypeError, match='`alerts`'): live_picture.live_png(record, alerts='nonfinite')
    with pytest.raises(ValueError, match='`alerts`'): live_picture.live_png(record, alerts=['boom'])
    two = fastai_gradstats.merge([record, _fit(epochs=1).grad_stats])
    with pytest.raises(ValueError, match='merge of 2 ranks'): live_picture.live_png(two)


@pytest.mark.parametrize('shape', [(1, 1), (1, 9), (7, 1), (64, 33)])
def test_the_live_picture_png_decodes_to_the_pixels_drawn(shape):
    """The live view writes its PNG itself (rows stored by their difference from the row above, deflated): Pillow's
    decoder reads back every pixel exactly, for random pixels (each byte wrapping around) and for flat areas."""
    import io
    from PIL import Image
    rng = np.random.default_rng(shape[0] * 100 + shape[1])
    for pixels in (rng.integers(0, 256, (*shape, 3), dtype=np.uint8), np.full((*shape, 3), 250, np.uint8)):
        back = Image.open(io.BytesIO(live_picture._png_bytes(pixels)))
        assert back.mode == 'RGB' and back.size == (shape[1], shape[0])
        np.testing.assert_array_equal(np.asarray(back), pixels)


def test_the_live_picture_text_kept_from_draw_to_draw_is_the_text_pillow_draws():
    """Short text is rendered once and kept (`_text_mask`): drawn again, from the kept mask, it has the pixels Pillow's
    own `ImageDraw.text` gives at that place, for each anchor the picture uses and for bold text; long text (a title)
    is drawn directly and not kept."""
    from PIL import Image, ImageDraw
    cases = [('0.weight', 7, 'rm', False), ('step', 10, 'mt', False), ('1e-5', 9, 'lm', False), ('gjq|', 9.5, 'md', False),
             ('CRITICAL', 11.5, 'mt', True), ('x' * (live_picture._CACHED_CHARS + 1), 8.5, 'mt', False)]
    live_picture._text_mask.cache_clear()
    for text, size, anchor, bold in cases:
        reference = Image.new('RGB', (2 * 700, 2 * 60), 'white')
        ImageDraw.Draw(reference).text((2 * 350, 2 * 30), text, font=live_picture._font(size, bold), fill='#222222',
                                       anchor=anchor)
        for _ in range(2):   # the first draw renders it, the second (when short) draws what was kept
            canvas = live_picture._Canvas(700, 60)
            canvas.text((350, 30), text, size, '#222222', anchor, bold)
            np.testing.assert_array_equal(np.asarray(canvas.image), np.asarray(reference))
    assert live_picture._text_mask.cache_info().currsize == len(cases) - 1   # the long one was not kept
