"""Packaging: the README's library example runs from an empty folder after a non-editable install,
every package iterseg imports is declared, and no iterseg module imports one above it."""

import ast
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.launch_runs import COMPILE_FLAGS

ROOT = Path(__file__).resolve().parent.parent
# The dependency line, bottom first (README "How the code is laid out"): a module may import only
# modules of an earlier rank (imports inside functions included).
LAYERS = [
    {'errors', 'configs'},
    {'files', 'spec'},
    {'plans', 'lock', 'slides'},
    {'settings'},
    {'models', 'losses', 'augment', 'data'},
    {'inference', 'state', 'plots', 'run'},
    {'methods', 'metrics', 'report'},
    {'flops', 'checkpoints'},
    {'hooks', 'native'},
    {'evaluate'},
    {'train', 'predict', 'export'},
    {'benchmark'},
    {'calibrate', 'ablation'},
    {'cli'},
]
RANK = {m: i for i, layer in enumerate(LAYERS) for m in layer}
# Import name -> distribution name in pyproject.toml.
DISTRIBUTIONS = {'PIL': 'pillow', 'absl': 'absl-py', 'ml_collections': 'ml-collections',
                 'tensorflow_datasets': 'tensorflow-datasets', 'orbax': 'orbax-checkpoint',
                 'array_record': 'array-record', 'openslide': 'openslide-python'}


def iterseg_imports(path: Path) -> set:
  """The iterseg modules that `path` imports, at any depth ('data' for iterseg.data.*)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      names = [node.module] + [f'{node.module}.{a.name}' for a in node.names]
    for name in names:
      parts = name.split('.')
      if parts[0] == 'iterseg' and len(parts) > 1:
        found.add(parts[1])
  return found


def test_no_module_imports_one_above_it():
  package = ROOT / 'iterseg'
  for path in sorted(package.glob('*.py')):
    module = path.stem
    if module == '__init__':
      continue
    assert module in RANK, f'{module} is not placed in the dependency line (LAYERS)'
    for other in iterseg_imports(path) - {module}:
      assert RANK.get(other, -1) < RANK[module], f'{module} imports {other}, which is not below it'
  for path in sorted((package / 'data').glob('*.py')):
    assert iterseg_imports(path) <= {'data', 'plans', 'spec', 'settings', 'errors', 'lock',
                                     'files', 'slides'}, path


def test_every_imported_package_is_declared():
  with open(ROOT / 'pyproject.toml', 'rb') as f:
    project = tomllib.load(f)['project']
  # The core, and the extras that iterseg imports only where present (slides: tile codecs, OpenSlide).
  dependencies = project['dependencies'] + project['optional-dependencies']['slides']
  declared = {re.match(r'[A-Za-z0-9_.-]+', d).group(0).lower() for d in dependencies}
  stdlib = set(sys.stdlib_module_names)
  for path in sorted((ROOT / 'iterseg').rglob('*.py')):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        tops = [a.name.split('.')[0] for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        tops = [node.module.split('.')[0]]
      else:
        continue
      for top in tops:
        if top in stdlib or top == 'iterseg':
          continue
        name = DISTRIBUTIONS.get(top, top).replace('_', '-').lower()
        assert name in declared, f'{path.relative_to(ROOT)} imports {top}, not in pyproject.toml'


def readme_example() -> str:
  """The python block under the README's '## As a library' heading."""
  text = (ROOT / 'README.md').read_text().split('## As a library', 1)[1]
  return text.split('```python\n', 1)[1].split('```', 1)[0]


def test_the_readme_library_example_runs_from_an_empty_folder_after_a_wheel_install(tmp_path):
  """Builds the wheel (offline, no build isolation), installs it without the checkout on the path,
  and runs the example as written, from an empty folder, against a small U-Net (width 4, depth 3:
  the example's shapes, in seconds on a CPU)."""
  source = tmp_path / 'source'
  shutil.copytree(ROOT, source, symlinks=True,
                  ignore=shutil.ignore_patterns('.venv', '.git', 'runs', '__pycache__', 'build',
                                                '*.egg-info', '.pytest_cache'))
  built = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation',
                          '-q', '-w', str(tmp_path / 'wheel'), str(source)],
                         capture_output=True, text=True, timeout=300)
  assert built.returncode == 0, built.stderr[-3000:]
  wheel = next((tmp_path / 'wheel').glob('iterseg-*.whl'))
  site = tmp_path / 'site'
  installed = subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps', '-q',
                              '--target', str(site), str(wheel)],
                             capture_output=True, text=True, timeout=300)
  assert installed.returncode == 0, installed.stderr[-3000:]
  empty = tmp_path / 'empty'
  empty.mkdir()
  (empty / 'example.py').write_text(readme_example())
  check = '\n'.join([
      'import iterseg, runpy',
      f'assert iterseg.__file__.startswith({str(site)!r}), iterseg.__file__',
      'shipped = iterseg.get_config',
      'def small(name):',
      '  c = shipped(name)',
      '  c.model.width, c.model.depth = 4, 3',
      '  return c',
      'iterseg.get_config = small',
      'runpy.run_path("example.py", run_name="__main__")'])
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  env.update(PYTHONPATH=str(site), JAX_PLATFORMS='cpu', XLA_FLAGS=COMPILE_FLAGS)  # One device.
  result = subprocess.run([sys.executable, '-c', check], cwd=empty, env=env, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.splitlines()[:3] == ['(2, 768, 768, 1)', '(2, 768, 768, 1)', '(2, 64)']
  assert list(empty.iterdir()) == [empty / 'example.py']  # It wrote nothing beside itself.


def test_get_config_names_the_configs_but_passes_a_missing_dependency_through(monkeypatch):
  import importlib  # pylint: disable=g-import-not-at-top
  import iterseg  # pylint: disable=g-import-not-at-top
  from iterseg import errors  # pylint: disable=g-import-not-at-top
  try:
    iterseg.get_config('nope')
  except errors.SettingsError as e:
    assert "no config named 'nope'" in str(e) and "'ph2'" in str(e)
  else:
    raise AssertionError('no error for a config that does not exist')
  real = importlib.import_module

  def a_config_whose_dependency_is_missing(name, *args):
    if name == 'iterseg.configs.demo':
      raise ModuleNotFoundError("No module named 'scipy'", name='scipy')
    return real(name, *args)
  monkeypatch.setattr(importlib, 'import_module', a_config_whose_dependency_is_missing)
  try:
    iterseg.get_config('demo')
  except ModuleNotFoundError as e:
    assert e.name == 'scipy' and not isinstance(e, errors.Error)
  else:
    raise AssertionError('the missing dependency was not reported')
