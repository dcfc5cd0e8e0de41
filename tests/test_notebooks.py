"The tutorial notebooks in nbs/ run from top to bottom; their own cells assert the forum threads' claims."
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NBS = sorted((Path(__file__).parent.parent/'nbs').glob('*.ipynb'))


def test_there_are_notebooks():
    assert {p.name for p in NBS} >= {'01_quickstart.ipynb', '02_forum_experiments.ipynb'}


@pytest.mark.parametrize('path', NBS, ids=[p.name for p in NBS])
def test_notebook_executes(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    # run in a scratch directory so nothing is written next to the notebooks
    NotebookClient(nb, timeout=600, kernel_name='python3', resources={'metadata': {'path': str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', []) if o.get('output_type') == 'error']
    assert not errors
    images = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', []) if 'image/png' in o.get('data', {})]
    assert images, 'the notebook should show its pictures'
