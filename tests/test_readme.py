"Every python example in README.md runs, in order, in a scratch directory; the documented commands exist."
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parent.parent/'README.md'


LAUNCHED = '# train.py\n'  # the first line of the example launched on several processes (tests/test_fastai_distributed.py)


def python_blocks():
    "The README's python examples run in one process, in order, and the one launched with torchrun."
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    launched = [b for b in blocks if b.startswith(LAUNCHED)]
    assert len(launched) == 1
    return [b for b in blocks if not b.startswith(LAUNCHED)], launched[0]


def test_python_examples_run(tmp_path):
    blocks, _ = python_blocks()
    assert len(blocks) >= 2
    script = tmp_path/'readme_examples.py'
    script.write_text("import matplotlib\nmatplotlib.use('Agg')\n" + '\n'.join(blocks))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'Gradient health' in result.stdout
    assert (tmp_path/'run'/'meta.json').is_file()


def test_setup_and_test_commands_match_ci():
    text = README.read_text()
    commands = re.findall(r"^pip install .*$", text, flags=re.M)
    assert 'pip install -c constraints.txt -e ".[dev]" && gradstats demo' in commands
    test_command = 'pip install -c constraints.txt -e ".[dev]" && python -m pytest'
    assert test_command in commands
    assert test_command in (README.parent/'.ci'/'run').read_text()
    assert 'torch==2.13.0' in (README.parent/'constraints.txt').read_text()


def test_cli_help_lists_documented_commands():
    result = subprocess.run([sys.executable, '-m', 'fastai_gradstats', '--help'], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ('demo', 'report', 'summary'): assert command in result.stdout


def test_exporter_paragraph_names_exactly_the_tags_sent():
    """README's paragraph on the TensorBoard/W&B exporters names every tag they send, and no other: the tags
    come from the exporters' own `send` (fake writer and run) on a step with `update_norm` and histograms."""
    import numpy as np
    pytest.importorskip('tensorboard'); pytest.importorskip('wandb')
    from fastai_gradstats import TensorBoardGradStats, WandbGradStats
    from fastai_gradstats.export import step_scalars
    from fastai_gradstats.stats import HIST_BINS, METRICS
    layers = ['0.weight', '0.bias']
    values = np.ones((2, len(METRICS) + 1), np.float32)
    values[1, METRICS.index('dead_frac')] = np.nan   # a 1-D parameter has no dead units
    last = {'step': 3, 'epoch': 0, 'lr': 1e-3, 'loss': 0.5, 'skipped': False, 'grad_norm': 1.4, 'layers': layers,
            'values': values, 'counts': np.zeros((2, 2), np.int64), 'hist': np.ones((2, len(HIST_BINS)), np.int64)}
    scalars = step_scalars(last)
    hists = dict(zip(layers, last['hist']))

    class Writer:
        def __init__(self): self.tags = []
        def add_scalar(self, tag, *args, **kwargs): self.tags.append(tag)
        def add_histogram_raw(self, tag, **kwargs): self.tags.append(tag)

    class Run:
        def log(self, data, step): self.tags = list(data)

    writer, run = Writer(), Run()
    TensorBoardGradStats(writer=writer).send(3, scalars, hists)
    WandbGradStats(wandb_run=run).send(3, scalars, hists)
    generic = lambda tags: {t.replace('0.weight', '<layer>').replace('0.bias', '<layer>') for t in tags}
    sent = generic(writer.tags) | generic(run.tags)
    assert 'update_ratio/<layer>' in sent and 'loss' in sent and 'lr' in sent   # the ones README once left out
    text = README.read_text()
    start = text.index('`TensorBoardGradStats` and `WandbGradStats`')
    paragraph = text[start:text.index('\n\n', start)]
    named = {t for t in re.findall(r'`([^`\s]+)`', paragraph) if '/' in t or t in ('loss', 'lr')}
    assert named == sent
