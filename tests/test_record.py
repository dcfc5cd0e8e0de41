"""The record: save/load round trips (parquet + JSON), the layer table, clear errors on bad
directories, and the record of an empty and of a one-step fit."""
import json
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import fastai_gradstats
from fastai_gradstats import GradRecord, GradStats, load, merge
from fastai_gradstats.stats import METRICS

from helpers import (LAYER_SCHEMA, STEP_SCHEMA, CPUMixedPrecision, Capture, InjectNonFinite, assert_record_matches,
                     dead_unit_mlp, make_learner, small_dls, tiny_mlp)


def assert_same_record(a: GradRecord, b: GradRecord):
    assert isinstance(b, GradRecord)
    assert len(a) == len(b)
    pd.testing.assert_frame_equal(a.df, b.df)
    pd.testing.assert_frame_equal(a.steps, b.steps)
    pd.testing.assert_frame_equal(a.layers, b.layers)


def rich_fit():
    """A real fit whose record has NaN/Inf, an overflow-skipped step, zero_tol, update_ratio and histograms."""
    learn = make_learner(dead_unit_mlp(), small_dls(n_train=64, bs=16))
    cap = Capture()
    learn.fit(1, 0.1, cbs=[CPUMixedPrecision(bf16=False), GradStats(zero_tol=1e-3, update_ratio=True, hist=True), cap,
                           InjectNonFinite(at={1})])
    return learn.grad_stats, cap


# --- round trips ----------------------------------------------------------------------------------
def test_save_load_round_trip_of_a_real_fit(tmp_path):
    record, cap = rich_fit()
    assert record.steps['skipped'].tolist() == [False, True, False, False]
    assert record.df['n_nan'].sum() == 4 and record.df['n_inf'].sum() == 3
    assert [c['skipped'] for c in cap.captured] == [False, True, False, False]
    path = record.save(tmp_path / 'run')
    assert (tmp_path / 'run' / 'meta.json').is_file()
    meta = json.loads((tmp_path / 'run' / 'meta.json').read_text())
    assert meta['version'] == fastai_gradstats.__version__
    assert meta['args']['zero_tol'] == 1e-3 and meta['args']['every'] == 1
    assert [l['name'] for l in meta['layers']] == ['0.weight', '0.bias', '2.weight', '2.bias']
    for loaded in (load(path), load(str(path)), fastai_gradstats.load(tmp_path / 'run')):
        assert_same_record(record, loaded)
        assert loaded.args == record.args
        assert 'update_ratio' in loaded.df.columns
        pd.testing.assert_frame_equal(record.hist, loaded.hist)


def test_save_load_round_trip_of_a_hand_built_record(tmp_path):
    layers = [dict(name='a', module='Linear', shape=(2, 3), numel=6, depth=0),
              dict(name='b', module='Linear', shape=(2,), numel=2, depth=1),
              dict(name='c', module='Conv2d', shape=(4, 1, 3, 3), numel=36, depth=2)]
    rec = GradRecord(layers, args={'every': 2, 'note': 'hand made'})
    rng = np.random.default_rng(0)
    vals = {s: rng.random((3, len(METRICS))).astype(np.float32) for s in (0, 2, 6)}
    vals[2][0, 0], vals[2][1, 2] = np.nan, np.inf
    rec.add_step(0, 0, 1e-3, 2.5, rec.layer_index(['a', 'b', 'c']), vals[0])
    rec.add_step(2, 0, 2e-3, np.nan, rec.layer_index(['a', 'c']), vals[2][:2], counts=[[3, 0], [0, 5]], skipped=True)
    rec.add_step(6, 1, 3e-3, 1.5, rec.layer_index(['c', 'b', 'a']), vals[6])
    rec.mark_skipped()
    loaded = load(rec.save(tmp_path / 'hand'))
    assert_same_record(rec, loaded)
    assert loaded.args == {'every': 2, 'note': 'hand made'}
    # and both hold what was put in
    st = loaded.steps
    assert st['step'].tolist() == [0, 2, 6] and st['epoch'].tolist() == [0, 0, 1]
    assert st['skipped'].tolist() == [False, True, True]
    np.testing.assert_allclose(st['lr'], [1e-3, 2e-3, 3e-3], rtol=1e-12)
    np.testing.assert_allclose(st['loss'], [2.5, np.nan, 1.5], rtol=1e-7)
    df = loaded.df
    s2 = df[df.step == 2].set_index('layer')
    assert list(s2.index.astype(str)) == ['a', 'c']
    assert np.isnan(s2.loc['a', 'grad_norm']) and s2.loc['a', 'n_nan'] == 3 and s2.loc['c', 'n_inf'] == 5
    assert s2.loc['c', 'grad_max'] == np.inf and s2.loc['c', 'n_nan'] == 0
    for s, names in ((0, ['a', 'b', 'c']), (6, ['c', 'b', 'a'])):
        rows = df[df.step == s].set_index('layer')
        for i, n in enumerate(names):
            np.testing.assert_array_equal(rows.loc[n, list(METRICS)].to_numpy(np.float32), vals[s][i])
    sizes = {'a': 6, 'b': 2, 'c': 36}
    np.testing.assert_allclose(df['grad_param_ratio'], df['grad_norm'] / df['param_norm'], rtol=1e-6)
    np.testing.assert_allclose(df['grad_rms'], df['grad_norm'] / np.sqrt(df['layer'].astype(str).map(sizes)), rtol=1e-6)
    expected_total = [float(np.sqrt(np.sum(vals[0][:, 0].astype(np.float64) ** 2))), np.nan,
                      float(np.sqrt(np.sum(vals[6][:, 0].astype(np.float64) ** 2)))]
    np.testing.assert_allclose(st['grad_norm'], expected_total, rtol=1e-7)


def test_save_overwrites_and_rejects_a_file(tmp_path):
    record, _ = rich_fit()
    record.save(tmp_path / 'run')
    small = GradRecord(record.layers.to_dict('records'))
    assert_same_record(small, load(small.save(tmp_path / 'run')))
    (tmp_path / 'file').write_text('x')
    with pytest.raises(ValueError, match='path'):
        record.save(tmp_path / 'file')
    with pytest.raises(TypeError, match='path'):
        record.save(42)


# --- load errors ----------------------------------------------------------------------------------
def test_load_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match='nowhere'):
        load(tmp_path / 'nowhere')
    (tmp_path / 'a_file').write_text('x')
    with pytest.raises(FileNotFoundError, match='a_file'):
        load(tmp_path / 'a_file')
    with pytest.raises(TypeError, match='path'):
        load(None)


def test_load_directory_that_is_not_a_record(tmp_path):
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match='meta.json'):
        load(tmp_path / 'empty')
    other = tmp_path / 'other'
    other.mkdir()
    (other / 'notes.txt').write_text('hello')
    pd.DataFrame({'x': [1]}).to_parquet(other / 'stats.parquet')
    with pytest.raises(FileNotFoundError, match='not a saved GradStats run'):
        load(other)
    # every file present, but meta.json belongs to something else
    record, _ = rich_fit()
    path = record.save(tmp_path / 'foreign')
    (path / 'meta.json').write_text(json.dumps({'format': 'something.else', 'layers': []}))
    with pytest.raises(ValueError, match='not a saved GradStats run'):
        load(path)


@pytest.fixture
def saved_run(tmp_path):
    record, _ = rich_fit()
    return record.save(tmp_path / 'run')


def _meta(path): return json.loads((path / 'meta.json').read_text())


@pytest.mark.parametrize('corrupt', [
    pytest.param(lambda p: (p / 'meta.json').write_text((p / 'meta.json').read_text()[:40]), id='truncated'),
    pytest.param(lambda p: (p / 'meta.json').write_bytes(b'\xff\xfe\x00garbage\x81'), id='binary'),
    pytest.param(lambda p: (p / 'meta.json').write_text(''), id='empty'),
    pytest.param(lambda p: (p / 'meta.json').write_text('[1, 2, 3]'), id='json-list'),
    pytest.param(lambda p: (p / 'meta.json').write_text(json.dumps({k: v for k, v in _meta(p).items() if k != 'layers'})),
                 id='no-layers'),
    pytest.param(lambda p: (p / 'meta.json').write_text(json.dumps(dict(_meta(p), format_version=99))), id='newer'),
])
def test_load_corrupted_meta_json_raises_value_error(saved_run, corrupt):
    corrupt(saved_run)
    with pytest.raises(ValueError, match='run|meta.json|GradStats'):
        load(saved_run)


def test_load_corrupted_parquet_raises_value_error(saved_run):
    (saved_run / 'stats.parquet').write_bytes(b'not a parquet file at all')
    with pytest.raises(ValueError, match='parquet'):
        load(saved_run)


# --- the layer table --------------------------------------------------------------------------------
class HeadFirst(nn.Module):
    "Registers its head before its body, but runs the body first."
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(8, 10)
        self.body = nn.Sequential(nn.Linear(64, 8), nn.ReLU())

    def forward(self, x): return self.head(self.body(x))


def test_layer_table_follows_the_model_from_input_to_output():
    model = HeadFirst()
    learn = make_learner(model, small_dls(n_train=32, bs=16))
    learn.fit(1, 0.1, cbs=GradStats())
    layers = learn.grad_stats.layers
    assert list(layers.columns)[:5] == ['name', 'module', 'shape', 'numel', 'depth']
    ordered = layers.sort_values('depth')
    assert ordered['name'].tolist() == ['body.0.weight', 'body.0.bias', 'head.weight', 'head.bias']
    shapes = dict(model.named_parameters())
    for _, row in layers.iterrows():
        p = shapes[row['name']]
        assert tuple(row['shape']) == tuple(p.shape) and row['numel'] == p.numel() and row['module'] == 'Linear'
    assert sorted(layers['depth']) == [0, 1, 2, 3]


# --- empty and one-step fits --------------------------------------------------------------------------
def test_empty_fit(tmp_path):
    learn = make_learner(tiny_mlp(), small_dls(n_train=32, bs=16))
    learn.fit(0, 0.1, cbs=GradStats())
    record = learn.grad_stats
    assert isinstance(record, GradRecord) and len(record) == 0
    assert len(record.df) == 0 and set(LAYER_SCHEMA) <= set(record.df.columns)
    assert len(record.steps) == 0 and set(STEP_SCHEMA) <= set(record.steps.columns)
    assert record.layers['name'].tolist() == [n for n, _ in learn.model.named_parameters()]
    assert 'no steps' in repr(record)
    loaded = load(record.save(tmp_path / 'empty'))
    assert len(loaded) == 0 and len(loaded.df) == 0
    pd.testing.assert_frame_equal(record.layers, loaded.layers)
    assert set(STEP_SCHEMA) <= set(loaded.steps.columns)


def test_one_step_fit(tmp_path):
    learn = make_learner(tiny_mlp(), small_dls(n_train=16, bs=16))
    cap = Capture()
    learn.fit(1, 0.1, cbs=[GradStats(), cap])
    record = learn.grad_stats
    assert len(record) == 1 and len(record.df) == 4
    assert_record_matches(record, cap.captured)
    loaded = load(record.save(tmp_path / 'one'))
    assert_same_record(record, loaded)
    assert_record_matches(loaded, cap.captured)


def test_last_complete_waits_for_a_pending_update_norm():
    "`last(complete=True)` is the step before while the last one's update norm is still to come (what exporters send)."
    layers = [{'name': 'w', 'module': 'Linear', 'shape': (2, 2), 'numel': 4, 'depth': 0}]
    record = GradRecord(layers, extra_columns=('update_norm',))
    index = record.layer_index(['w'])
    row = lambda s: np.r_[np.full(len(METRICS), float(s), np.float32), np.nan][None]
    record.add_step(0, 0, 0.1, 1.0, index, row(0), pending=True)
    assert record.pending_last and record.last(complete=True) is None and record.last()['step'] == 0
    record.set_last('update_norm', [0.5])
    assert not record.pending_last and record.last(complete=True)['values'][0, -1] == 0.5
    record.add_step(1, 0, 0.1, 2.0, index, row(1), pending=True)
    done = record.last(complete=True)
    assert done['step'] == 0 and done['loss'] == 1.0 and done['values'][0, 0] == 0 and done['values'][0, -1] == 0.5
    record.mark_skipped()   # a step the optimizer did not apply has no update to wait for
    assert not record.pending_last and record.last(complete=True)['step'] == 1



def test_set_last_later_fetches_only_when_the_record_is_read():
    "Values left to fetch are fetched once, when read, into the step they belong to; never when `set_last` comes first."
    layers = [{'name': n, 'module': 'Linear', 'shape': (2,), 'numel': 2, 'depth': d} for d, n in enumerate('ab')]
    record = GradRecord(layers, extra_columns=('update_norm',))
    index = record.layer_index(['a', 'b'])
    row = lambda s: np.c_[np.full((2, len(METRICS)), float(s), np.float32), np.full(2, np.nan, np.float32)]
    fetched = []
    def fetch(values):
        def get(): fetched.append(values); return np.array(values)
        return get
    with pytest.raises(ValueError, match='no step'): record.set_last_later('update_norm', fetch([1, 2]))
    record.add_step(0, 0, 0.1, 1.0, index, row(0), pending=True)
    with pytest.raises(ValueError, match='column'): record.set_last_later('grad_norm', fetch([1, 2]))
    with pytest.raises(TypeError, match='fetch'): record.set_last_later('update_norm', [1, 2])
    record.set_last_later('update_norm', fetch([0.5, 0.25]))
    record.set_last('update_norm', [0.5, 0.25])          # the usual way: the next step's copy brought them
    assert record.df['update_norm'].tolist() == [0.5, 0.25] and fetched == []
    record.add_step(1, 0, 0.1, 1.0, index, row(1), pending=True)
    record.set_last_later('update_norm', fetch([3.0, 4.0]))
    assert record.pending_last and fetched == []
    assert record.df['update_norm'].tolist() == [0.5, 0.25, 3.0, 4.0]  # an interrupted fit: read, so fetched
    assert fetched == [[3.0, 4.0]] and not record.pending_last
    record.df; record.fetch_pending()
    assert len(fetched) == 1                             # once
    record.add_step(2, 0, 0.1, 1.0, index, row(2), pending=True)
    record.set_last_later('update_norm', fetch([5.0, 6.0]))
    record.add_step(3, 0, 0.1, 1.0, index, row(3), pending=True)  # a step added first: the values go to step 2
    assert record.df['update_norm'].tolist()[4:6] == [5.0, 6.0] and np.isnan(record.df['update_norm'].iloc[6:]).all()
    record.set_last_later('update_norm', fetch([7.0, 8.0]))
    record.mark_skipped()                                # not applied: nothing to fetch, the weights did not move
    assert (record.df['update_norm'].iloc[6:] == 0).all() and len(fetched) == 2


def test_a_record_pickled_by_an_earlier_version_still_works():
    "Records pickled (`learn.export`) before `set_last_later` existed lack its attribute: reading, adding and pickling work."
    learn = make_learner(tiny_mlp(), small_dls(n_train=32, bs=16))
    learn.fit(1, 0.1, cbs=GradStats(update_ratio=True))
    record = learn.grad_stats
    state = pickle.loads(pickle.dumps(record.__getstate__()))  # its own arrays
    del state['_deferred']  # what an earlier version's pickle holds
    old = GradRecord.__new__(GradRecord)
    old.__dict__.update(state)  # what unpickling does
    pd.testing.assert_frame_equal(old.df, record.df)
    index = old.layer_index(list(record.layers['name']))
    old.add_step(99, 1, 0.1, 1.0, index, np.ones((len(index), len(old.value_columns)), np.float32))
    assert len(pickle.loads(pickle.dumps(old))) == len(record) + 1

def test_add_step_keeps_every_column_and_rejects_steps_that_do_not_increase():
    layers = [{'name': n, 'module': 'Linear', 'shape': (2,), 'numel': 2, 'depth': d} for d, n in enumerate('ab')]
    record = GradRecord(layers, every=3)
    index = record.layer_index(['b', 'a'])
    values = np.arange(2 * len(METRICS), dtype=np.float32).reshape(2, -1)
    for k, step in enumerate([0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 36, 39, 42, 45, 48]):  # past the first regrowth (16)
        record.add_step(step, k // 4, 0.5 * k, float(k), index, values + k, np.full((2, 2), k), skipped=k == 5)
    steps = record.steps
    assert steps['step'].tolist() == list(range(0, 51, 3)) and steps['epoch'].tolist() == [k // 4 for k in range(17)]
    assert steps['lr'].tolist() == [0.5 * k for k in range(17)] and steps['loss'].tolist() == list(map(float, range(17)))
    assert steps['skipped'].tolist() == [k == 5 for k in range(17)] and (steps['kept_every'] == 3).all()
    last = record.last()
    assert last['layers'] == ['b', 'a'] and (last['values'] == values + 16).all() and (last['counts'] == 16).all()
    for bad in (48, 47):
        with pytest.raises(ValueError, match='step'): record.add_step(bad, 4, 0.1, 1.0, index, values)
    hist_record = GradRecord(layers, hist_dtype=np.uint16)
    bad_calls = [((51, 4, 'fast', 1.0, index, values), {}, TypeError, '`lr`'),
                 ((51, 4, 0.1, None, index, values), {}, TypeError, '`loss`'),
                 (('51', 4, 0.1, 1.0, index, values), {}, TypeError, '`step`'),
                 ((51.0, 4, 0.1, 1.0, index, values), {}, TypeError, '`step`'),
                 ((51, 'four', 0.1, 1.0, index, values), {}, TypeError, '`epoch`'),
                 ((51, 4, 0.1, 1.0, index, values[:, :3]), {}, ValueError, '`values`'),
                 ((51, 4, 0.1, 1.0, index, [['x'] * len(METRICS)] * 2), {}, TypeError, '`values`'),
                 ((51, 4, 0.1, 1.0, index, values, np.zeros((2, 3))), {}, ValueError, '`counts` must have 2 rows of 2'),
                 ((51, 4, 0.1, 1.0, index, values, np.zeros((1, 2))), {}, ValueError, '`counts`')]
    for args, kwargs, error, message in bad_calls:
        with pytest.raises(error, match=message): record.add_step(*args, **kwargs)
    with pytest.raises(ValueError, match='`hist` must have 2 rows of 25'):
        hist_record.add_step(0, 0, 0.1, 1.0, index, values, hist=np.zeros((2, 24)))
    assert len(record) == 17 and len(record.df) == 2 * 17   # nothing half-written
    assert len(hist_record) == 0 and len(hist_record.df) == 0
    record.add_step(51, 4, 0.1, 1.0, index, values)
    assert len(record) == 18 and len(record.df) == 2 * 18


# --- argument checks and documented columns ------------------------------------------------------
ONE_LAYER = [{'name': 'a', 'module': 'Linear', 'shape': (2,), 'numel': 2, 'depth': 0}]


def test_merge_rejects_a_single_path_or_record(tmp_path):
    "A str or Path is one run, not a list of them: a TypeError naming `records`, not a search for run 's'."
    record = GradRecord(ONE_LAYER)
    record.add_step(0, 0, 0.1, 1.0, record.layer_index(['a']), np.ones((1, len(METRICS))))
    path = record.save(tmp_path / 'somerun')
    for bad in ('somerun', str(path), path, record, 5):
        with pytest.raises(TypeError, match='`records` must be a list of GradRecords or paths'):
            fastai_gradstats.merge(bad)
    merged = fastai_gradstats.merge([path, record])   # a list of them still merges
    assert merged.multi_rank and list(merged.steps['rank']) == [0, 1] and list(merged.steps['step']) == [0, 0]


def test_grad_record_checks_hist_dtype_and_args():
    for bad in ('float32', np.float64, 'bool', 'nonsense', object):
        with pytest.raises(TypeError, match='`hist_dtype`'):
            GradRecord(ONE_LAYER, hist_dtype=bad)
    for good in ('uint16', np.uint16, np.int64, np.dtype('uint32')):
        record = GradRecord(ONE_LAYER, hist_dtype=good)
        assert record.has_hist and record._hist.data.dtype == np.dtype(good)
    for bad in (5, 'every=2', [('every', 2)]):
        with pytest.raises(TypeError, match='`args`'):
            GradRecord(ONE_LAYER, args=bad)
    assert GradRecord(ONE_LAYER, args={'every': 2}).args == {'every': 2} and GradRecord(ONE_LAYER).args == {}


def _section(text, start, end):
    "The part of `text` from the first `start` to the next `end` after it."
    part = text[text.index(start):]
    return part[:part.index(end)]


def test_docstrings_list_the_columns_of_steps():
    "The class docstring and `steps`' docstring name every column `.steps` has (`rank` in a merge of ranks)."
    layers = [{'name': 'a', 'module': 'Linear', 'shape': (2,), 'numel': 2, 'depth': 0, 'group': 0}]
    record = GradRecord(layers)
    record.add_step(0, 0, 0.1, 1.0, record.layer_index(['a']), np.ones((1, len(METRICS))))
    columns = list(record.steps.columns)
    merged = list(fastai_gradstats.merge([record, GradRecord(layers)]).steps.columns)
    assert merged == ['rank', *columns]
    for doc in (_section(GradRecord.__doc__, '- `steps`', '- `layers`'), GradRecord.steps.__doc__):
        assert [c for c in merged if f'`{c}`' not in doc] == [], doc
    layer_doc = _section(GradRecord.__doc__, '- `layers`', '\n\n')
    assert [c for c in record.layers.columns if f'`{c}`' not in layer_doc] == []


def test_a_corrupt_meta_json_is_named_with_the_field(tmp_path):
    "A saved run whose meta.json has a string format_version or layer depth: a ValueError naming the file and the field."
    record = GradRecord(ONE_LAYER)
    record.add_step(0, 0, 0.1, 1.0, record.layer_index(['a']), np.ones((1, len(METRICS))))
    path = record.save(tmp_path / 'run')
    meta_file = path / 'meta.json'
    good = json.loads(meta_file.read_text())
    for key, change in (('format_version', lambda m: m.update(format_version='1')),
                        ('depth', lambda m: m['layers'][0].update(depth='0')),
                        ('shape', lambda m: m['layers'][0].update(shape='22')),
                        ('name', lambda m: m['layers'][0].update(name=3))):
        meta = json.loads(json.dumps(good))
        change(meta)
        meta_file.write_text(json.dumps(meta))
        with pytest.raises(ValueError, match=rf"meta\.json.*`{key}`"): fastai_gradstats.load(path)
    meta_file.write_text(json.dumps(good))
    assert fastai_gradstats.load(path).df.equals(record.df)
    with pytest.raises(TypeError, match='`numel`'):
        GradRecord([{'name': 'a', 'module': 'Linear', 'shape': (2,), 'numel': 2.0, 'depth': 0}])


# --- reads that see every step, and records that refuse to go wrong --------------------------------
def _hist_record(keep_last=None, every=1, layers=2):
    "A hand-built record with histograms: layer i of step s has grad_norm s + i / 10 and bin counts it can be told by."
    from fastai_gradstats.stats import HIST_BINS
    rec = GradRecord([dict(name=f'l{i}', module='Linear', shape=(3, 4 + i), numel=3 * (4 + i), depth=i) for i in range(layers)],
                     hist_dtype=np.int64, keep_last=keep_last, every=every)
    index = rec.layer_index([f'l{i}' for i in range(layers)])

    def add(s):
        values = np.zeros((layers, len(METRICS)), np.float32)
        values[:, 0] = s + np.arange(layers) / 10
        hist = np.zeros((layers, len(HIST_BINS)), np.int64)
        hist[:, 0] = s * 10 + np.arange(layers)
        rec.add_step(s, 0, 0.1, float(s), index, values, hist=hist)
    return rec, add


def test_hist_is_never_stale_while_steps_wait_or_are_thinned():
    rec, add = _hist_record()
    add(0)
    assert rec.hist['step'].tolist() == [0, 0]           # read once: cached
    rec.hold(lambda: add(1))                             # a step waiting, as GradStats leaves them
    assert rec.hist['step'].tolist() == [0, 0, 1, 1]     # the read adds it
    assert rec.hist['zero'].tolist() == [0, 1, 10, 11]
    thinned, add = _hist_record(keep_last=2)
    for s in range(12):
        add(s)
        hist, steps = thinned.hist, thinned.steps        # read every step, as a callback could
        assert sorted(set(hist['step'])) == steps['step'].tolist()
        assert (hist['zero'] == hist['step'] * 10 + hist['layer'].cat.codes).all()   # each row still its own step's


def test_hist_has_each_layers_numel():
    rec, add = _hist_record()
    add(0); add(1)
    expected = {'l0': 12, 'l1': 15}                      # 3 x 4 and 3 x 5 elements
    assert rec.hist['numel'].tolist() == [expected[str(l)] for l in rec.hist['layer']]


def test_len_repr_and_merge_agree_with_steps_under_keep_last():
    rec, add = _hist_record(keep_last=8)
    for s in range(23): add(s)                           # thinned every 2 steps: the last one arrived since
    n = len(rec)
    assert n == len(rec.steps) and f'GradRecord({n} steps' in repr(rec)
    fresh, add = _hist_record(keep_last=8)
    for s in range(23): add(s)
    merged = fastai_gradstats.merge([fresh])             # not read before the merge
    assert merged.steps['step'].tolist() == rec.steps['step'].tolist()


def test_merge_of_a_merge_keeps_each_steps_rank():
    parts = []
    for rank in range(3):
        rec, add = _hist_record()
        rec.rank = rank
        for s in range(2):
            add(s)
            rec._values.view[-2:, 0] = rank              # tell the ranks apart by their values
        parts.append(rec)
    nested = fastai_gradstats.merge([fastai_gradstats.merge(parts[:2]), parts[2]])
    df = nested.df
    assert (df['grad_norm'] == df['rank']).all() and sorted(set(df['rank'])) == [0, 1, 2]
    assert nested.steps.groupby('rank').size().tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match='same rank twice'):
        fastai_gradstats.merge([fastai_gradstats.merge(parts[:2]), parts[1]])


@pytest.mark.parametrize('index, error', [([0, 5], ValueError), ([0, -1], ValueError), ([0.7, 1.2], TypeError),
                                          (['a', 'b'], TypeError)])
def test_add_step_refuses_a_layer_index_that_names_no_layer(index, error):
    rec, add = _hist_record()
    add(0)
    before = rec.df.copy()
    with pytest.raises(error, match='`layer_index`'):
        rec.add_step(1, 0, 0.1, 1.0, index, np.zeros((2, len(METRICS))), hist=np.zeros((2, 25), np.int64))
    pd.testing.assert_frame_equal(rec.df, before)        # nothing added
    add(1)                                               # and the record goes on
    assert rec.steps['step'].tolist() == [0, 1]


def test_load_keeps_keep_last_and_every(tmp_path):
    rec, add = _hist_record(keep_last=4, every=2)
    rec.args.update(keep_last=4, every=2)                # as GradStats saves them
    for s in range(0, 40, 2): add(s)
    loaded = load(rec.save(tmp_path / 'run'))
    assert (loaded.keep_last, loaded.every) == (4, 2)
    for r in (rec, loaded):  # both go on alike
        r.add_step(40, 0, 0.1, 40.0, r.layer_index(['l0', 'l1']), np.zeros((2, len(METRICS))), hist=np.zeros((2, 25), np.int64))
    pd.testing.assert_frame_equal(rec.steps, loaded.steps)
    assert loaded.steps['kept_every'].iloc[-1] == 2


def _saved_hist_run(tmp_path, name='run', offset=0):
    rec, add = _hist_record()
    for s in range(3): add(s + offset)
    return rec.save(tmp_path / name)


@pytest.mark.parametrize('damage', ['truncated hist', 'duplicate step', 'hist of another run'])
def test_load_refuses_parquet_files_that_do_not_belong_together(tmp_path, damage):
    path = _saved_hist_run(tmp_path)
    if damage == 'truncated hist':
        pd.read_parquet(path / 'hist.parquet').iloc[:-2].to_parquet(path / 'hist.parquet', index=False)
    elif damage == 'duplicate step':
        steps = pd.read_parquet(path / 'steps.parquet')
        pd.concat([steps, steps.iloc[:1]]).to_parquet(path / 'steps.parquet', index=False)
    else:
        other = _saved_hist_run(tmp_path, 'other', offset=10)   # same shape, other steps
        (path / 'hist.parquet').write_bytes((other / 'hist.parquet').read_bytes())
    with pytest.raises(ValueError, match=str(path.name)):
        load(path)
    from fastai_gradstats.cli import main
    assert main(['summary', str(path)]) == 2             # the command says so in one line, no traceback


# --- each parameter group's learning rate ---------------------------------------------------------
def test_lrs_keep_every_groups_learning_rate_through_thinning_save_load_and_merge(tmp_path):
    layers = [{'name': n, 'module': 'Linear', 'shape': (2,), 'numel': 2, 'depth': d, 'group': d} for d, n in enumerate('ab')]
    record = GradRecord(layers, keep_last=4)
    index = record.layer_index(['a', 'b'])
    values = np.ones((2, len(METRICS)), np.float32)
    for step in range(40):
        record.add_step(step, 0, [1e-4 * (step + 1), 1e-3 * (step + 1)] if step != 7 else 0.5, 1.0, index, values)
    kept = record.steps['step'].tolist()
    assert len(kept) < 40  # thinned: .lrs keeps the same steps
    lrs = record.lrs
    expected = [(s, g, 0.5 if s == 7 else (1e-4, 1e-3)[g] * (s + 1)) for s in kept for g in ((0,) if s == 7 else (0, 1))]
    assert list(zip(lrs['step'], lrs['group'])) == [(s, g) for s, g, _ in expected]
    np.testing.assert_allclose(lrs['lr'], [lr for *_, lr in expected], rtol=1e-15)
    assert record.steps['lr'].tolist() == [lr for s, g, lr in expected if s == 7 or g == 1]  # .steps: the last group's
    again = load(record.save(tmp_path / 'run'))
    pd.testing.assert_frame_equal(again.lrs, lrs)
    other = load(tmp_path / 'run'); other.rank = 1
    again.rank = 0
    merged = merge([again, other])
    assert merged.lrs.columns.tolist() == ['rank', 'step', 'group', 'lr']
    pd.testing.assert_frame_equal(merged.lrs[merged.lrs['rank'] == 1].drop(columns='rank').reset_index(drop=True), lrs)
    for bad, error in (([], ValueError), ([[0.1, 0.2]], ValueError), ('0.1', TypeError), ([0.1, 'x'], TypeError)):
        with pytest.raises(error, match='`lr`'): record.add_step(100, 0, bad, 1.0, index, values)


def test_a_run_saved_without_lrs_loads_with_none_known(tmp_path):
    "Runs saved before the groups' learning rates were kept have no lrs.parquet: they load, with an empty `lrs`."
    record, _ = rich_fit()
    path = record.save(tmp_path / 'run')
    (path / 'lrs.parquet').unlink()
    old = load(path)
    assert len(old.lrs) == 0 and old.steps['lr'].tolist() == record.steps['lr'].tolist()
    assert len(load(old.save(tmp_path / 'again')).lrs) == 0


def test_a_record_pickled_before_lrs_existed_reads_and_records_on():
    learn = make_learner(tiny_mlp(), small_dls(n_train=32, bs=16))
    learn.fit(1, 0.1, cbs=GradStats())
    state = pickle.loads(pickle.dumps(learn.grad_stats.__getstate__()))
    del state['_lrs']; del state['_step_cols']['n_groups']  # what an earlier version's pickle holds
    old = GradRecord.__new__(GradRecord)
    old.__setstate__(state)
    assert len(old.lrs) == 0
    index = old.layer_index(list(learn.grad_stats.layers['name']))
    old.add_step(99, 1, [0.1, 0.2], 1.0, index, np.ones((len(index), len(old.value_columns)), np.float32))
    assert old.lrs.values.tolist() == [[99, 0, 0.1], [99, 1, 0.2]]


def test_a_run_saved_before_the_unit_statistics_loads_with_them_unknown(tmp_path):
    "stats.parquet of a run saved before shared_zero_frac and unit_spread existed lacks them: they load as NaN, the rest as saved."
    record, _ = rich_fit()
    path = record.save(tmp_path / 'run')
    stats = pd.read_parquet(path / 'stats.parquet')
    stats.drop(columns=['shared_zero_frac', 'unit_spread']).to_parquet(path / 'stats.parquet', index=False)
    old = load(path)
    assert old.df[['shared_zero_frac', 'unit_spread']].isna().all().all()
    pd.testing.assert_frame_equal(old.df.drop(columns=['shared_zero_frac', 'unit_spread']),
                                  record.df.drop(columns=['shared_zero_frac', 'unit_spread']))


def test_a_record_pickled_before_the_steps_kept_their_squared_norm_reads_the_same_total_norms():
    "A pickle without the per-step squared norms (`grad_sq`) gets them from its rows: `steps['grad_norm']` as `df` gives it."
    learn = make_learner(tiny_mlp(), small_dls(n_train=64, bs=16))
    learn.fit(1, 0.1, cbs=GradStats())
    state = pickle.loads(pickle.dumps(learn.grad_stats.__getstate__()))
    del state['_step_cols']['grad_sq']  # what an earlier version's pickle holds
    old = GradRecord.__new__(GradRecord)
    old.__setstate__(state)
    by_rows = old.df.groupby('step', observed=True)['grad_norm'].apply(lambda g: np.sqrt((g.astype(float) ** 2).sum()))
    np.testing.assert_allclose(old.steps['grad_norm'].to_numpy(), by_rows.to_numpy(), rtol=1e-12)
    index = old.layer_index(list(learn.grad_stats.layers['name']))
    old.add_step(99, 1, 0.1, 1.0, index, np.full((len(index), len(old.value_columns)), 2, np.float32))
    assert old.steps['grad_norm'].iloc[-1] == pytest.approx(2 * np.sqrt(len(index)))
