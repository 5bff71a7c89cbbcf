"""Preemption: a training killed with SIGKILL, then started again with the same command, ends with
exactly the bits of a training that was never interrupted.

The kill comes from a training hook that tests/kill_during_training.py adds to launch.py: right after
that step is dispatched and, at a checkpoint step, while orbax is still writing it.
"""

import json
import signal

import jax
import numpy as np
import pytest

from tests import launch_runs
from tests.launch_runs import STAGE1_STEPS, STAGE2_STEPS


@pytest.fixture(scope='module')
def launch(tmp_path_factory):
  return launch_runs.launcher(tmp_path_factory)


def logged(workdir) -> list:
  """(network, step, loss, dice) of every metrics line, in order."""
  with open(workdir / 'metrics.jsonl') as f:
    return [(r['network'], r['step'], r['loss'], r['dice']) for r in map(json.loads, f)]


def assert_same_bits(a: dict, b: dict):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize('kill_at, survivors', [
    ('stage1:3', {'stage1': [[], [2]], 'stage2_np4': [[]]}),  # Step 2 may still be being written.
    ('stage2_np4:4', {'stage1': [[2, 4]], 'stage2_np4': [[2], [2, 4]]}),  # While step 4 is written.
])
def test_a_killed_training_resumes_to_the_bits_of_an_uninterrupted_one(launch, tmp_path, kill_at,
                                                                        survivors):
  reference = launch.reference()
  workdir = tmp_path / 'run'
  command = launch.tiny(workdir)

  killed = launch.run(*command, kill_at=kill_at)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  for name, allowed in survivors.items():  # Only complete checkpoints count as steps.
    assert launch_runs.complete_steps(workdir, name) in allowed

  resumed = launch.run(*command)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  for name, step in (('stage1', STAGE1_STEPS), ('stage2_np4', STAGE2_STEPS)):
    assert_same_bits(launch_runs.read_checkpoint(workdir, name, step),
                     launch_runs.read_checkpoint(reference, name, step))
    leftovers = [p.name for p in (workdir / 'checkpoints' / name).iterdir()
                 if not p.name.isdigit() and p.name != 'plan.json']
    assert leftovers == []  # The half-written step of the killed run was cleaned up.
  assert logged(workdir) == logged(reference)  # Each step logged once, with the same loss.
  assert (workdir / 'results.json').exists()
