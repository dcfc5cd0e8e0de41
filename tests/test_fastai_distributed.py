"""fastai's own data-parallel training for real: two CPU processes launched by `torchrun`, each a fastai `Learner` inside
`learn.distrib_ctx(cpu=True)` (accelerate and gloo). Nothing is patched but one method: fastai's
`DistributedDL._broadcast` moves its index tensor to CUDA for NCCL, so the workers broadcast it on the CPU instead
(gloo supports that).

fastai's `DistributedDL` gives rank r the r-th half of each epoch's indices, in batches of `bs`; DDP averages the two
ranks' gradients in backward, so at `before_step` they are those of the global batch made of both halves' k-th
batches. Rank 0's record must equal one process trained on exactly those global batches. Needs accelerate (the second
environment, see the README); skipped with the reason elsewhere.
"""
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from fastai_gradstats import GradStats, load, merge

pytestmark = pytest.mark.distributed
if importlib.util.find_spec('accelerate') is None:
    pytest.skip("fastai's distrib_ctx needs accelerate, which is not installed here (the second environment has it)",
                allow_module_level=True)

N, BS = 256, 16  # items; batch size per rank (global batches of 32)

CPU_BROADCAST = textwrap.dedent('''
    import torch
    from fastai.distributed import DistributedDL

    def broadcast_on_cpu(self, t, rank):
        "fastai's DistributedDL._broadcast without its .cuda() (NCCL needs CUDA tensors; gloo broadcasts CPU ones)."
        t = torch.LongTensor(t)
        torch.distributed.broadcast(t, rank)
        return t.tolist()
    DistributedDL._broadcast = broadcast_on_cpu
''')

WORKER = CPU_BROADCAST + textwrap.dedent('''
    import os, sys, warnings
    sys.path.insert(0, os.environ['GRADSTATS_TESTS'])
    from test_fastai_distributed import BS, data, learner, model
    from fastai_gradstats import GradStats, TensorBoardGradStats

    out, all_ranks, lr = sys.argv[1], sys.argv[2] == '1', float(sys.argv[3])
    rank = int(os.environ['RANK'])
    torch.set_num_threads(1)
    x, y = data()
    learn = learner(x, y, model(), bs=BS, lr=lr)
    warnings.simplefilter('default')  # every warning printed: rank 1 must show none of ours
    with learn.distrib_ctx(cpu=True):
        learn.fit(1, cbs=[GradStats(all_ranks=all_ranks), TensorBoardGradStats(f'{out}/tensorboard/rank{rank}')])
    record = learn.grad_stats
    if len(record): record.save(f'{out}/rank{rank}')
''')


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 8, generator=g), torch.randint(0, 3, (N,), generator=g)


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def learner(x, y, net, bs, lr=0.1):
    from fastai.basics import CrossEntropyLossFlat, DataLoaders, Learner, SGD
    from fastai_gradstats.demo import TensorPairs
    dls = DataLoaders.from_dsets(TensorPairs(x, y), TensorPairs(x[:bs], y[:bs]), bs=bs, shuffle=False,
                                 drop_last=False, device=torch.device('cpu'))
    return Learner(dls, net, loss_func=CrossEntropyLossFlat(), opt_func=SGD, lr=lr)


def global_batches_in_order(x, y):
    "The items reordered so that batches of 2 * BS are the global batches of the two ranks: both halves' k-th batches."
    half = N // 2
    order = torch.cat([torch.cat([torch.arange(k, k + BS), torch.arange(half + k, half + k + BS)])
                       for k in range(0, half, BS)])
    return x[order], y[order]


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return str(s.getsockname()[1])


def launch(tmp_path, all_ranks=False, lr=0.1):
    """Run the worker on 2 processes with torchrun; each rank's stdout and stderr go to files of their own.
    Returns (rank -> stdout, rank -> stderr)."""
    script, logs = tmp_path/'worker.py', tmp_path/'logs'
    script.write_text(WORKER)
    env = {**os.environ, 'GRADSTATS_TESTS': str(Path(__file__).parent), 'OMP_NUM_THREADS': '1'}
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_addr',
                             '127.0.0.1', '--master_port', _free_port(), '--log-dir', str(logs), '--redirects', '3',
                             str(script), str(tmp_path), '1' if all_ranks else '0', str(lr)],
                            capture_output=True, text=True, timeout=600, env=env)
    outputs = {rank: {kind: ''.join(p.read_text() for p in logs.rglob(f'{rank}/{kind}.log')) for kind in ('stdout', 'stderr')}
               for rank in (0, 1)}
    assert result.returncode == 0, (result.stderr[-2000:], outputs[0]['stderr'][-2000:], outputs[1]['stderr'][-2000:])
    return outputs


@pytest.fixture(scope='module')
def reference():
    "The same global batches of 32, in one process."
    from fastai.basics import set_seed
    set_seed(0)
    learn = learner(*global_batches_in_order(*data()), model(), bs=2 * BS)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, cbs=GradStats())
    return learn.grad_stats


def assert_same_stats(record, reference):
    "Same steps, same layers (without DDP's `module.`), every per-layer statistic within float32 tolerance."
    got, want = record.df, reference.df
    assert record.steps['step'].tolist() == reference.steps['step'].tolist() == list(range(N // (2 * BS)))
    assert list(got['layer'].astype(str)) == list(want['layer'].astype(str))
    for column in ('grad_norm', 'param_norm', 'grad_max', 'grad_mean', 'grad_std', 'zero_frac', 'dead_frac'):
        np.testing.assert_allclose(got[column].to_numpy(np.float64), want[column].to_numpy(np.float64), rtol=2e-5,
                                   atol=1e-7, err_msg=column)
    np.testing.assert_allclose(record.steps['grad_norm'], reference.steps['grad_norm'], rtol=2e-5)


def test_rank0_records_the_global_gradient_and_rank1_writes_and_prints_nothing(tmp_path, reference):
    outputs = launch(tmp_path)
    record = load(tmp_path/'rank0')
    assert record.rank == 0
    assert_same_stats(record, reference)
    assert list(record.layers['name']) == list(reference.layers['name'])
    # rank 1: no record to save, no TensorBoard files, nothing printed of ours
    assert not (tmp_path/'rank1').exists() and not (tmp_path/'tensorboard'/'rank1').exists()
    assert any((tmp_path/'tensorboard'/'rank0').iterdir())
    assert 'GradStats' not in outputs[1]['stderr'] + outputs[1]['stdout'] and 'gradstats' not in outputs[1]['stderr'].lower()


def test_all_ranks_records_both_and_merge_joins_their_saved_runs(tmp_path, reference):
    launch(tmp_path, all_ranks=True)
    merged = merge([tmp_path/'rank0', tmp_path/'rank1'])
    assert merged.steps['rank'].tolist() == [0, 1] * 8 and merged.steps['step'].tolist() == sorted(list(range(8)) * 2)
    for rank in (0, 1):
        part = merged.df[merged.df['rank'] == rank]
        np.testing.assert_allclose(part['grad_norm'].to_numpy(np.float64), reference.df['grad_norm'].to_numpy(np.float64),
                                   rtol=2e-5, atol=1e-7)
        assert load(tmp_path/f'rank{rank}').rank == rank
    again = load(merged.save(tmp_path/'merged'))
    assert again.multi_rank and again.df['rank'].tolist() == merged.df['rank'].tolist()


def test_the_readmes_example_runs_under_torchrun(tmp_path):
    "The docs' train.py (docs/long-runs.md) on two CPU processes, after the CPU broadcast: rank 0 saves the run, rank 1 nothing."
    from test_readme import python_blocks
    _, example = python_blocks()
    script = tmp_path/'train.py'
    script.write_text(CPU_BROADCAST + example)
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_addr',
                             '127.0.0.1', '--master_port', _free_port(), str(script)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    record = load(tmp_path/'run')
    assert record.rank == 0 and len(record) == 1500 // (2 * 64) and record.steps['loss'].notna().all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['run', 'train.py']


def test_an_alert_is_printed_by_rank0_only(tmp_path):
    "A learning rate far too high: rank 0 warns once of the explosion (GradientAlert); rank 1, which records nothing, is silent."
    outputs = launch(tmp_path, lr=1e4)
    assert 'GradientAlert' in outputs[0]['stderr']
    assert 'GradientAlert' not in outputs[1]['stderr'] and 'GradStats' not in outputs[1]['stderr'] + outputs[1]['stdout']
