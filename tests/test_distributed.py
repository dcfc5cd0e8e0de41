"""Data parallel for real: 2 CPU processes, gloo, a fastai Learner around a DistributedDataParallel model.

Each rank trains on its half of every global batch; DDP averages the gradients in backward, so at
`before_step` they are the gradients of the whole global batch. The recorded statistics must equal
those of the same global batches trained in one process. (fastai's `distrib_ctx` needs accelerate,
which is not a dependency here: the callback logic is the same under plain DDP.)
"""
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import fastai_gradstats
from fastai_gradstats import GradStats, load, merge

WORKER = textwrap.dedent('''
    import os, sys, torch, torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP
    sys.path.insert(0, os.environ['GRADSTATS_TESTS'])
    from test_distributed import data, model, learner
    from fastai_gradstats import GradStats

    def worker(rank, world, out, all_ranks, port):
        os.environ['MASTER_ADDR'], os.environ['MASTER_PORT'] = '127.0.0.1', port
        torch.set_num_threads(1)
        dist.init_process_group('gloo', rank=rank, world_size=world)
        x, y = data()
        half = torch.arange(len(x)).view(-1, 32)[:, rank * 16:(rank + 1) * 16].reshape(-1)  # this rank's half of each batch
        learn = learner(x[half], y[half], DDP(model()), bs=16)
        with learn.no_bar(), learn.no_logging(): learn.fit(1, cbs=GradStats(all_ranks=all_ranks))
        learn.grad_stats.save(f'{out}/rank{rank}')
        dist.destroy_process_group()

    if __name__ == '__main__':
        out, all_ranks, port = sys.argv[1], sys.argv[2] == '1', sys.argv[3]
        torch.multiprocessing.spawn(worker, args=(2, out, all_ranks, port), nprocs=2)
''')


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(256, 8, generator=g), torch.randint(0, 3, (256,), generator=g)


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def learner(x, y, net, bs):
    from fastai.basics import CrossEntropyLossFlat, DataLoaders, Learner, SGD
    from fastai_gradstats.demo import TensorPairs
    dls = DataLoaders.from_dsets(TensorPairs(x, y), TensorPairs(x[:bs], y[:bs]), bs=bs, shuffle=False,
                                 drop_last=False, device=torch.device('cpu'))
    return Learner(dls, net, loss_func=CrossEntropyLossFlat(), opt_func=SGD, lr=0.1)


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return str(s.getsockname()[1])


def _run_ranks(tmp_path, all_ranks):
    script = tmp_path/'worker.py'
    script.write_text(WORKER)
    env = {**__import__('os').environ, 'GRADSTATS_TESTS': str(__import__('pathlib').Path(__file__).parent)}
    result = subprocess.run([sys.executable, str(script), str(tmp_path), '1' if all_ranks else '0', _free_port()],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return load(tmp_path/'rank0'), load(tmp_path/'rank1')


@pytest.fixture(scope='module')
def reference():
    "The same global batches of 32, in one process."
    x, y = data()
    learn = learner(x, y, model(), bs=32)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, cbs=GradStats())
    return learn.grad_stats


def _assert_same_stats(record, reference):
    columns = ['grad_norm', 'param_norm', 'grad_max', 'grad_mean', 'zero_frac']
    got, want = record.df, reference.df
    assert list(got['layer'].astype(str)) == list(want['layer'].astype(str))   # names without DDP's `module.`
    for column in columns:
        np.testing.assert_allclose(got[column].to_numpy(np.float64), want[column].to_numpy(np.float64), rtol=2e-5, atol=1e-7,
                                   err_msg=column)
    np.testing.assert_allclose(record.steps['grad_norm'], reference.steps['grad_norm'], rtol=2e-5)


def test_rank0_records_the_global_gradient(tmp_path, reference):
    rank0, rank1 = _run_ranks(tmp_path, all_ranks=False)
    assert len(rank0) == len(reference) == 8 and len(rank1) == 0      # rank 0 only, by default
    assert rank0.rank == 0 and rank1.rank == 1
    _assert_same_stats(rank0, reference)


def test_all_ranks_record_and_merge(tmp_path, reference):
    rank0, rank1 = _run_ranks(tmp_path, all_ranks=True)
    merged = merge([tmp_path/'rank0', tmp_path/'rank1'])
    assert list(merged.steps.columns[:2]) == ['rank', 'step']
    assert list(merged.steps['rank']) == [0, 1] * 8 and list(merged.steps['step']) == sorted(list(range(8)) * 2)
    for rank in (0, 1):
        part = merged.df[merged.df['rank'] == rank]
        np.testing.assert_allclose(part['grad_norm'].to_numpy(np.float64), reference.df['grad_norm'].to_numpy(np.float64),
                                   rtol=2e-5, atol=1e-7)
    # a merged record saves and loads like any other
    again = load(merged.save(tmp_path/'merged'))
    assert again.multi_rank and list(again.df['rank']) == list(merged.df['rank'])


def test_merge_rejects_bad_input(reference):
    with pytest.raises(TypeError, match='records'): merge([])
    with pytest.raises(ValueError, match='same rank'):
        reference.rank = 0
        merge([reference, reference])
