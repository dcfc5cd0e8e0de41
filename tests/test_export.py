"""Exporters: what TensorBoard's event files and a W&B offline run hold equals the record."""
import glob
import math
import os
import struct
import sys
import time

import numpy as np
import pytest
import torch

from fastai.basics import CrossEntropyLossFlat, Learner
from fastai_gradstats import GradStats, TensorBoardGradStats, WandbGradStats
from fastai_gradstats.demo import digits_dls, mlp
from fastai_gradstats.stats import HIST_BINS


def _fit(*cbs, n_train=256, **gradstats_kwargs):
    torch.manual_seed(0)
    learn = Learner(digits_dls(n_train=n_train, bs=64), mlp(2, 16), loss_func=CrossEntropyLossFlat())
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2, cbs=[GradStats(**{'hist': True, **gradstats_kwargs}), *cbs])
    return learn.grad_stats


def test_tensorboard_event_file_holds_the_recorded_values(tmp_path):
    pytest.importorskip('tensorboard')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    record = _fit(TensorBoardGradStats(str(tmp_path), hist_every=2), update_ratio=True)
    events = EventAccumulator(str(tmp_path), size_guidance={'scalars': 0, 'histograms': 0})
    events.Reload()
    scalars = set(events.Tags()['scalars'])
    df, steps = record.df, record.steps
    layers = list(record.layers['name'])
    for layer in layers:
        for column in ('grad_norm', 'grad_param_ratio', 'n_nan', 'n_inf', 'update_ratio'):
            assert f'{column}/{layer}' in scalars
    assert {f'dead_frac/{l}' for l in layers if l.endswith('weight')} <= scalars
    assert not {f'dead_frac/{l}' for l in layers if l.endswith('bias')} & scalars   # NaN for 1-D: not sent
    total = events.Scalars('grad_norm/total')
    assert [e.step for e in total] == list(steps['step'])
    np.testing.assert_allclose([e.value for e in total], steps['grad_norm'], rtol=1e-6)
    for layer in ('0.weight', '4.bias'):
        rows = df[df['layer'] == layer]
        got = events.Scalars(f'grad_norm/{layer}')
        np.testing.assert_allclose([e.value for e in got], rows['grad_norm'], rtol=1e-6)
        ratio = rows['grad_norm'].to_numpy(np.float64) / rows['param_norm'].to_numpy(np.float64)
        np.testing.assert_allclose([e.value for e in events.Scalars(f'grad_param_ratio/{layer}')], ratio, rtol=1e-5)
        np.testing.assert_allclose([e.value for e in events.Scalars(f'update_ratio/{layer}')], rows['update_ratio'], rtol=1e-6)
    # histograms every 2nd recorded step: the finite non-zero counts of record.hist, zeros as a scalar
    hist = record.hist
    histograms = events.Histograms('grad_log10_abs/0.weight')
    assert [h.step for h in histograms] == list(steps['step'])[::2]
    for h in histograms:
        row = hist[(hist['step'] == h.step) & (hist['layer'] == '0.weight')].iloc[0]
        finite = row[list(HIST_BINS[HIST_BINS.index('tiny'):HIST_BINS.index('huge') + 1])].to_numpy(float)
        assert list(h.histogram_value.bucket) == list(finite)
        assert h.histogram_value.num == finite.sum()
    zeros = events.Scalars('hist_zero/0.weight')
    assert [z.value for z in zeros] == list(hist[hist['layer'] == '0.weight']['zero'].to_numpy(float)[::2])


def _read_wandb_history(path):
    "History rows of a W&B offline run file (a LevelDB-style log of protobuf records), read independently."
    from wandb.proto import wandb_internal_pb2 as pb
    data, pos, block, records, pending = open(path, 'rb').read(), 7, 32768, [], b''
    while pos + 7 <= len(data):
        if block - pos % block < 7: pos += block - pos % block; continue
        _, length, kind = struct.unpack('<IHB', data[pos:pos + 7]); pos += 7
        chunk, pos = data[pos:pos + length], pos + length
        if kind == 1: records.append(chunk)
        elif kind == 2: pending = chunk
        elif kind == 3: pending += chunk
        elif kind == 4: records.append(pending + chunk)
    rows = []
    for raw in records:
        record = pb.Record(); record.ParseFromString(raw)
        if record.WhichOneof('record_type') == 'history':
            rows.append({(item.key or '/'.join(item.nested_key)): item.value_json for item in record.history.item})
    return rows


def test_wandb_offline_run_holds_the_expected_keys(tmp_path, monkeypatch):
    wandb = pytest.importorskip('wandb')
    monkeypatch.setenv('WANDB_SILENT', 'true')
    monkeypatch.setenv('WANDB_MODE', 'offline')
    run = wandb.init(mode='offline', dir=str(tmp_path), project='gradstats-test')
    try: record = _fit(WandbGradStats(hist_every=3))
    finally: run.finish()
    files = glob.glob(str(tmp_path/'wandb'/'offline-run-*'/'run-*.wandb'))
    assert len(files) == 1
    steps, df = record.steps, record.df
    # wandb's writer is its own process, and run.finish() can return before it has flushed the file: wait for it
    deadline = time.monotonic() + 60
    while len(rows := [r for r in _read_wandb_history(files[0]) if 'grad_norm/total' in r]) < len(steps) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(rows) == len(steps)
    import json
    np.testing.assert_allclose([json.loads(r['grad_norm/total']) for r in rows], steps['grad_norm'], rtol=1e-6)
    first = df[df['step'] == steps['step'].iloc[0]]
    for layer, norm in zip(first['layer'], first['grad_norm']):
        assert json.loads(rows[0][f'grad_norm/{layer}']) == pytest.approx(float(norm), rel=1e-6)
    with_hist = [i for i, r in enumerate(rows) if any(k.startswith('grad_log10_abs/') for k in r)]
    assert with_hist == list(range(0, len(rows), 3))


def test_missing_extras_give_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, 'wandb', None)
    with pytest.raises(ImportError, match=r'pip install wandb`.*-e \"\.\[wandb\]\"'): WandbGradStats()
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)
    with pytest.raises(ImportError, match=r'pip install tensorboard`.*-e \"\.\[tensorboard\]\"'): TensorBoardGradStats()


def test_exporter_arguments():
    pytest.importorskip('tensorboard')
    for exporter in (TensorBoardGradStats, WandbGradStats):  # checked before anything is imported or opened
        with pytest.raises(ValueError, match='`hist_every`'): exporter(hist_every=0)
        for bad in (2.5, '5', True):
            with pytest.raises(TypeError, match='`hist_every`'): exporter(hist_every=bad)
    assert TensorBoardGradStats(hist_every=np.int64(5)).hist_every == 5


def test_step_scalars_divide_by_a_zero_parameter_as_the_record_does():
    """A zero parameter (a freshly zeroed bias): grad_param_ratio and update_ratio are inf over it, as in `.df`
    (README: NaN only for 0 / 0), in the scalars exporters send."""
    from fastai_gradstats import step_scalars
    torch.manual_seed(0)
    model = mlp(2, 16)
    with torch.no_grad(): model[0].bias.zero_()
    learn = Learner(digits_dls(n_train=64, bs=64), model, loss_func=CrossEntropyLossFlat())
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2, cbs=GradStats(update_ratio=True))
    record = learn.grad_stats
    scalars, row = step_scalars(record.last()), record.df.set_index('layer').loc['0.bias']
    assert row['param_norm'] == 0 and row['grad_norm'] > 0 and row['update_norm'] > 0
    assert scalars['grad_param_ratio/0.bias'] == math.inf == row['grad_param_ratio']
    assert scalars['update_ratio/0.bias'] == math.inf == row['update_ratio']
    for layer, r in record.df.set_index('layer').iterrows():   # the other layers: the plain ratio
        np.testing.assert_allclose(scalars[f'grad_param_ratio/{layer}'], r['grad_norm'] / r['param_norm'], rtol=1e-6)


def _fake_step(hist_rows):
    "A `GradRecord.last()`-shaped step with the given histogram rows, one layer per row."
    from fastai_gradstats.stats import METRICS
    layers = [f'{i}.weight' for i in range(len(hist_rows))]
    return {'step': 7, 'epoch': 0, 'lr': 1e-3, 'loss': 0.5, 'skipped': False, 'grad_norm': 1.0, 'layers': layers,
            'values': np.ones((len(layers), len(METRICS)), np.float32), 'counts': np.zeros((len(layers), 2), np.int64),
            'hist': np.asarray(hist_rows, np.int64)}


def test_histogram_bin_counts_are_sent_for_all_zero_and_all_nan_layers():
    """A dead layer (all-zero gradient) and an all-NaN one have nothing finite and non-zero to draw, but their
    `hist_zero/`, `hist_inf/`, `hist_nan/` scalars are still sent, equal to the histogram row's counts."""
    pytest.importorskip('tensorboard'); pytest.importorskip('wandb')
    from fastai_gradstats import step_scalars
    zero, inf, nan, tiny = (HIST_BINS.index(b) for b in ('zero', 'inf', 'nan', 'tiny'))
    rows = np.zeros((3, len(HIST_BINS)), np.int64)
    rows[0, zero] = 40                                  # all zero
    rows[1, nan], rows[1, inf] = 30, 2                  # all non-finite
    rows[2, zero], rows[2, tiny], rows[2, HIST_BINS.index('1e-3')], rows[2, nan] = 3, 1, 5, 1   # a normal layer
    last = _fake_step(rows)

    class Writer:
        def __init__(self): self.scalars, self.hists = {}, {}
        def add_scalar(self, tag, value, step): self.scalars[tag] = (value, step)
        def add_histogram_raw(self, tag, **kwargs): self.hists[tag] = kwargs

    class Run:
        def log(self, data, step): self.data, self.step = data, step

    writer, run = Writer(), Run()
    hists = dict(zip(last['layers'], last['hist']))
    TensorBoardGradStats(writer=writer).send(7, step_scalars(last), hists)
    WandbGradStats(wandb_run=run).send(7, step_scalars(last), hists)
    for layer, row in hists.items():
        for name in ('zero', 'inf', 'nan'):
            assert writer.scalars[f'hist_{name}/{layer}'] == (float(row[HIST_BINS.index(name)]), 7)
        assert f'grad_log10_abs/{layer}' in run.data       # W&B takes an empty histogram as it is
    assert set(writer.hists) == {'grad_log10_abs/2.weight'}   # TensorBoard draws only what has finite non-zero counts
    assert writer.hists['grad_log10_abs/2.weight']['num'] == 6


def test_step_scalars_rejects_what_is_not_a_step_or_a_column():
    from fastai_gradstats import step_scalars
    from fastai_gradstats.export import STEP_SCALAR_COLUMNS
    record = _fit(n_train=64, hist=False)
    with pytest.raises(TypeError, match='`last`.*GradRecord.last'): step_scalars(None)
    with pytest.raises(TypeError, match='`last`.*DataFrame'): step_scalars(record.df)
    with pytest.raises(ValueError, match=r"`last` lacks \['values', 'counts'\]"):
        step_scalars({k: v for k, v in record.last().items() if k not in ('values', 'counts')})
    with pytest.raises(ValueError, match=r"unknown `columns` \['grad_nrom'\]; known: grad_norm, param_norm"):
        step_scalars(record.last(), columns=('grad_nrom',))
    with pytest.raises(TypeError, match='`columns` must be a list or tuple'): step_scalars(record.last(), columns='grad_norm')
    # every known column is accepted and sent (update_ratio only with update_norm recorded)
    scalars = step_scalars(record.last(), columns=list(STEP_SCALAR_COLUMNS))
    row = record.df.set_index('layer').loc['0.weight']
    for column in STEP_SCALAR_COLUMNS:
        if column != 'update_ratio': assert scalars[f'{column}/0.weight'] == pytest.approx(float(row[column]), rel=1e-6)
    assert not any(k.startswith('update_ratio/') for k in scalars)
    assert step_scalars(record.last(), columns=['param_norm']).keys() == {'grad_norm/total', 'loss', 'lr', *(
        f'param_norm/{l}' for l in record.layers['name'])}


class ListWriter:
    "A stand-in SummaryWriter that keeps what it is given."
    def __init__(self): self.scalars = []
    def add_scalar(self, tag, value, step): self.scalars.append((tag, value, step))
    def add_histogram_raw(self, *args, **kwargs): pass
    def flush(self): pass
    def close(self): pass


@pytest.mark.parametrize('update_ratio', [False, True])
def test_every_step_is_sent_once_when_keep_last_thins_right_behind(update_ratio):
    "keep_last=1 thins a step as soon as it is one step old; with update_ratio a step completes one step later."
    pytest.importorskip('tensorboard')
    writer = ListWriter()
    record = _fit(TensorBoardGradStats(writer=writer), n_train=1024, update_ratio=update_ratio, keep_last=1)
    sent = [step for tag, _, step in writer.scalars if tag == 'grad_norm/total']
    assert sent == list(range(1024 // 64))                      # one training batch per step, each sent once
    assert len(record.steps) < len(sent)                        # while the record kept only some of them
    totals = {step: value for tag, value, step in writer.scalars if tag == 'grad_norm/total'}
    np.testing.assert_allclose([totals[s] for s in record.steps['step']], record.steps['grad_norm'], rtol=1e-6)


def test_tensorboard_writer_must_be_a_summary_writer():
    pytest.importorskip('tensorboard')
    for bad in ('runs/x', 3, object()):
        with pytest.raises(TypeError, match='`writer`'): TensorBoardGradStats(writer=bad)
    assert TensorBoardGradStats(writer=ListWriter()).writer is not None
