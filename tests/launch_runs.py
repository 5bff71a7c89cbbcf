"""launch.py in subprocesses, as a user runs it, and the tiny run that the command-line, resume,
interruption and multi-host tests share.

`TINY_RUN` is that run's config (the paper's recipe on 16 synthetic 64 x 64 images, a 3-level U-Net
of width 4, stage 1 for 4 steps then stage 2 at Np = 4 for 6 steps, a checkpoint every 2 steps).
conftest.py trains it once per session in-process (the `reference` fixture); subprocesses started
here run the same config through launch.py and must end with the same bits. Every run shares the
session's XLA compilation cache (conftest.py), so a configuration compiles once.
"""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def compile_flags() -> str:
  """XLA flags of every process the suite starts (tests/conftest.py adds the fake devices).

  Tiny networks make the suite compile-bound, and these only change how fast XLA's CPU compiler
  works: LLVM at optimisation level 0 (~25 % faster) and, where XLA still has them (jaxlib <=
  0.11.0; later versions refuse the flag at start-up), its elemental fusion emitters instead of the
  newer MLIR ones (~45 % faster: 28.6 -> 14.9 s of compiling for test_models.py and
  test_inference.py). The graph is the same; a process with other flags may differ in the last
  bits, so processes whose results are compared with each other take these.
  """
  flags = ['--xla_backend_optimization_level=0']
  try:
    jaxlib = tuple(int(part) for part in importlib.metadata.version('jaxlib').split('.')[:3])
  except (importlib.metadata.PackageNotFoundError, ValueError):  # Unknown: the flags every XLA has.
    jaxlib = None
  if jaxlib and jaxlib <= (0, 11, 0):
    flags.append('--xla_cpu_use_fusion_emitters=false')
  return ' '.join(flags)


COMPILE_FLAGS = compile_flags()

STAGE1_STEPS, STAGE2_STEPS = 4, 6  # 11 training images, global batch 4: 2 steps per epoch.
TINY_RUN = {
    'data.num_examples': 16, 'hi_size': 64, 'model.width': 4, 'model.depth': 3, 'num_patches': 4,
    'train.num_patches_list': (4,), 'train.networks': ('stage1', 'stage2'), 'train.batch_size': 4,
    'train.stage1_epochs': 2, 'train.stage2_epochs': 3, 'train.log_every': 1,
    'train.checkpoint_every': 2,
}


def tiny_config(data_dir, **more):
  """The ConfigDict of the tiny run (configs/default.py with TINY_RUN), data in `data_dir`."""
  from iterseg.configs import default  # pylint: disable=g-import-not-at-top
  from tests import helpers  # pylint: disable=g-import-not-at-top  (jax: after conftest's flags)
  return helpers.set_fields(default.get_config(), **{**TINY_RUN, 'data.data_dir': str(data_dir),
                                                     **more})


def tiny_flags(workdir, data_dir, *more, **fields) -> list:
  """launch.py flags of the tiny run, then `more` flags; `fields` override TINY_RUN."""
  values = {**TINY_RUN, 'data.data_dir': str(data_dir), **fields}
  return ['--config=configs/default.py', f'--workdir={workdir}',
          *(f'--config.{k}={v}' for k, v in values.items()), *more]


def env(cache_dir, **extra) -> dict:
  return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache_dir), **extra)


def command(*flags, hook: str = '') -> list:
  """launch.py with `flags`; with hook='<network>:<step>[:<action>]', through
  tests/kill_during_training.py."""
  if hook:
    return [sys.executable, str(ROOT / 'tests' / 'kill_during_training.py'), hook, *map(str, flags)]
  return [sys.executable, str(ROOT / 'launch.py'), *map(str, flags)]


def run(*flags, env, timeout=600, hook: str = '') -> subprocess.CompletedProcess:
  return subprocess.run(command(*flags, hook=hook), cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)
