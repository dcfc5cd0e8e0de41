"""Shared fixtures of the tests: small data, small models, a gradient-capturing callback and an
independent float64 reference of every statistic `GradStats` records.

The reference never calls `fastai_gradstats`: it recomputes each statistic with numpy in float64
from gradients that `Capture` deep-copies at every optimizer step.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from fastai.basics import SGD, Callback, CrossEntropyLossFlat, DataLoaders, L, Learner, noop
from fastai.callback.all import MixedPrecision

from fastai_gradstats import GradStats
from fastai_gradstats.stats import HIST_BINS
from fastai_gradstats.demo import digits_dls, mlp

LAYER_SCHEMA = ('step', 'epoch', 'layer', 'grad_norm', 'param_norm', 'grad_param_ratio', 'grad_max', 'grad_mean',
                'grad_std', 'zero_frac', 'dead_frac', 'shared_zero_frac', 'unit_spread', 'n_nan', 'n_inf')
STEP_SCHEMA = ('step', 'epoch', 'lr', 'loss', 'grad_norm', 'skipped')


# --- data and models -------------------------------------------------------------------------
class ItemList(list):
    "A list dataset with the `new_empty` that `Learner.export` asks of datasets."
    def new_empty(self): return type(self)()


def small_dls(n_train: int = 64, n_valid: int = 32, bs: int = 16, seed: int = 0, shuffle: bool = True) -> DataLoaders:
    """Digits `DataLoaders` with `n_train // bs` training batches (drop_last) and a small validation set,
    in the main process (no workers: fast and deterministic)."""
    dls = digits_dls(bs=bs, seed=seed, n_train=n_train)
    train, valid = ItemList(dls.train.dataset), ItemList(list(dls.valid.dataset)[:n_valid])
    return DataLoaders.from_dsets(train, valid, bs=bs, num_workers=0, shuffle=(shuffle, False),
                                  device=torch.device('cpu'))


def digits(n_train, n_valid=32, bs=64, seed=0):
    "The digits (demo.digits_dls) with a small validation set, so that each epoch is quick; seeded shuffling."
    from fastai.basics import set_seed
    dls = digits_dls(bs=bs, n_train=n_train)
    set_seed(seed)   # the DataLoader draws its shuffling seed when it is made
    return DataLoaders.from_dsets(list(dls.train.dataset), list(dls.valid.dataset)[:n_valid], bs=bs,
                                  device=torch.device('cpu'))


def tiny_mlp(seed: int = 0, width: int = 16) -> nn.Sequential:
    torch.manual_seed(seed)
    return mlp(depth=1, width=width)  # 0: Linear(64, w), 1: ReLU, 2: Linear(w, 10)


def dead_unit_mlp(n_dead: int = 6, width: int = 16, seed: int = 0) -> nn.Sequential:
    """Linear(64, width) + ReLU + Linear(width, 10) whose first `n_dead` hidden units can never fire
    (inputs are in [0, 1] and their bias is -1000): their weight rows and biases get exactly zero gradient."""
    model = tiny_mlp(seed, width)
    with torch.no_grad(): model[0].bias[:n_dead] = -1e3
    return model


def dead_channel_cnn(n_dead: int = 1, channels: int = 4, seed: int = 0) -> nn.Sequential:
    "A conv net on the 8x8 digits whose first `n_dead` channels never fire: dead units of a 4-D weight."
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, channels, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(channels * 36, 10))
    with torch.no_grad(): model[1].bias[:n_dead] = -1e3
    return model


def quiet(learn: Learner) -> Learner:
    "No progress bar, no printed table."
    if hasattr(learn, 'progress'): learn.remove_cb(learn.progress)
    learn.logger = noop
    return learn


def make_learner(model, dls=None, opt_func=SGD, cbs=None, **kwargs) -> Learner:
    dls = small_dls() if dls is None else dls
    return quiet(Learner(dls, model, loss_func=CrossEntropyLossFlat(), opt_func=opt_func, cbs=cbs, **kwargs))


# --- callbacks of the tests ------------------------------------------------------------------
class Capture(Callback):
    """Deep-copies to the CPU, in float64, every parameter's gradient and value at each optimizer step, with the
    step's epoch, loss and learning rate. Runs right after `GradStats` (same gradients), counts
    optimizer steps itself, and also captures steps that an earlier callback cancelled."""
    run_valid = False

    def __init__(self, order: float = GradStats.order + 0.01, start: int = 0):
        self.order, self.captured, self.count, self._done = order, [], start, False

    def _grab(self, skipped):
        named = list(self.learn.model.named_parameters())
        self.captured.append(dict(
            step=self.count, epoch=self.learn.epoch, loss=float(self.learn.loss.detach()), skipped=skipped,
            lr=self.learn.opt.hypers[-1]['lr'], lrs=[h['lr'] for h in self.learn.opt.hypers],
            grads={n: None if p.grad is None else p.grad.detach().to('cpu', torch.float64, copy=True) for n, p in named},
            params={n: p.detach().to('cpu', torch.float64, copy=True) for n, p in named},
            requires_grad={n: p.requires_grad for n, p in named}))
        self._done = True

    def before_step(self): self._grab(skipped=False)

    def after_cancel_step(self):
        if self._done: self.captured[-1]['skipped'] = True
        else: self._grab(skipped=True)

    def after_step(self):
        self.count += 1
        self._done = False

    def by_step(self): return {c['step']: c for c in self.captured}


class CPUMixedPrecision(MixedPrecision):
    """fastai's `MixedPrecision` with a real, enabled CPU `GradScaler` (fastai's own one is disabled on
    CPU) and a CPU autocast (bfloat16, or disabled). Everything else is fastai's logic: `before_backward`
    scales the loss, `before_step` unscales and raises `CancelStepException` on overflow."""
    def __init__(self, init_scale: float = 2. ** 10, bf16: bool = True):
        super().__init__()
        self.init_scale, self.bf16 = init_scale, bf16

    def before_fit(self):
        self.autocast = torch.autocast('cpu', dtype=torch.bfloat16, enabled=self.bf16)
        self.learn.scaler = torch.amp.GradScaler('cpu', init_scale=self.init_scale)
        self.scales = L()


class OverflowAt(Callback):
    "Writes +Inf into one scaled gradient element at step `at`, and keeps the weights before/after each step."
    order = MixedPrecision.order - 0.5  # before the scaler unscales: the overflow is in the scaled gradients
    run_valid = False

    def __init__(self, at): self.at, self.count, self.before, self.after = at, 0, [], []

    def before_step(self):
        self.before.append({n: p.detach().clone() for n, p in self.learn.model.named_parameters()})
        if self.count == self.at: dict(self.learn.model.named_parameters())['2.weight'].grad[1, 2] = float('inf')

    def after_step(self):
        self.after.append({n: p.detach().clone() for n, p in self.learn.model.named_parameters()})
        self.count += 1


class InjectNonFinite(Callback):
    "Writes NaN/±Inf into known gradient elements at `before_step` of the steps in `at`, before GradStats runs."
    order = 9
    run_valid = False

    def __init__(self, at): self.at, self.count = set(at), 0

    def before_step(self):
        if self.count in self.at:
            p = dict(self.learn.model.named_parameters())
            p['0.weight'].grad[0, :3] = float('nan')
            p['0.bias'].grad[1] = float('inf'); p['0.bias'].grad[2] = -float('inf')
            p['2.weight'].grad[3, 4] = float('nan'); p['2.weight'].grad[5, 0] = float('inf')

    def after_step(self): self.count += 1


class Repair(Callback):
    "Zeroes non-finite gradients after GradStats recorded them, so the weights stay finite."
    order = GradStats.order + 0.2
    run_valid = False

    def before_step(self):
        for p in self.learn.model.parameters():
            if p.grad is not None: p.grad.nan_to_num_(0.0, 0.0, 0.0)


# --- the independent reference -----------------------------------------------------------------
def reference_stats(grad, param, zero_tol: float = 0.0) -> dict:
    "Every statistic of one gradient tensor, from the definitions, with numpy in float64."
    g = grad.detach().double().numpy() if isinstance(grad, torch.Tensor) else np.asarray(grad, np.float64)
    p = param.detach().double().numpy() if isinstance(param, torch.Tensor) else np.asarray(param, np.float64)
    a = np.abs(g)
    with np.errstate(invalid='ignore', over='ignore', divide='ignore'):
        grad_norm = float(np.sqrt(np.sum(g ** 2)))
        param_norm = float(np.sqrt(np.sum(p ** 2)))
        out = dict(
            grad_norm=grad_norm, param_norm=param_norm,
            grad_max=float(np.max(a)) if a.size else float('nan'),
            grad_mean=float(np.mean(g)),
            grad_std=float(np.std(g, ddof=1)) if g.size > 1 else float('nan'),
            zero_frac=float(np.mean(a <= zero_tol)),
            dead_frac=(float(np.mean([bool(np.all(row <= zero_tol)) for row in a.reshape(a.shape[0], -1)]))
                       if g.ndim >= 2 else float('nan')),
            n_nan=int(np.isnan(g).sum()), n_inf=int(np.isinf(g).sum()),
            **unit_stats(a, zero_tol, g),
            mean_abs=float(np.mean(a[np.isfinite(a)])) if np.isfinite(a).any() else 0.0)
        out['grad_param_ratio'] = float(np.divide(grad_norm, param_norm))  # as documented: inf over a zero parameter, NaN for 0 / 0
    return out


def unit_stats(a, zero_tol: float = 0.0, signed=None) -> dict:
    """`shared_zero_frac` (the least zero fraction of a unit's row among the units not all zero) of |g| `a`, and
    `unit_spread` (sqrt(var(row norms) + var(row sums / sqrt(row length))) / mean(row norm), population variances) of
    the gradient `signed`, from their definitions; NaN where undefined."""
    nan = {'shared_zero_frac': float('nan'), 'unit_spread': float('nan')}
    if a.ndim < 2 or a.shape[0] == 0 or a.size == 0: return nan
    rows = a.reshape(a.shape[0], -1)
    zero = rows <= zero_tol
    live = ~zero.all(axis=1)
    out = dict(nan)
    if live.any(): out['shared_zero_frac'] = float(zero[live].mean(axis=1).min())
    norms = np.sqrt((rows ** 2).sum(axis=1))
    if len(norms) > 1 and norms.sum() > 0 and signed is not None:
        sums = signed.reshape(signed.shape[0], -1).sum(axis=1) / np.sqrt(rows.shape[1])
        out['unit_spread'] = float(np.sqrt(norms.var() + sums.var()) / norms.mean())
    return out


def hist_counts(g):
    "Counts of HIST_BINS for one gradient (zero_tol 0), by comparison with powers of ten in float64."
    a = np.abs(np.asarray(g, np.float64).ravel())
    counts = dict.fromkeys(HIST_BINS, 0)
    counts['nan'] = int(np.isnan(a).sum())
    counts['inf'] = int(np.isinf(a).sum())
    counts['zero'] = int((a == 0).sum())
    rest = a[np.isfinite(a) & (a > 0)]
    edges = 10.0 ** np.arange(-16, 5)       # 1e-16 ... 1e4
    idx = np.searchsorted(edges, rest, side='right') - 1
    counts['tiny'] = int((idx < 0).sum())
    counts['huge'] = int((idx >= 20).sum())
    for k in range(20): counts[f'1e{k - 16}'] = int((idx == k).sum())
    return np.array([counts[b] for b in HIST_BINS])


def assert_stats_close(got: dict, ref: dict, label=''):
    """`got` (what the code recorded, float32) equals `ref` (float64) up to float32 rounding:
    norms/max/ratio to 1e-5 relative, the mean to 1e-5 of mean(|g|), the std to 1e-4 relative,
    fractions exactly (1e-6 is far below one element in 1/numel), counts exactly."""
    def close(name, rtol=0.0, atol=0.0):
        np.testing.assert_allclose(float(got[name]), ref[name], rtol=rtol, atol=atol, equal_nan=True,
                                   err_msg=f'{label} {name}')
    close('grad_norm', rtol=1e-5); close('param_norm', rtol=1e-5); close('grad_max', rtol=1e-6)
    close('grad_mean', rtol=1e-5, atol=1e-5 * ref['mean_abs'])
    close('grad_std', rtol=1e-4)
    close('zero_frac', atol=1e-6); close('dead_frac', atol=1e-6); close('shared_zero_frac', atol=1e-6)
    if 'unit_spread' in got: close('unit_spread', rtol=1e-4, atol=1e-5)
    if 'grad_param_ratio' in got: close('grad_param_ratio', rtol=1e-5)
    for name in ('n_nan', 'n_inf'):
        if name in got: assert int(got[name]) == ref[name], f'{label} {name}: {int(got[name])} != {ref[name]}'


def expected_layers(cap: dict) -> list:
    "The parameters a record of this captured step must hold: those that require grad and have one."
    return [n for n, g in cap['grads'].items() if cap['requires_grad'][n] and g is not None]


def assert_record_matches(record, captured, zero_tol: float = 0.0, steps=None, since: int = 0):
    """Every `.df` row and every `.steps` row of `record` (from step `since` on) equals the float64
    reference computed from the captured gradients, for exactly the optimizer steps `steps` (default:
    every captured step)."""
    by_step = {c['step']: c for c in captured}
    steps = sorted(by_step) if steps is None else list(steps)
    df, st, lrs = record.df, record.steps, record.lrs
    df, st = df[df['step'] >= since], st[st['step'] >= since].reset_index(drop=True)
    assert set(LAYER_SCHEMA) <= set(df.columns), f'missing .df columns {set(LAYER_SCHEMA) - set(df.columns)}'
    assert set(STEP_SCHEMA) <= set(st.columns), f'missing .steps columns {set(STEP_SCHEMA) - set(st.columns)}'
    assert st['step'].tolist() == steps
    assert sorted(df['step'].unique().tolist()) == sorted(s for s in steps if expected_layers(by_step[s]))
    for i, s in enumerate(steps):
        cap = by_step[s]
        names = expected_layers(cap)
        rows = df[df['step'] == s]
        assert sorted(rows['layer'].astype(str)) == sorted(names), f'step {s}: layers'
        assert (rows['epoch'] == cap['epoch']).all()
        for _, row in rows.iterrows():
            n = str(row['layer'])
            ref = reference_stats(cap['grads'][n], cap['params'][n], zero_tol)
            assert_stats_close(row, ref, f'step {s} layer {n}')
        srow = st.iloc[i]
        assert int(srow['epoch']) == cap['epoch']
        assert bool(srow['skipped']) == cap['skipped'], f'step {s}: skipped'
        np.testing.assert_allclose(srow['loss'], cap['loss'], rtol=1e-6, err_msg=f'step {s} loss')
        np.testing.assert_allclose(srow['lr'], cap['lr'], rtol=1e-12, err_msg=f'step {s} lr')
        group_lrs = lrs[lrs['step'] == s]
        assert group_lrs['group'].tolist() == list(range(len(cap['lrs']))), f'step {s}: parameter groups of .lrs'
        np.testing.assert_allclose(group_lrs['lr'], cap['lrs'], rtol=1e-12, err_msg=f'step {s} each group lr')
        total = np.concatenate([cap['grads'][n].reshape(-1).numpy() for n in names]) if names else np.zeros(0)
        with np.errstate(invalid='ignore', over='ignore'):
            np.testing.assert_allclose(srow['grad_norm'], np.sqrt(np.sum(total ** 2)), rtol=1e-5, equal_nan=True,
                                       err_msg=f'step {s} total grad_norm')


class CallNames(TorchFunctionMode):
    "The names of the torch calls made inside it, in order."
    def __init__(self): super().__init__(); self.names = []
    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, '__name__', str(func)))
        return func(*args, **(kwargs or {}))
