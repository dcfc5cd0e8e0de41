"Every python example in README.md runs, in order, in a scratch directory; the documented commands exist."
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).parent.parent/'README.md'


def test_python_examples_run(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
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
