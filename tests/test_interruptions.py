"""Interruptions and faults never lose work: Ctrl-C and SIGTERM save the current step and say one
line, a resumed run ends with the bits of an uninterrupted one; a second run on a workdir in use is
refused; a checkpoint that cannot be written stops training at once, keeping the last good one."""

import errno
import json
import os
import signal
import subprocess
import sys

import pytest

from iterseg import checkpoints, cli, errors, settings, train
from iterseg.data.synthetic import make_synthetic_example
from iterseg.run import Run
from tests import helpers, launch_runs
from tests.helpers import tiny
from tests.launch_runs import STAGE1_STEPS, STAGE2_STEPS


def assert_resumes_exactly(workdir, reference, data_dir):
  cli.run('train', launch_runs.tiny_config(data_dir), str(workdir))  # The same command, again.
  for name, step in (('stage1', STAGE1_STEPS), ('stage2_np4', STAGE2_STEPS)):
    helpers.assert_same_bits(helpers.read_checkpoint(workdir, name, step),
                             helpers.read_checkpoint(reference, name, step))
  assert helpers.logged(workdir) == helpers.logged(reference)


def signal_after(network: str, step: int, signum: int):
  def hook(s):
    if s.name == network and s.step == step:
      os.kill(os.getpid(), signum)
  return hook


def test_ctrl_c_saves_the_step_says_one_line_and_the_rerun_resumes_exactly(reference, data_dir,
                                                                              tmp_path):
  workdir = tmp_path / 'run'
  config = launch_runs.tiny_config(data_dir, **{'train.checkpoint_every': 100})
  with pytest.raises(errors.Interrupted) as interrupted:
    cli.run('train', config, str(workdir), hooks=(signal_after('stage1', 1, signal.SIGINT),))
  line = str(interrupted.value)
  assert 'interrupted (SIGINT) at step 2 of stage1' in line and 'rerun the same command' in line
  assert '\n' not in line
  assert helpers.complete_steps(workdir, 'stage1') == [2]  # Saved: not a checkpoint step.
  assert not (workdir / 'checkpoints' / 'stage2_np4').exists()
  assert_resumes_exactly(workdir, reference, data_dir)


def test_sigterm_from_outside_saves_says_one_line_and_the_rerun_resumes_exactly(
    reference, data_dir, subprocess_env, tmp_path):
  """launch.py waits after stage 2's step 3 until this test's SIGTERM arrives (no race)."""
  workdir = tmp_path / 'run'
  flags = launch_runs.tiny_flags(workdir, data_dir, **{'train.checkpoint_every': 100})
  process = subprocess.Popen(launch_runs.command(*flags, hook='stage2_np4:3:wait'),
                             cwd=launch_runs.ROOT, env=subprocess_env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  try:
    for line in process.stdout:
      if line.startswith('waiting at stage2_np4:3'):
        break
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
  finally:
    process.kill()
  line = helpers.one_line_error(subprocess.CompletedProcess(process.args, process.returncode,
                                                            stdout, stderr))
  assert 'interrupted (SIGTERM) at step 4 of stage2_np4' in line and 'rerun' in line
  assert helpers.complete_steps(workdir, 'stage2_np4') == [4]
  assert_resumes_exactly(workdir, reference, data_dir)


def test_a_second_run_on_a_workdir_in_use_is_refused(data_dir, tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys; from iterseg import lock; '
       f'held = lock.WorkdirLock({str(workdir)!r}).acquire(); print("held", flush=True); '
       'sys.stdin.read()'], cwd=launch_runs.ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
      text=True)
  try:
    assert holder.stdout.readline().strip() == 'held'
    before = helpers.snapshot(workdir)
    with pytest.raises(errors.LockedError, match=f'is in use by PID {holder.pid} .*since'):
      cli.run('train', launch_runs.tiny_config(data_dir), str(workdir))
    assert helpers.snapshot(workdir) == before
  finally:
    holder.communicate('', timeout=60)


def test_a_checkpoint_that_cannot_be_written_stops_training_keeping_the_last_good_one(
    tmp_path, monkeypatch):
  config = tiny(**{'train.checkpoint_every': 2, 'train.stage1_epochs': 3})
  s = settings.from_config(config)
  source = [make_synthetic_example(i, 64) for i in range(16)]  # 2 steps per epoch.
  save_args = checkpoints.save_args
  calls = []

  def full_disk_at_step_4(state):
    calls.append(int(state.step))
    if int(state.step) == 4:
      raise OSError(errno.ENOSPC, 'No space left on device')
    return save_args(state)
  monkeypatch.setattr(checkpoints, 'save_args', full_disk_at_step_4)
  with pytest.raises(errors.TrainingError) as error:
    train.train_network(s, str(tmp_path), 'stage1', source=source)
  message = str(error.value)
  assert 'cannot write the checkpoint of step 4' in message and 'disk full' in message
  assert str(Run(str(tmp_path)).network_dir('stage1')) in message and '\n' not in message
  assert calls == [2, 4]  # Stopped at the first failed save: step 6 never ran.
  assert helpers.complete_steps(tmp_path, 'stage1') == [2]
  steps = [json.loads(line)['step'] for line in open(tmp_path / 'metrics.jsonl')]
  assert max(steps) == 3  # Step 4's line comes after its checkpoint, which failed.
  assert 'free space or fix the permissions, then rerun the same command to resume' in message
  monkeypatch.undo()  # Space freed: the same command resumes from step 2 and finishes.
  train.train_network(s, str(tmp_path), 'stage1', source=source)
  assert helpers.complete_steps(tmp_path, 'stage1')[-1] == 6
  steps = [json.loads(line)['step'] for line in open(tmp_path / 'metrics.jsonl')]
  assert steps == list(range(1, 7))  # Steps 3 logged once: the log was trimmed to step 2.
