"""GradStats on fastai's own vision learners, where `fastai.vision` can be imported (the second test environment: a
torchvision that matches its torch; beside the pinned CPU torch of the main environment torchvision does not import,
so there this file is skipped with the reason). The library itself never imports `fastai.vision`: tests/test_api.py
checks that.

Every record is compared with a float64 reference computed from the gradients `Capture` copies at the same step."""
import numpy as np
import pytest
import torch
from torch import nn
from fastai.basics import CrossEntropyLossFlat, DataLoaders, set_seed

from fastai_gradstats import GradStats, load, plots
from fastai_gradstats.demo import digits_dls

from helpers import Capture, ItemList, assert_record_matches, expected_layers, quiet

pytestmark = pytest.mark.vision

try:
    import fastai.callback.all  # noqa: F401  (adds fine_tune, to_fp16; its names are not imported: one is test_overflow)
    from fastai.learner import load_learner
    from fastai.vision.learner import vision_learner
    from fastai.vision.models.xresnet import xresnet18
    from torchvision.models import resnet18
except Exception as e:  # torchvision built for another torch raises RuntimeError, not ImportError
    pytest.skip(f'fastai.vision cannot be imported here: {type(e).__name__}: {e}', allow_module_level=True)

ARCHS = {'resnet18': resnet18, 'xresnet18': xresnet18}


def image_dls(n_train=64, n_valid=16, bs=16, size=32):
    "The digits as 3 x `size` x `size` images: `n_train // bs` training batches, a small validation set, no workers."
    dls = digits_dls(bs=bs, n_train=n_train, image_size=size)
    return DataLoaders.from_dsets(ItemList(dls.train.dataset), ItemList(list(dls.valid.dataset)[:n_valid]), bs=bs,
                                  num_workers=0, device=torch.device('cpu'))


def learner(arch='resnet18', seed=0, **kwargs):
    set_seed(seed)
    return quiet(vision_learner(image_dls(), ARCHS[arch], pretrained=False, n_out=10, loss_func=CrossEntropyLossFlat(),
                                **kwargs))


def param_names(module):
    return {n for n, _ in module.named_parameters()}


@pytest.fixture(scope='module', params=list(ARCHS))
def fine_tuned(request):
    "A `fine_tune(1, freeze_epochs=1)` of each architecture, with the gradients captured at every step."
    learn = learner(request.param)
    cap = Capture()
    learn.fine_tune(1, 1e-3, freeze_epochs=1, cbs=[GradStats(), cap])
    return learn, cap


def test_fine_tune_records_both_phases_against_float64(fine_tuned):
    """`fine_tune(1, freeze_epochs=1)`: 4 frozen steps (the head and, with `train_bn`, the body's BatchNorm), then 4
    with every tensor; steps contiguous across the two fits; groups as the splitter's; each group's lr."""
    learn, cap = fine_tuned
    record = learn.grad_stats
    assert record.steps['step'].tolist() == list(range(8)) and record.steps['epoch'].tolist() == [0] * 4 + [0] * 4
    assert_record_matches(record, cap.captured)   # exactly the tensors with a gradient, each statistic, each lr
    body, head = learn.model[0], learn.model[1]
    body_bn = {f'0.{n}' for m_name, m in body.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               for n in (f'{m_name}.weight', f'{m_name}.bias')}
    frozen = {f'1.{n}' for n in param_names(head)} | body_bn
    recorded = record.df.groupby('step', observed=True)['layer'].apply(lambda s: set(s.astype(str)))
    assert all(recorded[s] == frozen for s in range(4))
    assert all(recorded[s] == param_names(learn.model) for s in range(4, 8))
    assert len(param_names(learn.model)) >= 60 and len(frozen) < len(param_names(learn.model))
    assert [set(expected_layers(c)) for c in cap.captured] == [recorded[s] for s in range(8)]
    # `.layers.group` is the splitter's parameter group of each tensor
    group_of = {id(p): i for i, group in enumerate(learn.splitter(learn.model)) for p in group}
    want = {n: group_of[id(p)] for n, p in learn.model.named_parameters()}
    assert dict(zip(record.layers['name'], record.layers['group'])) == want and len(set(want.values())) == 3
    # discriminative learning rates after unfreezing: the body's groups train slower than the head
    last = record.lrs[record.lrs['step'] == 7]
    assert last['group'].tolist() == [0, 1, 2] and last['lr'].is_monotonic_increasing and last['lr'].iloc[0] < last['lr'].iloc[2]


def test_to_fp16_records_the_unscaled_gradients():
    learn = learner('resnet18').to_fp16()
    cap = Capture()
    learn.fit(1, 1e-3, cbs=[GradStats(), cap])
    assert_record_matches(learn.grad_stats, cap.captured)
    assert len(learn.grad_stats) == 4 and not learn.grad_stats.steps['skipped'].any()


def test_a_channels_last_model_is_measured_as_it_is():
    "Convolution weights and their gradients in channels_last memory format (strided, not contiguous in NCHW order)."
    learn = learner('resnet18')
    learn.model.to(memory_format=torch.channels_last)
    conv = learn.model[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    cap = Capture()
    learn.fit(1, 1e-3, cbs=[GradStats(hist=True), cap])
    assert conv.grad.is_contiguous(memory_format=torch.channels_last) and not conv.grad.is_contiguous()
    assert_record_matches(learn.grad_stats, cap.captured)


def test_export_and_load_learner_with_gradstats_attached(tmp_path):
    "`learn.export()` with GradStats among the Learner's callbacks; the loaded Learner trains on and the record continues."
    learn = learner('xresnet18', cbs=GradStats())
    learn.fit(1, 1e-3)
    before = learn.grad_stats.df.copy()
    learn.export(tmp_path/'learner.pkl')
    loaded = load_learner(tmp_path/'learner.pkl')
    assert any(isinstance(cb, GradStats) for cb in loaded.cbs)
    assert loaded.grad_stats is not learn.grad_stats and len(loaded.grad_stats) == 4
    loaded.dls = image_dls()
    quiet(loaded)
    cap = Capture(start=4)
    loaded.fit(1, 1e-3, cbs=cap)
    record = loaded.grad_stats
    assert record.steps['step'].tolist() == list(range(8))
    assert_record_matches(record, cap.captured, steps=range(4, 8), since=4)
    old = record.df[record.df['step'] < 4].reset_index(drop=True)
    assert old.drop(columns='layer').equals(before.drop(columns='layer'))
    assert list(old['layer'].astype(str)) == list(before['layer'].astype(str))
    assert len(load(record.save(tmp_path/'run'))) == 8


def test_heatmap_and_flow_name_every_tensor_of_a_fine_tuned_model(fine_tuned, tmp_path):
    "The figures of a real fine_tune record of 62+ tensors name each one (tests/test_plots.py checks they do not overlap)."
    record = fine_tuned[0].grad_stats
    names = list(record.layers.sort_values('depth')['name'])
    heat = plots.heatmap(record)
    assert [t.get_text() for t in heat.get_yticklabels()] == names
    flow = plots.gradient_flow(record)
    assert [t.get_text() for t in flow.get_xticklabels()] == names
    for ax, name in ((heat, 'heatmap'), (flow, 'flow')): ax.figure.savefig(tmp_path/f'{name}.png')


def test_the_demo_trains_the_threads_resnet18_pair():
    """`gradstats demo`'s resnet18 runs of the "gradients less than 1?" thread (quick: 16 x 16 images, 10 steps): with
    a learning rate far too high the gradients become huge, orders of magnitude above the sensible run's."""
    from fastai_gradstats.demo import EXPERIMENTS, run_experiment
    exps = {e.name: e for e in EXPERIMENTS if e.arch == 'resnet18'}
    assert set(exps) == {'resnet18_lr_reasonable', 'resnet18_lr_too_high'} and all(e.unavailable() is None for e in exps.values())
    runs = {name: run_experiment(e, quick=True, progress=False) for name, e in exps.items()}
    sensible, too_high = runs['resnet18_lr_reasonable'], runs['resnet18_lr_too_high']
    assert len(sensible) == len(too_high) == 640 // 64
    assert len(sensible.layers) >= 60 and sensible.has_hist
    assert np.isfinite(sensible.df['grad_max']).all()
    assert np.nanmax(too_high.df['grad_max'].replace(np.inf, np.nan)) > 1e3 * sensible.df['grad_max'].max() or \
        not np.isfinite(too_high.df['grad_max']).all()
    for name, e in exps.items():
        health = runs[name].health()
        for check, status in e.expect.items():
            assert health[health['check'] == check]['status'].map({'critical': 0, 'warning': 1, 'ok': 2}).min() == \
                {'critical': 0, 'warning': 1, 'ok': 2}[status], (name, check)
