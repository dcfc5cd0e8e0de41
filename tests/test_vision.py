"""GradStats on fastai's own vision learner, where `fastai.vision` can be imported (it needs a torchvision that
matches torch; the CPU torch of CI has none, so there this file is skipped). The library itself never imports
`fastai.vision`: tests/test_api.py checks that."""
import pytest
import torch
from fastai.basics import CrossEntropyLossFlat, DataLoaders

from fastai_gradstats import GradStats
from fastai_gradstats.demo import TensorPairs

from helpers import Capture, assert_record_matches, quiet

try:
    from fastai.vision.learner import vision_learner
    from torchvision.models import resnet18
except Exception as e:  # torchvision built for another torch raises RuntimeError, not ImportError
    pytest.skip(f'fastai.vision cannot be imported here: {type(e).__name__}: {e}', allow_module_level=True)


def test_vision_learner_resnet18():
    """An untrained ResNet-18 from `vision_learner` (its head is fastai's: pooling, BatchNorm, dropout, linear): every
    parameter with a gradient is recorded, equal to the float64 reference, in input-to-output order."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, 32, 32, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long()
    dls = DataLoaders.from_dsets(TensorPairs(x[:32], y[:32]), TensorPairs(x[32:], y[32:]), bs=8,
                                 device=torch.device('cuda' if torch.cuda.is_available() else 'cpu'))
    learn = quiet(vision_learner(dls, resnet18, pretrained=False, n_out=2, loss_func=CrossEntropyLossFlat()))
    cap = Capture()
    learn.fit(1, 1e-3, cbs=[GradStats(), cap])
    assert_record_matches(learn.grad_stats, cap.captured)
    layers = learn.grad_stats.layers
    assert len(layers) == sum(p.requires_grad for p in learn.model.parameters())
    ordered = layers.sort_values('depth')['name'].tolist()
    assert ordered[0] == '0.0.weight' and ordered[-1].startswith('1.')   # the stem's conv first, the head last
