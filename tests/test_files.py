"""iterseg.files: atomic writes, write checks, and the workdir lock, tried with real processes."""

import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from iterseg import errors, files, lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A second process that holds the lock until a line arrives on its stdin (iterseg.lock imports no
# jax, so it starts fast).
HOLDER = """
import sys
from iterseg import lock
with lock.WorkdirLock(sys.argv[1]):
  print('locked', flush=True)
  sys.stdin.readline()
"""


@pytest.fixture
def holder(tmp_path):
  """Starts processes that lock tmp_path / 'run'; kills whichever are left at the end."""
  started = []

  def start():
    child = subprocess.Popen([sys.executable, '-c', HOLDER, str(tmp_path / 'run')], cwd=ROOT,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    started.append(child)
    assert child.stdout.readline() == 'locked\n'
    return child

  yield start
  for child in started:
    if child.poll() is None:
      child.kill()
      child.wait()


@pytest.fixture
def notes(monkeypatch):
  """The warnings lock.py logs, formatted."""
  logged = []
  monkeypatch.setattr(lock.logging, 'warning', lambda msg, *args: logged.append(msg % args))
  return logged


def test_files_and_the_lock_do_not_import_jax():
  code = ('import sys\nfrom iterseg import files, lock\n'
          'assert "jax" not in sys.modules, "jax imported"\n')
  subprocess.run([sys.executable, '-c', code], check=True, cwd=ROOT)


def test_atomic_write_keeps_the_old_file_when_write_fails(tmp_path):
  path = tmp_path / 'metrics.csv'
  path.write_text('old\n')

  def write(f):
    f.write('half of the new')
    raise ValueError('boom')

  with pytest.raises(ValueError, match='boom'):
    files.atomic_write(path, write)
  assert path.read_text() == 'old\n'
  assert os.listdir(tmp_path) == ['metrics.csv']


def test_atomic_writes(tmp_path):
  files.atomic_write_text(tmp_path / 'a.txt', 'a\nb\n')
  files.atomic_write_json(tmp_path / 'c.json', {'x': [1, 2]})
  files.atomic_write(tmp_path / 'd.bin', lambda f: f.write(b'\0\1'), 'wb', fsync=True)
  files.atomic_write_text(tmp_path / 'a.txt', 'new')
  assert (tmp_path / 'a.txt').read_text() == 'new'
  assert json.loads((tmp_path / 'c.json').read_text()) == {'x': [1, 2]}
  assert (tmp_path / 'd.bin').read_bytes() == b'\0\1'
  assert sorted(os.listdir(tmp_path)) == ['a.txt', 'c.json', 'd.bin']


def test_check_writable_creates_the_folder_and_leaves_nothing(tmp_path):
  files.check_writable(tmp_path / 'a' / 'b')
  assert os.listdir(tmp_path / 'a' / 'b') == []


def test_check_writable_under_a_file(tmp_path):
  (tmp_path / 'f').write_text('')
  with pytest.raises(errors.WriteError) as e:
    files.check_writable(tmp_path / 'f' / 'run')
  message = str(e.value)
  assert str(tmp_path / 'f' / 'run') in message and 'not a folder' in message
  assert '\n' not in message
  with pytest.raises(errors.WriteError, match='is not a folder'):
    files.check_writable(tmp_path / 'f')


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes into read-only folders')
def test_check_writable_read_only_folder(tmp_path):
  folder = tmp_path / 'ro'
  folder.mkdir(mode=0o555)
  try:
    with pytest.raises(errors.WriteError, match=f'cannot write to {folder}: permission denied'):
      files.check_writable(folder)
  finally:
    folder.chmod(0o755)


@pytest.mark.parametrize('code, cause', [(errno.ENOSPC, 'disk full'),
                                         (errno.EROFS, 'read-only file system'),
                                         (errno.EACCES, 'permission denied')])
def test_check_writable_names_the_cause(tmp_path, monkeypatch, code, cause):
  def failing_open(path, *args):
    raise OSError(code, os.strerror(code), path)

  monkeypatch.setattr(files.os, 'open', failing_open)
  with pytest.raises(errors.WriteError) as e:
    files.check_writable(tmp_path)
  assert str(e.value).startswith(f'cannot write to {tmp_path}: {cause} (errno {code}). ')


def test_lock_held_by_another_process(tmp_path, holder):
  child = holder()
  with pytest.raises(errors.LockedError) as e:
    lock.WorkdirLock(tmp_path / 'run').acquire()
  message = str(e.value)
  assert f'PID {child.pid} on host {socket.gethostname()} since ' in message
  assert str(tmp_path / 'run' / '.iterseg.lock') in message and '\n' not in message
  child.communicate('exit\n')
  assert child.returncode == 0
  assert os.listdir(tmp_path / 'run') == []
  with lock.WorkdirLock(tmp_path / 'run') as held:
    assert held.held
  assert os.listdir(tmp_path / 'run') == []


def test_lock_of_a_killed_process_is_taken_over(tmp_path, holder, notes):
  child = holder()
  os.kill(child.pid, signal.SIGKILL)
  child.wait()
  assert os.listdir(tmp_path / 'run') == ['.iterseg.lock']
  with lock.WorkdirLock(tmp_path / 'run'):
    info = json.loads((tmp_path / 'run' / '.iterseg.lock').read_text())
    assert info['pid'] == os.getpid()
  assert len(notes) == 1
  assert notes[0].startswith(f'took over the stale lock of PID {child.pid} on host '
                             f'{socket.gethostname()} (since ')


def write_lock(workdir, **info):
  workdir.mkdir(exist_ok=True)
  info = {'pid': os.getppid(), 'host': socket.gethostname(), 'since': '2026-11-25T14:30:02+01:00',
          'command': 'train', **info}
  (workdir / '.iterseg.lock').write_text(json.dumps(info))


def test_lock_of_a_reused_pid_is_taken_over(tmp_path, notes):
  write_lock(tmp_path, pid=os.getppid())  # Alive, but holds no flock: the PID was reused.
  with lock.WorkdirLock(tmp_path):
    pass
  assert notes == [f'took over the stale lock of PID {os.getppid()} on host {socket.gethostname()} '
                   f'(since 2026-11-25 14:30:02) in {tmp_path}']


def test_lock_of_a_dead_pid_is_taken_over_even_if_a_child_kept_its_flock(tmp_path, notes):
  dead = subprocess.Popen(['true'])
  dead.wait()
  write_lock(tmp_path, pid=dead.pid)
  with open(tmp_path / '.iterseg.lock') as f:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # As a forked child of the dead run would.
    with lock.WorkdirLock(tmp_path):
      assert json.loads((tmp_path / '.iterseg.lock').read_text())['pid'] == os.getpid()
  assert len(notes) == 1 and notes[0].startswith(f'took over the stale lock of PID {dead.pid} ')


def test_lock_from_another_host_is_refused(tmp_path):
  write_lock(tmp_path, host='elsewhere', pid=1)
  with pytest.raises(errors.LockedError, match='PID 1 on host elsewhere since 2026-11-25 14:30:02 '
                     '.* If that run is dead, delete the lock file.'):
    lock.WorkdirLock(tmp_path).acquire()
  assert json.loads((tmp_path / '.iterseg.lock').read_text())['host'] == 'elsewhere'


def test_unreadable_lock(tmp_path, notes):
  path = tmp_path / '.iterseg.lock'
  path.write_text('')
  with open(path) as f:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # Held: its writer may still be writing.
    with pytest.raises(errors.LockedError, match='held but unreadable'):
      lock.WorkdirLock(tmp_path).acquire()
  with lock.WorkdirLock(tmp_path):  # Free: its writer crashed.
    pass
  assert notes == [f'took over the stale, unreadable lock file {path}']


def test_acquiring_twice_in_one_process(tmp_path):
  with lock.WorkdirLock(tmp_path) as held:
    for again in (held, lock.WorkdirLock(tmp_path)):
      with pytest.raises(errors.LockedError, match=f'PID {os.getpid()} \\(this process\\)'):
        again.acquire()
  held.release()
  assert os.listdir(tmp_path) == []


def test_disabled_lock_does_nothing(tmp_path):
  write_lock(tmp_path, host='elsewhere')
  with lock.WorkdirLock(tmp_path, enabled=False) as held:
    assert not held.held
  with lock.WorkdirLock(tmp_path / 'other', enabled=False):
    pass
  assert os.listdir(tmp_path) == ['.iterseg.lock']
