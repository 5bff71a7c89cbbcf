"""iterseg.files: atomic writes and write checks (the locks: test_lock.py)."""

import errno
import json
import os
import pathlib
import subprocess
import sys

import pytest

from iterseg import errors, files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


def test_a_replaced_folder_is_the_new_set_or_the_old_one_never_a_mix(tmp_path, monkeypatch):
  folder = tmp_path / 'out'
  with files.replaced_folder(folder) as tmp:
    (pathlib.Path(tmp) / 'a').write_text('1')
  assert sorted(p.name for p in folder.iterdir()) == ['a']
  with pytest.raises(RuntimeError):  # A failure while writing: the old set stays.
    with files.replaced_folder(folder) as tmp:
      (pathlib.Path(tmp) / 'b').write_text('2')
      raise RuntimeError('disk full')
  assert sorted(p.name for p in folder.iterdir()) == ['a'] and sorted(os.listdir(tmp_path)) == ['out']
  real = os.replace

  def busy(src, dst):
    if os.path.basename(src) == 'out':
      raise OSError(errno.EBUSY, 'Device or resource busy')
    return real(src, dst)
  monkeypatch.setattr(os, 'replace', busy)  # A mount point cannot be renamed.
  with pytest.raises(errors.WriteError, match='cannot replace .*not a mount point'):
    with files.replaced_folder(folder) as tmp:
      (pathlib.Path(tmp) / 'c').write_text('3')
  assert sorted(p.name for p in folder.iterdir()) == ['a'] and sorted(os.listdir(tmp_path)) == ['out']


_KILLED = """
import os, signal, sys
from iterseg import files
folder, at = sys.argv[1], int(sys.argv[2])
for name, text in (('a', 'new a'), ('b', 'new b')):
  with open(files.temporary(os.path.join(folder, name)), 'w') as f:
    f.write(text)
renames, real = [], os.replace
def replace(src, dst):  # SIGKILL at the rename number `at` (0: the journal's own write).
  if len(renames) == at:
    os.kill(os.getpid(), signal.SIGKILL)
  renames.append(src)
  return real(src, dst)
os.replace = os.rename = replace
files.replace_all({files.temporary(os.path.join(folder, n)): os.path.join(folder, n) for n in 'ab'})
"""


@pytest.mark.parametrize('at', [0, 1, 2, 3, 4])
def test_a_set_a_kill_cut_in_two_is_completed_or_left_whole_by_recover(tmp_path, at):
  """SIGKILL at each rename of replace_all (the journal, a aside, a in, b aside, b in), then the
  next writer's `recover`: the old set whole before the journal, else the new set whole; nothing
  of the dead process left."""
  for name in 'ab':
    (tmp_path / name).write_text(f'old {name}')
  run = subprocess.run([sys.executable, '-c', _KILLED, str(tmp_path), str(at)], cwd=ROOT)
  assert run.returncode == -9
  if at:  # Cut in two, with its journal.
    assert any(n.endswith('.journal') for n in os.listdir(tmp_path))
  files.recover(tmp_path)
  state = {p.name: p.read_text() for p in tmp_path.iterdir()}
  assert state == ({'a': 'old a', 'b': 'old b'} if at == 0 else {'a': 'new a', 'b': 'new b'})


def test_recover_leaves_what_a_live_process_is_writing(tmp_path):
  tmp = files.temporary(tmp_path / 'a')
  pathlib.Path(tmp).write_text('being written')
  files.recover(tmp_path)
  assert os.listdir(tmp_path) == [os.path.basename(tmp)]


def test_a_folder_replaced_by_a_killed_process_is_whole_at_the_next_write(tmp_path):
  """replaced_folder killed between renaming the old folder aside and the new one in: the next
  replaced_folder first completes it (the new set), then writes its own."""
  code = ('import os, signal, sys\nfrom iterseg import files\nreal = os.replace\n'
          'def replace(src, dst):\n  real(src, dst)\n  if dst.endswith(".old"): '
          'os.kill(os.getpid(), signal.SIGKILL)\nos.replace = replace\n'
          'with files.replaced_folder(sys.argv[1]) as tmp:\n'
          '  open(os.path.join(tmp, "b"), "w").write("2")\n')
  folder = tmp_path / 'out'
  with files.replaced_folder(folder) as tmp:
    (pathlib.Path(tmp) / 'a').write_text('1')
  assert subprocess.run([sys.executable, '-c', code, str(folder)], cwd=ROOT).returncode == -9
  assert not folder.exists()  # Cut between its renames.
  with files.replaced_folder(folder) as tmp:
    assert sorted(p.name for p in folder.iterdir()) == ['b']  # Completed first.
    (pathlib.Path(tmp) / 'c').write_text('3')
  assert sorted(os.listdir(tmp_path)) == ['out'] and os.listdir(folder) == ['c']


SCHEMA = {'total': files.COUNT, 'name': str, 'point': (None, {'fraction': files.number(0, 1)}),
          'rows': [{'dice': (files.number(0, 1), *files.MAYBE)}]}


@pytest.mark.parametrize('content, words', [
    ('{"total": 3, "name": "a", "point": null, "rows": [{}]}', None),
    ('{"total": 3, "name": "a", "point": null, "rows": [{"dice": 0.5}]', 'Expecting'),  # Truncated.
    ('', 'Expecting value'),  # Empty: a write that never began.
    ('[]', 'not a JSON object'),
    ('{"total": "3", "name": "a", "point": null, "rows": []}',
     "total='3' is not valid (a whole number >= 0)"),
    ('{"total": true, "name": "a", "point": null, "rows": []}', 'total=True is not valid'),
    ('{"total": -1, "name": "a", "point": null, "rows": []}', 'total=-1 is not valid'),
    ('{"total": 3, "point": null, "rows": []}', 'name=(missing) is not valid (a string)'),
    ('{"total": 3, "name": "a", "point": {"fraction": 1.5}, "rows": []}',
     'point.fraction=1.5 is not valid (a finite number in [0, 1])'),
    ('{"total": 3, "name": "a", "point": 7, "rows": []}',
     'point=7 is not valid (null or an object)'),
    ('{"total": 3, "name": "a", "point": null, "rows": [{"dice": NaN}]}',
     'rows[0].dice=nan is not valid (a finite number in [0, 1] or null)'),
], ids=['valid', 'truncated', 'empty', 'not-an-object', 'mistyped', 'a-bool-for-a-count',
        'out-of-range', 'missing', 'nested-out-of-range', 'neither-alternative', 'nan-in-a-list'])
def test_read_json_checks_each_field_against_its_schema_in_one_line(tmp_path, content, words):
  path = tmp_path / 'plan.json'
  path.write_text(content)
  if words is None:
    assert files.read_json(path, 'rerun it', errors.CheckpointError, SCHEMA)['total'] == 3
    return
  with pytest.raises(errors.CheckpointError) as e:
    files.read_json(path, 'rerun it', errors.CheckpointError, SCHEMA)
  message = str(e.value)
  assert message.startswith(f'{path} cannot be read (') and message.endswith('): rerun it.')
  assert words in message and '\n' not in message
  with pytest.raises(errors.CheckpointError, match=r'No such file'):  # Missing.
    files.read_json(tmp_path / 'gone.json', 'rerun it', errors.CheckpointError, SCHEMA)
