"""Does the diagnosis name what is wrong? A labelled suite of fits, scored.

`python benchmarks/diagnosis.py [--quick] [--only NAME ...] [--out FILE] [--check] [--json FILE] [--threads N]`


A labelled suite of real fastai fits on data that ships with the packages (scikit-learn's digits, synthetic
sequences, tables and images). Each fit is labelled `healthy` or with exactly one known fault, trains with
`GradStats()` attached, and carries its own evidence that the label is right, measured here by a callback of this
file (`Probe`) and by plain torch, never by `fastai_gradstats`. Then `record.health()` and `record.summary()` are
scored against the label:

- a healthy run passes with no critical finding and at most one warning;
- a fault passes when the first CRITICAL/WARNING line of `summary()` names one of the checks the scenario expects
  (and, where the scenario gives a layer, names that layer) and contains none of its forbidden phrases (a remedy
  that would make it worse).

Each scenario's evidence also says whether the label is confirmed (`label_holds`): a run whose evidence does not
back its label is reported as such (and fails `--check`), since its score would mean nothing.

Scenarios that need torchvision (`needs='vision'`) run only where `fastai.vision` imports (`demo.vision_unavailable`, which tries
it in a subprocess: torchvision is never imported by this module itself) and are listed as skipped elsewhere.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import platform
import re
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from fastai.basics import Adam, Callback, CrossEntropyLossFlat, DataLoaders, Learner, SGD, accuracy, params
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.training import GradientAccumulation, GradientClip
import fastai.callback.schedule  # noqa: F401  (adds Learner.fit_one_cycle and Learner.fine_tune)
from fastai.layers import ConvLayer
from fastai.torch_core import set_seed

import fastai_gradstats
from fastai_gradstats import GradStats, GradientAlert
from fastai_gradstats import demo
from fastai_gradstats.demo import RowRNN, TensorPairs, mlp

HERE = Path(__file__).resolve().parent
LN10 = math.log(10)
CPU = torch.device('cpu')

__all__ = ['Scenario', 'SCENARIOS', 'first_problem', 'score', 'run_suite', 'Probe']


# --- the interface -------------------------------------------------------------------------------------------------
@dataclass
class Scenario:
    name: str                    # short id, e.g. 'mlp_adam_one_cycle'
    label: str                   # 'healthy' or the fault's name (e.g. 'dead_relu')
    run: Callable[[bool], tuple] # run(quick) -> (record: GradRecord, evidence: dict of plain numbers/str)
    expect: tuple = ()           # faults: the checks that may name it on the first problem line
    layer: str | None = None     # faults: a parameter name (or prefix, e.g. '3.') the first problem line must name
    forbid: tuple = ()           # phrases the first problem line must not contain
    quick: bool = False          # part of --quick
    needs: str | None = None     # 'vision' when it needs torchvision
    about: str = ''              # one sentence: what is done, and why it is healthy or which fault it has


PROBLEM = re.compile(r'^(CRITICAL|WARNING)\s+([A-Za-z_]\w*)')


def first_problem(summary_text: str) -> str | None:
    "The first line of `summary()` whose status is CRITICAL or WARNING, stripped; None if none."
    for line in summary_text.splitlines():
        line = line.strip()
        if PROBLEM.match(line): return line
    return None


def _check_of(line: str | None) -> str | None:
    "The check a summary line is about: `CRITICAL exploding: ...`, `WARNING  dead 2.weight: ...`, `... zero_frac in 3 layers`."
    m = PROBLEM.match(line) if line else None
    return m.group(2) if m else None


def _layer_pattern(layer: str):
    """A parameter name, or a prefix ending in '.', as a whole token of a line: '0.weight' is not part of '10.weight'
    nor of '0.weight_hh', 'neck.' matches 'neck.0.weight' but not 'myneck.0.weight'."""
    tail = '' if layer.endswith('.') else r'(?![\w.])'
    return re.compile(r'(?<![\w.])' + re.escape(layer) + tail)


def _names(text: str | None, layer: str) -> bool:
    return bool(text) and bool(_layer_pattern(layer).search(text))


def _row_is(layer_name: str, layer: str) -> bool:
    "Whether a health row's layer is `layer` (a name) or lies under it (a prefix ending in '.')."
    return bool(_layer_pattern(layer).match(str(layer_name)))


def score(scenario: Scenario, record) -> dict:
    """Hold `record`'s diagnosis against `scenario`'s label (see the module docstring for the targets)."""
    table = record.health()
    text = record.summary()
    line = first_problem(text)
    check = _check_of(line)
    problems = table[table['status'] != 'ok']
    n_critical = int((table['status'] == 'critical').sum())
    n_warning = int((table['status'] == 'warning').sum())
    if scenario.label == 'healthy':
        return dict(n_critical=n_critical, n_warning=n_warning, first_line=line, first_check=check, named_first=False,
                    found=False, remedy_ok=True, passed=n_critical == 0 and n_warning <= 1)
    named_first = check in scenario.expect and (scenario.layer is None or _names(line, scenario.layer))
    hits = problems[problems['check'].isin(scenario.expect)]
    if scenario.layer is not None: hits = hits[[_row_is(n, scenario.layer) for n in hits['layer']]]
    remedy_ok = line is not None and not any(p.lower() in line.lower() for p in scenario.forbid)
    return dict(n_critical=n_critical, n_warning=n_warning, first_line=line, first_check=check,
                named_first=bool(named_first), found=bool(len(hits)), remedy_ok=bool(remedy_ok),
                passed=bool(named_first and remedy_ok))


# --- measurements of this file (independent of fastai_gradstats) ---------------------------------------------------
class Probe(Callback):
    """Measures each training step itself: the loss, every parameter's gradient norm (float64, at `before_step`,
    after MixedPrecision unscaled the gradients and before GradientClip clips them), the total norm, the steps
    that were cancelled (the grad scaler's skips), and the weights before the first fit, to compare with after."""
    order = GradStats.order + 0.05
    run_valid = False

    def __init__(self):
        self.losses, self.totals, self.norms, self.skipped, self.lrs, self.x_abs_max, self.x_nan = [], [], [], [], [], [], []
        self.w0 = None
        self._stepped = False

    def before_fit(self):
        if self.w0 is None: self.w0 = {n: p.detach().clone() for n, p in self.learn.model.named_parameters()}

    def before_batch(self):
        if not self.training: return
        self._stepped = False
        xs = [x for x in self.learn.xb if torch.is_tensor(x) and x.is_floating_point()]
        self.x_abs_max.append(max((float(x.detach().abs().nan_to_num(0.0).max()) for x in xs), default=0.0))
        self.x_nan.append(int(sum(int(torch.isnan(x).sum()) for x in xs)))

    def before_step(self):
        norms = {n: float(torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float64))
                 for n, p in self.learn.model.named_parameters() if p.grad is not None and p.requires_grad}
        self.norms.append(norms)
        self.totals.append(math.sqrt(sum(v * v for v in norms.values())) if norms else math.nan)
        self.skipped.append(False)
        self.lrs.append([h['lr'] for h in self.learn.opt.hypers])
        self._stepped = True

    def after_cancel_step(self):
        if self._stepped: self.skipped[-1] = True; return
        self.norms.append({}); self.totals.append(math.nan); self.skipped.append(True)
        self.lrs.append([h['lr'] for h in self.learn.opt.hypers])
        self._stepped = True

    def after_batch(self):
        if self.training: self.losses.append(float(self.learn.loss.detach().float()))

    # reading
    def layer_norms(self, name):
        return np.array([n.get(name, np.nan) for n in self.norms], float)

    def moved(self, model, prefix=''):
        "max |w_after - w_before| over the parameters whose name starts with `prefix`."
        return max(float((p.detach() - self.w0[n]).abs().max()) for n, p in model.named_parameters()
                   if n.startswith(prefix))


def _f(x, digits=4):
    "A plain float for the evidence, rounded to `digits` significant digits (NaN/Inf kept)."
    x = float(x)
    return float(f'{x:.{digits}g}') if math.isfinite(x) else x


def loss_evidence(probe: Probe) -> dict:
    "The training loss at the start and at the end (the median of the last fifth of the finite losses)."
    losses = np.array(probe.losses, float)
    finite = losses[np.isfinite(losses)]
    tail = finite[len(finite) - max(1, len(finite) // 5):] if len(finite) else finite
    return dict(loss_first=_f(losses[0]), loss_start=_f(np.nanmean(losses[:5])),
                loss_last=_f(np.median(tail)) if len(tail) else math.nan,
                loss_max=_f(np.nanmax(finite)) if len(finite) else math.nan,
                n_batches=len(losses), n_loss_nonfinite=int((~np.isfinite(losses)).sum()))


def norm_evidence(probe: Probe) -> dict:
    totals = np.array(probe.totals, float)
    applied = totals[~np.array(probe.skipped, bool)]
    finite = applied[np.isfinite(applied)]
    return dict(norm_first=_f(applied[0]) if len(applied) else math.nan,
                norm_median=_f(np.median(finite)) if len(finite) else math.nan,
                norm_max=_f(finite.max()) if len(finite) else math.nan,
                n_norm_nonfinite=int((~np.isfinite(applied)).sum()))


def valid_accuracy(learn) -> float:
    "Accuracy on the validation set, from fastai's get_preds (no GradStats involved)."
    with learn.no_bar(), learn.no_logging():
        preds, targs = learn.get_preds(dl=learn.dls.valid)
    return _f((preds.argmax(-1) == targs.view(-1)).float().mean())


def loss_acc(ev) -> str:
    return f"loss {ev['loss_start']:.3g}->{ev['loss_last']:.3g}, acc {ev['valid_acc']:.3f}"


def trains_well(ev, min_acc=0.9, fall=0.3):
    "Healthy: the loss falls to at most `fall` of its start, and the validation accuracy is at least `min_acc`."
    holds = ev['loss_last'] <= fall * ev['loss_start'] and ev['valid_acc'] >= min_acc and ev['n_loss_nonfinite'] == 0
    return holds, f"loss_last <= {fall:g} x loss_start, valid_acc >= {min_acc:g}, every loss finite"


def fit(learn, method='fit', *args, update_ratio=False, cbs=(), **kwargs):
    "Train `learn` with `GradStats()` and a `Probe` (silently) and return (record, probe)."
    probe = Probe()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', GradientAlert)
        warnings.filterwarnings('ignore', message='.*(nested|enable_nested_tensor|torch.jit).*')
        with learn.no_bar(), learn.no_logging():
            getattr(learn, method)(*args, cbs=[GradStats(update_ratio=update_ratio), probe, *cbs], **kwargs)
    return learn.grad_stats, probe


def evidence(learn, probe, classify=True, **extra) -> dict:
    ev = {**loss_evidence(probe), **norm_evidence(probe)}
    if classify: ev['valid_acc'] = valid_accuracy(learn)
    ev.update(extra)
    return ev


def finish(ev, holds_and_criteria, brief) -> dict:
    holds, criteria = holds_and_criteria
    ev['label_holds'] = bool(holds)
    ev['criteria'] = criteria
    ev['brief'] = brief
    return ev


# --- data (nothing is downloaded) -----------------------------------------------------------------------------------
def digits(bs=64, n_train=1500, sequence=False, x_fn=None, y_fn=None, seed=0):
    """The demo's digits split (`demo.digits_dls`: pixels in [0, 1], 1500 train, 297 valid images), in the main process.
    `x_fn(x, train)`, `y_fn(y, train)` change the tensors (outliers, NaN, random labels)."""
    base = demo.digits_dls(bs=bs, seed=seed, n_train=n_train, sequence=sequence)
    tr, va = base.train.dataset, base.valid.dataset
    xt, yt, xv, yv = tr.x.clone(), tr.y.clone(), va.x.clone(), va.y.clone()
    if x_fn is not None: xt, xv = x_fn(xt, True), x_fn(xv, False)
    if y_fn is not None: yt, yv = y_fn(yt, True), y_fn(yv, False)
    return DataLoaders.from_dsets(TensorPairs(xt, yt), TensorPairs(xv, yv), bs=bs, num_workers=0, device=CPU)


def tensor_dls(xt, yt, xv, yv, bs=64):
    return DataLoaders.from_dsets(TensorPairs(xt, yt), TensorPairs(xv, yv), bs=bs, num_workers=0, device=CPU)


def learner(dls, model, opt_func=Adam, loss_func=None, **kwargs):
    return Learner(dls, model, loss_func=CrossEntropyLossFlat() if loss_func is None else loss_func,
                   opt_func=opt_func, metrics=accuracy, **kwargs)


# --- models --------------------------------------------------------------------------------------------------------
class BodyHead(nn.Module):
    "A body, optionally a neck, and a head, by name: what a custom splitter refers to."
    def __init__(self, body, head, neck=None):
        super().__init__()
        self.body = body
        if neck is not None: self.neck = neck
        self.head = head

    def forward(self, x):
        x = self.body(x)
        if hasattr(self, 'neck'): x = self.neck(x)
        return self.head(x)


def body_head_splitter(m): return [params(m.body), params(m.head)]


class ForgotLayer(nn.Module):
    "An MLP whose `extra` block is built (and so optimised) but never called in `forward`: a forgotten layer."
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 64), nn.ReLU())
        self.extra = nn.Sequential(nn.Linear(64, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x): return self.head(self.body(x))  # self.extra forgotten


class Tokens(nn.Module):
    "A small transformer encoder over token sequences: embedding + learned positions, 2 layers, mean pooled."
    def __init__(self, vocab=12, d=32, seq=16, n_out=6, layers=2):
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.randn(seq, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, n_out)

    def forward(self, x): return self.head(self.encoder(self.embed(x) + self.pos).mean(1))


class SeqLSTM(nn.Module):
    def __init__(self, n_in=2, hidden=32, n_out=2):
        super().__init__()
        self.lstm, self.head = nn.LSTM(n_in, hidden, batch_first=True), nn.Linear(hidden, n_out)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def time_gradients(model, x, y):
    """||dL/dx_t|| at each time step t of a recurrent `model` (on a copy: the model's own gradients stay untouched):
    how much of the loss's gradient reaches each step back in time."""
    model = copy.deepcopy(model)
    x = x.clone().requires_grad_(True)
    nn.functional.cross_entropy(model(x), y).backward()
    return x.grad.norm(dim=(0, 2)).double().numpy()


# --- fp16 on the CPU, with a real GradScaler -----------------------------------------------------------------------
class CPUMixedPrecision(MixedPrecision):
    """fastai's `MixedPrecision` with a real, enabled CPU `torch.amp.GradScaler` (fastai's own is disabled on the
    CPU) and a CPU float16 autocast. Everything else is fastai's logic: `before_backward` scales the loss,
    `before_step` unscales and cancels the step on overflow, `after_step` updates the scale."""
    def __init__(self, **scaler_kwargs):
        super().__init__()
        self.scaler_kwargs = scaler_kwargs

    def before_fit(self):
        self.autocast = torch.autocast('cpu', dtype=torch.float16)
        self.learn.scaler = torch.amp.GradScaler('cpu', **self.scaler_kwargs)
        self.scales, self.all_scales = [], []

    def after_step(self):
        self.all_scales.append(self.learn.scaler.get_scale())
        super().after_step()

    def after_fit(self):
        self.final = dict(scales=list(self.all_scales))
        super().after_fit()


class OutlierBatches(Callback):
    "Multiplies the inputs of the training batches numbered in `at` (counted over the fit) by `factor`: a bad shard."
    order = -1
    run_valid = False

    def __init__(self, at, factor):
        self.at, self.factor, self.count, self.hit = set(at), factor, 0, []

    def before_batch(self):
        if not self.training: return
        if self.count in self.at:
            self.learn.xb = tuple(x * self.factor for x in self.learn.xb)
            self.hit.append(self.count)
        self.count += 1


# --- healthy scenarios ---------------------------------------------------------------------------------------------
def run_mlp_adam_one_cycle(quick):
    set_seed(0)
    learn = learner(digits(), mlp(3, 64))
    record, probe = fit(learn, 'fit_one_cycle', 6, 1e-2)
    ev = evidence(learn, probe)
    return record, finish(ev, trains_well(ev), loss_acc(ev))


def run_mlp_kaiming_sgd(quick):
    set_seed(0)
    learn = learner(digits(), mlp(3, 64, init='kaiming'), opt_func=functools.partial(SGD, mom=0.9))
    record, probe = fit(learn, 'fit', 4, 0.03)
    ev = evidence(learn, probe)
    return record, finish(ev, trains_well(ev), loss_acc(ev))


def run_cnn_batchnorm(quick):
    set_seed(0)
    model = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), ConvLayer(1, 16), ConvLayer(16, 32, stride=2),
                          ConvLayer(32, 64, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    learn = learner(digits(), model)
    record, probe = fit(learn, 'fit_one_cycle', 3, 1e-2)
    ev = evidence(learn, probe)
    return record, finish(ev, trains_well(ev), loss_acc(ev))


def synthetic_table(n=2400, seed=0):
    """A shop table: 3 categorical columns (shop of 30, weekday of 7, colour of 5), 3 continuous ones and a 0/1 target
    drawn from a known logistic model of them; also the Bayes accuracy (the true probability thresholded at 0.5)."""
    import pandas as pd
    g = np.random.default_rng(seed)
    shop, day, colour = g.integers(0, 30, n), g.integers(0, 7, n), g.integers(0, 5, n)
    x1, x2, x3 = g.normal(size=n), g.normal(size=n), g.normal(size=n)
    shop_eff, day_eff, col_eff = g.normal(0, 2.0, 30), g.normal(0, 1.0, 7), g.normal(0, 1.0, 5)
    logit = shop_eff[shop] + day_eff[day] + col_eff[colour] + 1.5 * x1 - 1.0 * x2 + 0.5 * x1 * x3
    p = 1 / (1 + np.exp(-logit))
    y = (g.random(n) < p).astype(int)
    df = pd.DataFrame({'shop': [f's{i}' for i in shop], 'weekday': [f'd{i}' for i in day],
                       'colour': [f'c{i}' for i in colour], 'x1': x1, 'x2': x2, 'x3': x3, 'y': y})
    return df, (p > 0.5).astype(int) == y


def run_tabular_embeddings(quick):
    from fastai.tabular.all import Categorify, CategoryBlock, FillMissing, Normalize, TabularDataLoaders, tabular_learner
    set_seed(0)
    df, bayes_right = synthetic_table()
    valid_idx = list(range(2000, len(df)))
    dls = TabularDataLoaders.from_df(df, procs=[Categorify, FillMissing, Normalize], cat_names=['shop', 'weekday', 'colour'],
                                     cont_names=['x1', 'x2', 'x3'], y_names='y', y_block=CategoryBlock(),
                                     valid_idx=valid_idx, bs=64, num_workers=0, device=CPU)
    learn = tabular_learner(dls, layers=[64, 32], metrics=accuracy)
    record, probe = fit(learn, 'fit_one_cycle', 5, 1e-2)
    ev = evidence(learn, probe)
    bayes = float(bayes_right[valid_idx].mean())
    majority = float(max(df['y'].iloc[valid_idx].mean(), 1 - df['y'].iloc[valid_idx].mean()))
    ev.update(bayes_acc=_f(bayes), majority_acc=_f(majority))
    holds = ev['valid_acc'] >= bayes - 0.08 and ev['valid_acc'] >= majority + 0.15 and ev['loss_last'] < 0.8 * ev['loss_start']
    return record, finish(ev, (holds, 'valid_acc >= bayes_acc - 0.08 and >= majority_acc + 0.15, loss falls 20%+ '
                                      '(a 0/1 target with label noise: its loss cannot fall to 0)'),
                          f"acc {ev['valid_acc']:.3f} (Bayes {bayes:.3f}, majority {majority:.3f}), "
                          f"loss {ev['loss_start']:.3g}->{ev['loss_last']:.3g}")


def token_data(n=3000, seq=16, vocab=12, seed=0):
    "Random token sequences; the label is how many times token 0 occurs, capped at 5 (6 classes)."
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, seq), generator=g)
    y = (x == 0).sum(1).clamp_max(5)
    return x, y


def run_transformer_tokens(quick):
    set_seed(0)
    x, y = token_data()
    dls = tensor_dls(x[:2500], y[:2500], x[2500:], y[2500:])
    learn = learner(dls, Tokens())
    record, probe = fit(learn, 'fit_one_cycle', 6, 3e-3)
    ev = evidence(learn, probe)
    majority = float(torch.bincount(y[2500:]).max() / len(y[2500:]))
    ev['majority_acc'] = _f(majority)
    return record, finish(ev, trains_well(ev, min_acc=0.9, fall=0.3),
                          f"{loss_acc(ev)} (majority {majority:.2f})")


def sum_sign_data(n=2400, seq=20, seed=0):
    "Sequences of 20 steps of 2 noise features; the label is whether the first feature sums to more than 0."
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, seq, 2, generator=g)
    return x, (x[:, :, 0].sum(1) > 0).long()


def run_lstm_gradient_clip(quick):
    set_seed(0)
    x, y = sum_sign_data()
    dls = tensor_dls(x[:2000], y[:2000], x[2000:], y[2000:])
    learn = learner(dls, SeqLSTM(), cbs=GradientClip(max_norm=1.0))
    record, probe = fit(learn, 'fit_one_cycle', 6, 1e-2)
    ev = evidence(learn, probe)
    ev['clip_max_norm'] = 1.0
    ev['frac_steps_clipped'] = _f(np.mean(np.array(probe.totals) > 1.0))
    return record, finish(ev, trains_well(ev, min_acc=0.9, fall=0.4),
                          f"loss {ev['loss_start']:.3g}->{ev['loss_last']:.3g}, acc {ev['valid_acc']:.3f}, "
                          f"{ev['frac_steps_clipped']:.0%} steps clipped")


def run_fine_tune(quick):
    """A body pretrained (10 epochs) on the first half of the training images, a new 10-class head, a body/head
    splitter and `fine_tune` on all of them (the body frozen for an epoch, then everything, discriminative lrs)."""
    set_seed(0)
    pre = digits()
    tr, va = pre.train.dataset, pre.valid.dataset
    half = len(tr) // 2
    body = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
    pre_learn = learner(tensor_dls(tr.x[:half], tr.y[:half], va.x, va.y), BodyHead(body, nn.Linear(64, 10)))
    with pre_learn.no_bar(), pre_learn.no_logging(): pre_learn.fit_one_cycle(10, 1e-2)
    pre_acc = valid_accuracy(pre_learn)
    set_seed(1)
    learn = learner(digits(), BodyHead(body, nn.Linear(64, 10)), splitter=body_head_splitter)
    record, probe = fit(learn, 'fine_tune', 3, 1e-2, freeze_epochs=1)
    n_frozen = len(learn.dls.train)
    ev = evidence(learn, probe, pretrain_acc=pre_acc, frozen_steps=n_frozen,
                  loss_end_of_frozen=_f(np.median(probe.losses[n_frozen - 5:n_frozen])),
                  body_grads_while_frozen=int(sum(any(k.startswith('body.') for k in n) for n in probe.norms[:n_frozen])),
                  body_grads_after_unfreeze=int(sum(any(k.startswith('body.') for k in n) for n in probe.norms[n_frozen:])))
    return record, finish(ev, trains_well(ev), f"pretrained body (acc {pre_acc:.2f}), new head; loss "
                          f"{ev['loss_start']:.3g}->{ev['loss_end_of_frozen']:.3g} (frozen)->{ev['loss_last']:.3g}, "
                          f"acc {ev['valid_acc']:.3f}")


def run_converged(quick):
    set_seed(0)
    learn = learner(digits(), mlp(2, 64, init='kaiming'))
    record, probe = fit(learn, 'fit_one_cycle', 20, 1e-2)
    ev = evidence(learn, probe)
    losses = np.array(probe.losses)
    tail = losses[len(losses) - len(losses) // 5:]
    half = len(tail) // 2
    flat = abs(np.median(tail[half:]) - np.median(tail[:half])) / ev['loss_start']
    ev['late_loss_change'] = _f(flat)
    holds = ev['loss_last'] <= 0.01 * ev['loss_start'] and flat <= 0.01 and ev['valid_acc'] >= 0.95
    return record, finish(ev, (holds, 'loss_last <= 1% of loss_start, the two halves of the last fifth differ by <= 1% '
                                      'of loss_start, valid_acc >= 0.95'),
                          f"loss {ev['loss_start']:.3g}->{ev['loss_last']:.2g}, flat ({flat:.1e}), acc {ev['valid_acc']:.3f}")


def noisy_regression(n=9000, k=8, noise=1.0, seed=0):
    """x ~ N(0, 1)^k, y = f(x) + noise with f = sin(2 x0) + x1 x2 + x3 + x4^2 / 2 scaled to variance 1, y standardised;
    also f on the same scale (the Bayes predictor)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g)
    f = torch.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2] + x[:, 3] + 0.5 * x[:, 4] ** 2
    f = (f - f.mean()) / f.std()
    y = f + noise * torch.randn(n, generator=g)
    mu, sd = y.mean(), y.std()
    return x, ((y - mu) / sd)[:, None], ((f - mu) / sd)[:, None]


def run_large_norm(quick):
    """A wide MLP (one hidden layer of 4096 Kaiming ReLU units) regressing a noisy target (standardised, MSE): the noise
    keeps the residuals near 1 and the wide layer's activations are large, so the total norm sits above 10."""
    from fastai.losses import MSELossFlat
    set_seed(0)
    x, y, f = noisy_regression()
    n = 8000
    model = mlp(1, 4096, n_in=x.shape[1], n_out=1, init='kaiming')
    learn = Learner(tensor_dls(x[:n], y[:n], x[n:], y[n:]), model, loss_func=MSELossFlat(), opt_func=Adam)
    record, probe = fit(learn, 'fit_one_cycle', 3, 1e-3)
    ev = evidence(learn, probe, classify=False)
    with torch.no_grad(): pred = model(x[n:])
    mse, bayes, var = (float(((pred - y[n:]) ** 2).mean()), float(((f[n:] - y[n:]) ** 2).mean()), float(y[n:].var()))
    explained = (var - mse) / (var - bayes)
    totals = np.array(probe.totals)
    ev.update(valid_mse=_f(mse), bayes_mse=_f(bayes), target_var=_f(var), explainable_captured=_f(explained),
              frac_steps_norm_above_10=_f(np.mean(totals > 10)))
    holds = explained >= 0.75 and ev['frac_steps_norm_above_10'] >= 0.75 and ev['n_loss_nonfinite'] == 0
    return record, finish(ev, (holds, 'the valid MSE captures >= 75% of the explainable variance ((var - mse) / (var - '
                                      'bayes_mse)), and the total norm (own computation) is above 10 on >= 75% of steps'),
                          f"norm median {ev['norm_median']:.3g}, >10 on {ev['frac_steps_norm_above_10']:.0%} of steps; "
                          f"valid MSE {mse:.3f} (Bayes {bayes:.3f}, var {var:.3f})")


def demo_run(name):
    """The demo experiment `name` (`demo.EXPERIMENTS`), trained exactly as `demo.run_experiment` trains it (the same
    seed, `demo.digits_dls`, model, optimizer, lr and epochs: the same batches and weights), with the Probe beside it.
    `run(quick, before=None)`; `before(learn)` is called before the fit (to measure the initial model)."""
    exp = next(e for e in demo.EXPERIMENTS if e.name == name)

    def run(quick, before=None):
        set_seed(0)
        learn = Learner(demo.digits_dls(sequence=exp.sequence), exp.model(), loss_func=CrossEntropyLossFlat(),
                        metrics=accuracy, opt_func={'Adam': Adam, 'SGD': SGD}[exp.opt])
        if before is not None: before(learn)
        record, probe = fit(learn, 'fit', exp.quick_epochs if quick else exp.epochs, exp.lr)
        return learn, record, probe
    return exp, run


def healthy_demo(name, min_acc=0.8):
    exp, train = demo_run(name)

    def run(quick):
        learn, record, probe = train(quick)
        ev = evidence(learn, probe, demo_experiment=name)
        return record, finish(ev, trains_well(ev, min_acc=min_acc),
                              f"loss {ev['loss_start']:.3g}->{ev['loss_last']:.3g}, acc {ev['valid_acc']:.3f}")
    return run


def run_gradient_accumulation(quick):
    "Batches of 16 with fastai's GradientAccumulation(64): one optimizer step per 4 batches, as with batches of 64."
    set_seed(0)
    learn = learner(digits(bs=16), mlp(3, 64))
    record, probe = fit(learn, 'fit_one_cycle', 4, 1e-2, cbs=[GradientAccumulation(64)])
    ev = evidence(learn, probe, batches=len(probe.losses), optimizer_steps=len(probe.totals))
    return record, finish(ev, trains_well(ev), f"{ev['optimizer_steps']} steps of 4 batches; loss {ev['loss_start']:.3g}->"
                          f"{ev['loss_last']:.3g}, acc {ev['valid_acc']:.3f}")


def run_dropout_weight_decay(quick):
    "A 256-128 MLP with Dropout(0.3) after each hidden layer and weight decay 0.1 (fastai's decoupled Adam)."
    set_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Dropout(0.3), nn.Linear(256, 128), nn.ReLU(), nn.Dropout(0.3),
                          nn.Linear(128, 10))
    learn = learner(digits(), model, wd=0.1)
    record, probe = fit(learn, 'fit_one_cycle', 6, 1e-2)
    ev = evidence(learn, probe)
    return record, finish(ev, trains_well(ev), loss_acc(ev))


def run_resnet18_vision(quick):
    from fastai.vision.learner import vision_learner   # torchvision: only here, only where it imports
    from torchvision.models import resnet18
    set_seed(0)
    up = lambda x, train: nn.functional.interpolate(x.view(-1, 1, 8, 8), size=32, mode='bilinear',
                                                    align_corners=False).repeat(1, 3, 1, 1)
    dls = digits(x_fn=up)
    learn = vision_learner(dls, resnet18, pretrained=False, n_out=10, loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    record, probe = fit(learn, 'fine_tune', 2, 2e-3, freeze_epochs=1)
    n_frozen = len(learn.dls.train)
    totals = np.array(probe.totals)
    ev = evidence(learn, probe, frozen_steps=n_frozen, norm_median_frozen=_f(np.median(totals[:n_frozen])),
                  norm_median_unfrozen=_f(np.median(totals[n_frozen:])))
    return record, finish(ev, trains_well(ev), f"loss {ev['loss_start']:.3g}->{ev['loss_last']:.3g}, acc "
                          f"{ev['valid_acc']:.3f}; norm median {ev['norm_median_frozen']:.3g} frozen, "
                          f"{ev['norm_median_unfrozen']:.3g} unfrozen (max {ev['norm_max']:.3g})")


def run_fp16_healthy(quick):
    "float16 autocast with a real CPU GradScaler at PyTorch's defaults (init_scale 2**16): mixed precision done right."
    set_seed(0)
    amp = CPUMixedPrecision()
    learn = learner(digits(), mlp(3, 64), cbs=[amp])
    record, probe = fit(learn, 'fit_one_cycle', 6, 1e-2)
    skipped = np.array(probe.skipped)
    ev = evidence(learn, probe, init_scale=2.0 ** 16, n_skipped=int(skipped.sum()), frac_skipped=_f(skipped.mean()))
    healthy, criteria = trains_well(ev)
    holds = healthy and skipped.mean() <= 0.05
    return record, finish(ev, (holds, criteria + ', the GradScaler skips at most 5% of the steps'),
                          f"{int(skipped.sum())}/{len(skipped)} steps skipped; loss {ev['loss_start']:.3g}->"
                          f"{ev['loss_last']:.3g}, acc {ev['valid_acc']:.3f}")


# --- faults --------------------------------------------------------------------------------------------------------
def run_lr_too_high(quick):
    exp, train = demo_run('lr_too_high')
    learn, record, probe = train(quick)
    ev = evidence(learn, probe, demo_experiment='lr_too_high', lr=exp.lr, control='lr_reasonable: the same model at lr 3e-3')
    holds = ev['valid_acc'] <= 0.3 and (ev['loss_max'] >= 10 * ev['loss_first'] or ev['n_loss_nonfinite'] > 0)
    return record, finish(ev, (holds, 'valid_acc <= 0.3 (the same model trains at lr 3e-3) and the loss rises 10x+ '
                                      'above its first value or turns NaN'),
                          f"Adam lr=1: loss max {ev['loss_max']:.3g} (first {ev['loss_first']:.3g}), norm max "
                          f"{ev['norm_max']:.3g}, acc {ev['valid_acc']:.3f}")


def run_lr_too_high_sgd(quick):
    "The Kaiming MLP of mlp_kaiming_sgd_momentum with SGD (mom=0.9) at lr 3 instead of 0.03."
    set_seed(0)
    learn = learner(digits(), mlp(3, 64, init='kaiming'), opt_func=functools.partial(SGD, mom=0.9))
    record, probe = fit(learn, 'fit', 2, 3.0)
    ev = evidence(learn, probe, lr=3.0, control='mlp_kaiming_sgd_momentum: the same model and optimizer at lr 0.03')
    holds = ev['valid_acc'] <= 0.3 and (ev['loss_max'] >= 10 * ev['loss_first'] or ev['n_loss_nonfinite'] > 0)
    return record, finish(ev, (holds, 'valid_acc <= 0.3 (the same model trains at lr 0.03) and the loss rises 10x+ above '
                                      'its first value or turns NaN'),
                          f"SGD lr=3: loss max {ev['loss_max']:.3g} (first {ev['loss_first']:.3g}), "
                          f"{ev['n_loss_nonfinite']} NaN/Inf losses, acc {ev['valid_acc']:.3f}")


def run_init_too_large(quick):
    """An 8 x 64 ReLU MLP whose Linear weights are drawn from N(0, 0.5): 2.8x the Kaiming std (0.177), so the
    activations grow about 2.8x per layer."""
    set_seed(0)
    model = mlp(8, 64)
    for m in model:
        if isinstance(m, nn.Linear): nn.init.normal_(m.weight, 0.0, 0.5)
    learn = learner(digits(), model)
    x = learn.dls.train.dataset.x[:256]
    with torch.no_grad():  # activation rms after each Linear, at init
        rms, h = [], x
        for m in model:
            h = m(h)
            if isinstance(m, nn.Linear): rms.append(float(h.pow(2).mean().sqrt()))
    growth = (rms[-2] / rms[0]) ** (1 / (len(rms) - 2))
    record, probe = fit(learn, 'fit', 2, 1e-3)
    ev = evidence(learn, probe, weight_std=0.5, kaiming_std=_f(math.sqrt(2 / 64)),
                  act_rms_first_linear=_f(rms[0]), act_rms_last_hidden=_f(rms[-2]), act_growth_per_layer=_f(growth))
    holds = growth >= 2 and ev['norm_first'] >= 1000
    return record, finish(ev, (holds, 'at init the activation rms grows >= 2x per hidden layer (a forward pass here) '
                                      'and the first total gradient norm is >= 1000'),
                          f"N(0, 0.5) init: activations x{growth:.2g} per layer ({rms[0]:.3g} -> {rms[-2]:.3g}), "
                          f"norm first {ev['norm_first']:.3g}; acc {ev['valid_acc']:.3f}")


def run_lr_too_low(quick):
    set_seed(0)
    learn = learner(digits(), mlp(3, 64))
    record, probe = fit(learn, 'fit', 3, 1e-7)
    rel_move = max(float((p.detach() - probe.w0[n]).norm() / probe.w0[n].norm()) for n, p in learn.model.named_parameters())
    ev = evidence(learn, probe, lr=1e-7, max_rel_weight_change=_f(rel_move))
    ev['loss_change'] = _f(abs(ev['loss_last'] - ev['loss_start']) / ev['loss_start'])
    holds = ev['loss_change'] <= 0.02 and ev['valid_acc'] <= 0.3 and rel_move <= 1e-3 and ev['norm_median'] >= 0.1
    return record, finish(ev, (holds, 'the loss moves <= 2%, valid_acc <= 0.3, no weight tensor moves by 0.1% of its '
                                      'norm, while the total gradient norm is normal (median >= 0.1); the same model '
                                      'at lr 3e-3 is mlp_adam_one_cycle'),
                          f"lr 1e-7: loss {ev['loss_start']:.4g}->{ev['loss_last']:.4g}, weights moved "
                          f"{rel_move:.1e} rel., acc {ev['valid_acc']:.3f}")


def run_no_signal(quick):
    def random_labels(y, train):
        return torch.randint(0, 10, y.shape, generator=torch.Generator().manual_seed(1 if train else 2))
    set_seed(0)
    learn = learner(digits(y_fn=random_labels), mlp(3, 64))
    record, probe = fit(learn, 'fit_one_cycle', 3, 3e-3)
    ev = evidence(learn, probe, chance_loss=_f(LN10))
    holds = ev['loss_last'] >= 0.97 * LN10 and ev['valid_acc'] <= 0.2
    return record, finish(ev, (holds, 'labels drawn at random, independent of the images: the training loss stays '
                                      'within 3% of ln 10 and valid_acc <= 0.2'),
                          f"random labels: loss {ev['loss_start']:.3g}->{ev['loss_last']:.3g} (ln10 2.303), "
                          f"acc {ev['valid_acc']:.3f}")


def run_vanishing_depth(quick):
    exp, train = demo_run('sigmoid_deep')
    learn, record, probe = train(quick)
    first, last = '0.weight', f'{2 * 10}.weight'
    numel = {n: p.numel() for n, p in learn.model.named_parameters()}
    rms_first = probe.layer_norms(first) / math.sqrt(numel[first])
    rms_last = probe.layer_norms(last) / math.sqrt(numel[last])
    ratio = float(np.median(rms_last / rms_first))
    ev = evidence(learn, probe, demo_experiment='sigmoid_deep', rms_ratio_output_to_input=_f(ratio))
    holds = ratio >= 100
    return record, finish(ev, (holds, f'median rms gradient of {last} (output) / {first} (input) >= 100'),
                          f"10 sigmoid layers: rms grad {last}/{first} = {ratio:.3g}x; loss "
                          f"{ev['loss_start']:.3g}->{ev['loss_last']:.3g}")


class NeverFires(Callback):
    "Forward hook on a ReLU: the largest output of each unit over every training batch."
    def __init__(self, module): self.module, self.max = module, None

    def before_fit(self): self.handle = self.module.register_forward_hook(self.hook)
    def after_fit(self): self.handle.remove()

    def hook(self, module, inp, out):
        if not module.training: return
        m = out.detach().amax(0)
        self.max = m if self.max is None else torch.maximum(self.max, m)


def run_dead_relu(quick):
    set_seed(0)
    model = mlp(3, 64, init='kaiming')
    with torch.no_grad(): model[2].bias[:40] = -100.0   # 40 of 64 units of the second hidden layer: a bad bias init
    learn = learner(digits(), model)
    watch = NeverFires(model[3])
    record, probe = fit(learn, 'fit_one_cycle', 3, 3e-3, cbs=[watch])
    never_train = int((watch.max <= 0).sum())
    with torch.no_grad():  # every image, train and valid, after training
        every = torch.cat([learn.dls.train.dataset.x, learn.dls.valid.dataset.x])
        pre = model[:3](every)
    never_all = int((pre.amax(0) <= 0).sum())
    ev = evidence(learn, probe, units=64, biased_units=40, never_fire_in_training=never_train,
                  never_fire_on_any_image=never_all, max_preact_of_dead=_f(pre[:, :40].max()))
    holds = never_train >= 40 and never_all >= 40
    return record, finish(ev, (holds, 'a forward hook: at least 40 of the 64 units of the ReLU after 2 never output > 0 '
                                      'on any training batch, nor (after the fit) on any image'),
                          f"{never_train}/64 units of 2 never fire (max pre-act {float(pre[:, :40].max()):.3g}); "
                          f"acc {ev['valid_acc']:.3f}")


def run_unused_param(quick):
    set_seed(0)
    model = ForgotLayer()
    learn = learner(digits(), model)
    record, probe = fit(learn, 'fit_one_cycle', 3, 3e-3)
    in_opt = {id(p) for group in learn.opt.param_lists for p in group}
    extra = dict(model.extra.named_parameters())
    ev = evidence(learn, probe, unused=','.join(f'extra.{n}' for n in extra),
                  unused_in_optimizer=all(id(p) in in_opt for p in extra.values()),
                  unused_requires_grad=all(p.requires_grad for p in extra.values()),
                  unused_grad_is_none=all(p.grad is None for p in extra.values()),
                  steps_with_unused_grad=int(sum(any(k.startswith('extra.') for k in n) for n in probe.norms)))
    holds = (ev['unused_in_optimizer'] and ev['unused_requires_grad'] and ev['unused_grad_is_none']
             and ev['steps_with_unused_grad'] == 0)
    return record, finish(ev, (holds, 'extra.* are in the optimizer and require grad, yet their .grad is None after the '
                                      'fit and at every step'),
                          f"extra.* in opt, requires_grad, .grad None at all {ev['n_batches']} steps; "
                          f"acc {ev['valid_acc']:.3f}")


def run_not_in_optimizer(quick):
    set_seed(0)
    model = BodyHead(nn.Sequential(nn.Linear(64, 64), nn.ReLU()), nn.Linear(64, 10),
                     neck=nn.Sequential(nn.Linear(64, 64), nn.ReLU()))
    learn = learner(digits(), model, splitter=body_head_splitter)  # written before the neck was added
    record, probe = fit(learn, 'fit_one_cycle', 3, 3e-3)
    in_opt = {id(p) for group in learn.opt.param_lists for p in group}
    neck = dict(model.neck.named_parameters())
    ev = evidence(learn, probe, left_out=','.join(f'neck.{n}' for n in neck),
                  left_out_in_optimizer=any(id(p) in in_opt for p in neck.values()),
                  left_out_have_grad=all(p.grad is not None for p in neck.values()),
                  left_out_moved=_f(probe.moved(model, 'neck.')), body_moved=_f(probe.moved(model, 'body.')),
                  neck_grad_norm_first=_f(probe.layer_norms('neck.0.weight')[0]),
                  neck_grad_norm_last=_f(probe.layer_norms('neck.0.weight')[-1]))
    holds = not ev['left_out_in_optimizer'] and ev['left_out_have_grad'] and ev['left_out_moved'] == 0 and ev['body_moved'] > 0
    return record, finish(ev, (holds, 'neck.* are in no optimizer param group, have a .grad, and never move '
                                      '(max |dw| = 0) while the body moves'),
                          f"neck.* not in opt.param_lists, .grad set (norm {ev['neck_grad_norm_first']:.3g}->"
                          f"{ev['neck_grad_norm_last']:.3g}: never zeroed), max|dw|=0; acc {ev['valid_acc']:.3f}")


def run_constant_init(quick):
    set_seed(0)
    model = mlp(1, 64)
    for m in model.modules():  # "initialise every Linear to a small constant"
        if isinstance(m, nn.Linear): nn.init.constant_(m.weight, 0.05); nn.init.zeros_(m.bias)
    learn = learner(digits(), model)
    record, probe = fit(learn, 'fit_one_cycle', 3, 3e-3)
    w = model[0].weight.detach()
    distinct = int(torch.unique(w, dim=0).shape[0])
    spread = float((w - w[0]).abs().max())
    ev = evidence(learn, probe, hidden_units=64, distinct_hidden_rows=distinct, max_row_difference=_f(spread),
                  distinct_bias_values=int(torch.unique(model[0].bias.detach()).numel()))
    holds = distinct == 1
    return record, finish(ev, (holds, "after the fit the 64 rows of 0.weight (one per hidden unit) are still identical: "
                                      "the hidden units never became different"),
                          f"{distinct} distinct row(s) of 64 in 0.weight after the fit; acc {ev['valid_acc']:.3f}")


def rnn_fault(name, direction):
    exp, train = demo_run(name)

    def run(quick):
        at_init = []
        def measure(learn):  # the initial model of the fit, on 256 training sequences (on a copy: no side effect)
            x, y = learn.dls.train.dataset.x[:256], learn.dls.train.dataset.y[:256]
            at_init.append(time_gradients(learn.model, x, y))
        learn, record, probe = train(quick, before=measure)
        ratio = float(at_init[0][-1] / at_init[0][0])
        ev = evidence(learn, probe, demo_experiment=name, time_grad_last_over_first=_f(ratio))
        if direction == 'explode':
            holds = ratio <= 1e-3 and (ev['norm_max'] >= 100 or ev['n_norm_nonfinite'] > 0)
            criteria = ("at init ||dL/dx_0|| (first time step) is >= 1000x ||dL/dx_15|| (last), and the total norm "
                        "(own computation) reaches 100 or turns NaN/Inf")
            brief = (f"dL/dx_0 {1 / ratio:.3g}x dL/dx_15 at init; norm max {ev['norm_max']:.3g}, "
                     f"{ev['n_norm_nonfinite']} NaN/Inf steps")
        else:
            holds = ratio >= 1e3 and ev['loss_last'] >= 0.9 * LN10
            criteria = ("at init ||dL/dx_15|| (last time step) is >= 1000x ||dL/dx_0|| (first), and the training loss "
                        "stays within 10% of chance (ln 10)")
            brief = (f"dL/dx_15 {ratio:.3g}x dL/dx_0 at init; loss {ev['loss_start']:.3g}->{ev['loss_last']:.3g}, "
                     f"acc {ev['valid_acc']:.3f}")
        return record, finish(ev, (holds, criteria), brief)
    return run


def run_spikes(quick):
    set_seed(0)
    at, factor = (40, 70, 100), 20.0
    outliers = OutlierBatches(at, factor=factor)
    learn = learner(digits(), mlp(3, 64, init='kaiming'))
    record, probe = fit(learn, 'fit_one_cycle', 6, 3e-3, cbs=[outliers])
    totals = np.array(probe.totals)
    base = [np.median(totals[max(0, s - 20):s]) for s in at]
    ratios = [float(totals[s] / b) for s, b in zip(at, base)]
    others = np.delete(totals, list(at))
    roll = np.array([totals[s] / np.median(totals[max(0, s - 20):s]) for s in range(5, len(totals)) if s not in at])
    ev = evidence(learn, probe, outlier_steps=','.join(map(str, outliers.hit)), outlier_factor=factor,
                  spike_ratios=','.join(f'{r:.3g}' for r in ratios), max_ratio_other_steps=_f(roll.max()),
                  norm_median_other_steps=_f(np.median(others)))
    healthy, criteria = trains_well(ev, min_acc=0.85)
    holds = healthy and min(ratios) >= 10 and roll.max() < 5
    return record, finish(ev, (holds, criteria + '; at each outlier step the total norm is >= 10x the median of the 20 '
                                                 'steps before, at no other step 5x'),
                          f"batches {','.join(map(str, outliers.hit))} x{factor:g}: norm "
                          f"{', '.join(f'{r:.0f}' for r in ratios)}x "
                          f"the median; acc {ev['valid_acc']:.3f}")


def run_nan_data(quick):
    bad = [100, 700, 1300]
    def nan_pixels(x, train):
        if train: x[bad, 5] = float('nan')
        return x
    set_seed(0)
    learn = learner(digits(x_fn=nan_pixels), mlp(3, 64))
    record, probe = fit(learn, 'fit_one_cycle', 2, 3e-3)
    nan_batches = [i for i, n in enumerate(probe.x_nan) if n]
    first = nan_batches[0] if nan_batches else None
    losses = np.array(probe.losses)
    ev = evidence(learn, probe, nan_images=len(bad), first_nan_batch=first if first is not None else -1,
                  loss_at_first_nan_batch=_f(losses[first]) if first is not None else math.nan,
                  finite_losses_before=int(np.isfinite(losses[:first]).sum()) if first is not None else 0)
    holds = first is not None and not np.isfinite(losses[first]) and ev['finite_losses_before'] == first
    return record, finish(ev, (holds, '3 training images hold a NaN pixel; the first batch with one (seen by the probe) '
                                      'has a NaN loss, every loss before it is finite'),
                          f"3 NaN images; first in batch {first}, loss NaN from there ({ev['n_loss_nonfinite']}/"
                          f"{ev['n_batches']} NaN losses)")


def run_fp16_skipped(quick):
    set_seed(0)
    amp = CPUMixedPrecision(init_scale=2.0 ** 28, backoff_factor=0.9, growth_interval=10 ** 6)
    learn = learner(digits(), mlp(3, 64), cbs=[amp])
    record, probe = fit(learn, 'fit', 3, 3e-3)
    skipped = np.array(probe.skipped)
    scales = np.array(amp.final['scales'])
    ev = evidence(learn, probe, init_scale=2.0 ** 28, backoff_factor=0.9, frac_skipped=_f(skipped.mean()),
                  n_skipped=int(skipped.sum()), first_applied_step=int(np.argmin(skipped)) if (~skipped).any() else -1,
                  final_scale=_f(scales[-1]), scale_decreases=int((np.diff(scales) < 0).sum()))
    holds = skipped.mean() >= 0.5
    return record, finish(ev, (holds, 'the GradScaler cancelled (found Inf/NaN) at least half of the steps'),
                          f"GradScaler skipped {int(skipped.sum())}/{len(skipped)} steps ({skipped.mean():.0%}); "
                          f"loss {ev['loss_start']:.3g}->{ev['loss_last']:.3g}")


def run_loss_summed(quick):
    set_seed(0)
    loss_func = nn.CrossEntropyLoss(reduction='sum')
    learn = learner(digits(), mlp(3, 64), loss_func=loss_func)
    record, probe = fit(learn, 'fit_one_cycle', 3, 3e-3)
    bs = learn.dls.train.bs
    ev = evidence(learn, probe, reduction=loss_func.reduction, batch_size=bs,
                  first_loss_over_ln10=_f(probe.losses[0] / LN10))
    holds = loss_func.reduction == 'sum' and ev['first_loss_over_ln10'] >= 0.5 * bs
    return record, finish(ev, (holds, "CrossEntropyLoss(reduction='sum') on batches of 64: the first loss is about "
                                      "64 x ln 10"),
                          f"reduction='sum', bs {bs}: first loss {probe.losses[0]:.4g} = "
                          f"{ev['first_loss_over_ln10']:.3g} x ln10")


def run_weights_frozen(quick):
    set_seed(0)
    body = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
    model = BodyHead(body, nn.Linear(64, 10))
    learn = learner(digits(), model, splitter=body_head_splitter)
    record, probe = fit(learn, 'fit', 3, [0.0, 3e-3], update_ratio=True)  # the body's group gets lr 0
    body_norm = float(np.median(probe.layer_norms('body.2.weight')))
    head_norm = float(np.median(probe.layer_norms('head.weight')))
    ev = evidence(learn, probe, lr_per_group='0, 3e-3', body_moved=_f(probe.moved(model, 'body.')),
                  head_moved=_f(probe.moved(model, 'head.')), body_grad_norm_median=_f(body_norm),
                  head_grad_norm_median=_f(head_norm))
    holds = ev['body_moved'] == 0 and ev['head_moved'] > 0 and body_norm >= 0.01
    return record, finish(ev, (holds, 'max |w_after - w_before| over body.* is exactly 0 while the head moves, and the '
                                      "body's gradients are normal (median norm of body.2.weight >= 0.01)"),
                          f"lr [0, 3e-3]: body max|dw|=0 (grad norm {body_norm:.3g}), head moved "
                          f"{ev['head_moved']:.3g}; acc {ev['valid_acc']:.3f}")


# --- the suite -----------------------------------------------------------------------------------------------------
CLIP, RAISE, LOWER = 'clip', 'raise the learning rate', 'lower the learning rate'
SCENARIOS: list[Scenario] = [
    # healthy
    Scenario('mlp_adam_one_cycle', 'healthy', run_mlp_adam_one_cycle, quick=True,
             about='Raw 0..1 digit pixels, a 3 x 64 ReLU MLP with PyTorch default init, Adam and fit_one_cycle(6, 1e-2): '
                   'the plain recipe, trains to high accuracy.'),
    Scenario('mlp_kaiming_sgd_momentum', 'healthy', run_mlp_kaiming_sgd, quick=True,
             about="A Kaiming-initialised 3 x 64 ReLU MLP with fastai's SGD (mom=0.9) and a plain fit(4, 0.03)."),
    Scenario('cnn_batchnorm', 'healthy', run_cnn_batchnorm,
             about='The digits as 1x8x8 images, three fastai ConvLayers (conv + BatchNorm + ReLU), pooling and a linear '
                   'head, fit_one_cycle(3, 1e-2).'),
    Scenario('tabular_embeddings', 'healthy', run_tabular_embeddings, quick=True,
             about='tabular_learner with embeddings for 3 categorical columns and 3 continuous ones on a synthetic '
                   'table with a known logistic target: reaches the Bayes accuracy.'),
    Scenario('transformer_tokens', 'healthy', run_transformer_tokens,
             about='A 2-layer nn.TransformerEncoder with token embeddings counting one token in random sequences, '
                   'fit_one_cycle(6, 3e-3).'),
    Scenario('lstm_gradient_clip', 'healthy', run_lstm_gradient_clip,
             about="An LSTM on synthetic sequences (is the sum of a feature > 0?) with fastai's GradientClip(1.0), "
                   'fit_one_cycle(6, 1e-2).'),
    Scenario('fine_tune_body_head', 'healthy', run_fine_tune,
             about='A body pretrained on half of the training images, a new 10-class head, a body/head splitter and '
                   'fine_tune(3, 1e-2, freeze_epochs=1): freeze, train the head, unfreeze, train all.'),
    Scenario('converged_long', 'healthy', run_converged,
             about='A 2 x 64 Kaiming ReLU MLP trained with fit_one_cycle(20, 1e-2): the training loss ends low and flat.'),
    Scenario('large_norm_healthy', 'healthy', run_large_norm,
             about='One hidden layer of 4096 Kaiming ReLU units regressing a standardised noisy target with MSE: the '
                   'irreducible noise and the wide layer keep the total norm (measured here) above 10 while it fits '
                   'as well as the noise allows; a large norm alone is not a fault.'),
    Scenario('fp16_healthy', 'healthy', run_fp16_healthy, quick=True,
             about="float16 autocast with a real CPU GradScaler at PyTorch's defaults (init_scale 2**16): no step "
                   'overflows, the MLP of mlp_adam_one_cycle trains as well as in float32.'),
    Scenario('gradient_accumulation', 'healthy', run_gradient_accumulation,
             about="Batches of 16 with fastai's GradientAccumulation(64): one optimizer step every 4 batches, the MLP "
                   'of mlp_adam_one_cycle, fit_one_cycle(4, 1e-2).'),
    Scenario('dropout_weight_decay', 'healthy', run_dropout_weight_decay,
             about='A 256-128 ReLU MLP with Dropout(0.3) and weight decay 0.1, Adam, fit_one_cycle(6, 1e-2).'),
    Scenario('demo_lr_reasonable', 'healthy', healthy_demo('lr_reasonable'),
             about="The demo's lr_reasonable: a 4 x 64 ReLU MLP, Adam at lr 3e-3, fit(4)."),
    Scenario('demo_relu_deep', 'healthy', healthy_demo('relu_deep'),
             about="The demo's relu_deep: 10 Kaiming-initialised ReLU layers, Adam at lr 1e-3, fit(3)."),
    Scenario('demo_generalrelu_kaiming', 'healthy', healthy_demo('generalrelu_kaiming'),
             about="The demo's generalrelu_kaiming: 6 layers of GeneralRelu(0.1, 0.4), Kaiming init, Adam at 3e-3, fit(3)."),
    Scenario('resnet18_fine_tune', 'healthy', run_resnet18_vision, needs='vision',
             about='vision_learner(resnet18, pretrained=False, n_out=10) fine_tune(2) on the digits upscaled to 3x32x32.'),
    # faults
    Scenario('lr_too_high', 'lr_too_high', run_lr_too_high, expect=('exploding', 'nonfinite'), forbid=(RAISE,),
             quick=True, about="The demo's lr_too_high: the 4 x 64 MLP of demo_lr_reasonable with Adam at lr 1.0."),
    Scenario('lr_too_high_sgd', 'lr_too_high', run_lr_too_high_sgd, expect=('exploding', 'nonfinite'), forbid=(RAISE,),
             about='The model of mlp_kaiming_sgd_momentum with SGD (mom=0.9) at lr 3 instead of 0.03: the loss '
                   'blows up and turns NaN.'),
    Scenario('init_too_large', 'init_too_large', run_init_too_large, expect=('exploding', 'nonfinite'), forbid=(RAISE,),
             about='An 8 x 64 ReLU MLP initialised from N(0, 0.5), about 3x the Kaiming std: activations and '
                   'gradients grow layer by layer and are huge from the first step.'),
    Scenario('lr_too_low', 'lr_too_low', run_lr_too_low, expect=('lr_too_low',), forbid=(CLIP, LOWER), quick=True,
             about='The MLP of mlp_adam_one_cycle with Adam at lr 1e-7 for 3 epochs: normal gradients, the weights '
                   'barely move, the loss stays flat.'),
    Scenario('no_signal', 'no_signal', run_no_signal, expect=('not_learning',), forbid=(CLIP,), quick=True,
             about='The MLP of mlp_adam_one_cycle trained on random labels: nothing to learn, the loss stays at ln 10.'),
    Scenario('vanishing_depth', 'vanishing_depth', run_vanishing_depth, expect=('vanishing',), layer='0.weight',
             forbid=(CLIP, LOWER), quick=True,
             about="The demo's sigmoid_deep: 10 sigmoid layers; the gradient shrinks layer by layer towards the input."),
    Scenario('dead_relu', 'dead_relu', run_dead_relu, expect=('dead',), layer='2.weight', forbid=(RAISE,), quick=True,
             about='A 3 x 64 Kaiming ReLU MLP whose second hidden Linear (2) has 40 of 64 biases at -100: those units '
                   'never fire on any input, their rows of 2.weight get no gradient.'),
    Scenario('unused_param', 'unused_param', run_unused_param, expect=('no_gradient',), layer='extra.',
             forbid=(CLIP, RAISE, LOWER), quick=True,
             about='A model that builds a block `extra` (in the optimizer, requires grad) but forgets to call it in '
                   'forward: its parameters never get a gradient.'),
    Scenario('not_in_optimizer', 'not_in_optimizer', run_not_in_optimizer, expect=('not_in_optimizer',), layer='neck.',
             forbid=(CLIP, RAISE, LOWER), quick=True,
             about='A body/neck/head model with a custom splitter written before the neck was added: the neck gets '
                   'gradients but is in no parameter group, so it never trains (and fastai never zeroes its grads).'),
    Scenario('constant_init', 'constant_init', run_constant_init, expect=('symmetric',), layer='0.weight',
             forbid=(CLIP, LOWER),
             about='Every Linear weight initialised to 0.05 and every bias to 0: the 64 hidden units start identical, '
                   'get identical gradients and stay identical (0 is the hidden Linear).'),
    Scenario('exploding_rnn', 'exploding_rnn', rnn_fault('rnn_scale_above_1', 'explode'), expect=('exploding', 'nonfinite'),
             forbid=(RAISE,),
             about="The demo's rnn_scale_above_1: a ReLU RNN whose recurrent weight is 3 x an orthogonal matrix."),
    Scenario('spikes', 'spikes', run_spikes, expect=('spikes',), forbid=(RAISE,), quick=True,
             about='A healthy Kaiming MLP run in which 3 of the 138 training batches arrive with inputs x20 (a corrupt '
                   'shard): three isolated gradient spikes, after which training goes on.'),
    Scenario('nan_data', 'nan_data', run_nan_data, expect=('nonfinite',), forbid=(RAISE,), quick=True,
             about='3 of the 1500 training images hold a NaN pixel: the first batch with one makes the loss, the '
                   'gradients and then the weights NaN.'),
    Scenario('fp16_skipped', 'fp16_skipped', run_fp16_skipped, expect=('skipped',), forbid=(CLIP, RAISE), quick=True,
             about='float16 autocast with a real CPU GradScaler started at 2**28 with backoff 0.9: the scaled gradients '
                   'overflow and the scaler skips most steps.'),
    Scenario('loss_summed', 'loss_summed', run_loss_summed, expect=('loss_scale',), forbid=(RAISE,),
             about="nn.CrossEntropyLoss(reduction='sum') over batches of 64 with Adam: loss and gradients 64x what a "
                   'mean gives.'),
    Scenario('weights_frozen', 'weights_frozen', run_weights_frozen, expect=('update_ratio',), layer='body.',
             forbid=(CLIP, LOWER),
             about='A body/head model fit with per-group learning rates [0, 3e-3] and GradStats(update_ratio=True): '
                   "the body's weights never move while their gradients are normal."),
    Scenario('rnn_vanishing', 'rnn_vanishing', rnn_fault('rnn_scale_below_1', 'vanish'),
             expect=('vanishing', 'stuck', 'not_learning'), forbid=(CLIP, LOWER),
             about="The demo's rnn_scale_below_1: a ReLU RNN whose recurrent weight is 0.5 x an orthogonal matrix: "
                   'the gradient through time vanishes and the loss stays near chance.'),
]


# --- running -------------------------------------------------------------------------------------------------------
def _plain(x):
    "JSON-friendly: numpy scalars to Python, NaN/NA to None."
    if isinstance(x, dict): return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)): return [_plain(v) for v in x]
    if isinstance(x, (np.bool_, bool)): return bool(x)
    if isinstance(x, (np.integer,)): return int(x)
    if isinstance(x, (float, np.floating)): return float(x) if math.isfinite(x) else (None if math.isnan(x) else str(float(x)))
    try:
        import pandas as pd
        if x is pd.NA: return None
    except Exception: pass
    return x


def run_suite(quick=False, names=None, verbose=False) -> list[dict]:
    "Run the scenarios (`names`; else the quick ones or all), score each, return one row per scenario."
    if names:
        by_name = {s.name: s for s in SCENARIOS}
        unknown = [n for n in names if n not in by_name]
        if unknown: raise ValueError(f"unknown scenario(s) {unknown}; known: {sorted(by_name)}")
        chosen = [by_name[n] for n in names]
    else: chosen = [s for s in SCENARIOS if s.quick or not quick]
    rows = []
    for s in chosen:
        row = dict(name=s.name, label=s.label, expect=list(s.expect), layer=s.layer, forbid=list(s.forbid), quick=s.quick,
                   needs=s.needs, about=s.about, skipped=None, error=None)
        if s.needs == 'vision':
            why = demo.vision_unavailable()   # tried in a subprocess: a broken torchvision stays out of this one
            if why is not None:
                row.update(skipped=why, passed=None, label_holds=None, seconds=0.0, evidence={})
                rows.append(row)
                if verbose: print(f"  {s.name:28} skipped: {why}", flush=True)
                continue
        started = time.perf_counter()
        try:
            with warnings.catch_warnings():
                for category in (GradientAlert, FutureWarning, DeprecationWarning): warnings.simplefilter('ignore', category)
                record, ev = s.run(quick)
            row['seconds'] = round(time.perf_counter() - started, 2)
            row.update(score(s, record))
            row['summary'] = record.summary()
            table = record.health()
            row['health'] = _plain(table.astype(object).where(table.notna(), None).to_dict('records'))
        except Exception as e:
            row.update(seconds=round(time.perf_counter() - started, 2), error=f'{type(e).__name__}: {e}',
                       traceback=traceback.format_exc(), passed=False, evidence={}, label_holds=False,
                       first_line=None, first_check=None, named_first=False, found=False, remedy_ok=False,
                       n_critical=None, n_warning=None)
            rows.append(row)
            if verbose: print(f"  {s.name:28} ERROR {row['error']}", flush=True)
            continue
        row['evidence'] = _plain(ev)
        row['label_holds'] = bool(ev.get('label_holds', False))
        rows.append(row)
        if verbose:
            print(f"  {s.name:28} {row['seconds']:6.1f} s  {'pass' if row['passed'] else 'FAIL'}  "
                  f"{'' if row['label_holds'] else '[LABEL NOT CONFIRMED] '}{row['first_line'] or 'no problem line'}",
                  flush=True)
    return rows


def verdict(row) -> str:
    if row.get('skipped'): return 'skipped'
    if row.get('error'): return 'error'
    check = row.get('first_check')
    if check is None: return 'healthy'
    return f"{'CRITICAL' if row['first_line'].startswith('CRITICAL') else 'WARNING'} {check}"


def _short(text, n=150):
    "`text` cut to `n` characters, its '|' escaped for a Markdown table."
    text = text or ''
    return (text if len(text) <= n else text[:n - 3] + '...').replace('|', '\\|')


def totals(rows) -> dict:
    ran = [r for r in rows if not r.get('skipped')]
    healthy = [r for r in ran if r['label'] == 'healthy']
    faults = [r for r in ran if r['label'] != 'healthy']
    return dict(
        scenarios=len(rows), ran=len(ran), skipped=len(rows) - len(ran),
        healthy=len(healthy), healthy_passed=sum(bool(r['passed']) for r in healthy),
        healthy_with_critical=sum((r['n_critical'] or 0) > 0 for r in healthy if not r['error']),
        criticals_on_healthy=sum(r['n_critical'] or 0 for r in healthy if not r['error']),
        healthy_with_more_than_one_warning=sum((r['n_warning'] or 0) > 1 for r in healthy if not r['error']),
        warnings_on_healthy=sum(r['n_warning'] or 0 for r in healthy if not r['error']),
        healthy_with_warning=sum((r['n_warning'] or 0) > 0 for r in healthy if not r['error']),
        faults=len(faults), faults_found=sum(bool(r['found']) for r in faults),
        faults_named_first=sum(bool(r['named_first']) for r in faults),
        remedies_fitting=sum(bool(r['remedy_ok']) for r in faults),
        faults_passed=sum(bool(r['passed']) for r in faults),
        labels_not_confirmed=sum(not r['label_holds'] for r in ran),
        errors=sum(bool(r['error']) for r in ran),
        seconds=round(sum(r.get('seconds') or 0 for r in rows), 1))


def _checkout() -> str:
    "The commit of the checkout this ran from, and whether fastai_gradstats/ had uncommitted changes (the diagnosis ran)."
    def git(*args):
        return subprocess.run(['git', *args], cwd=HERE.parent, capture_output=True, text=True, timeout=30).stdout.strip()
    try:
        head = git('rev-parse', '--short', 'HEAD')
        dirty = git('status', '--porcelain', '--', 'fastai_gradstats')
    except Exception: return 'commit unknown'
    if not head: return 'commit unknown'
    return f"commit {head}" + (' with uncommitted changes in fastai_gradstats/' if dirty else '')


def environment() -> str:
    import fastai
    ok = demo.vision_unavailable() is None
    return (f"Python {platform.python_version()}, torch {torch.__version__}, fastai {fastai.__version__}, "
            f"fastai_gradstats {fastai_gradstats.__version__} ({_checkout()}), {platform.machine()} {platform.system()}, "
            f"torch threads: {torch.get_num_threads()}; torchvision: {'imports' if ok else 'does not import'}")


def table_text(rows) -> str:
    head = ('| scenario | label | verdict | pass | first problem line of summary() | evidence | s |\n'
            '| --- | --- | --- | --- | --- | --- | --- |')
    lines = [head]
    for r in rows:
        if r.get('skipped'):
            lines.append(f"| {r['name']} | {r['label']} | skipped | - | {_short(r['skipped'])} | needs {r['needs']} | - |")
            continue
        ok = 'error' if r['error'] else 'pass' if r['passed'] else 'FAIL'
        if not r['label_holds']: ok += ' (label not confirmed)'
        ev = r['evidence'].get('brief', '') if r['evidence'] else _short(r['error'], 100)
        lines.append(f"| {r['name']} | {r['label']} | {verdict(r)} | {ok} | {_short(r['first_line']) or '(none)'} | "
                     f"{_short(ev, 140)} | {r['seconds']:.0f} |")
    return '\n'.join(lines)


def totals_text(t) -> str:
    return '\n'.join([
        f"- healthy runs: {t['healthy_passed']} of {t['healthy']} pass (no critical finding, at most one warning)",
        f"- false criticals on healthy runs: {t['criticals_on_healthy']} critical finding(s), on "
        f"{t['healthy_with_critical']} of {t['healthy']} healthy runs",
        f"- false warnings on healthy runs: {t['healthy_with_more_than_one_warning']} of {t['healthy']} healthy runs "
        f"have more than one warning; {t['warnings_on_healthy']} warning(s) in all, on {t['healthy_with_warning']} run(s)",
        f"- faults found (any non-ok finding of an expected check, on the expected layer): "
        f"{t['faults_found']} of {t['faults']}",
        f"- faults named first (the first problem line): {t['faults_named_first']} of {t['faults']}",
        f"- remedies fitting (the first problem line has none of the scenario's forbidden phrases): "
        f"{t['remedies_fitting']} of {t['faults']}",
        f"- faults passing (named first and remedy fitting): {t['faults_passed']} of {t['faults']}",
        f"- labels not confirmed by their evidence: {t['labels_not_confirmed']}; errors: {t['errors']}",
        f"- scenarios: {t['scenarios']} ({t['ran']} ran, {t['skipped']} skipped), {t['seconds']:.0f} s of fits"])


def write_markdown(rows, path, quick, elapsed):
    t = totals(rows)
    skipped = [r for r in rows if r.get('skipped')]
    text = f"""# Diagnosis benchmark

Written by `python benchmarks/diagnosis.py{' --quick' if quick else ''}` ({elapsed:.0f} s). Each scenario is a real
fastai fit labelled `healthy` or with one known fault; its evidence is measured by the benchmark itself (a probe
callback, forward hooks, the weights before and after), never by `fastai_gradstats`. A healthy run passes with no
critical finding and at most one warning; a fault passes when the first CRITICAL/WARNING line of `record.summary()`
names an expected check (and the expected layer, where one is given) and has no forbidden remedy in it. See
`benchmarks/README.md` for how to run it and `python benchmarks/diagnosis.py --json FILE` for every row, its
evidence and the full `record.health()` table.

Environment: {environment()}.

## How to run it

```bash
python benchmarks/diagnosis.py                      # every scenario; writes this file
python benchmarks/diagnosis.py --quick              # the {sum(s.quick for s in SCENARIOS)} quick scenarios (a smoke test; no file unless --out)
python benchmarks/diagnosis.py --only dead_relu spikes --json /tmp/rows.json   # some, with every row as JSON
python benchmarks/diagnosis.py --check              # exit 1 when a scenario misses its target
VISION_PYTHON benchmarks/diagnosis.py --out /tmp/DIAGNOSIS_vision.md   # a Python where fastai.vision imports: also the resnet18 scenario
```

## Scenarios

{table_text(rows)}

## Totals

{totals_text(t)}

## Skipped

{chr(10).join(f"- {r['name']}: {r['skipped']}" for r in skipped) if skipped else 'none'}

## What each scenario is, what it expects, and the evidence criteria

""" + '\n'.join(f"- **{r['name']}** ({r['label']}"
                + (f"; expects {'/'.join(r['expect'])}" if r['expect'] else '')
                + (f" on {r['layer']}" if r['layer'] else '')
                + (f"; must not say {' / '.join(repr(p) for p in r['forbid'])}" if r['forbid'] else '')
                + f"): {r['about']}"
                + (f" Evidence criteria: {r['evidence'].get('criteria')}." if r.get('evidence') else '')
                for r in rows) + '\n'
    Path(path).write_text(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--quick', action='store_true', help='the quick subset only (a smoke test; writes a file only with --out)')
    p.add_argument('--only', nargs='+', metavar='NAME', help='run these scenarios only')
    p.add_argument('--out', help='write the Markdown table here (default for a full run: benchmarks/DIAGNOSIS.md)')
    p.add_argument('--check', action='store_true',
                   help='exit 1 when any scenario misses its target (or its label is not confirmed)')
    p.add_argument('--json', help='write every row, its evidence and the full health table here')
    p.add_argument('--threads', type=int, default=1, help='torch threads (default 1: the fits are small, and one thread '
                   'stays fast when other processes share the cores)')
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print(f"diagnosis benchmark: {environment()}", flush=True)
    try: rows = run_suite(quick=args.quick, names=args.only, verbose=True)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - started
    print('\n' + table_text(rows) + '\n\n' + totals_text(totals(rows)))
    print(f"\n{elapsed:.0f} s in all")
    out = args.out or (None if args.quick or args.only else HERE / 'DIAGNOSIS.md')
    if out:
        write_markdown(rows, out, args.quick, elapsed)
        print(f"wrote {out}")
    if args.json:
        Path(args.json).write_text(json.dumps(_plain(rows), indent=1, default=str))
        print(f"wrote {args.json}")
    if args.check:
        missed = [r['name'] for r in rows if not r.get('skipped') and not (r['passed'] and r['label_holds'])]
        if missed:
            print(f"missed targets: {', '.join(missed)}")
            return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
