"""Locks that name their holder: two runs never write one workdir, or prepare one dataset, at once.

  with lock.WorkdirLock(workdir): ...         # LockedError naming the holder if another run has it
  with lock.DataLock(folder, wait_s=60): ...  # waits for the holder (and says so), then LockedError

`filelock` holds an flock on `<folder>/.iterseg.lock`, which the kernel drops when its holder dies
(kill -9 leaves nothing that blocks). The holder writes who it is (pid, host, since, command) to
`.iterseg.lock.json` beside it, for the message of a run refused, and deletes it on release (the
lock file too where nothing else is). Under multi-host: `enabled=(jax.process_index() == 0)`.
"""

import datetime
import json
import os
import socket
import sys
from typing import Optional

import filelock
from absl import logging

from iterseg import files
from iterseg.errors import LockedError

LOCK_NAME = '.iterseg.lock'


class FolderLock:
  """Holds `<folder>/.iterseg.lock` while in use; `what` names the folder, `hint` what to do."""

  def __init__(self, folder, what: str, hint: str, *, enabled: bool = True, wait_s: float = 0):
    self.folder, self.what, self.hint = os.fspath(folder), what, hint
    self.path = os.path.join(self.folder, LOCK_NAME)
    self.record = self.path + '.json'
    self.enabled, self.wait_s, self.held = enabled, wait_s, False
    self._lock = filelock.FileLock(self.path)

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc_info):
    self.release()

  def acquire(self):
    """Takes the lock, waiting up to wait_s, or raises LockedError naming the run that holds it."""
    if not self.enabled:
      return self
    if self.held:  # filelock would count it twice; twice in one run is the caller's bug.
      raise self._refused()
    os.makedirs(self.folder, exist_ok=True)
    try:
      self._lock.acquire(timeout=0)
    except filelock.Timeout:
      if not self.wait_s:
        raise self._refused() from None
      logging.warning('waiting up to %g s for %s to release %s', self.wait_s,
                      _who(_read(self.record)), self.what)
      try:
        self._lock.acquire(timeout=self.wait_s)
      except filelock.Timeout:
        raise self._refused(f' after a wait of {self.wait_s:g} s') from None
    try:
      stale = _read(self.record)  # Left by a holder that never released: killed, or its host died.
      if stale:
        logging.warning('took over the stale lock of %s in %s', _who(stale), self.folder)
      files.atomic_write_json(self.record, {
          'pid': os.getpid(), 'host': socket.gethostname(),
          'since': datetime.datetime.now().astimezone().isoformat(' ', 'seconds'),
          'command': _command()})
    except BaseException:
      self._lock.release()
      raise
    self.held = True
    return self

  def release(self) -> None:
    """Deletes the record (and the lock file where nothing else is), then unlocks; safe twice."""
    if not self.held:
      return
    self.held = False
    try:
      os.unlink(self.record)
      if os.listdir(self.folder) == [LOCK_NAME]:  # No trace where the run wrote nothing.
        os.unlink(self.path)  # While held: filelock retries a flock won on a deleted file.
    except OSError as e:
      logging.warning('could not delete %s: %s', e.filename, files.describe_os_error(e))
    finally:
      self._lock.release()

  def _refused(self, waited: str = '') -> LockedError:
    return LockedError(f'{self.what} is in use by {_who(_read(self.record))}{waited} '
                       f'(lock file {self.path}); {self.hint}')


class WorkdirLock(FolderLock):
  """Keeps two runs out of one workdir: `with WorkdirLock(workdir): ...`, refused at once."""

  def __init__(self, workdir, *, enabled: bool = True):
    super().__init__(workdir, f'workdir {os.fspath(workdir)}',
                     'wait for it to finish or use another --workdir.', enabled=enabled)


class DataLock(FolderLock):
  """Keeps two runs from preparing one dataset at once: the second waits up to `wait_s`."""

  def __init__(self, folder, *, wait_s: float):
    super().__init__(folder, f'the dataset folder {os.fspath(folder)}',
                     'wait for it to finish preparing, or set another config.data.data_dir.',
                     wait_s=wait_s)


def _read(path: str) -> Optional[dict]:
  try:
    with open(path) as f:
      info = json.load(f)
  except (OSError, ValueError):
    return None
  return info if isinstance(info, dict) and 'pid' in info else None


def _who(info: Optional[dict]) -> str:
  if not info:
    return 'another process'
  own = info['pid'] == os.getpid() and info.get('host') == socket.gethostname()
  return (f"PID {info['pid']}{' (this process)' if own else ''} on host {info.get('host')} "
          f"since {info.get('since')}, running `{info.get('command')}`")


def _command(chars: int = 200) -> str:
  command = ' '.join(sys.argv) or sys.executable
  return command if len(command) <= chars else command[:chars - 3] + '...'
