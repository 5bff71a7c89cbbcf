"""Tests run on CPU with 4 fake devices, so pmap and multi-device code runs in CI.

Session fixtures share what is expensive to make: one XLA compilation cache (also used by the
launch.py subprocesses), one prepared synthetic dataset, one tiny trained workdir (`reference`) and
one workdir of random networks. Tests that change a workdir copy it first (`trained`).
"""

import atexit
import gc
import os
import shutil
import sys
import tempfile

from tests import launch_runs  # Imports no jax: the variables below are set before jax reads them.

_FLAGS = f'--xla_force_host_platform_device_count=4 {launch_runs.COMPILE_FLAGS}'
os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAGS}".strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# The CPU client runs each device's part of a pmapped step, and the launches of the next steps, on one
# pool of max(cores, devices) threads: one per device on a machine of <= 4 cores. When the host is 32
# steps ahead (the client's limit of steps in flight per device), a launch waits in that pool for a
# device whose step waits for a free thread, the other devices wait for it in pmean, and XLA aborts
# after 40 s ("Termination timeout for `all reduce ...`"). PJRT_NPROC replaces the core count: with
# twice the devices, every device's step has a thread while every launch of a step waits.
os.environ['PJRT_NPROC'] = str(max(2 * 4, os.cpu_count() or 1))
# One compilation cache per test run, shared by pytest-xdist's workers (the same run id) and the
# launch.py subprocesses; removed by the process that created the run.
_RUN = os.environ.get('PYTEST_XDIST_TESTRUNUID') or f'{os.getpid()}'
_CACHE = os.path.join(tempfile.gettempdir(), f'iterseg-test-xla-cache-{_RUN}')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', _CACHE)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import pytest  # noqa: E402  (after XLA_FLAGS, before anything imports jax)

# tests.helpers (jax, orbax) is imported where a fixture needs it: an xdist controller runs no test,
# and importing it there delayed the workers' start by ~3 s.


_WORKER = 'PYTEST_XDIST_WORKER' in os.environ


def pytest_collection_modifyitems(config, items):
  """The tests of the session's trained `reference` run first, then those of `random_workdir`, each
  group in collection order. `--dist worksteal` (pyproject.toml) gives each worker a contiguous
  half of this order and steals from the end of a queue, so each group runs on one worker, which
  makes its fixture once (the reference training is ~10 s of CPU)."""
  del config
  def group(item):
    names = getattr(item, 'fixturenames', ())
    return 0 if 'reference' in names else 1 if 'random_workdir' in names else 2
  items[:] = sorted(items, key=group)  # Stable: the collection order within each group.


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _WORKER:
    # What runs after the last test (the terminal summary's imports, pytest's final gc pass) no
    # longer walks the hundreds of thousands of objects that compiling left: 1-3 s per worker.
    gc.freeze()
  else:  # The controller (or a run without xdist).
    shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
  """An xdist worker ends without JAX's exit handler (it clears every compiled function: 2-5 s on
  a worker, which the controller waits for). Registered last, it runs first, once the worker has
  reported everything; a worker's exit status is not read (the controller reads its reports)."""
  del config
  if _WORKER:
    atexit.register(_exit_now)


def _exit_now():
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(0)  # pylint: disable=protected-access


@pytest.fixture
def tiny_config():
  from tests import helpers  # pylint: disable=g-import-not-at-top
  return helpers.tiny()


@pytest.fixture(scope='session')
def subprocess_env():
  """The environment of launch.py subprocesses: this session's compilation cache and devices."""
  return launch_runs.env(os.environ['JAX_COMPILATION_CACHE_DIR'])


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """A data_dir with the tiny run's synthetic dataset prepared (16 images of 64 x 64)."""
  from iterseg import data, settings  # pylint: disable=g-import-not-at-top
  folder = tmp_path_factory.mktemp('tfds')
  data.prepare(settings.from_config(launch_runs.tiny_config(folder)).data)
  return folder


@pytest.fixture(scope='session')
def reference(tmp_path_factory, data_dir):
  """The tiny run (launch_runs.TINY_RUN) trained and evaluated once, in-process, uninterrupted."""
  from iterseg import cli  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp('reference') / 'run'
  cli.run('train', launch_runs.tiny_config(data_dir), str(workdir))
  return workdir


@pytest.fixture
def trained(reference, tmp_path):
  """A copy of the reference workdir, to damage or misuse."""
  return shutil.copytree(reference, tmp_path / 'trained')


@pytest.fixture(scope='session')
def random_workdir(tmp_path_factory, data_dir):
  """A workdir of random networks as training leaves them: tiny(), stage 2 at Np 2 and 4, the
  baseline; data in the session's data_dir (16 synthetic images). Read only."""
  from tests import helpers  # pylint: disable=g-import-not-at-top
  config = helpers.tiny(**{'data.num_examples': 16, 'data.data_dir': str(data_dir),
                           'eval.batch_size': 2})
  return config, helpers.save_random_networks(config, tmp_path_factory.mktemp('random') / 'run')
