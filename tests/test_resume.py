"""Preemption: a training killed with SIGKILL, then started again with the same command, ends with
exactly the bits of a training that was never interrupted.

The kill comes from a training hook that tests/kill_during_training.py adds to launch.py: right after
that step is dispatched and, at a checkpoint step, while orbax is still writing it.
"""

import signal

import pytest

from tests import helpers, launch_runs
from tests.launch_runs import STAGE1_STEPS, STAGE2_STEPS


@pytest.mark.parametrize('kill_at, survivors', [
    ('stage1:3', {'stage1': [[], [2]], 'stage2_np4': [[]]}),  # Step 2 may still be being written.
    ('stage2_np4:4', {'stage1': [[2, 4]], 'stage2_np4': [[2], [2, 4]]}),  # While step 4 is written.
])
def test_a_killed_training_resumes_to_the_bits_of_an_uninterrupted_one(
    reference, data_dir, subprocess_env, tmp_path, kill_at, survivors):
  workdir = tmp_path / 'run'
  command = launch_runs.tiny_flags(workdir, data_dir)

  killed = launch_runs.run(*command, env=subprocess_env, hook=kill_at)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  for name, allowed in survivors.items():  # Only complete checkpoints count as steps.
    assert helpers.complete_steps(workdir, name) in allowed

  resumed = launch_runs.run(*command, env=subprocess_env)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  for name, step in (('stage1', STAGE1_STEPS), ('stage2_np4', STAGE2_STEPS)):
    helpers.assert_same_bits(helpers.read_checkpoint(workdir, name, step),
                             helpers.read_checkpoint(reference, name, step))
    leftovers = [p.name for p in (workdir / 'checkpoints' / name).iterdir()
                 if not p.name.isdigit() and p.name != 'plan.json']
    assert leftovers == []  # The half-written step of the killed run was cleaned up.
  assert helpers.logged(workdir) == helpers.logged(reference)  # Each step once, the same loss.
  assert (workdir / 'results.json').exists()
