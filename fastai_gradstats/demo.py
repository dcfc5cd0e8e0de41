"""The main job: the experiments of the forum threads and posts in `SOURCES`, reproduced with `GradStats` on real data.

Every experiment trains on scikit-learn's 8x8 digits (shipped with it: no download) with a
fastai `Learner` (the resnet18 runs with a `vision_learner`, on the digits upscaled to 3 x 32 x 32 images,
where torchvision imports), and `run_demo` writes each run's record, the figures as PNG and one
self-contained `report.html`, and prints each run's health summary.
"""
from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .report import Comparison

__all__ = ['SOURCES', 'digits_dls', 'TensorPairs', 'mlp', 'GeneralRelu', 'RowRNN', 'Experiment', 'EXPERIMENTS', 'COMPARISONS', 'run_experiment',
           'run_demo', 'vision_unavailable', 'HEALTHY']


def digits_dls(bs: int = 64, seed: int = 0, n_train: int = 1500, sequence: bool = False, image_size: int | None = None):
    """fastai `DataLoaders` of scikit-learn's digits: 64 pixels in [0, 1] and a label 0-9; `n_train` images train.

    `sequence=True` gives each image as 16 steps of 4 pixels, for recurrent networks; `image_size=32` gives each
    as a 3 x 32 x 32 image (the 8 x 8 pixels upscaled, the same in the three channels), for vision models."""
    from fastai.data.core import DataLoaders
    from sklearn.datasets import load_digits
    if not isinstance(n_train, int) or not 0 < n_train < 1797:
        raise ValueError(f"`n_train` must be an int between 1 and 1796, got {n_train!r}")
    if image_size is not None and (not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 8):
        raise ValueError(f"`image_size` must be None or an int >= 8, got {image_size!r}")
    if sequence and image_size is not None: raise ValueError("`sequence` and `image_size` cannot both be given")
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    if sequence: x = x.view(-1, 16, 4)
    if image_size is not None:
        x = nn.functional.interpolate(x.view(-1, 1, 8, 8), size=image_size, mode='nearest').expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, valid = order[:n_train], order[n_train:]
    return DataLoaders.from_dsets(TensorPairs(x[train], y[train]), TensorPairs(x[valid], y[valid]), bs=bs,
                                  device=torch.device('cpu'))


class TensorPairs(torch.utils.data.Dataset):
    "(input, label) pairs held in two tensors; `new_empty` lets `learn.export` save a Learner built on it."
    def __init__(self, x, y): self.x, self.y = x, y
    def __len__(self): return len(self.x)
    def __getitem__(self, i): return self.x[i], self.y[i]
    def new_empty(self): return TensorPairs(self.x[:0], self.y[:0])


class GeneralRelu(nn.Module):
    "ReLU with a leak, shifted down by `sub` and capped at `maxv` (the course's GeneralRelu)."
    def __init__(self, leak: float = 0.1, sub: float = 0.4, maxv: float | None = None):
        super().__init__()
        self.leak, self.sub, self.maxv = leak, sub, maxv

    def forward(self, x):
        x = nn.functional.leaky_relu(x, self.leak) if self.leak else nn.functional.relu(x)
        x = x - self.sub
        return x.clamp_max(self.maxv) if self.maxv is not None else x


def mlp(depth: int = 4, width: int = 64, act: Callable[[], nn.Module] = nn.ReLU, n_in: int = 64, n_out: int = 10,
        init: str | None = None, leak: float = 0.0) -> nn.Sequential:
    """A plain MLP: `depth` hidden `Linear` layers of `width` units, each followed by `act()`.

    `init='kaiming'` initialises the hidden weights with Kaiming normal (for a leak of `leak`)
    and zero biases; `None` keeps PyTorch's default."""
    if not isinstance(depth, int) or depth < 0: raise ValueError(f"`depth` must be an int >= 0, got {depth!r}")
    if init not in (None, 'kaiming'): raise ValueError(f"`init` must be None or 'kaiming', got {init!r}")
    layers, n = [], n_in
    for _ in range(depth):
        linear = nn.Linear(n, width)
        if init == 'kaiming':
            nn.init.kaiming_normal_(linear.weight, a=leak, nonlinearity='leaky_relu')
            nn.init.zeros_(linear.bias)
        layers += [linear, act()]
        n = width
    return nn.Sequential(*layers, nn.Linear(n, n_out))


class RowRNN(nn.Module):
    """A ReLU RNN over the digits as 16 steps of 4 pixels, whose recurrent weight is an orthogonal matrix
    times `scale`: every singular value is `scale`, so gradients through time grow as scale**steps
    above 1 and shrink below 1 (the blog post of `SOURCES['003']`)."""
    def __init__(self, scale: float = 1.0, hidden: int = 64, n_in: int = 4, n_out: int = 10):
        super().__init__()
        self.rnn = nn.RNN(n_in, hidden, nonlinearity='relu', batch_first=True)
        with torch.no_grad():
            nn.init.orthogonal_(self.rnn.weight_hh_l0)
            self.rnn.weight_hh_l0.mul_(scale)
            self.rnn.bias_hh_l0.zero_()
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


SOURCES = {
    '000': 'fastai forum thread "Why NN gradients are less than 1?"',
    '001': 'fastai forum thread "Are vanishing gradients a sign of good training? [Lesson 10]"',
    '002': 'Q&A thread "Why does Geoffrey Hinton say in his Coursera course that gradient magnitudes can vary widely '
           'when training Neural Networks?"',
    '003': 'blog post "Exploding and Vanishing Gradients" (2022)',
    '004': 'textbook section 8.3 "Gradient Statistics"',
}
"The threads, post and textbook section the demo and the default `Thresholds` answer, by the id an `Experiment` gives."


@dataclass
class Experiment:
    "One training run of the demo: what it reproduces and how it is trained."
    name: str
    seed_thread: str              # which source it answers: a key of `SOURCES`
    claim: str                    # what the thread says, checked by the run
    model: Callable[[], nn.Module] | None  # None: the `arch` of a fastai `vision_learner`
    lr: float
    epochs: int = 3
    quick_epochs: int = 1
    opt: str = 'Adam'
    sequence: bool = False
    expect: dict = field(default_factory=dict)  # health check -> status the run should show (tests read it)
    arch: str | None = None       # a torchvision model for `vision_learner(pretrained=False)`, e.g. 'resnet18'
    image_size: int | None = None # the digits as 3 x size x size images (`digits_dls`); quick runs: half the size
    one_cycle: bool = False       # train with `fit_one_cycle` (as the thread did), else `fit`
    title: str = ''               # what the run is, for a reader (the report's headings; default: its name)

    @property
    def quick_n_train(self) -> int:
        "Training images of a quick run: all 1500, but 640 for a vision model (whose steps cost 10-100x an MLP's)."
        return 1500 if self.arch is None else 640

    def unavailable(self) -> str | None:
        "Why this run cannot train here (a vision model where torchvision does not import), else None."
        return None if self.arch is None else vision_unavailable()


def vision_unavailable() -> str | None:
    """Why `fastai.vision` and torchvision cannot be imported here (None: they can). Tried once per process, in a fresh
    Python process: a torchvision built for another torch fails at import (a RuntimeError, not an ImportError) and would
    leave half of itself in this one, so this process imports it only to train a vision run."""
    if 'reason' not in _VISION: _VISION['reason'] = _try_vision()
    return _VISION['reason']


_VISION = {}   # what `vision_unavailable` found, once per process


def _try_vision() -> str | None:
    if importlib.util.find_spec('torchvision') is None:   # looks the package up without importing it
        return "torchvision is not installed; install it with a matching torch, e.g. `pip install torch==2.14.1 torchvision==0.29.1`"
    code = 'import torchvision.models; from fastai.vision.learner import vision_learner'
    try: out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as e: return f"could not try importing torchvision ({type(e).__name__}: {e})"
    if out.returncode == 0: return None
    lines = [line.strip() for line in out.stderr.splitlines() if line.strip()]
    return (f"torchvision does not import beside torch {torch.__version__} ({lines[-1] if lines else f'exit {out.returncode}'}); "
            "install a matching pair, e.g. `pip install torch==2.14.1 torchvision==0.29.1` in a venv of its own")


HEALTHY = ('skipped', 'symmetric', 'lr_too_low', 'exploding', 'nonfinite', 'vanishing', 'spikes', 'not_learning', 'stuck',
           'zero_frac')
"Checks a sensible baseline of the demo must pass (its `expect`); a plain ReLU net may keep some dead units."

EXPERIMENTS = [
    Experiment('lr_reasonable', '000', 'with a sensible learning rate, are gradient elements ever larger than 1?',
               lambda: mlp(4, 64), lr=3e-3, epochs=4, quick_epochs=2, expect=dict.fromkeys((*HEALTHY, 'dead'), 'ok'), title='4-layer ReLU MLP, Adam at lr 3e-3 (sensible)'),
    Experiment('lr_too_high', '000', 'a learning rate set far too high makes gradients huge', lambda: mlp(4, 64),
               lr=1.0, epochs=2, quick_epochs=1, expect={'exploding': 'critical'}, title='4-layer ReLU MLP, Adam at lr 1 (far too high)'),
    Experiment('relu_default_init', '001', 'plain ReLU with default init: many units get zero gradient',
               lambda: mlp(6, 64), lr=3e-3, epochs=3, quick_epochs=2, title="6-layer plain ReLU MLP, PyTorch's default init"),
    Experiment('generalrelu_kaiming', '001', 'Kaiming-initialised GeneralReLU keeps more units alive',
               lambda: mlp(6, 64, act=lambda: GeneralRelu(0.1, 0.4), init='kaiming', leak=0.1), lr=3e-3, epochs=3,
               quick_epochs=2, expect=dict.fromkeys((*HEALTHY, 'dead'), 'ok'), title='6-layer GeneralReLU MLP, Kaiming init'),
    Experiment('sigmoid_deep', '002', 'a deep sigmoid network: gradients vanish towards the input',
               lambda: mlp(10, 64, act=nn.Sigmoid), lr=1e-3, epochs=3, quick_epochs=1,
               expect={'vanishing': 'critical'}, title='10-layer sigmoid MLP'),
    Experiment('relu_deep', '002', 'the same depth with Kaiming-initialised ReLU: gradients keep their size',
               lambda: mlp(10, 64, init='kaiming'), lr=1e-3, epochs=3, quick_epochs=1,
               expect=dict.fromkeys(HEALTHY, 'ok'), title='10-layer ReLU MLP, Kaiming init'),
    # GradStats sees one gradient per weight, summed over the 16 time steps, not the gradient at each step
    Experiment('rnn_scale_below_1', '003', 'recurrent weight with norm 0.5 < 1 (the post: gradients likely vanish '
               'through time): the total norm, summed over time steps, stays small, over 100x below the norm-3 run, '
               'but does not vanish',
               lambda: RowRNN(0.5), lr=1e-3, epochs=3, quick_epochs=1, sequence=True,
               expect={'vanishing': 'ok', 'exploding': 'ok', 'total_norm': 'ok', 'nonfinite': 'ok', 'not_learning': 'critical'}, title='ReLU RNN, recurrent weight x0.5'),
    Experiment('rnn_scale_above_1', '003', 'recurrent weight with norm 3 > 1: gradients explode through time',
               lambda: RowRNN(3.0), lr=1e-3, epochs=3, quick_epochs=1, sequence=True,
               expect={'exploding': 'critical'}, title='ReLU RNN, recurrent weight x3'),
    # the thread's own model: cnn_learner(dls, resnet18, pretrained=False), trained with fit_one_cycle
    Experiment('resnet18_lr_reasonable', '000', "the thread's untrained resnet18 with a sensible learning rate: are "
               'gradient elements ever larger than 1?', None, lr=1e-3, epochs=2, quick_epochs=1, arch='resnet18',
               image_size=32, one_cycle=True, expect={'nonfinite': 'ok'}, title='untrained resnet18, Adam one-cycle at lr 1e-3 (sensible)'),
    Experiment('resnet18_lr_too_high', '000', 'the same resnet18 with a learning rate far too high (SGD at a constant '
               'lr of 10): gradients become huge', None, lr=10.0, epochs=2, quick_epochs=1, opt='SGD', arch='resnet18',
               image_size=32, expect={'exploding': 'critical'}, title='untrained resnet18, SGD at lr 10 (far too high)'),
]
"The demo's runs, in the order of their `SOURCES`."

# each pair compares the metric of its claim: gradient size, except the units kept alive (the dead fraction)
COMPARISONS = [Comparison(('lr_reasonable', 'lr_too_high')),
               Comparison(('relu_default_init', 'generalrelu_kaiming'), metric='dead_frac'),
               Comparison(('sigmoid_deep', 'relu_deep')), Comparison(('rnn_scale_below_1', 'rnn_scale_above_1')),
               Comparison(('resnet18_lr_reasonable', 'resnet18_lr_too_high'))]
"Pairs of runs the report puts side by side, each a `report.Comparison` (a tuple of two names) naming its `metric`."


def run_experiment(exp: Experiment, quick: bool = False, progress: bool = True, **gradstats_kwargs):
    "Train `exp` with `GradStats` (histograms on unless `hist=False` is given) and return the record (`learn.grad_stats`)."
    import warnings
    import fastai.callback.schedule  # noqa: F401  (adds Learner.fit_one_cycle)
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy
    from fastai.optimizer import SGD, Adam
    from fastai.torch_core import set_seed
    from .callback import GradientAlert, GradStats
    reason = exp.unavailable()
    if reason is not None: raise RuntimeError(f"experiment {exp.name!r} cannot run here: {reason}")
    set_seed(0)  # torch, numpy and Python's random (fastai shuffles with it): the same run every time
    opt = {'Adam': Adam, 'SGD': SGD}[exp.opt]
    image_size = None if exp.image_size is None else exp.image_size // 2 if quick else exp.image_size
    dls = digits_dls(sequence=exp.sequence, image_size=image_size, n_train=exp.quick_n_train if quick else 1500)
    if exp.arch is None:
        learn = Learner(dls, exp.model(), loss_func=CrossEntropyLossFlat(), metrics=accuracy, opt_func=opt)
    else:
        import torchvision.models
        from fastai.vision.learner import vision_learner
        learn = vision_learner(dls, getattr(torchvision.models, exp.arch), pretrained=False, n_out=10,
                               loss_func=CrossEntropyLossFlat(), metrics=accuracy, opt_func=opt)
    cb = GradStats(**{'hist': True, **gradstats_kwargs})
    fit = learn.fit_one_cycle if exp.one_cycle else learn.fit
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', GradientAlert)  # the summary reports them
        if progress: fit(exp.quick_epochs if quick else exp.epochs, exp.lr, cbs=cb)
        else:
            with learn.no_bar(), learn.no_logging(): fit(exp.quick_epochs if quick else exp.epochs, exp.lr, cbs=cb)
    record = learn.grad_stats
    record.args.update({'experiment': exp.name, 'seed_thread': exp.seed_thread, 'source': SOURCES[exp.seed_thread],
                        'claim': exp.claim, 'title': exp.title or exp.name, 'lr': exp.lr, 'opt': exp.opt})
    return record


def run_demo(out='gradstats-demo', quick: bool = False, progress: bool = True) -> dict:
    """Run every experiment of `EXPERIMENTS`, save each record under `out/<name>`, the figures under
    `out/figures`, the report at `out/report.html`, print each run's health summary, and return the
    records by name. An experiment that cannot run here (a vision model where torchvision does not import) is
    skipped, and the console and the report say why. An empty `out`, or a file or directory in the way of those
    paths, is refused (ValueError) before anything trains."""
    from .report import write_report
    if not isinstance(out, (str, Path)): raise TypeError(f"`out` must be a str or Path, got {type(out).__name__}")
    if isinstance(out, str) and not out: raise ValueError("`out` is empty: give the directory to write the demo to")
    out = Path(out)
    _check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    records, skipped, started = {}, {}, time.perf_counter()
    for exp in EXPERIMENTS:
        print(f"\n== {exp.name}: {exp.claim}\n   (from the {SOURCES[exp.seed_thread]})")
        reason = exp.unavailable()
        if reason is not None:
            skipped[exp.name] = reason
            print(f"   skipped: {reason}")
            continue
        record = run_experiment(exp, quick=quick, progress=progress)
        record.save(out/exp.name)
        records[exp.name] = record
        print(record.summary())
    comparisons = [c for c in COMPARISONS if all(name in records for name in c)]
    from .questions import answer
    report = write_report(records, out/'report.html', comparisons=comparisons, figures_dir=out/'figures',
                          title='fastai_gradstats demo: the forum experiments', skipped=skipped, questions=answer(records))
    print(f"\nSaved {len(records)} runs under {out}/, figures under {out/'figures'}/; report: {report} "
          f"({time.perf_counter() - started:.0f} s)" + (f"; skipped {len(skipped)}: {', '.join(skipped)}" if skipped else ''))
    return records


def _check_out(out: Path):
    "Refuse, before any training, an `out` whose runs, figures or report.html would land on something in the way."
    if out.exists() and not out.is_dir(): raise ValueError(f"`out` {str(out)!r} is a file, not a directory")
    for name in [exp.name for exp in EXPERIMENTS] + ['figures']:
        if (out/name).exists() and not (out/name).is_dir():
            raise ValueError(f"`out` {str(out)!r} holds a file {str(out/name)!r} where the demo needs a directory")
    if (out/'report.html').is_dir():
        raise ValueError(f"`out` {str(out)!r} holds a directory {str(out/'report.html')!r} where the report goes")
