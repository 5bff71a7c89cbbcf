"""Files a run writes: atomic writes, and checks that a folder can be written before any work.
Imports only `errors` from iterseg and not jax, so any module can use it."""

import contextlib
import errno
import json
import math
import os
import pathlib
import re
import shutil
import socket
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
  folder, tmp = os.path.dirname(path), temporary(path)
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


def temporary(path, kind: str = 'tmp') -> str:
  """A hidden sibling name for `path` owned by this process: `.<name>.<host>-<pid>.<kind>`."""
  folder, name = os.path.split(os.fspath(path))
  return os.path.join(folder, f'.{name}.{_OWNER}.{kind}')


_OWNER = f'{socket.gethostname().replace(".", "_")}-{os.getpid()}'
_LEFT = re.compile(r'^\.(.+)\.([^.]+)-(\d+)\.(tmp|old|journal)$')  # What `temporary` names.


def replace_all(moves: dict) -> None:
  """Renames each complete temporary (a file or a folder) onto its path ({tmp: path}), as one set:
  the paths there are renamed aside first and deleted at the end. A journal naming the moves is
  written before the first rename, so a set that a kill cut in two is completed by `recover` (the
  next write into the folder); any other failure puts the previous set back and re-raises."""
  moves = {os.fspath(t): os.fspath(p) for t, p in moves.items()}
  first = next(iter(moves.values()))
  journal = temporary(first, 'journal')
  atomic_write_json(journal, [[t, p, temporary(p, 'old')] for t, p in moves.items()], fsync=True)
  placed = []
  try:
    for tmp, path in moves.items():
      if os.path.lexists(path):
        os.replace(path, temporary(path, 'old'))
      os.replace(tmp, path)
      placed.append(path)
  except BaseException:
    for path in placed:
      _remove(path)
    for path in moves.values():
      if os.path.lexists(temporary(path, 'old')):
        os.replace(temporary(path, 'old'), path)
    os.unlink(journal)
    raise
  for path in moves.values():
    _remove(temporary(path, 'old'))
  os.unlink(journal)


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path)
  elif os.path.lexists(path):
    os.unlink(path)


def recover(folder) -> None:
  """Finishes in `folder` what processes of this host that died (`kill -9`) left: each journal's
  set is completed (`replace_all`), and their temporaries are deleted. A live process's are left."""
  import psutil  # pylint: disable=g-import-not-at-top
  host = _OWNER.rsplit('-', 1)[0]
  try:
    names = sorted(os.listdir(folder), key=lambda n: not n.endswith('.journal'))
  except FileNotFoundError:
    return
  for name in names:
    m = _LEFT.match(name)
    if not m or m[2] != host or psutil.pid_exists(int(m[3])):
      continue
    path = os.path.join(folder, name)
    if m[4] == 'journal' and os.path.exists(path):
      with open(path, encoding='utf-8') as f:
        moves = json.load(f)
      for tmp, target, old in moves:
        if os.path.lexists(tmp):
          if os.path.lexists(target) and not os.path.lexists(old):
            os.replace(target, old)
          os.replace(tmp, target)
      for _, _, old in moves:
        _remove(old)
    _remove(path)


@contextlib.contextmanager
def replaced_folder(folder):
  """A result of several files written whole or not at all: yields a sibling temporary folder to
  write them into; once the block ends without error, it takes `folder`'s place (`replace_all`).
  On any error the temporary folder is deleted and `folder` is left as it was: the previous
  complete set, never a mix, even after a kill (what it left is completed on the next call)."""
  folder = os.path.abspath(os.fspath(folder))
  os.makedirs(os.path.dirname(folder), exist_ok=True)
  recover(os.path.dirname(folder))
  tmp = temporary(folder)
  _remove(tmp)
  os.makedirs(tmp)
  try:
    yield tmp
    try:
      replace_all({tmp: folder})
    except OSError as e:  # A mount point or a busy folder cannot be renamed.
      raise WriteError(f'cannot replace {folder} with the new files ({describe_os_error(e)}): '
                       f'choose a folder inside it, or one that is not a mount point.') from e
  finally:
    _remove(tmp)


# At most how many bytes one byte of a file decodes to, by TIFF compression (tag 259): none 1, LZW
# 2048 (12-bit codes reach ~1300), deflate 1032 (its limit), PackBits 64, JPEG 2048 (at least a bit
# per 8x8 block: 512 pixels a byte, of at most 4 samples). Other codecs (CCITT, zstd...): no bound.
TIFF_RATIO = {1: 1, 5: 2048, 7: 2048, 8: 1032, 32946: 1032, 32773: 64}


def check_declared(declared: int, size: int, ratio, what: str) -> None:
  """ValueError if `declared` decoded bytes are more than `size` bytes can hold at `ratio` (None:
  no bound): a decoder would allocate them before finding the data missing."""
  if ratio and declared > ratio * size:
    raise ValueError(f'its header declares {what}, more than its {size} bytes can hold: it is '
                     f'truncated or forged')


def is_number(v, low=None, high=None, low_open=False, high_open=False, whole=False) -> bool:
  """Whether `v` is a finite number (an int if `whole`; not a bool) within the bounds given."""
  if isinstance(v, bool) or not isinstance(v, int if whole else (int, float)):
    return False
  return ((whole or math.isfinite(v)) and (low is None or v > low or (v == low and not low_open))
          and (high is None or v < high or (v == high and not high_open)))


def describe_number(low=None, high=None, low_open=False, high_open=False, whole=False) -> str:
  """What is_number allows, for a message: 'a whole number >= 1', 'a finite number in (0, 1]'."""
  kind = 'a whole number' if whole else 'a finite number'
  if low is not None and high is not None:
    return f'{kind} in {"(" if low_open else "["}{low}, {high}{")" if high_open else "]"}'
  if low is not None:
    return f'{kind} {">" if low_open else ">="} {low}'
  return kind if high is None else f'{kind} <= {high}'


class Rule:
  """A field of `read_json`'s schema that no type says: `test(value)` holds, as `what` says."""

  def __init__(self, test: Callable[[object], bool], what: str):
    self.test, self.what = test, what


def number(low=None, high=None, **bounds) -> Rule:
  """The Rule of a finite number in the bounds (`is_number`'s: whole, low_open, high_open)."""
  return Rule(lambda v: is_number(v, low, high, **bounds), describe_number(low, high, **bounds))


_MISSING = object()
COUNT, ABSENT = number(0, whole=True), Rule(lambda v: v is _MISSING, '')
MAYBE = (None, ABSENT)  # A rule's alternatives where a field may be null or absent.
_KINDS = {dict: 'an object', list: 'a list', str: 'a string', int: 'a whole number',
          bool: 'true or false', float: 'a number', type(None): 'null', object: 'anything'}


def invalid(value, rule, name: str = '') -> Optional[str]:
  """Where `value` breaks `rule`, as 'name=value is not valid (what is)'; None where it holds. A
  rule is a type, a `Rule`, {field: rule} (an object with these fields, others free), [rule] (a
  list, each item so), or a tuple of rules (any one: (rule, *MAYBE): null or absent too)."""
  rules = rule if isinstance(rule, tuple) else (rule,)
  for one in rules:
    if isinstance(one, dict) and isinstance(value, dict):
      parts = [(f'{name}.{k}'.lstrip('.'), value.get(k, _MISSING), r) for k, r in one.items()]
    elif isinstance(one, list) and isinstance(value, list):
      parts = [(f'{name}[{i}]', v, one[0]) for i, v in enumerate(value)]
    elif isinstance(one, Rule):
      parts = None if one.test(value) else False
    else:
      kind = type(None) if one is None else one
      parts = None if (isinstance(kind, type) and isinstance(value, kind) and
                       not (type(value) is bool and kind in (int, float))) else False
    if parts is not False:
      return next(filter(None, (invalid(v, r, n) for n, v, r in parts or ())), None)
  what = ' or '.join(r.what if isinstance(r, Rule) else _KINDS[type(r) if isinstance(
      r, (dict, list)) else r or type(None)] for r in rules if r is not ABSENT)
  return f'{name}={"(missing)" if value is _MISSING else repr(value)} is not valid ({what})'


def read_json(path, fix: str, error=errors.Error, fields: Optional[dict] = None) -> dict:
  """The JSON object in `path`, checked against the schema `fields` ({name: rule}, see `invalid`);
  `error` (an iterseg.errors class), one line naming the file, what is wrong and `fix`, if it is
  missing, truncated, not an object, or a field breaks its rule. The one reader of the JSON iterseg
  writes."""
  try:
    with open(path) as f:
      saved = json.load(f)
    problem = invalid(saved, fields or {}) if isinstance(saved, dict) else 'not a JSON object'
    if problem:
      raise ValueError(problem)
  except (OSError, ValueError) as e:
    raise error(f'{path} cannot be read ({" ".join(str(e).split())[:200]}): {fix}.') from e
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
