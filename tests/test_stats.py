"""`fastai_gradstats.stats` on bare tensors: every column of `METRICS` against a float64 reference
computed from the definitions (numpy), NaN/Inf propagation, exact counts, bad arguments."""
import math
import pickle

import numpy as np
import pytest
import torch

import fastai_gradstats.stats as stats_module
from fastai_gradstats.stats import HIST_BINS, METRICS, PAD_ELEMENTS, LayerStats, MagnitudeHistogram, _StepGraph, count_nonfinite

from helpers import CallNames, assert_stats_close, hist_counts, reference_stats

NAN, INF = float('nan'), float('inf')


def as_dict(row):
    return dict(zip(METRICS, row.tolist()))


def mixed_tensors(seed=0):
    """Gradients of several ranks, with exact zeros, wholly zero units (dead at any tolerance) and
    units whose elements are all small (dead only with a tolerance), and matching parameters."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(s, generator=gen)
    w = r(6, 5) * 0.1                      # 2-D: rows 1 and 4 zero, row 3 small
    w[1] = 0; w[4] = 0; w[3] = r(5) * 1e-4; w[0, 2] = 0
    conv = r(4, 3, 2, 2) * 0.1             # 4-D: channel 2 zero, channel 0 small
    conv[2] = 0; conv[0] = r(3, 2, 2) * 1e-4
    cube = r(3, 4, 2) * 0.1                # 3-D: unit 1 zero
    cube[1] = 0
    bias = r(7) * 0.1                      # 1-D with two zeros
    bias[[2, 5]] = 0
    grads = [w, conv, cube, bias, r(1, 1), r(1), torch.tensor(0.25), torch.zeros(3, 2), r(2, 9) * 1e-4]
    params = [r(*g.shape) for g in grads]
    return grads, params


@pytest.mark.parametrize('zero_tol', [0.0, 1e-3])
def test_every_metric_equals_float64_reference(zero_tol):
    grads, params = mixed_tensors()
    out = LayerStats([g.shape for g in grads], zero_tol=zero_tol)(grads, params)
    assert out.shape == (len(grads), len(METRICS)) and out.dtype == torch.float32
    for i, (g, p) in enumerate(zip(grads, params)):
        assert_stats_close(as_dict(out[i]), reference_stats(g, p, zero_tol), f'tensor {i} {tuple(g.shape)}')


def test_hand_computed_values():
    g = torch.tensor([[3., -4., 0.], [0., 0., 0.]])   # norm 5, max 4, mean -1/6, 4 zeros of 6, 1 dead unit of 2
    p = torch.tensor([[1., 2., 2.], [0., 0., 0.]])    # norm 3
    s = as_dict(LayerStats([g.shape])([g], [p])[0])
    assert s['grad_norm'] == pytest.approx(5.0, rel=1e-6)
    assert s['param_norm'] == pytest.approx(3.0, rel=1e-6)
    assert s['grad_max'] == 4.0
    assert s['grad_mean'] == pytest.approx(-1 / 6, rel=1e-6)
    # Bessel: sum((x - mean)^2) / (n - 1) with x = 3, -4, 0, 0, 0, 0
    var = ((3 + 1 / 6) ** 2 + (-4 + 1 / 6) ** 2 + 4 * (1 / 6) ** 2) / 5
    assert s['grad_std'] == pytest.approx(math.sqrt(var), rel=1e-5)
    assert s['zero_frac'] == pytest.approx(4 / 6, abs=1e-7)
    assert s['dead_frac'] == 0.5


def test_dead_frac_counts_units_along_dim0_and_is_nan_below_two_dims():
    lin = torch.ones(4, 3); lin[0] = 0; lin[2] = 0                     # 2 of 4 units dead
    conv = torch.ones(4, 3, 2, 2); conv[1] = 0; conv[3, 0, 0, 0] = 0    # 1 of 4 channels dead (channel 3 only partly zero)
    vec, scalar = torch.zeros(5), torch.tensor(0.0)                    # 1-D and 0-D: no units, NaN
    grads = [lin, conv, vec, scalar]
    out = LayerStats([g.shape for g in grads])(grads, [torch.ones_like(g) for g in grads])
    col = out[:, METRICS.index('dead_frac')]
    assert col[0].item() == 0.5 and col[1].item() == 0.25
    assert math.isnan(col[2].item()) and math.isnan(col[3].item())
    zero = out[:, METRICS.index('zero_frac')]
    assert zero[0].item() == 0.5 and zero[1].item() == pytest.approx(13 / 48, abs=1e-7)
    assert zero[2].item() == 1.0 and zero[3].item() == 1.0


def test_zero_tol_counts_small_elements_and_small_units():
    g = torch.tensor([[0.0, 1e-4, -1e-4], [2e-3, -0.5, 0.0], [5e-4, -9e-4, 1e-5]])
    p = torch.ones_like(g)
    exact = as_dict(LayerStats([g.shape], zero_tol=0)([g], [p])[0])
    loose = as_dict(LayerStats([g.shape], zero_tol=1e-3)([g], [p])[0])
    assert exact['zero_frac'] == pytest.approx(2 / 9, abs=1e-7) and exact['dead_frac'] == 0
    assert loose['zero_frac'] == pytest.approx(7 / 9, abs=1e-7)  # all but 2e-3 and -0.5
    assert loose['dead_frac'] == pytest.approx(2 / 3, abs=1e-7)  # rows 0 and 2


def test_zero_tol_is_compared_exactly_as_documented():
    """`zero_frac` is the fraction of elements with |g| <= zero_tol. float32(0.1) = 0.10000000149 is greater
    than 0.1, so with zero_tol=0.1 it is not a zero element; `dead_frac` (compared in float64) agrees."""
    g = torch.tensor([[0.1], [0.0]])
    s = as_dict(LayerStats([g.shape], zero_tol=0.1)([g], [torch.ones_like(g)])[0])
    ref = reference_stats(g, torch.ones_like(g), 0.1)
    assert ref['zero_frac'] == 0.5 and ref['dead_frac'] == 0.5
    assert s['dead_frac'] == 0.5
    assert s['zero_frac'] == 0.5, "zero_frac counts float32(0.1) > 0.1 as <= zero_tol (tolerance rounded to float32)"


def _refined(grads, params):
    "What the callback records: the batched statistics, then `refine` for the rows float32 cannot give."
    plan = LayerStats([g.shape for g in grads])
    values, counts = plan.refine(plan(grads, params).numpy(), grads, params)
    return values, counts


def test_grad_std_is_accurate_when_the_mean_dominates():
    "`grad_std` is documented 'as torch.std': it must stay accurate for near-constant gradients (after `refine`)."
    gen = torch.Generator().manual_seed(0)
    g = 1 + 1e-3 * torch.randn(1000, generator=gen)
    s = as_dict(torch.from_numpy(_refined([g], [torch.ones_like(g)])[0][0]))
    ref = float(np.std(g.double().numpy(), ddof=1))
    assert torch.std(g).item() == pytest.approx(ref, rel=1e-4)  # what float32 torch.std achieves
    assert s['grad_std'] == pytest.approx(ref, rel=1e-3)


def test_large_finite_gradients_give_finite_norms():
    "An exploding but finite gradient (|g| = 1e20, norm 1e21 < float32 max 3.4e38) must not read as Inf."
    g = torch.full((100,), 1e20)
    g[::2] = -3e19
    p = torch.full((100,), 1e20)
    values, counts = _refined([g], [p])
    s = as_dict(torch.from_numpy(values[0]))
    ref = reference_stats(g, p)
    assert counts.tolist() == [[0, 0]]
    assert math.isfinite(ref['grad_norm']) and ref['grad_norm'] < 3.4e38
    assert_stats_close(s, ref, 'large gradient')
    assert count_nonfinite([g]).tolist() == [[0, 0]]


@pytest.mark.parametrize('zero_tol', [0.0, 0.05])
def test_nan_and_inf_propagate_and_are_counted_exactly(zero_tol):
    a = torch.ones(3, 4) * 0.5; a[0, 1] = NAN; a[2, 3] = NAN; a[1, 0] = 0       # NaN in first and last rows
    b = torch.linspace(-1, 1, 10); b[4] = INF                                    # +Inf
    c = torch.ones(2, 3); c[0, 0] = -INF; c[1, 2] = NAN; c[1, 1] = 0             # -Inf and NaN
    d = torch.ones(5, 2); d[4, 1] = NAN                                          # NaN after a larger finite row
    d[0, 0] = 7.0
    e = torch.tensor([[0.0, 0.0], [INF, -INF]])                                   # a zero unit and two Inf
    clean = torch.arange(6.).reshape(2, 3)
    grads = [a, b, c, d, e, clean]
    params = [torch.ones_like(g) for g in grads]
    out = LayerStats([g.shape for g in grads], zero_tol=zero_tol)(grads, params)
    for i, (g, p) in enumerate(zip(grads, params)):
        assert_stats_close(as_dict(out[i]), reference_stats(g, p, zero_tol), f'tensor {i}')
    col = lambda m: out[:, METRICS.index(m)].tolist()
    assert [math.isnan(x) for x in col('grad_norm')] == [True, False, True, True, False, False]
    assert col('grad_norm')[1] == INF and col('grad_norm')[4] == INF
    assert [math.isnan(x) for x in col('grad_max')] == [True, False, True, True, False, False]
    assert col('param_norm') == pytest.approx([math.sqrt(g.numel()) for g in grads])
    assert col('dead_frac')[4] == 0.5  # the zero unit is dead; the Inf one is not
    assert count_nonfinite(grads).tolist() == [[2, 0], [0, 1], [1, 1], [1, 0], [0, 2], [0, 0]]
    assert count_nonfinite(grads).dtype == torch.int64


def test_inputs_are_left_unchanged():
    grads, params = mixed_tensors(1)
    before = [g.clone() for g in grads], [p.clone() for p in params]
    LayerStats([g.shape for g in grads], zero_tol=1e-3)(grads, params)
    count_nonfinite(grads)
    assert all(torch.equal(x, y) for x, y in zip(grads, before[0]))
    assert all(torch.equal(x, y) for x, y in zip(params, before[1]))


def test_empty_lists():
    assert LayerStats([])([], []).shape == (0, len(METRICS))
    assert count_nonfinite([]).shape == (0, 2)


def test_stats_can_be_reused_every_step():
    gen = torch.Generator().manual_seed(3)
    stats = LayerStats([(4, 3), (3,)])
    for _ in range(3):
        grads = [torch.randn(4, 3, generator=gen), torch.randn(3, generator=gen)]
        params = [torch.randn(4, 3, generator=gen), torch.randn(3, generator=gen)]
        out = stats(grads, params)
        for i in range(2): assert_stats_close(as_dict(out[i]), reference_stats(grads[i], params[i]), f'tensor {i}')


@pytest.mark.parametrize('zero_tol', [-1, -1e-9, NAN, INF, '0.1', None])
def test_bad_zero_tol(zero_tol):
    with pytest.raises((ValueError, TypeError), match='zero_tol'):
        LayerStats([(2, 2)], zero_tol=zero_tol)


def test_wrong_number_of_tensors():
    stats = LayerStats([(2, 2), (2,)])
    g, b = torch.ones(2, 2), torch.ones(2)
    with pytest.raises(ValueError, match='`grads` and `params` must hold 2 tensors'): stats([g], [g, b])
    with pytest.raises(ValueError, match='`grads` and `params` must hold 2 tensors'): stats([g, b], [g])
    with pytest.raises(ValueError, match='`grads` and `params` must hold 2 tensors'): stats([g, b, b], [g, b, b])
    with pytest.raises(ValueError, match=r'`grads\[1\]` has shape \(3,\)'): stats([g, torch.zeros(3)], [g, b])


def test_non_list_inputs():
    stats = LayerStats([(2, 2)])
    g = torch.ones(2, 2)
    with pytest.raises(TypeError, match='grads'): stats(g, [g])
    with pytest.raises(TypeError, match='params'): stats([g], g)
    with pytest.raises(TypeError, match='grads'): stats((x for x in [g]), [g])
    with pytest.raises(TypeError, match='grads'): stats([g.numpy()], [g])
    with pytest.raises(TypeError, match='params'): stats([g], [1.0])
    with pytest.raises(TypeError, match='grads'): count_nonfinite(g)
    with pytest.raises(TypeError, match='grads'): count_nonfinite([np.ones(3)])


# --- the work buffer: blocks of rows, rows longer than the buffer, dtypes, layouts --------------------
def assorted_tensors(seed=0):
    """`mixed_tensors` plus a long vector, wide rows, a tensor with more rows than the others, -0.0 zeros
    (which count as zero) and NaN/Inf, so that small buffers split tensors over several blocks."""
    gen = torch.Generator().manual_seed(seed)
    grads, params = mixed_tensors(seed)
    long = torch.randn(300, generator=gen) * 1e-2; long[::7] = 0; long[5] = -0.0
    wide = torch.randn(3, 40, generator=gen); wide[1] = -0.0; wide[2, :3] = NAN; wide[0, 4] = INF
    tall = torch.randn(50, 2, generator=gen); tall[10:20] = 0
    extra = [long, wide, tall, torch.randn(6, 5, generator=gen)]  # the last has the same shape as grads[0]
    return grads + extra, params + [torch.randn(t.shape, generator=gen) for t in extra]


@pytest.mark.parametrize('zero_tol', [0.0, 1e-3])
@pytest.mark.parametrize('chunk_elements', [1, 7, 64, 10**6])
def test_statistics_do_not_depend_on_the_work_buffer_size(zero_tol, chunk_elements):
    """Tensors split over several blocks, rows longer than the buffer (reduced where they lie) and one
    block for everything all give the float64 reference; the buffer never exceeds `chunk_elements`."""
    grads, params = assorted_tensors()
    plan = LayerStats([g.shape for g in grads], zero_tol=zero_tol, chunk_elements=chunk_elements)
    values, counts = plan.refine(plan(grads, params).numpy(), grads, params)
    for i, (g, p) in enumerate(zip(grads, params)):
        got = dict(zip(METRICS, values[i].tolist()), n_nan=counts[i, 0], n_inf=counts[i, 1])
        assert_stats_close(got, reference_stats(g, p, zero_tol), f'tensor {i} {tuple(g.shape)}')
    chunks = plan._layout(grads).chunks
    assert all(c.direct or c.n_rows * c.row_length <= chunk_elements for c in chunks)
    # float32 gradients only; narrow rows may be padded with at most PAD_ELEMENTS zeros to join wider ones
    assert 0 < plan.work_bytes <= 4 * min(chunk_elements, sum(g.numel() for g in grads) + PAD_ELEMENTS)
    assert sum(c.direct for c in chunks) == sum(g.numel() // (g.shape[0] if g.dim() >= 2 else 1) > chunk_elements
                                                for g in grads if g.numel())


def test_negative_zero_counts_as_zero():
    g = torch.tensor([[-0.0, 1.0, 0.0], [-0.0, -0.0, 0.0]])
    s = as_dict(LayerStats([g.shape])([g], [torch.ones_like(g)])[0])
    assert s['zero_frac'] == pytest.approx(5 / 6, abs=1e-7) and s['dead_frac'] == 0.5


def test_half_precision_float64_and_non_contiguous_gradients():
    gen = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(s, generator=gen)
    grads = [r(6, 5).half(), r(9).bfloat16(), r(3, 3).double(), r(5, 7).t(), r(4, 3, 2, 2).to(memory_format=torch.channels_last),
             r(8, 6)[:, ::2]]
    grads[0][2] = 0; grads[3][1] = 0; grads[4][0] = 0
    params = [r(*g.shape).to(g.dtype) for g in grads]
    for chunk_elements in (5, 10**6):
        out = LayerStats([g.shape for g in grads], chunk_elements=chunk_elements)(grads, params)
        for i, (g, p) in enumerate(zip(grads, params)):
            assert_stats_close(as_dict(out[i]), reference_stats(g, p), f'tensor {i} {g.dtype} {chunk_elements}')


@pytest.mark.parametrize('chunk_elements', [1, 7, 64, 10**6])
def test_parameter_norms_by_foreach_norm_as_on_cuda(monkeypatch, chunk_elements):
    """On CUDA a layout takes the parameters' norms with `torch._foreach_norm` (one fused kernel there) and puts each in
    its tensor's first row, the other rows 0. Forced here on the CPU, every statistic still matches the float64
    reference over two steps: tensors split over blocks or reduced where they lie, half and float64 precision
    (float32 blocks staged into a float64 result) and an empty tensor."""
    monkeypatch.setattr(stats_module.layout, '_param_norms_by_rows', lambda device: False)
    gen = torch.Generator().manual_seed(3)
    grads, params = assorted_tensors()
    more = [torch.randn(5, 4, generator=gen).double(), torch.randn(9, generator=gen).half(), torch.zeros(0, 3)]
    grads, params = grads + more, params + [torch.randn(t.shape, generator=gen).to(t.dtype) for t in more]
    plan = LayerStats([g.shape for g in grads], chunk_elements=chunk_elements)
    for step in range(2):
        values, counts = plan.refine(plan(grads, params).numpy(), grads, params)
        assert not plan._last.param_rows
        for i, (g, p) in enumerate(zip(grads[:-1], params)):
            got = dict(zip(METRICS, values[i].tolist()), n_nan=counts[i, 0], n_inf=counts[i, 1])
            assert_stats_close(got, reference_stats(g, p), f'step {step} tensor {i} {tuple(g.shape)} {g.dtype}')
        assert values[-1, :2].tolist() == [0, 0] and np.isnan(values[-1, 2:]).all()  # the empty tensor
        params = [p * (i + 2) for i, p in enumerate(params)]


def test_parameters_laid_out_unlike_their_gradients():
    """The parameters are copied into the gradients' block: strides that differ from their gradient's (transposed,
    channels_last, sliced) and NaN/Inf elements give the reference's norms; a parameter of another shape is refused."""
    gen = torch.Generator().manual_seed(4)
    r = lambda *s: torch.randn(s, generator=gen)
    grads = [r(5, 7), r(7, 5).t(), r(4, 3, 2, 2), r(4, 3, 2, 2).to(memory_format=torch.channels_last), r(6, 8), r(9)]
    params = [r(7, 5).t(), r(5, 7), r(4, 3, 2, 2).to(memory_format=torch.channels_last), r(4, 3, 2, 2), r(6, 16)[:, ::2], r(9)]
    params[4][1, 2] = NAN; params[5][3] = INF
    for chunk_elements in (7, 10**6):
        plan = LayerStats([g.shape for g in grads], chunk_elements=chunk_elements)
        values, counts = plan.refine(plan(grads, params).numpy(), grads, params)
        for i, (g, p) in enumerate(zip(grads, params)):
            got = dict(zip(METRICS, values[i].tolist()), n_nan=counts[i, 0], n_inf=counts[i, 1])
            assert_stats_close(got, reference_stats(g, p), f'tensor {i} {chunk_elements}')
    with pytest.raises(ValueError, match='params'): LayerStats([(4, 3)])([torch.ones(4, 3)], [torch.ones(1, 3)])


def test_an_object_pickled_by_an_older_version_plans_again():
    """A layout without the fields of this version (as one pickled before the parameter norms moved into the block)
    is dropped when loaded, and the object records on with the reference's values."""
    import pickle
    grads, params = mixed_tensors()
    plan = LayerStats([g.shape for g in grads])
    plan(grads, params)
    del next(iter(plan._layouts.values())).param_rows
    copy = pickle.loads(pickle.dumps(plan))
    assert copy._layouts == {} and copy._last is None
    values = copy(grads, params).numpy()
    for i, (g, p) in enumerate(zip(grads, params)):
        assert_stats_close(as_dict(values[i]), reference_stats(g, p), f'tensor {i}')


def test_parameter_norms_are_taken_along_the_rows_on_the_cpu():
    grads, params = mixed_tensors()
    plan = LayerStats([g.shape for g in grads])
    with CallNames() as calls: plan(grads, params)
    assert plan._last.param_rows and '_foreach_norm' not in calls.names


def test_empty_tensors_have_zero_norms_and_no_other_statistics():
    grads = [torch.zeros(0, 3), torch.zeros(0), torch.zeros(5, 0), torch.ones(2, 2)]
    out = LayerStats([g.shape for g in grads])(grads, [g + 1 for g in grads])
    for row in out[:3]:
        s = as_dict(row)
        assert s['grad_norm'] == 0 and s['param_norm'] == 0
        assert all(math.isnan(s[m]) for m in ('grad_max', 'grad_mean', 'grad_std', 'zero_frac', 'dead_frac'))
    assert_stats_close(as_dict(out[3]), reference_stats(grads[3], grads[3] + 1))
    # only empty tensors, with and without the histogram: nothing to reduce, nothing counted
    for hist in (False, True):
        empty = [torch.zeros(0, 3), torch.zeros(5, 0)]
        plan = LayerStats([g.shape for g in empty], hist=hist)
        values, counts = plan.assemble(plan.collect(empty, empty).numpy())
        assert (values[:, :2] == 0).all() and np.isnan(values[:, 2:]).all()
        assert (counts is None) if not hist else (counts == 0).all()


@pytest.mark.parametrize('chunk_elements', [3, 64, 10**6])
def test_histogram_counted_with_the_statistics(chunk_elements):
    """`LayerStats(hist=True)` counts the same histogram as `MagnitudeHistogram` on the same sample, and with
    every element counted (`hist_sample=None`) the independent float64 binning."""
    grads, params = assorted_tensors(2)
    grads[0][0, 0] = 3e-20; grads[1][1, 0, 0, 0] = 2e5          # `tiny` and `huge` bins
    shapes = [g.shape for g in grads]
    for sample in (None, 16):
        plan = LayerStats(shapes, hist=True, hist_sample=sample, chunk_elements=chunk_elements)
        values, hist = plan.assemble(plan.collect(grads, params).numpy())
        assert hist.shape == (len(grads), len(HIST_BINS)) and hist.dtype == np.int64
        np.testing.assert_array_equal(hist, MagnitudeHistogram(shapes, sample=sample)(grads).numpy())
        if sample is None:
            for i, g in enumerate(grads): np.testing.assert_array_equal(hist[i], hist_counts(g), err_msg=f'tensor {i}')
        else:
            assert (hist.sum(1) == [min(g.numel(), 16) for g in grads]).all()


def test_collect_appends_extra_values_and_leaves_inputs_unchanged():
    grads, params = assorted_tensors(3)
    before = [g.clone() for g in grads], [p.clone() for p in params]
    plan = LayerStats([g.shape for g in grads], zero_tol=1e-3, hist=True, chunk_elements=16)
    raw = plan.collect(grads, params, extra=torch.tensor([2.5, -1.0]))
    assert raw.dtype == torch.float32 and raw[-2:].tolist() == [2.5, -1.0]
    values, _ = plan.assemble(raw.numpy().copy())
    np.testing.assert_array_equal(values, plan(grads, params).numpy())
    # a list of tensors, in order (a 0-d loss, then a vector), and more values than the room kept for them
    room = len(grads) + 1   # the result keeps room for the loss and one value per tensor; more are appended
    for extra in ([torch.tensor(0.5), torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)],
                  [torch.arange(room, dtype=torch.float32), torch.tensor([[7.0]])]):
        flat = torch.cat([e.reshape(-1).float() for e in extra])
        raw = plan.collect(grads, params, extra=extra)
        assert raw[len(raw) - len(flat):].tolist() == flat.tolist()
        assert (raw.data_ptr() == plan._last.result.data_ptr()) == (len(flat) <= room)
        np.testing.assert_array_equal(plan.assemble(raw.numpy())[0], values)
    with pytest.raises(TypeError, match='raw'): plan.assemble(raw.numpy().astype(np.float64))
    with pytest.raises(ValueError, match='raw'): plan.assemble(raw.numpy()[:5])
    with pytest.raises(TypeError, match='extra'): plan.collect(grads, params, extra=[1.0])
    same = lambda x, y: (torch.equal(torch.isnan(x), torch.isnan(y)) and torch.equal(torch.signbit(x), torch.signbit(y))
                         and torch.equal(x.nan_to_num(0.0), y.nan_to_num(0.0)))   # bit for bit, NaN and -0.0 included
    assert all(same(x, y) for x, y in zip(grads, before[0]))
    assert all(same(x, y) for x, y in zip(params, before[1]))


def test_bad_chunk_elements():
    for bad in (0, -5, np.int64(0)):
        with pytest.raises(ValueError, match='`chunk_elements`'): LayerStats([(2, 2)], chunk_elements=bad)
    for bad in (2.5, True, None, '8'):
        with pytest.raises(TypeError, match='`chunk_elements`'): LayerStats([(2, 2)], chunk_elements=bad)
    with pytest.raises(TypeError, match='hist'): LayerStats([(2, 2)], hist='yes')
    assert LayerStats([(2, 2)], chunk_elements=np.int64(8)).chunk_elements == 8


def test_bad_shapes_hist_sample_and_seed_are_named():
    """Shapes must be sequences of sizes >= 0; `hist_sample` is checked under its own name (with or without `hist`), a
    numpy integer is an int; `MagnitudeHistogram`'s `seed` must be an int."""
    for bad in (5, 'ab', torch.zeros(2, 2), [(2, 'a')], [(2, 1.5)], [3], [(True, 2)]):
        with pytest.raises(TypeError, match='`shapes`'): LayerStats(bad)
    with pytest.raises(ValueError, match='`shapes`'): LayerStats([(2, -3)])
    for hist in (False, True):
        with pytest.raises(ValueError, match='`hist_sample`'): LayerStats([(4, 4)], hist=hist, hist_sample=0)
        with pytest.raises(TypeError, match='`hist_sample`'): LayerStats([(4, 4)], hist=hist, hist_sample=2.0)
    with pytest.raises(TypeError, match='`seed`'): MagnitudeHistogram([(50,)], sample=10, seed=1.5)
    with pytest.raises(TypeError, match='`seed`'): MagnitudeHistogram([(50,)], sample=10, seed='a')
    # numpy integers count as ints: the same sample as the Python int
    grads = [torch.randn(40, 30)]
    plan, same = LayerStats([(40, 30)], hist=True, hist_sample=np.int64(100)), LayerStats([(40, 30)], hist=True, hist_sample=100)
    torch.testing.assert_close(plan.collect(grads, grads), same.collect(grads, grads), rtol=0, atol=0)
    assert torch.equal(MagnitudeHistogram([(500,)], sample=20, seed=np.int64(3)).index[0],
                       MagnitudeHistogram([(500,)], sample=20, seed=3).index[0])


def _vanishing_net_gradients(n, seed=0):
    """`n` gradients of a deep net whose early layers' gradients vanish: elements around 1e-25, whose
    squares underflow float32, one with a NaN, one with an Inf, one a single element, one constant."""
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(4 + i % 3, 5, generator=gen) * 1e-25 for i in range(n)]
    grads[1][0, 0] = NAN
    grads[2][1, 1] = INF
    grads[3] = torch.tensor([3e-24])
    grads[4] = torch.full((6,), 2e-24)
    return grads, [torch.randn(g.shape, generator=gen) for g in grads]


def test_refine_fixes_the_norms_of_tiny_parameters(monkeypatch):
    """Parameters of 1e-21 to 3e-23 (squares at or below float32's smallest normal): `refine` gives their norms in
    float64. A parameter of zeros reads 0 and costs no refine; one whose every square vanishes (elements below
    about 2.6e-23, two or more of them) reads 0 too, as `torch.linalg.vector_norm` gives it (documented)."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 8), (4, 8), (6,), (3, 5), (4, 8)]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    params = [torch.randn(shapes[0], generator=gen) * 1e-21, torch.randn(shapes[1], generator=gen) * 1e-22,
              torch.full((6,), 3e-23), torch.zeros(3, 5), torch.randn(shapes[4], generator=gen) * 1e-26]
    redone = []
    original = stats_module.exact._exact_stats
    monkeypatch.setattr(stats_module.exact, '_exact_stats', lambda g, p, *a: redone.append(len(g)) or original(g, p, *a))
    plan = LayerStats(shapes)
    values, _ = plan.refine(plan(grads, params).numpy(), grads, params)
    assert redone == [3]  # the three tiny ones, not the zeros nor the vanished one
    for i in range(4):
        assert_stats_close(dict(zip(METRICS, values[i].tolist())), reference_stats(grads[i], params[i]), f'tensor {i}')
    assert values[4, METRICS.index('param_norm')] == 0 == float(torch.linalg.vector_norm(params[4]))
    healthy = [torch.randn(s, generator=gen) for s in shapes]
    plan.refine(plan(grads, healthy).numpy(), grads, healthy)
    assert redone == [3]  # normal parameters (and gradients) cost no refine


@pytest.mark.parametrize('chunk_elements', [8, 2**22])
def test_refine_fixes_many_rows_with_batched_ops(chunk_elements):
    """Every row of a vanishing deep net needs `refine`: its float64 values match numpy's, and it takes the
    same number of segmented sums for 10 flagged tensors as for 60 (no loop of reductions per tensor)."""
    reductions = {}
    for n in (10, 60):
        grads, params = _vanishing_net_gradients(n)
        plan = LayerStats([g.shape for g in grads], chunk_elements=chunk_elements)
        raw = plan(grads, params).numpy()
        assert (raw[5:, METRICS.index('grad_norm')] == 0).all()   # float32 squares underflow: refine must fix them
        with CallNames() as calls: values, counts = plan.refine(raw, grads, params)
        for i, (g, p) in enumerate(zip(grads, params)):
            ref = reference_stats(g, p)
            got = dict(zip(METRICS, values[i].tolist()), n_nan=counts[i, 0], n_inf=counts[i, 1])
            for key in ('grad_norm', 'param_norm', 'grad_mean', 'grad_std', 'unit_spread'):
                assert got[key] == pytest.approx(ref[key], rel=1e-5, nan_ok=True), (i, key)
            assert (got['n_nan'], got['n_inf']) == (ref['n_nan'], ref['n_inf'])
        reductions[n] = sum(name in ('index_add_', 'norm', 'std', 'mean', 'sum') for name in calls.names)
    # per group of tensors: two segmented sums for the tensors' columns, two for their units' norms (unit_spread)
    if chunk_elements > 1000: assert reductions[10] == reductions[60] == 4
    else: assert reductions[60] > reductions[10]   # groups of at most chunk_elements / 8 elements


@pytest.mark.parametrize('zero_tol', [0.0, 1e-3])
def test_narrow_rows_share_a_padded_block_step_after_step(zero_tol):
    """Rows of 3, 5, 8 and 40 elements (and a bias, a scalar) land in fewer blocks, shorter rows followed by
    zeros. The in-place |g| and `<= zero_tol` of one step must not leak into the next: three steps with
    different gradients, NaN and a dead row, all equal the float64 reference, histograms included."""
    shapes = [torch.Size(s) for s in [(4, 3), (6, 5), (2, 2, 2), (7, 40), (9,), ()]]
    params = [torch.randn(s) for s in shapes]
    plan = LayerStats(shapes, zero_tol=zero_tol, hist=True, hist_sample=None)
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        grads = [torch.randn(s, generator=gen) * 10.0 ** -step for s in shapes]
        grads[step][0] = 0                         # a dead unit, a different tensor each step
        if step == 1: grads[3][2, 7] = NAN
        values, hist = plan.assemble(plan.collect(grads, params).numpy())
        values, counts = plan.refine(values, grads, params)
        for i, (g, p) in enumerate(zip(grads, params)):
            got = dict(zip(METRICS, values[i].tolist()), n_nan=counts[i, 0], n_inf=counts[i, 1])
            assert_stats_close(got, reference_stats(g, p, zero_tol), f'step {step} tensor {i}')
            if zero_tol == 0: np.testing.assert_array_equal(hist[i], hist_counts(g), err_msg=f'step {step} tensor {i}')
    chunks = plan._layout(grads).chunks
    assert len(chunks) < len({s.numel() // (s[0] if len(s) >= 2 else 1) for s in shapes})   # fewer blocks than row lengths
    assert any(c.pad_targets for c in chunks)


@pytest.mark.parametrize('zero_tol', [0.0, 0.5])
def test_zero_and_dead_fractions_are_exact_ratios_in_padded_blocks(zero_tol):
    """Narrow rows padded into a wider block: the zeros of the padding are subtracted as whole numbers, so a
    tensor without zero elements reads exactly 0 and one with k of n reads float32(k / n), not 1e-16 off."""
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(4, 16, generator=gen) + 5, torch.randn(10, generator=gen) + 5, torch.randn(7, generator=gen) + 5,
             torch.randn(3, 9, generator=gen) + 5, torch.randn(13, generator=gen) + 5]
    grads[3][1] = 0; grads[3][0, :2] = 0; grads[4][[2, 5, 11]] = 0
    plan = LayerStats([g.shape for g in grads], zero_tol=zero_tol)
    assert any(c.pad_targets for c in plan._layout(grads).chunks)   # the narrow rows are padded
    values = plan(grads, grads).numpy()
    for i, g in enumerate(grads):
        zeros = int((g.abs() <= zero_tol).sum())
        assert values[i, METRICS.index('zero_frac')] == np.float32(zeros / g.numel()), f'tensor {i}'
        if g.dim() == 2:
            dead = int((g.abs() <= zero_tol).all(1).sum())
            assert values[i, METRICS.index('dead_frac')] == np.float32(dead / g.shape[0]), f'tensor {i}'


def test_histogram_with_a_float64_gradient():
    "A float64 gradient makes the result float64: histogram counts travel as int64 bits and stay exact."
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(6, 5, generator=gen).double() * 1e-3, torch.randn(40, generator=gen) * 1e3]
    grads[0][0, 0] = 0; grads[1][3] = float('inf')
    plan = LayerStats([g.shape for g in grads], hist=True, hist_sample=None)
    raw = plan.collect(grads, grads)
    assert raw.dtype == torch.float64
    _, hist = plan.assemble(raw.numpy())
    for i, g in enumerate(grads): np.testing.assert_array_equal(hist[i], hist_counts(g), err_msg=f'tensor {i}')


def test_same_gradient_tensors_updated_in_place_step_after_step():
    # the training loop hands the same .grad tensors every step (fastai zeroes them in place): each step's
    # statistics are those of the current values, and a tensor given a new shape is refused, not misread
    grads, params = mixed_tensors(4)
    plan = LayerStats([g.shape for g in grads], zero_tol=1e-3)
    gen = torch.Generator().manual_seed(5)
    for step in range(3):
        for g, p in zip(grads, params):
            g.copy_(torch.randn(g.shape, generator=gen) * (step + 1)); p.add_(0.1)
        grads[0][2] = 0  # a dead unit, in place
        out = plan(grads, params)
        for i, (g, p) in enumerate(zip(grads, params)):
            assert_stats_close(as_dict(out[i]), reference_stats(g, p, zero_tol=1e-3), f'step {step}, tensor {i}')
    grads[1].data = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r'shape \(2, 2\)'): plan(grads, params)
    with pytest.raises(ValueError, match=r'shape \(2, 2\)'): plan._collect(grads, params, [])


def test_collect_reads_parameters_without_recording_and_keeps_the_grad_mode():
    grads, params = mixed_tensors(6)
    params = [p.requires_grad_() for p in params]
    plan = LayerStats([g.shape for g in grads])
    assert not plan.collect(grads, params).requires_grad and torch.is_grad_enabled()
    with torch.no_grad():
        plan.collect(grads, params)
        assert not torch.is_grad_enabled()
    with pytest.raises(ValueError): plan.collect(grads[:1] + grads[:-1], params)  # refused before any work
    assert torch.is_grad_enabled()
    # a call that fails in the middle of the work (a meta tensor holds no values to copy) restores it too
    with pytest.raises((NotImplementedError, RuntimeError)): plan.collect(grads, params, extra=[torch.empty(1, device='meta')])
    assert torch.is_grad_enabled()
    np.testing.assert_array_equal(plan(grads, params).numpy(), LayerStats([g.shape for g in grads])(grads, params).numpy())


def test_gradients_whose_dtype_changes_in_place_get_a_layout_of_their_dtype():
    "`Module.double()` swaps the `.data` of the same .grad objects: the next step is reduced in float64, not float32."
    layer = torch.nn.Linear(4, 3)
    grads, params = [torch.full(p.shape, 1e-50, dtype=torch.float64).float() for p in layer.parameters()], list(layer.parameters())
    plan = LayerStats([g.shape for g in grads])
    before = plan(grads, params).numpy()
    assert (before[:, METRICS.index('zero_frac')] == 1).all()  # 1e-50 is 0 in float32
    for g in grads: g.data = torch.full(g.shape, 1e-50, dtype=torch.float64)
    for p in params: p.data = p.data.double()
    raw = plan.collect(grads, params)
    assert raw.dtype == torch.float64
    after = plan.assemble(raw.numpy())[0]  # float32 values: norms of 1e-50 elements round to 0 there, fractions do not
    for i, (g, p) in enumerate(zip(grads, params)):
        ref = reference_stats(g, p)
        assert after[i, METRICS.index('zero_frac')] == ref['zero_frac'] == 0
        np.testing.assert_equal(after[i, METRICS.index('dead_frac')], ref['dead_frac'])  # 0 for the weight, NaN for the bias


def test_extra_values_of_changing_sizes_land_after_the_results():
    grads, params = mixed_tensors(7)
    plan = LayerStats([g.shape for g in grads])
    expected = plan(grads, params).numpy()
    room = len(grads) + 1  # more values than that are appended to a copy of the result
    for extra in ([torch.tensor(1.5)], [torch.tensor(2.5), torch.arange(4.0)], [torch.tensor(3.5)],
                  [torch.tensor([[1.0, 2.0], [3.0, 4.0]])], [torch.arange(room + 2.0)], [torch.tensor(4.5), torch.arange(4.0) + 10],
                  [torch.arange(room + 2.0) - 1], [torch.tensor(5.5)]):
        flat = torch.cat([e.reshape(-1) for e in extra])
        raw = plan.collect(grads, params, extra=extra)
        assert raw[len(raw) - len(flat):].tolist() == flat.tolist() and len(raw) == plan._last.extra_at + len(flat)
        assert (raw.data_ptr() == plan._last.result.data_ptr()) == (len(flat) <= room)
        np.testing.assert_array_equal(plan.assemble(raw.numpy())[0], expected)


@pytest.mark.parametrize('chunk_elements', [4, 10**6])
def test_histogram_of_negative_nan_inf_and_zero_in_every_dtype(chunk_elements):
    "Signs never reach the bins: -NaN, -Inf and -0.0 count as NaN, Inf and zero, in float16/32/64 blocks and direct chunks."
    gen = torch.Generator().manual_seed(8)
    grads = [torch.randn(5, 6, generator=gen) * 1e-3, torch.randn(12, generator=gen).double() * 1e2,
             torch.randn(4, 3, generator=gen).half()]
    for g in grads:
        flat = g.view(-1)
        flat[0], flat[1], flat[2], flat[3] = -float('nan'), -float('inf'), -0.0, float('nan')
    assert torch.signbit(grads[0].view(-1)[0])  # a NaN with its sign bit set
    plan = LayerStats([g.shape for g in grads], hist=True, hist_sample=None, chunk_elements=chunk_elements)
    for _ in range(2):  # the sample buffer is reused: the second step counts the same
        _, hist = plan.assemble(plan.collect(grads, [g.float() for g in grads]).numpy())
        for i, g in enumerate(grads): np.testing.assert_array_equal(hist[i], hist_counts(g.double()), err_msg=f'tensor {i}')


@pytest.mark.parametrize('chunk_elements', [4, 10**6])
def test_float64_magnitudes_beyond_float32_keep_their_bins(chunk_elements):
    "A float64 gradient of 1e300 is `huge`, not `inf`, and one of 1e-310 is `tiny`, not `zero` (the bins read float32 bits)."
    g = torch.tensor([[1e300, -1e300, 1e-310, -1e-310], [0.0, float('inf'), float('nan'), 1e-3],
                      [3.5e38, -1e-46, 1e-20, 2.0]], dtype=torch.float64)
    expected = hist_counts(g)
    assert expected[HIST_BINS.index('huge')] == 3 and expected[HIST_BINS.index('tiny')] == 4
    plan = LayerStats([g.shape, (3,)], hist=True, hist_sample=None, chunk_elements=chunk_elements)
    _, hist = plan.assemble(plan.collect([g, g[0, :3].float()], [g, g[0, :3].float()]).numpy())
    np.testing.assert_array_equal(hist[0], expected)
    np.testing.assert_array_equal(hist[1], hist_counts(g[0, :3].float()))  # float32: 1e300 is already Inf there
    np.testing.assert_array_equal(MagnitudeHistogram([g.shape], sample=None)([g])[0].numpy(), expected)
    # a zero_tol below float32's range still decides what is zero, as zero_frac does
    small = torch.tensor([1e-310, 1e-290, 0.5], dtype=torch.float64)
    want = np.zeros(len(HIST_BINS), np.int64)
    for b in ('zero', 'tiny', '1e-1'): want[HIST_BINS.index(b)] = 1
    plan = LayerStats([small.shape], zero_tol=1e-300, hist=True, hist_sample=None, chunk_elements=chunk_elements)
    values, hist = plan.assemble(plan.collect([small], [small]).numpy())
    np.testing.assert_array_equal(hist[0], want)
    assert values[0, METRICS.index('zero_frac')] == np.float32(1 / 3)
    np.testing.assert_array_equal(MagnitudeHistogram([small.shape], zero_tol=1e-300, sample=None)([small])[0].numpy(), want)


# --- gradients on several devices ------------------------------------------------------------------
def test_per_device_split_puts_every_row_back_in_place():
    """`_PerDevice` (a model split between devices) gives each device's gradients to their own LayerStats and
    returns rows in the gradients' order. The device of each gradient is only a grouping key here (every tensor
    is on the CPU), so the test checks the split and the scatter against the float64 reference, histograms and
    refined NaN/Inf rows included; tests/test_cuda.py trains a model split between the CPU and a GPU."""
    from fastai_gradstats.stats import _PerDevice
    grads, params = mixed_tensors()
    grads[3] = grads[3].clone(); grads[3][1] = NAN; grads[5] = torch.tensor([INF])
    devices = ['b', 'a', 'b', 'c', 'a', 'c', 'b', 'a', 'c']
    split = _PerDevice(devices, [g.shape for g in grads], 0.0, True, None)
    assert [list(index) for index, _ in split.groups] == [[0, 2, 6], [1, 4, 7], [3, 5, 8]] and len(split) == 9
    copies = []
    to_host = lambda t: copies.append(t) or t.cpu().numpy()
    values, hist, extra = split._measure(grads, params, [torch.tensor(2.5), torch.tensor([1., 2.])], to_host)
    assert len(copies) == 3   # one host copy per device
    values, counts = split.refine(values, grads, params)
    assert extra.tolist() == [2.5, 1.0, 2.0]
    for i, (g, p) in enumerate(zip(grads, params)):
        ref = reference_stats(g, p)
        assert_stats_close(dict(as_dict(values[i]), n_nan=counts[i, 0], n_inf=counts[i, 1]), ref, f'tensor {i}')
        assert hist[i].tolist() == hist_counts(g).tolist(), f'tensor {i}'
    assert counts[:, 0].tolist() == [0, 0, 0, 1, 0, 0, 0, 0, 0] and counts[:, 1].tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 0]
    # the first device's result keeps room for a loss and a value per tensor of every device: no concatenation
    first = split.groups[0][1]
    assert copies[0].data_ptr() == first._last.result.data_ptr()
    values, _, extra = split._measure(grads, params, [torch.tensor(1.0), torch.arange(9.0)], to_host)
    assert extra.tolist() == [1.0] + list(range(9)) and copies[3].data_ptr() == first._last.result.data_ptr()
    # one value per gradient (as the update norms), gathered in the gradients' order
    assert split.gather([torch.tensor(float(i)) for i in range(9)]).tolist() == list(range(9))
    # each device keeps its parameters, device 'a' one copy per tensor (rows longer than its buffer, as on CUDA) and the
    # others in rows; their update norms come back in the gradients' order
    split = _PerDevice(devices, [g.shape for g in grads], 0.0, False, None)
    split.groups[1][1].chunk_elements = 1
    params = [p.clone().double() if i == 4 else p.clone() for i, p in enumerate(params)]
    grads = [g.double() if i == 4 else g for i, g in enumerate(grads)]
    split._measure(grads, params, [], to_host, keep=True)
    assert [stats._last.keeps_rows for _, stats in split.groups] == [True, False, True]
    before = [p.clone() for p in params]
    gen = torch.Generator().manual_seed(9)
    for i, p in enumerate(params): p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * (i + 1))
    np.testing.assert_allclose(split._update_norms(params).numpy(), _float64_distances(before, params), rtol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a second device: CUDA')
def test_layer_stats_names_the_devices_when_gradients_lie_on_several():
    grads = [torch.ones(2, 3), torch.ones(3, device='cuda')]
    with pytest.raises(ValueError, match=r'several devices \(cpu, cuda:0\)'):
        LayerStats([g.shape for g in grads])(grads, [torch.ones_like(g) for g in grads])


# --- the bookkeeping of CUDA graphs, on the CPU --------------------------------------------------------
class TensorsGraph:
    "Stands in for a CUDA graph: replays the reductions on the tensors it was recorded with, as a graph reads the memory it was captured with."
    def __init__(self, stats, layout, grads, params): self.replay = lambda: stats._reduce(layout, list(grads), list(params))


class CPUStepGraph(_StepGraph):
    def _record(self, stats, layout, grads, params):
        self.captures += 1
        return TensorsGraph(stats, layout, grads, params)


def graphed_stats(grads, **kwargs):
    stats = LayerStats([g.shape for g in grads], **kwargs)
    stats._layout(grads).graph = CPUStepGraph()
    return stats


def assert_step_matches(stats, grads, params, label, zero_tol=0.0):
    out = stats(grads, params)
    for i, (g, p) in enumerate(zip(grads, params)):
        assert_stats_close(as_dict(out[i]), reference_stats(g, p, zero_tol), f'{label} tensor {i}')


@pytest.mark.parametrize('zero_tol', [0.0, 1e-3])
def test_graph_replays_while_the_tensors_stay_and_sees_their_new_values(zero_tol):
    grads, params = mixed_tensors(0)
    stats = graphed_stats(grads, zero_tol=zero_tol)
    for step in range(6):
        new_grads, new_params = mixed_tensors(step + 1)
        for g, new in zip(grads, new_grads): g.copy_(new)      # in place, as fastai zeroes and refills gradients
        for p, new in zip(params, new_params): p.copy_(new)
        assert_step_matches(stats, grads, params, f'step {step}', zero_tol)
        graph = stats._last.graph
        assert (graph.graph is not None, graph.captures) == (step >= 2, int(step >= 2)), f'step {step}'


def test_graph_is_dropped_when_the_tensors_move_and_recorded_again_when_they_settle():
    """New gradient tensors (as an optimizer that sets them to None may give): a replay would read the old ones, so
    the step runs launch by launch until the new ones have stayed for two steps; at most MAX_CAPTURES recordings."""
    grads, params = mixed_tensors(0)
    stats, kept, seen = graphed_stats(grads), [], []
    for step in range(16):
        if step in (4, 5, 9, 13):   # the old tensors kept alive: the new ones lie elsewhere
            kept.append(grads); grads = [g.clone() * (step + 1) for g in grads]
        assert_step_matches(stats, grads, params, f'step {step}')
        seen.append((stats._last.graph.graph is not None, stats._last.graph.captures))
    assert seen == [(False, 0), (False, 0), (True, 1), (True, 1), (False, 1), (False, 1), (False, 1), (True, 2), (True, 2),
                    (False, 2), (False, 2), (True, 3), (True, 3), (False, 3), (False, 3), (False, 3)]


@pytest.mark.parametrize('save', ['pickle', 'torch.save'])
def test_a_pickled_plan_plans_again_and_records_on(tmp_path, save):
    """`learn.export` after an interrupted fit pickles GradStats' plan. Its layouts are left out: a CUDA graph cannot be
    pickled, plain `pickle` would copy each view of the work buffer apart from it, and a kept copy of the parameters is
    as large as they are. The copy plans again and gives the reference's statistics; the kept copy is gone."""
    import pickle
    grads, params = mixed_tensors(0)
    stats = graphed_stats(grads)
    for step in range(3): assert_step_matches(stats, grads, params, f'step {step}')
    assert stats._last.graph.graph is not None
    stats.collect(grads, params, keep_params=True)
    if save == 'pickle': copy = pickle.loads(pickle.dumps(stats))
    else:
        torch.save(stats, tmp_path / 'plan.pt')
        copy = torch.load(tmp_path / 'plan.pt', weights_only=False)
    assert copy._layouts == {} and copy._last is None and copy.work_bytes == 0
    with pytest.raises(ValueError, match='keep_params=True'): copy.update_norms(params)
    grads, params = [g.clone() for g in grads], [p.clone() for p in params]
    for step in range(3): assert_step_matches(copy, grads, params, f'copy step {step}')


# --- update_norms: how far the parameters moved since a collect that kept them ------------------------
def _moving_tensors(seed=5):
    "`assorted_tensors` plus half and float64 precision, a 0-d and an empty tensor: parameters of every kind."
    gen = torch.Generator().manual_seed(seed)
    grads, params = assorted_tensors(seed)
    more = [torch.randn(5, 4, generator=gen).double(), torch.randn(9, generator=gen).bfloat16(),
            torch.randn((), generator=gen), torch.zeros(0, 3), torch.randn(4, 3, 2, 2, generator=gen), torch.randn(400, 2, generator=gen)]
    params = [torch.where(p.isfinite(), p, 0.5) for p in params]  # finite weights; the gradients keep their NaN/Inf
    return grads + more, params + [torch.randn(t.shape, generator=gen).to(t.dtype) for t in more]


def _float64_distances(before, after):
    "The independent answer: ||before - after|| per tensor, in float64."
    return np.array([float(torch.linalg.vector_norm(b.double() - a.double())) if b.numel() else 0.0 for b, a in zip(before, after)])


@pytest.mark.parametrize('by_rows', [True, False])
@pytest.mark.parametrize('chunk_elements', [1, 7, 500, 10**6])
def test_update_norms_equal_the_float64_distance_step_after_step(monkeypatch, by_rows, chunk_elements):
    """`update_norms` gives ||p_kept - p_now|| per tensor over several steps, against float64 differences of copies
    taken by the test: kept in rows on the CPU (tensors split over blocks, padded narrow rows, float32 chunks of a
    float64 result) and, as on CUDA or with rows longer than the buffer, in one copy per tensor. Keeping them changes
    neither the parameters nor any statistic."""
    import fastai_gradstats.stats as stats_module
    if not by_rows: monkeypatch.setattr(stats_module.layout, '_param_norms_by_rows', lambda device: False)
    gen = torch.Generator().manual_seed(6)
    grads, params = _moving_tensors()
    plan, plain = (LayerStats([g.shape for g in grads], chunk_elements=chunk_elements) for _ in range(2))
    for step in range(3):
        before = [p.clone() for p in params]
        kept = plan.collect(grads, params, keep_params=True).clone()
        assert all(torch.equal(b, p) for b, p in zip(before, params))  # read, not changed
        torch.testing.assert_close(kept, plain.collect(grads, params), rtol=0, atol=0, equal_nan=True)  # as without keeping
        assert plan._last.keeps_rows == (by_rows and chunk_elements >= 300)  # rows longer than the buffer: one copy per tensor
        assert len(plan._last.chunks) > (chunk_elements < 10**6)  # 500: the tall tensor is split over blocks
        for i, p in enumerate(params):  # an optimizer step: every tensor moves by its own amount, one not at all
            if i != 2: p.add_((torch.randn(p.shape, generator=gen) * 10.0 ** (i % 5 - 3)).to(p.dtype))
        if step == 1: plan.collect(grads, params)  # a collect that does not keep leaves the copy alone
        moved = plan.update_norms(params)
        assert moved.shape == (len(params),) and moved.device == params[0].device
        expected = _float64_distances(before, params)
        assert moved[2] == 0 and expected[2] == 0
        np.testing.assert_allclose(moved.double().numpy(), expected, rtol=2e-6, atol=0, err_msg=f'step {step}')


@pytest.mark.parametrize('by_rows', [True, False])
def test_tiny_and_huge_update_norms_are_taken_in_float64(monkeypatch, by_rows):
    """Zero-initialized parameters (biases) moved by a vanishing update: float32 squares of elements below about 1e-22
    lose precision and below about 2.6e-23 vanish, so those norms are taken again in float64 (on the CPU), in rows
    and in one copy per tensor. A row that did not move (a dead unit) stays 0; float64 and large updates are as before."""
    import fastai_gradstats.stats as stats_module
    if not by_rows: monkeypatch.setattr(stats_module.layout, '_param_norms_by_rows', lambda device: False)
    gen = torch.Generator().manual_seed(11)
    shapes = [(64,), (64,), (64,), (32, 64), (48,), (16, 8), (6, 8)]
    params = [torch.zeros(s) for s in shapes[:3]] + [torch.randn(32, 64, generator=gen), torch.zeros(48, dtype=torch.float64),
                                                      torch.zeros(16, 8), torch.full((6, 8), 1e20)]
    plan = LayerStats([p.shape for p in params])
    plan.collect([torch.zeros_like(p) for p in params], params, keep_params=True)
    before = [p.clone() for p in params]
    for p, scale in zip(params, (1e-21, 1e-23, 1e-25, 1e-3, 1e-30, 0, 1e20)): p.add_(torch.randn(p.shape, generator=gen) * scale)
    params[5][:8].add_(torch.randn(8, 8, generator=gen) * 1e-24)  # half its rows move, the other half stay 0
    float32_says = [float(torch.linalg.vector_norm(p - b)) for p, b in zip(params, before)]
    expected = _float64_distances(before, params)
    # what float32 sums would say: the smallest vanish or lose precision, the largest overflow
    assert float32_says[2] == 0 and abs(float32_says[1] / expected[1] - 1) > 0.1 and float32_says[6] == math.inf
    moved = plan.update_norms(params)
    assert moved.dtype == torch.float64 and (expected > 0).all() and np.isfinite(expected).all()
    np.testing.assert_allclose(moved.numpy(), expected, rtol=1e-6, atol=0)


def test_a_plan_pickled_before_the_update_check_measures_updates():
    """A `LayerStats` pickled by the version before the update norms' range check (no `_nonempty`) loads and measures
    update norms, an empty tensor among them, against float64."""
    params = [torch.zeros(8, 4), torch.zeros(0, 3), torch.randn(6)]
    plan = LayerStats([p.shape for p in params])
    state = plan.__getstate__()
    del state['_nonempty']
    loaded = LayerStats.__new__(LayerStats)
    loaded.__setstate__(pickle.loads(pickle.dumps(state)))
    loaded.collect([torch.ones_like(p) for p in params], params, keep_params=True)
    before = [p.clone() for p in params]
    params[0].add_(1e-24); params[2].add_(0.5)
    np.testing.assert_allclose(loaded.update_norms(params).numpy(), _float64_distances(before, params), rtol=1e-6)


def test_update_norms_of_tall_narrow_and_wide_tensors_sum_their_rows_in_float64():
    "Millions of one-element rows: their squares add up in float64, so the norm keeps float32's precision."
    gen = torch.Generator().manual_seed(8)
    params = [torch.randn(2_000_000, 1, generator=gen), torch.randn(20_000, 64, generator=gen)]
    plan = LayerStats([p.shape for p in params])
    plan.collect([torch.zeros_like(p) for p in params], params, keep_params=True)
    before = [p.clone() for p in params]
    for p in params: p.add_(torch.randn(p.shape, generator=gen) * 1e-3)
    np.testing.assert_allclose(plan.update_norms(params).numpy(), _float64_distances(before, params), rtol=1e-5)


def test_a_new_dtype_frees_the_copy_kept_for_the_old_one():
    """Parameters whose dtype changes (`Module.double()`) get a layout of their own; keeping them there frees the copy the
    old layout kept, and `update_norms` measures them in the new one."""
    grads, params = mixed_tensors()
    plan = LayerStats([g.shape for g in grads])
    plan.collect(grads, params, keep_params=True)
    old = plan._last
    assert all(c.kept is not None for c in old.chunks)
    grads, params = [g.double() for g in grads], [p.double() for p in params]
    plan.collect(grads, params, keep_params=True)
    assert plan._last is not old and not old.kept and all(c.kept is None for c in old.chunks)
    before = [p.clone() for p in params]
    for p in params: p.mul_(1.5)
    np.testing.assert_allclose(plan.update_norms(params).numpy(), _float64_distances(before, params), rtol=1e-12)
    # an empty plan has nothing to move
    assert LayerStats([]).update_norms([]).shape == (0,)


def test_update_norms_needs_a_collect_that_kept_the_parameters():
    grads, params = mixed_tensors()
    plan = LayerStats([g.shape for g in grads])
    with pytest.raises(ValueError, match='keep_params=True'): plan.update_norms(params)
    plan.collect(grads, params)
    with pytest.raises(ValueError, match='keep_params=True'): plan.update_norms(params)
    plan.collect(grads, params, keep_params=True)
    with pytest.raises(ValueError, match='`params`'): plan.update_norms(params[:-1])
    with pytest.raises(ValueError, match='`params`'): plan.update_norms([p.reshape(-1) for p in params])
    with pytest.raises(TypeError, match='`params`'): plan.update_norms(params[0])
    np.testing.assert_array_equal(plan.update_norms(params).numpy(), 0)  # nothing moved
    with pytest.raises(ValueError, match='keep_params=True'): plan.update_norms(params)  # the copy is used up
    with pytest.raises(TypeError, match='`keep_params`'): plan.collect(grads, params, keep_params=1)


def test_kept_rows_replace_the_copy_of_the_parameters_into_the_work_buffer():
    """On the CPU, keeping the parameters costs no copy of its own: they go to the kept rows instead of the work buffer
    (one batched copy per block either way), and `update_norms` takes one subtraction and one norm per block."""
    grads, params = mixed_tensors()
    plan = LayerStats([g.shape for g in grads])
    plan.collect(grads, params)
    with CallNames() as plain: plan.collect(grads, params)
    with CallNames() as keeping: plan.collect(grads, params, keep_params=True)
    assert keeping.names.count('_foreach_copy_') == plain.names.count('_foreach_copy_')
    blocks = len(plan._last.chunks)
    with CallNames() as update: plan.update_norms(params)
    assert update.names.count('_foreach_sub_') == blocks and '_foreach_norm' not in update.names


@pytest.mark.parametrize('chunk_elements', [2 ** 22, 2 ** 18])
def test_long_rows_keep_float32_precision(chunk_elements):
    """Rows of millions of elements (a large 1-D parameter, a wide weight): a float32 norm that adds their squares one
    by one drifts by about 1e-4 here, so the CPU takes them in pieces. Checked against float64, in a block of the
    buffer and (rows longer than the buffer, whose update norms are taken per tensor) where they lie, for gradients,
    parameters and update norms; also half precision, whose squares the CPU adds in float32. (CUDA's reductions add
    in a tree: no drift.)"""
    gen = torch.Generator().manual_seed(21)
    shapes = [(3_000_001,), (2, 1_500_000), (8, 16)]
    grads = [torch.randn(s, generator=gen) * 1e-2 + 3e-3 for s in shapes] + [(torch.randn(1_200_000, generator=gen) * 1e-2).half()]
    params = [torch.randn(g.shape, generator=gen).to(g.dtype) for g in grads]
    plan = LayerStats([g.shape for g in grads], chunk_elements=chunk_elements)
    raw = plan.collect(grads, params, keep_params=True)
    values, _ = plan.assemble(raw.numpy())
    values, _ = plan.refine(values, grads, params)
    assert any(c.long_rows for c in plan._last.chunks) and plan._last.keeps_rows == (chunk_elements == 2 ** 22)
    for i, (g, p) in enumerate(zip(grads, params)):
        ref = reference_stats(g, p)
        for name in ('grad_norm', 'param_norm'):
            np.testing.assert_allclose(values[i, METRICS.index(name)], ref[name], rtol=2e-6, err_msg=f'{i} {name}')
        np.testing.assert_allclose(values[i, METRICS.index('grad_std')], ref['grad_std'], rtol=1e-5, err_msg=f'{i} std')
    before = [p.clone() for p in params]
    for p in params: p.add_((torch.randn(p.shape, generator=gen) * 1e-3).to(p.dtype))
    np.testing.assert_allclose(plan.update_norms(params).double().numpy(), _float64_distances(before, params), rtol=2e-6)
