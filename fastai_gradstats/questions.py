"""The forum threads' questions, answered from the demo's runs: the claim each thread makes, what the recorded numbers
say of it (confirmed, partly confirmed or not confirmed, with the numbers), and the one figure that shows it.

`answer(records)` answers every question whose runs are among `records` (runs of `gradstats demo`, saved or live,
keyed by their experiment's name); `write_report(..., questions=...)` opens the report with them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import matplotlib.pyplot as plt
import numpy as np

from .demo import SOURCES
from .plots import compare, flow_table, gradient_flow, hist_table, layer_curves, magnitude_hist, total_norm
from .record import GradRecord
from .stats import HIST_BINS

__all__ = ['Answer', 'Question', 'QUESTIONS', 'VERDICTS', 'answer', 'share_at_least_one']

VERDICTS = ('confirmed', 'partly confirmed', 'not confirmed')


@dataclass
class Answer:
    "What the runs say of a question's claim: a `verdict` (one of `VERDICTS`), the `numbers` that back it, its `figure`."
    verdict: str
    numbers: str
    figure: plt.Figure


@dataclass
class Question:
    "A thread's question, the claim it makes, the demo runs that test it and how they answer it (`answer(runs) -> Answer`)."
    source: str                 # a key of `demo.SOURCES`
    question: str
    claim: str
    runs: tuple
    answer: Callable[[dict], Answer]

    @property
    def source_name(self) -> str: return SOURCES[self.source]


def share_at_least_one(record) -> float:
    "Fraction of gradient elements with |g| >= 1 over the whole run (from the magnitude histograms; NaN left out)."
    table = hist_table(record)
    above = [b for b in HIST_BINS[HIST_BINS.index('1e0'):] if b != 'nan']
    return float(table.loc[above].sum().mean())


def _pair(n_axes=2, size=(14, 4)):
    fig, axes = plt.subplots(1, n_axes, figsize=size)
    return fig, axes


def _title(record, name): return str(record.args.get('title', name))


def _gradients_below_one(runs) -> Answer:
    sensible, too_high = runs['lr_reasonable'], runs['lr_too_high']
    share, share_high = share_at_least_one(sensible), share_at_least_one(too_high)
    largest, largest_high = float(sensible.df['grad_max'].max()), float(np.nanmax(too_high.df['grad_max']))
    numbers = (f"MLP: the largest |g| is {largest:.3g} with a sensible learning rate and {largest_high:.3g} with one far "
               f"too high; the share of elements with |g| >= 1 is {share:.2g} against {share_high:.2g}.")
    confirmed = share < 1e-3 and largest_high > 100 * largest
    resnet = 'resnet18_lr_reasonable' in runs and 'resnet18_lr_too_high' in runs
    names = ('resnet18_lr_reasonable', 'resnet18_lr_too_high') if resnet else ('lr_reasonable', 'lr_too_high')
    if resnet:
        r_sensible, r_high = runs['resnet18_lr_reasonable'], runs['resnet18_lr_too_high']
        r_share, r_largest = share_at_least_one(r_sensible), float(r_sensible.df['grad_max'].max())
        r_high_largest = float(np.nanmax(r_high.df['grad_max'].replace(np.inf, np.nan)))
        numbers += (f" The thread's own untrained resnet18: largest |g| {r_largest:.3g} at a sensible rate, "
                    f"{r_high_largest:.3g} at one far too high; share >= 1: {r_share:.2g}.")
        resnet_confirmed = r_share < 1e-3 and r_high_largest > 100 * r_largest
        verdict = VERDICTS[0] if confirmed and resnet_confirmed else VERDICTS[1] if confirmed or resnet_confirmed else VERDICTS[2]
    else: verdict = VERDICTS[0] if confirmed else VERDICTS[2]
    fig, axes = _pair()
    for ax, name in zip(axes, names):
        magnitude_hist(runs[name], ax=ax)
        ax.set_title(_title(runs[name], name), fontsize=10)
    fig.tight_layout()
    return Answer(verdict, numbers, fig)


def _zero_gradients(runs) -> Answer:
    plain, general = runs['relu_default_init'], runs['generalrelu_kaiming']
    zero_plain, zero_general = float(plain.df['zero_frac'].mean()), float(general.df['zero_frac'].mean())
    dead_plain, dead_general = float(plain.df['dead_frac'].mean()), float(general.df['dead_frac'].mean())
    loss_plain, loss_general = (float(r.steps['loss'].iloc[-5:].mean()) for r in (plain, general))
    confirmed = zero_plain > 2 * zero_general and loss_general < loss_plain
    numbers = (f"Mean zero fraction of the gradients: {zero_plain:.1%} with plain ReLU and default init, {zero_general:.1%} "
               f"with Kaiming GeneralReLU; dead units {dead_plain:.1%} against {dead_general:.1%}; final loss {loss_plain:.3f} "
               f"against {loss_general:.3f}.")
    fig = compare([plain, general], 'dead_frac', labels=[_title(plain, 'plain'), _title(general, 'general')])
    return Answer(VERDICTS[0] if confirmed else VERDICTS[2], numbers, fig)


def _output_over_input(record) -> float:
    flow = flow_table(record)
    weights = flow[[n.endswith('weight') for n in flow.index]]['grad_rms']
    return float(weights.iloc[-1] / weights.iloc[0])


def _vanishing_with_depth(runs) -> Answer:
    sigmoid, relu = runs['sigmoid_deep'], runs['relu_deep']
    ratio_sigmoid, ratio_relu = _output_over_input(sigmoid), _output_over_input(relu)
    layers = sum(n.endswith('weight') for n in flow_table(sigmoid).index) - 1
    per_layer = ratio_sigmoid ** (1 / layers)
    confirmed = ratio_sigmoid > 1e4 and per_layer >= 4 and ratio_relu < 100
    numbers = (f"The rms gradient of the output-most weight is {ratio_sigmoid:.3g}x the input-most's with sigmoids "
               f"({per_layer:.2f}x per layer: the sigmoid's derivative is at most 0.25, so at least 4x), {ratio_relu:.3g}x "
               "with Kaiming ReLU.")
    fig, axes = _pair()
    for ax, name in zip(axes, ('sigmoid_deep', 'relu_deep')):
        gradient_flow(runs[name], ax=ax, weights_only=True)
        ax.set_title(_title(runs[name], name), fontsize=10)
    fig.tight_layout()
    return Answer(VERDICTS[0] if confirmed else VERDICTS[2], numbers, fig)


def _recurrent_weight(runs) -> Answer:
    above, below = runs['rnn_scale_above_1'], runs['rnn_scale_below_1']
    first = lambda r: float(r.df[(r.df['step'] == r.df['step'].min()) & (r.df['layer'] == 'rnn.weight_ih_l0')]['grad_norm'].iloc[0])
    ratio = first(above) / first(below)
    loss = below.steps['loss']
    stays = float(loss.iloc[-5:].mean())
    explode = ratio > 100
    numbers = (f"At the first step the input weights' gradient norm is {ratio:.3g}x larger with the recurrent weight x3 "
               f"than x0.5 (the exploding half). The x0.5 run's loss goes from {loss.iloc[0]:.3g} to {stays:.3g} "
               f"(ln 10 = {math.log(10):.3g}, a uniform guess): it learns little, as the vanishing half predicts, but "
               "GradStats sees each weight's gradient summed over the 16 time steps, so it cannot show the fall from one "
               "time step to the next.")
    fig, axes = _pair()
    for ax, name in zip(axes, ('rnn_scale_above_1', 'rnn_scale_below_1')):
        layer_curves(runs[name], metrics='grad_norm', ax=ax)
        ax.set_title(_title(runs[name], name), fontsize=10)
    fig.tight_layout()
    return Answer(VERDICTS[1] if explode else VERDICTS[2], numbers, fig)


def _textbook_bands(runs) -> Answer:
    sensible = [n for n in ('lr_reasonable', 'generalrelu_kaiming', 'relu_deep', 'resnet18_lr_reasonable') if n in runs]
    broken = [n for n in ('lr_too_high', 'rnn_scale_above_1', 'resnet18_lr_too_high') if n in runs]
    peak = lambda r: float(np.nanmax(np.where(np.isfinite(r.steps['grad_norm']), r.steps['grad_norm'], np.nan)))
    over = {n: peak(runs[n]) for n in sensible + broken}
    sensible_over = [n for n in sensible if over[n] > 100]
    broken_over = [n for n in broken if over[n] > 100 or not np.isfinite(runs[n].steps['grad_norm']).all()]
    numbers = ('Peak total norm: ' + ', '.join(f"{n} {over[n]:.3g}" for n in sensible + broken) + '. '
               + (f"Of the sensible runs, {', '.join(sensible_over)} pass{'es' if len(sensible_over) == 1 else ''} 100 "
                  f"and train{'s' if len(sensible_over) == 1 else ''} well: the level alone does not tell an explosion (the "
                  "diagnosis reads growth, NaN/Inf and the loss instead)." if sensible_over else "Every sensible run stays under 100.")
               + f" {len(broken_over)} of the {len(broken)} broken runs pass 100 or turn NaN/Inf.")
    verdict = (VERDICTS[0] if not sensible_over and len(broken_over) == len(broken) else
               VERDICTS[1] if len(broken_over) == len(broken) else VERDICTS[2])
    ax = total_norm([runs[n] for n in sensible + broken], labels=[_title(runs[n], n) for n in sensible + broken])
    ax.set_title('total gradient norm per step, with the textbook\'s bands', fontsize=10)
    ax.figure.set_size_inches(14, 4); ax.figure.tight_layout()
    return Answer(verdict, numbers, ax.figure)


QUESTIONS = [
    Question('000', 'Why are the gradients of a network less than 1: are they ever larger at all?',
             'With a sensible learning rate almost no gradient element reaches 1 (the scale is set by the architecture and '
             'the loss); a learning rate far too high makes gradients huge.',
             ('lr_reasonable', 'lr_too_high'), _gradients_below_one),
    Question('001', 'Are vanishing gradients a sign of good training?',
             "Jeremy's worry: with plain ReLU and default init many units get zero gradient; Kaiming-initialised "
             'GeneralReLU keeps more units alive and trains better.',
             ('relu_default_init', 'generalrelu_kaiming'), _zero_gradients),
    Question('002', 'Why do gradient magnitudes vary so widely between layers?',
             "Nielsen's answer: an early layer's gradient is a product of terms from all the later ones; with sigmoids "
             '(derivative at most 0.25) it shrinks towards the input, while Kaiming ReLU keeps its size.',
             ('sigmoid_deep', 'relu_deep'), _vanishing_with_depth),
    Question('003', 'Do recurrent weights above 1 make gradients explode, and below 1 vanish?',
             'A recurrent weight whose norm is above 1 makes gradients explode through time; below 1 they vanish.',
             ('rnn_scale_above_1', 'rnn_scale_below_1'), _recurrent_weight),
    Question('004', "Do the textbook's bands of the total gradient norm tell healthy from exploding runs?",
             'A total norm of 0.1-10 is healthy, above 100 the run is likely to explode.',
             ('lr_reasonable', 'lr_too_high', 'rnn_scale_above_1'), _textbook_bands),
]
"The questions of the demo's sources, in their order; each needs its `runs`."


def answer(records: dict, questions=None) -> list:
    """`(question, answer)` for each of `questions` (default `QUESTIONS`) whose runs are all in `records` (a dict of run
    name -> GradRecord; a run counts by its name or by the demo experiment it records, `args['experiment']`)."""
    if not isinstance(records, dict) or not all(isinstance(r, GradRecord) for r in records.values()):
        raise TypeError("`records` must be a dict of run name -> GradRecord")
    by_experiment = {**{r.args.get('experiment', name): r for name, r in records.items()}, **records}
    out = []
    for question in QUESTIONS if questions is None else questions:
        if all(name in by_experiment for name in question.runs):
            out.append((question, question.answer(by_experiment)))
    return out
