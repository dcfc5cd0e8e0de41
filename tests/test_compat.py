"""A restructuring keeps what users see: the public names, the record's methods and the CLI are those of the snapshot
taken before it (tests/data/api_0.1.json), a run saved before it loads with the same DataFrame and diagnosis, and the
package's rooms import one way (docs/architecture.md)."""
import argparse
import ast
import importlib
import inspect
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import fastai_gradstats
from fastai_gradstats import GradRecord, load

DATA = Path(__file__).parent/'data'
PACKAGE = Path(fastai_gradstats.__file__).parent


# --- (a) the public API equals the snapshot --------------------------------------------------------------------
@pytest.fixture(scope='module')
def snapshot():
    return json.loads((DATA/'api_0.1.json').read_text())


ADDED_SINCE = {'live_png'}   # names the package exports that the snapshot lacks: what was added since, nothing lost


def test_the_package_exports_the_same_names(snapshot):
    assert sorted(set(fastai_gradstats.__all__) - ADDED_SINCE) == snapshot['package']
    assert ADDED_SINCE <= set(fastai_gradstats.__all__)


def test_each_module_keeps_its_import_path_and_its_all(snapshot):
    for name, names in snapshot['modules'].items():
        module = importlib.import_module(f'fastai_gradstats.{name}')
        assert sorted(module.__all__) == names, name
        for public in names: assert hasattr(module, public), f'fastai_gradstats.{name}.{public}'


def test_the_record_has_the_same_methods_with_the_same_signatures(snapshot):
    public = sorted(n for n in dir(GradRecord) if not n.startswith('_'))
    assert public == snapshot['record_methods']
    signatures = {n: str(inspect.signature(getattr(GradRecord, n))) for n in public if inspect.isfunction(getattr(GradRecord, n))}
    assert signatures == snapshot['record_signatures']


def test_the_cli_has_the_same_commands(snapshot):
    from fastai_gradstats import cli
    commands, = [a.choices for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert sorted(commands) == snapshot['cli_commands']


# --- (b) a run saved before the change loads after it --------------------------------------------------------
@pytest.fixture(scope='module')
def saved_run():
    return load(DATA/'run_0.1')


def test_a_run_saved_before_loads_with_the_same_dataframe(saved_run):
    expected = pd.read_parquet(DATA/'run_0.1_df.parquet')
    pd.testing.assert_frame_equal(saved_run.df, expected)


def test_a_run_saved_before_gets_the_same_diagnosis(saved_run):
    expected = json.loads((DATA/'run_0.1_health.json').read_text())
    got = json.loads(saved_run.health().to_json(orient='records'))
    assert len(got) == len(expected)
    for i, (row, want) in enumerate(zip(got, expected)):
        assert row.keys() == want.keys(), i
        for key in want:
            if key in ('value', 'threshold'):   # numbers: equal within 1e-6, NaN (null) where NaN
                a, b = (math.nan if v is None else v for v in (row[key], want[key]))
                assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6), (i, key, a, b)
            else: assert row[key] == want[key], (i, key)


# --- (c) the rooms import one way ------------------------------------------------------------------------------
LAYERS = (('checks', 'thresholds'),                      # argument checks and the diagnosis' numbers: plain Python
          ('stats',),                                   # pure torch: statistics of lists of tensors
          ('record',),                                  # the recorded numbers: arrays -> DataFrames, save/load
          ('aggregate', 'plots', 'health', 'view', 'live_picture'),   # read a record (live or loaded)
          ('callback', 'export', 'live'),               # fastai's training loop
          ('report', 'questions', 'demo', 'cli', '__main__'))  # the edge: experiments, HTML, commands
LEVEL = {room: level for level, rooms in enumerate(LAYERS) for room in rooms}
FASTAI = ('fastai', 'fastcore')
FASTAI_ROOMS = {'callback', 'export', 'live', 'demo'}   # the fastai-loop modules, and the demo's experiments
FORBIDDEN = {'stats': ('pandas', *FASTAI), 'checks': ('pandas', *FASTAI), 'thresholds': ('pandas', 'torch', *FASTAI),
             'record': FASTAI}


def _modules():
    "(dotted name, room, parsed tree) of every module of the package but its root `__init__`."
    for path in sorted(PACKAGE.rglob('*.py')):
        parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
        if parts == ('fastai_gradstats', '__init__'): continue
        name = '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)
        yield name, parts[1], path, ast.parse(path.read_text(encoding='utf-8'))


def _imports(name, path, tree):
    "(what is imported: a dotted module name, the names taken from it) for every import of the module, lazy ones too."
    package = name if path.name == '__init__.py' else name.rsplit('.', 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names: yield alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split('.')
                base = base[:len(base) - node.level + 1]
                yield '.'.join(base + ([node.module] if node.module else [])), tuple(a.name for a in node.names)
            else: yield node.module, tuple(a.name for a in node.names)


def test_the_layers_name_every_room():
    rooms = {room for _, room, _, _ in _modules()}
    assert rooms == set(LEVEL), rooms ^ set(LEVEL)


def test_no_room_imports_a_room_above_it_nor_what_it_must_not_know():
    wrong = []
    for name, room, path, tree in _modules():
        for target, names in _imports(name, path, tree):
            top = target.split('.')[0]
            if top == 'fastai_gradstats':
                parts = target.split('.')
                if len(parts) == 1:   # the package root: only its version (the rooms' names come from the rooms)
                    targets = [n for n in names if n != '__version__']
                    if targets: wrong.append(f'{name} imports {targets} from the package root, not from their rooms')
                    continue
                if LEVEL[parts[1]] > LEVEL[room]: wrong.append(f'{name} ({room}) imports {target}, a room above it')
                if room in ('plots', 'health') and parts[1] == 'callback': wrong.append(f'{name} imports the callback')
            elif top in FORBIDDEN.get(room, ()): wrong.append(f'{name} ({room}) imports {target}')
            elif top in FASTAI and room not in FASTAI_ROOMS: wrong.append(f'{name} ({room}) imports fastai: {target}')
    assert not wrong, '\n'.join(wrong)


def test_the_check_finds_an_upward_import():
    "The check above reads relative imports right: a module of stats importing the record, or pandas, is caught."
    tree = ast.parse('from ..record import GradRecord\nimport pandas as pd\nfrom . import USE_CUDA_GRAPHS')
    found = list(_imports('fastai_gradstats.stats.layout', PACKAGE/'stats'/'layout.py', tree))
    assert found == [('fastai_gradstats.record', ('GradRecord',)), ('pandas', ()), ('fastai_gradstats.stats', ('USE_CUDA_GRAPHS',))]
