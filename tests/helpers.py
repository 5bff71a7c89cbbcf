"""What several test modules share: tiny configs, workdirs as training leaves them, and checks.

Imported by the test modules (never from one test module into another); fixtures live in
conftest.py.
"""

import hashlib
import json
import re
import subprocess
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from iterseg import checkpoints, models, settings, state
from iterseg.configs import default
from iterseg.run import Run


def set_fields(config, **dotted):
  """Sets config fields by dotted name, e.g. set_fields(c, **{'train.batch_size': 8}); returns it."""
  for key, value in dotted.items():
    node = config
    *path, leaf = key.split('.')
    for p in path:
      node = node[p]
    with node.ignore_type():
      node[leaf] = value
  return config


def tiny(**overrides):
  """The default config shrunk to seconds on CPU: 64 x 64 images, a 3-level U-Net of width 4."""
  c = default.get_config()
  set_fields(c, hi_size=64, num_patches=4, **{
      'model.width': 4, 'model.depth': 3, 'train.num_patches_list': (2, 4),
      'train.batch_size': 8, 'train.stage1_epochs': 1, 'train.stage2_epochs': 1,
      'train.baseline_epochs': 1, 'train.log_every': 1, 'data.num_examples': 20})
  return set_fields(c, **overrides)


def save_random_networks(config, workdir, networks=('stage1', 'stage2', 'baseline')):
  """A workdir as training leaves it (config.json and one checkpoint per network), random weights."""
  s = config if isinstance(config, settings.Settings) else settings.from_config(config)
  Run(str(workdir)).save_settings(s)
  for network in networks:
    for n in (s.train.num_patches_list if network == 'stage2' else [None]):
      spec = s.spec_for(n) if n else s.spec
      fresh = state.create_train_state(s.train, spec, network)
      manager = checkpoints.manager(str(workdir), models.name(network, n), 1)
      manager.save(1, args=checkpoints.save_args(fresh))
      manager.wait_until_finished()
      manager.close()
  return Path(workdir)


def snapshot(folder) -> dict:
  """{relative path: sha1 of the content} of every file under `folder` (names, sizes and bytes)."""
  folder = Path(folder)
  return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob('*')) if p.is_file()}


def assert_same_bits(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x, y)


def logged(workdir) -> list:
  """(network, step, loss, dice) of every training metrics line, in order (not the validation
  scores of train.select_checkpoint='best')."""
  with open(Path(workdir) / 'metrics.jsonl') as f:
    return [(r['network'], r['step'], r['loss'], r['dice']) for r in map(json.loads, f)
            if 'loss' in r]


def read_checkpoint(workdir, name: str, step: int) -> dict:
  """Every array of <workdir>/checkpoints/<name>/<step> as numpy, whatever devices wrote it."""
  path = Path(workdir) / 'checkpoints' / name / str(step) / 'default'
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(path).item_metadata
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
  return jax.tree.map(np.asarray, checkpointer.restore(path, target))


def complete_steps(workdir, name: str) -> list:
  path = Path(workdir) / 'checkpoints' / name
  return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()) if path.is_dir() else []


def one_line_error(result: subprocess.CompletedProcess) -> str:
  """The `iterseg: error: ...` line of a failed run, checked to be its only error and no traceback."""
  assert result.returncode not in (0, None), result.stdout[-2000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  lines = re.findall(r'^iterseg: error: .*$', result.stderr, re.MULTILINE)
  assert len(lines) == 1, result.stderr[-3000:]
  return lines[0]


def unreadable(monkeypatch, bad: int, split: str = 'test'):
  """Makes data.load_split's example `bad` of `split` fail to read, as a damaged record of a
  prepared dataset does (data.Examples: a DataError naming it)."""
  from iterseg import data  # pylint: disable=g-import-not-at-top
  from iterseg.errors import DataError  # pylint: disable=g-import-not-at-top
  load_split = data.load_split

  class Damaged(data.Subset):
    def __getitem__(self, index):
      if self.indices[index] == bad:
        raise DataError(f'example {bad} of the prepared dataset cannot be read (zlib error). '
                        f'Delete that folder and run again: it is prepared anew.')
      return super().__getitem__(index)

  def damaged(spec, which):
    source = load_split(spec, which)
    return Damaged(source, range(len(source))) if which == split else source
  monkeypatch.setattr(data, 'load_split', damaged)
