"""iterseg.lock: the workdir and dataset locks, tried with real processes. A refusal names the holder
in one line; a holder killed with kill -9 blocks nothing; a second prepare waits, then goes on."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import filelock
import pytest

from iterseg import data, errors, lock, settings
from tests import launch_runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A second process that holds a lock until a line arrives on its stdin: `-c workdir|data FOLDER
# [fork]`; with fork, it first forks a worker that outlives it (iterseg.lock imports no jax).
HOLDER = """
import os, sys, time
from iterseg import lock
kind, folder = sys.argv[1:3]
with lock.WorkdirLock(folder) if kind == 'workdir' else lock.DataLock(folder, wait_s=0):
  worker = os.fork() if sys.argv[3:] == ['fork'] else None
  if worker == 0:  # Past the fork's hooks (filelock closes its descriptor there): say so.
    open(folder + '.worker-ready', 'w').close()
    time.sleep(120)
    os._exit(0)
  while worker and not os.path.exists(folder + '.worker-ready'):
    time.sleep(0.01)
  print('locked', worker or '', flush=True)
  sys.stdin.readline()
"""


@pytest.fixture
def holder():
  """Starts processes that hold a lock; kills whichever are left (and their workers) at the end."""
  started = []

  def start(kind, folder, *more):
    child = subprocess.Popen([sys.executable, '-c', HOLDER, kind, str(folder), *more], cwd=ROOT,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = child.stdout.readline().split()
    child.worker = int(line[1]) if len(line) > 1 else None
    started.append(child)
    assert line[0] == 'locked'
    return child

  yield start
  for child in started:
    for pid in (child.pid, child.worker):
      if pid:
        try:
          os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
          pass
    child.wait()


@pytest.fixture
def notes(monkeypatch):
  """The warnings lock.py logs, formatted."""
  logged = []
  monkeypatch.setattr(lock.logging, 'warning', lambda msg, *args: logged.append(msg % args))
  return logged


def write_record(folder, **info):
  folder.mkdir(exist_ok=True)
  info = {'pid': os.getppid(), 'host': socket.gethostname(), 'since': '2026-11-25 14:30:02+01:00',
          'command': 'train', **info}
  (folder / '.iterseg.lock.json').write_text(json.dumps(info))


def test_a_refusal_names_the_holders_pid_host_and_command_in_one_line(tmp_path, holder):
  run = tmp_path / 'run'
  child = holder('workdir', run)
  with pytest.raises(errors.LockedError) as e:
    lock.WorkdirLock(run).acquire()
  message = str(e.value)
  assert message.startswith(f'workdir {run} is in use by PID {child.pid} on host '
                            f'{socket.gethostname()} since ')
  assert f', running `-c workdir {run}` (lock file {run / ".iterseg.lock"}); wait for it' in message
  assert '\n' not in message
  child.communicate('exit\n')
  assert child.returncode == 0
  assert os.listdir(run) == []  # It wrote nothing else, so it left no lock file either.
  with lock.WorkdirLock(run) as held:
    assert held.held
  assert os.listdir(run) == []


def test_a_lock_held_by_a_process_killed_with_sigkill_does_not_block_the_next_run(tmp_path, holder):
  run = tmp_path / 'run'
  child = holder('workdir', run)
  os.kill(child.pid, signal.SIGKILL)
  child.wait()
  assert sorted(os.listdir(run)) == ['.iterseg.lock', '.iterseg.lock.json']  # Its record stays.
  next_run = subprocess.run(
      [sys.executable, '-c', 'import sys; from iterseg import lock\n'
       'with lock.WorkdirLock(sys.argv[1]): print("ran")', str(run)],
      cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
  assert next_run.stdout == 'ran\n'
  assert f'took over the stale lock of PID {child.pid} on host ' in next_run.stderr
  assert os.listdir(run) == []


def test_a_worker_forked_by_a_run_killed_with_sigkill_does_not_keep_its_lock(tmp_path, holder,
                                                                              notes):
  run = tmp_path / 'run'
  child = holder('workdir', run, 'fork')
  os.kill(child.pid, signal.SIGKILL)
  child.wait()
  os.kill(child.worker, 0)  # The worker lives on, with the run's descriptors.
  with lock.WorkdirLock(run):
    assert json.loads((run / '.iterseg.lock.json').read_text())['pid'] == os.getpid()
  assert len(notes) == 1 and notes[0].startswith(f'took over the stale lock of PID {child.pid} ')


def test_a_record_whose_lock_is_free_is_stale_whoever_it_names(tmp_path, notes):
  write_record(tmp_path, host='elsewhere')  # Its host died, or its PID was reused: nobody holds it.
  with lock.WorkdirLock(tmp_path):
    assert json.loads((tmp_path / '.iterseg.lock.json').read_text())['pid'] == os.getpid()
  assert notes == [f'took over the stale lock of PID {os.getppid()} on host elsewhere since '
                   f'2026-11-25 14:30:02+01:00, running `train` in {tmp_path}']
  assert os.listdir(tmp_path) == []


def test_a_lock_held_without_a_record_is_refused(tmp_path):
  with filelock.FileLock(str(tmp_path / '.iterseg.lock')):  # Its holder has not written one yet.
    with pytest.raises(errors.LockedError, match=f'workdir {tmp_path} is in use by another process '
                       r'\(lock file '):
      lock.WorkdirLock(tmp_path).acquire()


def test_acquiring_twice_in_one_process(tmp_path):
  with lock.WorkdirLock(tmp_path) as held:
    for again in (held, lock.WorkdirLock(tmp_path)):
      with pytest.raises(errors.LockedError, match=f'PID {os.getpid()} \\(this process\\) on host'):
        again.acquire()
  held.release()
  assert os.listdir(tmp_path) == []


def test_a_lock_is_kept_where_the_run_wrote_something(tmp_path):
  with lock.WorkdirLock(tmp_path):
    (tmp_path / 'config.json').write_text('{}')
  assert sorted(os.listdir(tmp_path)) == ['.iterseg.lock', 'config.json']
  with lock.WorkdirLock(tmp_path):
    pass
  assert (tmp_path / '.iterseg.lock').read_bytes() == b''  # The same empty file, run after run.


def test_disabled_lock_does_nothing(tmp_path):
  write_record(tmp_path, host='elsewhere')
  with lock.WorkdirLock(tmp_path, enabled=False) as held:
    assert not held.held
  with lock.WorkdirLock(tmp_path / 'other', enabled=False):
    pass
  assert os.listdir(tmp_path) == ['.iterseg.lock.json']


def synthetic(tmp_path):
  """The tiny run's DataSpec (16 synthetic images) in tmp_path / 'tfds', and its lock's folder."""
  spec = settings.from_config(launch_runs.tiny_config(tmp_path / 'tfds')).data
  return spec, os.path.dirname(data.make_builder(spec).data_dir)


def test_prepare_waits_for_another_run_preparing_the_same_dataset_then_prepares(tmp_path, holder,
                                                                                notes):
  spec, folder = synthetic(tmp_path)
  child = holder('data', folder)  # As a run that prepares the dataset would.

  def finish():
    child.stdin.write('done\n')
    child.stdin.flush()
  threading.Timer(1.5, finish).start()
  start = time.monotonic()
  stats = data.prepare(spec)
  assert time.monotonic() - start > 1
  assert stats['train'] + stats['test'] == 16
  notes = [n for n in notes if n.startswith('waiting')]  # Not TFDS's.
  assert len(notes) == 1
  assert notes[0].startswith(f'waiting up to {data.PREPARE_WAIT_S} s for PID {child.pid} on host '
                             f'{socket.gethostname()} since ')
  assert notes[0].endswith(f', running `-c data {folder}` to release the dataset folder {folder}')
  assert child.wait(timeout=60) == 0
  assert '.iterseg.lock.json' not in os.listdir(folder)


def test_prepare_refuses_after_its_wait_naming_the_holder(tmp_path, holder, monkeypatch, notes):
  spec, folder = synthetic(tmp_path)
  child = holder('data', folder)
  monkeypatch.setattr(data, 'PREPARE_WAIT_S', 0.5)
  with pytest.raises(errors.LockedError) as e:
    data.prepare(spec)
  message = str(e.value)
  assert message.startswith(f'the dataset folder {folder} is in use by PID {child.pid} on host ')
  assert message.endswith(f', running `-c data {folder}` after a wait of 0.5 s (lock file '
                          f'{folder}/.iterseg.lock); wait for it to finish preparing, or set '
                          'another config.data.data_dir.')
  assert [n for n in notes if n.startswith(f'waiting up to 0.5 s for PID {child.pid} ')]
  assert not data.is_prepared(data.make_builder(spec))
