"""Interruptions and faults never lose work: Ctrl-C and SIGTERM save the current step and say one
line, a resumed run ends with the bits of an uninterrupted one; a second run on a workdir in use is
refused; a checkpoint that cannot be written stops training at once, keeping the last good one."""

import errno
import json
import signal
import subprocess
import sys
import time

import pytest

from iterseg import checkpoints, settings, train
from iterseg.data.synthetic import make_synthetic_example
from tests import launch_runs
from tests.conftest import tiny
from tests.launch_runs import STAGE1_STEPS, STAGE2_STEPS, one_line_error
from tests.test_errors import snapshot
from tests.test_resume import assert_same_bits, logged


@pytest.fixture(scope='module')
def launch(tmp_path_factory):
  return launch_runs.launcher(tmp_path_factory)


def assert_resumes_exactly(launch, workdir, command):
  resumed = launch.run(*command)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  reference = launch.reference()
  for name, step in (('stage1', STAGE1_STEPS), ('stage2_np4', STAGE2_STEPS)):
    assert_same_bits(launch_runs.read_checkpoint(workdir, name, step),
                     launch_runs.read_checkpoint(reference, name, step))
  assert logged(workdir) == logged(reference)


def test_ctrl_c_saves_the_step_says_one_line_and_the_rerun_resumes_exactly(launch, tmp_path):
  workdir = tmp_path / 'run'
  command = launch.tiny(workdir, '--config.train.checkpoint_every=100')
  interrupted = launch.run(*command, kill_at='stage1:1:SIGINT')
  line = one_line_error(interrupted)
  assert 'interrupted (SIGINT) at step 2 of stage1' in line and 'rerun the same command' in line
  assert launch_runs.complete_steps(workdir, 'stage1') == [2]  # Saved: not a checkpoint step.
  assert not (workdir / 'checkpoints' / 'stage2_np4').exists()
  assert_resumes_exactly(launch, workdir, command)


def test_sigterm_from_outside_saves_and_the_rerun_resumes_exactly(launch, tmp_path):
  workdir = tmp_path / 'run'
  command = launch.tiny(workdir, '--config.train.checkpoint_every=100')
  process = subprocess.Popen(launch.command(*command), cwd=launch_runs.ROOT, env=launch.env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = workdir / 'metrics.jsonl'
  deadline = time.time() + 300
  while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
    time.sleep(0.05)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=300)
  result = subprocess.CompletedProcess(process.args, process.returncode, '', stderr)
  if result.returncode == 0:  # It finished before the signal arrived: nothing to test.
    pytest.skip('training finished before SIGTERM arrived')
  line = one_line_error(result)
  assert 'interrupted (SIGTERM) at step' in line
  name = line.split(' of ')[1].split(';')[0]
  step = int(line.split('at step ')[1].split()[0])
  assert launch_runs.complete_steps(workdir, name)[-1] == step
  assert_resumes_exactly(launch, workdir, launch.tiny(workdir))


def test_a_second_run_on_a_workdir_in_use_is_refused(launch, tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys; from iterseg import files; '
       f'lock = files.WorkdirLock({str(workdir)!r}).acquire(); print("held", flush=True); '
       'sys.stdin.read()'], cwd=launch_runs.ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
      text=True)
  try:
    assert holder.stdout.readline().strip() == 'held'
    before = snapshot(workdir)
    line = one_line_error(launch.run(*launch.tiny(workdir)))
    assert f'is in use by PID {holder.pid}' in line and 'since' in line
    assert snapshot(workdir) == before
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
  with pytest.raises(train.TrainingError) as error:
    train.train_network(s, str(tmp_path), 'stage1', source=source)
  message = str(error.value)
  assert 'cannot write the checkpoint of step 4' in message and 'disk full' in message
  assert str(checkpoints.network_dir(str(tmp_path), 'stage1')) in message and '\n' not in message
  assert calls == [2, 4]  # Stopped at the first failed save: step 6 never ran.
  assert launch_runs.complete_steps(tmp_path, 'stage1') == [2]
  steps = [json.loads(line)['step'] for line in open(tmp_path / 'metrics.jsonl')]
  assert max(steps) == 3  # Step 4's line comes after its checkpoint, which failed.
