"""The workdir lock: two runs never write into one workdir at once.

  with lock.WorkdirLock(workdir): ...     # LockedError naming the holder if another run has it

The lock file `<workdir>/.iterseg.lock` holds one JSON object:
  {"pid": 123, "host": "h", "since": "2026-11-25T14:30:02+01:00", "command": "python -m ..."}
Its holder also keeps an `fcntl.flock` on it. The kernel drops a flock when its process dies, so
on the same host a lock whose holder is gone is recognised as stale even if its PID was reused.
Under multi-host, pass `enabled=(jax.process_index() == 0)`.
"""

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import time
from typing import Optional

from absl import logging

from iterseg.errors import LockedError
from iterseg.files import describe_os_error

LOCK_NAME = '.iterseg.lock'
_PATIENCE_S = 0.5  # How long an unreadable or orphaned lock is watched before acting on it.
_POLL_S = 0.01
_COMMAND_CHARS = 200


def _try_flock(fd: int) -> Optional[bool]:
  """True if we now hold the flock on `fd`, False if another holds it, None if unsupported."""
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return True
  except BlockingIOError:
    return False
  except OSError as e:
    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      return False
    if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
      return None  # The file system has no flock: fall back to PID checks.
    raise


def _is_file_at(fd: int, path: str) -> bool:
  """Whether `fd` is still the file at `path` (not one replaced or deleted since it was opened)."""
  try:
    here = os.stat(path)
  except FileNotFoundError:
    return False
  mine = os.fstat(fd)
  return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # It exists, owned by someone else.
  return True


def _read_info(fd: int) -> Optional[dict]:
  """The JSON of a lock file, or None if it is empty, damaged or lacks a field."""
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    data = os.read(fd, 1 << 16)
    info = json.loads(data.decode('utf-8'))
    if isinstance(info, dict) and isinstance(info.get('pid'), int) and info.get('host'):
      return info
  except (OSError, ValueError):
    pass
  return None


def _read_path(path: str) -> Optional[dict]:
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return None
  try:
    return _read_info(fd)
  finally:
    os.close(fd)


def _shown_time(since) -> str:
  try:
    return datetime.datetime.fromisoformat(str(since)).strftime('%Y-%m-%d %H:%M:%S')
  except ValueError:
    return str(since)


class WorkdirLock:
  """Keeps two runs out of one workdir: `with WorkdirLock(workdir): ...`.

  Acquiring creates `<workdir>/.iterseg.lock` exclusively and holds a flock on it. An existing
  lock on this host is stale, and taken over with a warning, if nobody holds its flock or its PID
  is dead; otherwise, or if it was written on another host, acquiring raises LockedError.
  """

  def __init__(self, workdir, *, enabled: bool = True):
    self.workdir = os.fspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_NAME)
    self.enabled = enabled
    self._fd = None
    self._held_info = None  # What we wrote into the lock file.

  @property
  def held(self) -> bool:
    return self._fd is not None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc_info):
    self.release()

  def acquire(self) -> 'WorkdirLock':
    """Takes the lock, or raises LockedError naming the run that holds it."""
    if not self.enabled:
      return self
    if self._fd is not None:
      raise self._locked(self._held_info, own=True)
    os.makedirs(self.workdir, exist_ok=True)
    deadline = time.monotonic() + _PATIENCE_S
    while True:
      if time.monotonic() > deadline + 20 * _PATIENCE_S:
        raise LockedError(f'workdir {self.workdir} is contended: its lock file {self.path} keeps '
                          'changing; use another --workdir or try again.')
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        if self._examine(patient=time.monotonic() < deadline):
          return self
      else:
        if self._own(fd):
          return self
      time.sleep(_POLL_S)

  def release(self) -> None:
    """Deletes the lock file if it is still ours and drops the flock; safe to call twice."""
    fd, self._fd = self._fd, None
    if fd is None:
      return
    try:
      if _is_file_at(fd, self.path) and (_read_path(self.path) or {}).get('pid') == os.getpid():
        os.unlink(self.path)
    except OSError as e:
      logging.warning('could not delete the lock file %s: %s', self.path, describe_os_error(e))
    finally:
      os.close(fd)  # Drops the flock after the unlink, so no one sees a free flock on our file.

  def _new_info(self) -> dict:
    self._held_info = {
        'pid': os.getpid(), 'host': socket.gethostname(),
        'since': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
        'command': _command()}
    return self._held_info

  def _own(self, fd: int) -> bool:
    """Makes the freshly created file `fd` our lock; False if another process took it over."""
    if _try_flock(fd) is False or not _is_file_at(fd, self.path):
      os.close(fd)
      return False
    try:
      os.write(fd, json.dumps(self._new_info(), indent=1).encode() + b'\n')
      os.fsync(fd)
    except BaseException:
      try:
        os.unlink(self.path)
      finally:
        os.close(fd)
      raise
    self._fd = fd
    return True

  def _examine(self, patient: bool) -> bool:
    """Takes over a stale lock (True), raises LockedError if it is held, or asks to retry (False).

    Retry when the file changed meanwhile or may be mid-write or mid-takeover (`patient`).
    """
    try:
      fd = os.open(self.path, os.O_RDONLY)
    except FileNotFoundError:
      return False
    try:
      free = _try_flock(fd)
      if free and not _is_file_at(fd, self.path):
        return False
      info = _read_info(fd)
      if info and info['host'] != socket.gethostname():
        raise self._locked(info)  # Liveness cannot be checked on another host.
      if info and info['pid'] == os.getpid() and not free:
        raise self._locked(info, own=True)
      if free:
        return self._take_over(fd, info, flocked=True)
      if info is None:  # Held, but not written yet (or damaged while its holder lives).
        if patient:
          return False
        raise LockedError(
            f'workdir {self.workdir} is in use by another process (lock file {self.path} is held '
            'but unreadable); wait for it to finish or use another --workdir. If that process is '
            'gone, delete the lock file.')
      if _pid_alive(info['pid']):
        raise self._locked(info)
      # Dead PID, but its flock is held: maybe another process is checking it right now (wait),
      # maybe a child of the dead run inherited it (take over without the flock).
      if patient:
        return False
      return self._take_over(fd, info, flocked=False)
    finally:
      os.close(fd)

  def _take_over(self, old_fd: int, info: Optional[dict], flocked: bool) -> bool:
    """Replaces the stale lock file `old_fd` by ours in one rename; False if it changed meanwhile.

    With `flocked`, we hold the old file's flock, so no other process can take it over at once.
    """
    tmp = os.path.join(self.workdir, f'{LOCK_NAME}.{os.getpid()}.tmp')
    try:
      os.unlink(tmp)
    except FileNotFoundError:
      pass
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    replaced = False
    try:
      _try_flock(fd)
      os.write(fd, json.dumps(self._new_info(), indent=1).encode() + b'\n')
      os.fsync(fd)
      if flocked or _is_file_at(old_fd, self.path):
        os.replace(tmp, self.path)
        replaced = True
    finally:
      if not replaced:
        try:
          os.unlink(tmp)
        except OSError:
          pass
        os.close(fd)
    if not replaced:
      return False
    self._fd = fd
    if info:
      logging.warning('took over the stale lock of PID %s on host %s (since %s) in %s',
                      info['pid'], info['host'], _shown_time(info.get('since')), self.workdir)
    else:
      logging.warning('took over the stale, unreadable lock file %s', self.path)
    return True

  def _locked(self, info: dict, own: bool = False) -> LockedError:
    who = f"PID {info['pid']}{' (this process)' if own else ''} on host {info['host']}"
    where = (f"workdir {self.workdir} is in use by {who} since {_shown_time(info.get('since'))} "
             f'(lock file {self.path})')
    if info['host'] != socket.gethostname():
      return LockedError(
          f'{where}; a run on another host cannot be checked from here: wait for it to finish or '
          'use another --workdir. If that run is dead, delete the lock file.')
    return LockedError(f'{where}; wait for it to finish or use another --workdir. If that process '
                       'is gone, delete the lock file.')


def _command() -> str:
  command = ' '.join(sys.argv) or sys.executable
  return command if len(command) <= _COMMAND_CHARS else command[:_COMMAND_CHARS - 3] + '...'
