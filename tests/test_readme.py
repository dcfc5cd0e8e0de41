"""The README and the pages of docs/ stay true: every python example runs (per page, in order, in a scratch
directory), every relative link resolves, the summary the README quotes is a real run's, the documented commands
exist, and the exporter paragraph names exactly the tags the exporters send."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
README = ROOT/'README.md'
DOCS = ROOT/'docs'
PAGES = [README, *sorted(DOCS.glob('*.md'))]
EXPORTERS_PAGE = DOCS/'long-runs.md'  # the paragraph on the TensorBoard/W&B exporters
LAUNCHED_PAGE = DOCS/'long-runs.md'   # the example launched on several processes
LAUNCHED = '# train.py\n'  # the first line of that example (tests/test_fastai_distributed.py runs it under torchrun)
LINK = re.compile(r'\]\(([^)\s]+)\)')  # the target of a Markdown link or image


def blocks_of(page, language='python') -> list:
    "The fenced code blocks of `page` in `language`, in order."
    return re.findall(rf"```{language}\n(.*?)```", page.read_text(encoding='utf-8'), flags=re.S)


def launched_example() -> str:
    "The one example of all the pages that is launched with torchrun, not run in one process."
    found = [(page.name, block) for page in PAGES for block in blocks_of(page) if block.startswith(LAUNCHED)]
    assert len(found) == 1, f"{len(found)} examples start with {LAUNCHED!r}: {[name for name, _ in found]}"
    return found[0][1]


def examples(page) -> list:
    """The examples of `page` that run in one process, in order: the README's own; for a page of docs/, the README's
    quickstart (which trains `learn` and saves `run`) and then the page's own."""
    own = [b for b in blocks_of(page) if not b.startswith(LAUNCHED)]
    return own if page == README else [blocks_of(README)[0], *own]


def python_blocks():
    "The README's python examples run in one process, in order, and the one launched with torchrun (wherever it lives)."
    return examples(README), launched_example()


# One process runs every page's examples, each page in a scratch directory of its own and a namespace of its own
# (torch and fastai are imported once, not once per page): the runner writes each page's output and error, if any.
RUNNER = r"""
import contextlib, io, json, os, runpy, sys, traceback
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
results = {}
for name, script in json.loads(sys.argv[1]):
    os.chdir(os.path.dirname(script))
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out): runpy.run_path(script, run_name='__main__')
        error = None
    except BaseException: error = traceback.format_exc()
    plt.close('all')
    results[name] = {'stdout': out.getvalue(), 'error': error}
with open(sys.argv[2], 'w') as f: json.dump(results, f)
"""

DOC_PAGES = [p for p in PAGES[1:] if [b for b in blocks_of(p) if not b.startswith(LAUNCHED)]]


@pytest.fixture(scope='module')
def page_runs(tmp_path_factory):
    "Each page's examples run, in order, in a scratch directory of its own: {page name: {'stdout', 'error', 'folder'}}."
    root = tmp_path_factory.mktemp('pages')
    scripts = []
    for page in [README, *DOC_PAGES]:
        folder = root/page.stem
        folder.mkdir()
        script = folder/f'{page.stem}_examples.py'
        script.write_text('\n'.join(examples(page)), encoding='utf-8')
        scripts.append((page.name, str(script)))
    out = root/'results.json'
    result = subprocess.run([sys.executable, '-c', RUNNER, json.dumps(scripts), str(out)], cwd=root, capture_output=True,
                            text=True, timeout=900, env={**os.environ, 'MPLBACKEND': 'Agg'})
    assert result.returncode == 0 and out.is_file(), result.stderr[-3000:]
    runs = json.loads(out.read_text())
    for name, script in scripts: runs[name]['folder'] = Path(script).parent
    return runs


def test_readme_examples_run(page_runs):
    blocks, _ = python_blocks()
    assert len(blocks) >= 2
    run = page_runs[README.name]
    assert run['error'] is None, run['error']
    assert 'Gradient health' in run['stdout']
    assert 'GradStats epoch 0' in run['stdout']   # the live view's line in a terminal
    assert (run['folder']/'run'/'meta.json').is_file()


@pytest.mark.parametrize('page', DOC_PAGES, ids=[p.name for p in DOC_PAGES])
def test_docs_examples_run(page, page_runs):
    "Each page of docs/ runs after the README's quickstart (which trains `learn` and saves `run`)."
    run = page_runs[page.name]
    assert run['error'] is None, run['error']


def test_the_pages_with_examples():
    assert {p.name for p in DOC_PAGES} >= {'callback.md', 'record.md', 'diagnosis.md', 'plots.md', 'long-runs.md', 'cli.md'}


def test_the_launched_example_is_found_where_it_lives():
    example = launched_example()
    assert example in blocks_of(LAUNCHED_PAGE)
    assert 'distrib_ctx' in example and "save('run')" in example


def _anchors(page) -> set:
    "GitHub's anchors of the headings of `page`: lower case, punctuation dropped, spaces as hyphens."
    text = re.sub(r"```.*?```", '', page.read_text(encoding='utf-8'), flags=re.S)
    headings = re.findall(r'^#+ (.+)$', text, flags=re.M)
    return {re.sub(r'[^\w\- ]', '', h.strip().lower()).replace(' ', '-') for h in headings}


def test_relative_links_point_to_existing_files():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text(encoding='utf-8')):
            if re.match(r'[a-z][a-z0-9+.-]*:', target): continue   # http:, https:, mailto:
            path, _, anchor = target.partition('#')
            file = page.parent/path if path else page
            if not file.exists(): broken.append(f'{page.name}: {target}')
            elif anchor and file.suffix == '.md' and anchor not in _anchors(file): broken.append(f'{page.name}: {target} (no such heading)')
    assert not broken


def test_readme_links_every_docs_page():
    linked = {(README.parent/t.partition('#')[0]).resolve() for t in LINK.findall(README.read_text(encoding='utf-8'))}
    assert [p.name for p in PAGES[1:] if p.resolve() not in linked] == []


def test_readmes_summary_sample_is_a_real_run():
    """The lines of `summary()` the README quotes (shortened with '...') are those of the demo's `lr_too_high` run,
    up to the numbers (which may differ in their last digits from one machine to another)."""
    from fastai_gradstats.demo import EXPERIMENTS, run_experiment
    text = README.read_text(encoding='utf-8')
    sample = next(b for b in blocks_of(README, 'text') if b.startswith('Gradient health'))
    record = run_experiment(next(e for e in EXPERIMENTS if e.name == 'lr_too_high'), progress=False)
    real = record.summary().splitlines()
    assert '`lr_too_high`' in text
    numbers = lambda s: re.sub(r'\d+(\.\d+)?(e[+-]?\d+)?', '#', s)
    shown = sample.rstrip('\n').splitlines()
    assert 2 <= len(shown) <= len(real)
    for quoted, line in zip(shown, real):
        parts = numbers(quoted).split('...')
        line = numbers(line)
        assert line.startswith(parts[0].rstrip()), (quoted, line)
        at = len(parts[0].rstrip())
        for part in (p.strip() for p in parts[1:]):
            at = line.find(part, at)
            assert at >= 0, (quoted, part, line)
            at += len(part)


def test_setup_and_test_commands_match_ci():
    text = README.read_text(encoding='utf-8')
    commands = re.findall(r"^pip install .*$", text, flags=re.M)
    assert 'pip install -c constraints.txt -e ".[dev]" && gradstats demo' in commands
    test_command = 'pip install -c constraints.txt -e ".[dev]" && python -m pytest'
    assert test_command in commands
    assert test_command in (README.parent/'.ci'/'run').read_text()
    assert 'torch==2.13.0' in (README.parent/'constraints.txt').read_text()
    assert 'venv-vision/bin/python -m pytest -m "vision or distributed"' in text   # the second environment


def test_cli_help_lists_documented_commands():
    result = subprocess.run([sys.executable, '-m', 'fastai_gradstats', '--help'], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ('demo', 'report', 'summary'): assert command in result.stdout
    for page in (README, DOCS/'cli.md'):
        for command in ('demo', 'report', 'summary'): assert f'gradstats {command} ' in page.read_text(encoding='utf-8')


def test_exporter_paragraph_names_exactly_the_tags_sent():
    """The paragraph on the TensorBoard/W&B exporters (docs/long-runs.md) names every tag they send, and no other: the
    tags come from the exporters' own `send` (fake writer and run) on a step with `update_norm` and histograms."""
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
    text = EXPORTERS_PAGE.read_text(encoding='utf-8')
    start = text.index('`TensorBoardGradStats` and `WandbGradStats`')
    paragraph = text[start:text.index('\n\n', start)]
    named = {t for t in re.findall(r'`([^`\s]+)`', paragraph) if '/' in t or t in ('loss', 'lr')}
    assert named == sent
