"Every public name of every module is exported from the package and documented."
import importlib
import inspect
import pkgutil

import pytest

import fastai_gradstats

MODULES = [m.name[len('fastai_gradstats.'):] for m in pkgutil.walk_packages(fastai_gradstats.__path__, 'fastai_gradstats.')
           if not m.name.rsplit('.', 1)[-1].startswith('_')]   # the rooms' modules too: 'stats', 'stats.layout', ...


def package_of(name):
    "The package a module's names reach: its room's for a module inside a room (stats.layout: stats), else fastai_gradstats."
    room = name.rpartition('.')[0]
    return importlib.import_module(f'fastai_gradstats.{room}') if room else fastai_gradstats


@pytest.mark.parametrize('name', MODULES)
def test_public_names_are_exported_and_documented(name):
    module = importlib.import_module(f'fastai_gradstats.{name}')
    assert module.__doc__, f'module {name} has no docstring'
    for public in getattr(module, '__all__', []):
        obj = getattr(module, public)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            assert obj.__doc__, f'{name}.{public} has no docstring'
            if public == name:   # health.health: the package's `health` is the module (`record.health()` calls it)
                assert getattr(package_of(name), public) is module
            elif name not in ('cli', 'demo', 'questions'):   # the edge modules: fastai_gradstats.cli / .demo / .questions
                assert getattr(package_of(name), public, None) is obj, f'{name}.{public} is not exported from its package'


def test_record_methods_are_documented():
    for method in ('plot_heatmap', 'plot_magnitude_hist', 'plot_gradient_flow', 'plot_layer_curves', 'plot_update_ratio',
                   'health', 'summary', 'suggest_clip', 'save', 'last', 'thin'):
        assert getattr(fastai_gradstats.GradRecord, method).__doc__, method


def test_importing_never_imports_torchvision_or_fastai_vision():
    import subprocess, sys
    code = ("import sys, fastai_gradstats, fastai_gradstats.report, fastai_gradstats.export, fastai_gradstats.cli; "
            "bad = [m for m in sys.modules if m.startswith(('torchvision', 'fastai.vision'))]; print(bad); sys.exit(bool(bad))")
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_asking_whether_torchvision_imports_keeps_it_out_of_this_process():
    """`demo.vision_unavailable()` (asked by the demo, its tests and notebook 02) answers as an import in a process of
    its own does, and leaves no module of torchvision or fastai.vision behind, even where torchvision fails half-way."""
    import subprocess, sys
    code = ("import sys; from fastai_gradstats.demo import vision_unavailable; reason = vision_unavailable(); "
            "bad = [m for m in sys.modules if m.startswith(('torchvision', 'fastai.vision'))]; "
            "print(reason is None); sys.exit(bool(bad))")
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    imports = subprocess.run([sys.executable, '-c', 'import torchvision.models, fastai.vision.learner'], capture_output=True)
    assert result.stdout.split()[-1] == str(imports.returncode == 0)


def test_version_comes_from_settings_ini_installed_or_not():
    "Installed: pip's metadata, written from settings.ini. A checkout imported without installing reads settings.ini itself."
    import configparser, subprocess, sys
    from pathlib import Path
    root = Path(fastai_gradstats.__file__).resolve().parent.parent
    config = configparser.ConfigParser(delimiters=['='])
    config.read(root/'settings.ini')
    expected = config['DEFAULT']['version']
    assert fastai_gradstats.__version__ == expected
    code = ("import importlib.metadata as m\n"
            "def missing(name): raise m.PackageNotFoundError(name)\n"
            "m.version = missing\n"
            "import fastai_gradstats; print(fastai_gradstats.__version__)")
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=root)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


def test_every_third_party_import_is_a_declared_requirement():
    "What the package imports (outside the standard library) is in settings.ini's requirements or in an optional extra's."
    import ast, re, sys
    from configparser import ConfigParser
    from pathlib import Path
    package = Path(fastai_gradstats.__file__).parent
    imported = set()
    for path in package.rglob('*.py'):   # the rooms' modules too
        for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
            if isinstance(node, ast.Import): imported.update(a.name.split('.')[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0: imported.add(node.module.split('.')[0])
    third_party = imported - set(sys.stdlib_module_names) - {'fastai_gradstats', '__future__'}
    config = ConfigParser(delimiters=['='])
    config.read(package.parent/'settings.ini', encoding='utf-8')
    declared = {re.split(r'[<>=!~ ]', r)[0].lower() for key, value in config['DEFAULT'].items()
                if key == 'requirements' or key.endswith('_requirements') and key != 'dev_requirements' for r in value.split()}
    distribution = {'sklearn': 'scikit-learn', 'PIL': 'pillow'}   # import name -> the name pip installs
    assert third_party, 'no import found: the scan is broken'
    assert {distribution.get(m, m) for m in third_party} <= declared, third_party


@pytest.mark.parametrize('name', MODULES)
def test_public_functions_and_constants_are_in_all_and_exported(name):
    "A module's public functions and classes are in its `__all__`, and every name there (constants too) reaches the package."
    module = importlib.import_module(f'fastai_gradstats.{name}')
    listed = set(getattr(module, '__all__', []))
    defined = [n for n, obj in vars(module).items() if not n.startswith('_') and (inspect.isfunction(obj) or inspect.isclass(obj))
               and obj.__module__ == module.__name__]
    assert not set(defined) - listed, f'{name} defines public {sorted(set(defined) - listed)} outside its __all__'
    if name in ('cli', 'demo', 'questions'): return
    for public in listed - {name}:
        assert getattr(package_of(name), public, None) is getattr(module, public), f'{name}.{public} is not exported'
