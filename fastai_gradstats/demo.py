"""The main job's experiments, trained on scikit-learn's 8x8 digits (shipped with it: no download)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ['digits_dls', 'mlp', 'run_demo']


def digits_dls(bs: int = 64, seed: int = 0, n_train: int = 1500):
    "fastai `DataLoaders` of scikit-learn's digits: 64 pixels in [0, 1] and a label 0-9; `n_train` images train."
    from fastai.data.core import DataLoaders
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, valid = order[:n_train], order[n_train:]
    return DataLoaders.from_dsets(list(zip(x[train], y[train])), list(zip(x[valid], y[valid])), bs=bs,
                                  device=torch.device('cpu'))


def mlp(depth: int = 4, width: int = 64, act=nn.ReLU, n_in: int = 64, n_out: int = 10) -> nn.Sequential:
    "A plain MLP of `depth` hidden layers of `width` units with activation `act`."
    layers, n = [], n_in
    for _ in range(depth):
        layers += [nn.Linear(n, width), act()]
        n = width
    return nn.Sequential(*layers, nn.Linear(n, n_out))


def run_demo(out='gradstats-demo', quick: bool = False) -> dict:
    "Train a small MLP on the digits with `GradStats`, save its record under `out` and return the records by name."
    import fastai.callback.schedule  # noqa: F401  (adds Learner.fit_one_cycle)
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy
    from .callback import GradStats
    torch.manual_seed(0)
    out = Path(out)
    learn = Learner(digits_dls(), mlp(), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    learn.fit_one_cycle(1 if quick else 3, 1e-2, cbs=GradStats())
    record = learn.grad_stats
    record.save(out/'mlp')
    print(record)
    print(record.steps.tail().to_string(index=False))
    return {'mlp': record}
