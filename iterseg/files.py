"""Files a run writes: atomic writes, and checks that a folder can be written before any work.
Imports only `errors` from iterseg and not jax, so any module can use it."""

import contextlib
import errno
import json
import os
import pathlib
import shutil
from typing import Callable, IO, Optional

from iterseg import errors
from iterseg.errors import WriteError


def atomic_write(path, write: Callable[[IO], None], mode: str = 'w', *, fsync: bool = False):
  """Calls `write(f)` on a temporary file next to `path`, then renames it onto `path`: readers see
  the old file or the new one, never a partial one. On any error the temporary file is removed,
  `path` is left as it was, and the error is re-raised. Text mode is UTF-8 with newline='' (what
  the csv module needs: '\\n' is written as is)."""
  if mode not in ('w', 'wb'):
    raise ValueError(f"atomic_write: mode must be 'w' or 'wb', not {mode!r}")
  path = os.fspath(path)
  folder, name = os.path.split(path)
  tmp = os.path.join(folder, f'.{name}.{os.getpid()}.tmp')
  text = {} if mode == 'wb' else {'encoding': 'utf-8', 'newline': ''}
  try:
    with open(tmp, mode, **text) as f:
      write(f)
      if fsync:
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise
  if fsync:  # Makes the rename durable; best effort (not every file system allows it).
    with contextlib.suppress(OSError):
      fd = os.open(folder or '.', os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)


def atomic_write_text(path, text: str, *, fsync: bool = False):
  """Writes `text` to `path` atomically."""
  atomic_write(path, lambda f: f.write(text), 'w', fsync=fsync)


def atomic_write_json(path, obj, indent: Optional[int] = 1, *, fsync: bool = False):
  """Writes `obj` as JSON (and a final newline) to `path` atomically."""
  atomic_write_text(path, json.dumps(obj, indent=indent) + '\n', fsync=fsync)


@contextlib.contextmanager
def replaced_folder(folder):
  """A result of several files written whole or not at all: yields a sibling temporary folder to
  write them into; once the block ends without error, it takes `folder`'s place (the previous one
  is renamed aside, then deleted). On any error the temporary folder is deleted and `folder` is
  left as it was: the previous complete set, never a mix."""
  folder = os.path.abspath(os.fspath(folder))
  parent, name = os.path.split(folder)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f'.{name}.{os.getpid()}.tmp')
  old = os.path.join(parent, f'.{name}.{os.getpid()}.old')
  for leftover in (tmp, old):
    shutil.rmtree(leftover, ignore_errors=True)
  os.makedirs(tmp)
  try:
    yield tmp
    try:
      if os.path.exists(folder):
        os.rename(folder, old)
      os.rename(tmp, folder)
    except OSError as e:  # A mount point or a busy folder cannot be renamed.
      raise WriteError(f'cannot replace {folder} with the new files ({describe_os_error(e)}): '
                       f'choose a folder inside it, or one that is not a mount point.') from e
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    if os.path.exists(old) and not os.path.exists(folder):
      os.rename(old, folder)
    raise
  shutil.rmtree(old, ignore_errors=True)


def read_json(path, fix: str, error=errors.Error, fields: Optional[dict] = None) -> dict:
  """The JSON object in `path`, its `fields` ({name: type or tuple of types}) checked; `error` (an
  iterseg.errors class) naming the file, what is wrong and `fix` if it is missing, truncated, not
  an object, or a field is missing or of another type. The one reader of the JSON iterseg writes."""
  try:
    with open(path) as f:
      saved = json.load(f)
    if not isinstance(saved, dict):
      raise ValueError('not a JSON object')
    for name, kinds in (fields or {}).items():
      kinds = kinds if isinstance(kinds, tuple) else (kinds,)
      value = saved.get(name)
      if name not in saved or not isinstance(value, kinds) or (
          type(value) is bool and int in kinds):  # True is not a count.
        raise ValueError(f'{name}={saved.get(name, "(missing)")!r} is not valid')
  except (OSError, ValueError) as e:
    raise error(f'{path} cannot be read ({" ".join(str(e).split())[:160]}): {fix}.') from e
  return saved


_CAUSES = {errno.ENOSPC: 'disk full', errno.EDQUOT: 'disk quota exceeded',
           errno.EROFS: 'read-only file system', errno.EACCES: 'permission denied',
           errno.EPERM: 'permission denied', errno.ENOENT: 'no such file or folder',
           errno.ENOTDIR: 'part of the path is a file, not a folder',
           errno.EEXIST: 'it exists and is not a folder'}
_FIXES = {errno.ENOSPC: 'Free some space', errno.EDQUOT: 'Free some space',
          errno.EACCES: 'Fix its permissions', errno.EPERM: 'Fix its permissions'}


def describe_os_error(e: OSError) -> str:
  """A short lower-case cause: 'disk full', 'read-only file system', 'permission denied', ..."""
  if e.errno in _CAUSES:
    return _CAUSES[e.errno]
  cause = e.strerror or str(e) or type(e).__name__
  return cause[:1].lower() + cause[1:]


def check_writable(folder) -> None:
  """Creates `folder` (and its parents) if needed and writes and deletes a probe file in it;
  WriteError, one line naming `folder` and the cause, if any of this fails."""
  folder = os.fspath(folder)
  probe = os.path.join(folder, f'.iterseg-write-check.{os.getpid()}.tmp')
  try:
    if os.path.exists(folder) and not os.path.isdir(folder):
      raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), folder)
    os.makedirs(folder, exist_ok=True)
    fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
      os.write(fd, b'ok\n')
      os.fsync(fd)  # A full disk may only say so here.
    finally:
      os.close(fd)
      os.unlink(probe)
  except OSError as e:
    code = f' (errno {e.errno})' if e.errno else ''
    fix = f'{_FIXES[e.errno]} or choose' if e.errno in _FIXES else 'Choose'
    raise WriteError(f'cannot write to {folder}: {describe_os_error(e)}{code}. '
                     f'{fix} another --workdir.') from e


def _read_bytes(path: str) -> Optional[bytes]:
  return pathlib.Path(path).read_bytes() if os.path.exists(path) else None


class Undo:
  """The files (and new folders) a command is about to write, as they are now: `restore()` puts
  them back if the command is refused after its first write, so that it leaves them as they were."""

  def __init__(self, paths, folders=()):
    self.saved = {path: _read_bytes(path) for path in map(os.fspath, paths)}
    self.folders = [os.fspath(f) for f in folders if not os.path.exists(f)]

  def restore(self) -> None:
    """Every file back to its recorded bytes (or gone, if it did not exist); folders created since
    removed when empty."""
    for path, data in self.saved.items():
      if data is None:
        with contextlib.suppress(FileNotFoundError):
          os.unlink(path)
      elif _read_bytes(path) != data:
        atomic_write(path, lambda f, d=data: f.write(d), 'wb')
    for folder in sorted(self.folders, key=len, reverse=True):
      with contextlib.suppress(OSError):  # Not empty (something good is there) or already gone.
        os.rmdir(folder)
