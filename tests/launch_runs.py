"""launch.py in subprocesses, as a user runs it: for the command-line, resume and multi-host tests.

All runs of a pytest session share one XLA compilation cache, so that only the first run of a
configuration pays for compiling (about a minute on two slow CPU cores) and the others take seconds.
The cache changes no result: a cached executable is the one that was compiled.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

ROOT = Path(__file__).resolve().parent.parent
STAGE1_STEPS, STAGE2_STEPS = 4, 6  # 11 training images, global batch 4: 2 steps per epoch.

_launcher = None


def launcher(tmp_path_factory) -> 'Launcher':
  """The session's Launcher (one compilation cache, one prepared dataset, one reference run)."""
  global _launcher
  if _launcher is None:
    _launcher = Launcher(tmp_path_factory.mktemp('launch'))
  return _launcher


class Launcher:

  def __init__(self, root: Path):
    self.root = root
    self.data_dir = root / 'data'
    self._reference = None

  def env(self, **extra) -> dict:
    return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(self.root / 'xla-cache'),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0', **extra)

  def tiny(self, workdir, *more, data_dir=None, networks=('stage1', 'stage2')) -> list:
    """Flags of a run in seconds: the paper's recipe (configs/default.py) on 16 synthetic images of
    64 x 64, a 3-level U-Net of width 4, stage 1 for 4 steps then stage 2 at Np = 4 for 6 steps, a
    checkpoint every 2 steps."""
    return ['--config=configs/default.py', f'--workdir={workdir}',
            f'--config.data.data_dir={data_dir or self.data_dir}',
            '--config.data.num_examples=16', '--config.hi_size=64', '--config.model.width=4',
            '--config.model.depth=3', '--config.num_patches=4', '--config.train.num_patches_list=(4,)',
            f'--config.train.networks={tuple(networks)}', '--config.train.batch_size=4',
            '--config.train.stage1_epochs=2', '--config.train.stage2_epochs=3',
            '--config.train.log_every=1', '--config.train.checkpoint_every=2', *more]

  def command(self, *flags, kill_at: str = '') -> list:
    """launch.py with `flags`; with kill_at='<network>:<step>', through tests/kill_during_training.py."""
    if kill_at:
      return [sys.executable, str(ROOT / 'tests' / 'kill_during_training.py'), kill_at,
              *map(str, flags)]
    return [sys.executable, str(ROOT / 'launch.py'), *map(str, flags)]

  def run(self, *flags, env=None, timeout=600, kill_at: str = '') -> subprocess.CompletedProcess:
    return subprocess.run(self.command(*flags, kill_at=kill_at), cwd=ROOT,
                          env=self.env(**(env or {})), capture_output=True, text=True,
                          timeout=timeout)

  def reference(self) -> Path:
    """The workdir of the tiny run, trained once per session without interruption."""
    if self._reference is None:
      workdir = self.root / 'reference'
      result = self.run(*self.tiny(workdir))
      assert result.returncode == 0, result.stderr[-3000:]
      self._reference = workdir
    return self._reference


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
