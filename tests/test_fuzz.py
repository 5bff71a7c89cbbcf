"""Fuzzing with hypothesis: whatever a user gives (config values and field names, damaged or forged
image files, arrays to `iterseg.infer`), the answer is a result or one `iterseg.errors` line: never
another exception (a bug keeps its traceback and fails here), a hang, or memory far beyond what the
input's bytes can hold (an image file's read is measured in a child process: its peak resident
memory, less that of a child that does nothing, stays below 32 MiB + 50 x the file's bytes).

The suite runs a short profile; `ITERSEG_FUZZ_EXAMPLES=500 pytest tests/test_fuzz.py` a longer one.
"""

import io
import os
import struct
import subprocess
import sys
import zlib

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings as hsettings, strategies as st
from PIL import Image
import tifffile

import iterseg
from iterseg import errors, inference, settings
from tests.fuzz_readers import READERS
from tests.helpers import tiny

EXAMPLES = int(os.environ.get('ITERSEG_FUZZ_EXAMPLES', 12))
FUZZ = hsettings(max_examples=EXAMPLES, deadline=None, database=None,
                 suppress_health_check=list(HealthCheck))
MEMORY_SLACK = 32 * 2 ** 20  # What reading any file may take beyond 50 x its bytes.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- Config values and field names ------------------------------------------------------------------

FIELDS = ['hi_size', 'num_patches', 'refine_count', 'threshold', 'score', 'train.batch_size',
          'train.learning_rate', 'model.width', 'model.input_norm', 'native.overlap',
          'native.blend', 'eval.fov', 'calibrate.thresholds', 'data.train_fraction', 'nope',
          'train.nope', 'resolution', 'stage1_size', 'halo', 'benchmark.repeats']
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10 ** 6, 10 ** 6),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                   st.lists(st.integers(-3, 70), max_size=4).map(tuple))


@FUZZ
@given(st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=3))
def test_any_config_values_give_settings_or_one_line(fields):
  config = tiny()
  try:
    with config.unlocked():
      for name, value in fields.items():
        node = config
        *parents, leaf = name.split('.')
        for parent in parents:
          node = node[parent] if parent in node else None
          if node is None:
            raise errors.SettingsError(f'no section {parent}')
        node[leaf] = value
  except (TypeError, ValueError, KeyError, AttributeError):
    return  # ml_collections refuses a value of another type as it is set: the launch.py path.
  except errors.SettingsError:
    return
  try:
    settings.from_config(config)
  except errors.Error as e:
    assert '\n' not in str(e) and len(str(e)) < 1000, str(e)


# --- Image files --------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
  return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))


def _forged_png(width: int, height: int, body: bytes) -> bytes:
  """A PNG whose header declares width x height, followed by whatever bytes."""
  header = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + _png_chunk(b'IHDR', header) +
          _png_chunk(b'IDAT', zlib.compress(body)) + _png_chunk(b'IEND', b''))


def _forged_jpeg(width: int, height: int, progressive: bool) -> bytes:
  """A 16 x 16 JPEG whose frame header (SOF) declares width x height (each 1 to 65535)."""
  buffer = io.BytesIO()
  Image.new('RGB', (16, 16), (9, 99, 200)).save(buffer, 'JPEG', progressive=progressive)
  data = bytearray(buffer.getvalue())
  struct.pack_into('>HH', data, data.find(b'\xff\xc2' if progressive else b'\xff\xc0') + 5,
                   height, width)
  return bytes(data)


def _forged_tiff(width: int, height: int, compression: str, tile: bool) -> bytes:
  """A 16 x 16 TIFF (in strips, or one tile) whose tags declare width x height (and as large a
  tile or strip)."""
  buffer = io.BytesIO()
  tifffile.imwrite(buffer, np.full((16, 16, 3), 99, np.uint8), compression=compression,
                   tile=(16, 16) if tile else None, rowsperstrip=None if tile else 16)
  data = bytearray(buffer.getvalue())
  offset = struct.unpack_from('<I', data, 4)[0]
  for i in range(struct.unpack_from('<H', data, offset)[0]):
    entry = offset + 2 + 12 * i
    tag, kind = struct.unpack_from('<HH', data, entry)
    if tag in (256, 257, 278, 322, 323):  # Width, length, rows per strip, tile width, length.
      value = width if tag in (256, 322) else height
      struct.pack_into('<H' if kind == 3 else '<I', data, entry + 8, min(value, 65535)
                       if kind == 3 else value)
  return bytes(data)


def _valid(fmt: str, side: int) -> bytes:
  buffer = io.BytesIO()
  image = np.random.default_rng(side).integers(0, 256, (side, side + 3, 3), np.uint8)
  Image.fromarray(image).save(buffer, format=fmt)
  return buffer.getvalue()


FILES = st.one_of(
    st.binary(max_size=2048),  # Noise.
    st.tuples(st.sampled_from(['PNG', 'JPEG', 'TIFF', 'BMP']), st.integers(1, 40),
              st.floats(0.0, 1.0)).map(lambda t: _valid(t[0], t[1])[:int(len(_valid(t[0], t[1]))
                                                                       * t[2])]),  # Truncated.
    st.tuples(st.integers(1, 2 ** 31 - 1), st.integers(1, 2 ** 31 - 1),
              st.binary(max_size=256)).map(lambda t: _forged_png(*t)),  # Header-forged.
    st.tuples(st.integers(1, 65535), st.integers(1, 65535), st.booleans()).map(
        lambda t: _forged_jpeg(*t)),
    st.tuples(st.integers(1, 2 ** 20), st.integers(1, 2 ** 20),
              st.sampled_from([None, 'zlib', 'lzw', 'packbits']), st.booleans()).map(
                  lambda t: _forged_tiff(*t)),
)



# Reads files in a child process forked for each (from a small server process that imports only the
# readers), and reports its exit status and its peak resident memory (wait4's ru_maxrss) less that
# of a child forked just before that does nothing: what the read took. (The server's own ru_maxrss
# would not do: it keeps the peak of the pytest process it was forked from before its exec.)
READER = r"""
import os, sys
import numpy as np
from iterseg import errors
from tests.fuzz_readers import READERS


def child(path):
  pid = os.fork()
  if pid == 0:
    if path.startswith('allocate '):  # What a reader that blew up would do: the check sees it.
      np.ones(int(path.split()[1]), np.uint8)
    elif path:  # (None: the child that does nothing.)
      for read in READERS:
        try:
          read(path)
        except errors.DataError:
          pass
    os._exit(0)
  _, status, usage = os.wait4(pid, 0)
  return os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024


for line in sys.stdin:
  _, before = child('')
  status, peak = child(line.rstrip('\n'))
  print(status, peak - before, flush=True)
"""


@pytest.fixture(scope='module')
def peak_memory():
  """peak_memory(path) -> bytes that reading `path` (every reader) took above the process it started
  from, measured in a child process; the child must exit cleanly (any other exception fails)."""
  server = subprocess.Popen([sys.executable, '-c', READER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)

  def measure(path) -> int:
    server.stdin.write(f'{path}\n')
    server.stdin.flush()
    status, peak = map(int, server.stdout.readline().split())
    assert status == 0, f'reading {path} in a child process exited with {status}'
    return peak
  yield measure
  server.stdin.close()
  server.wait(timeout=60)


def test_the_memory_check_sees_a_read_that_takes_memory(peak_memory, tmp_path):
  assert peak_memory(tmp_path / 'none.png') < MEMORY_SLACK
  assert peak_memory(f'allocate {100 * 2 ** 20}') > 95 * 2 ** 20


@FUZZ
@given(FILES, st.sampled_from(['.png', '.jpg', '.tif', '.bmp']))
@example(_forged_png(1, 65_000_000, b''), '.png')  # Found: 0.5 GB of row pointers for 60 bytes.
@example(_forged_png(65_000_000, 1, b''), '.png')  # Found: 0.2 GB of row buffers.
@example(_forged_jpeg(12000, 12000, False), '.jpg')  # Found: 0.6 GB, read as grey (633 bytes).
@example(_forged_jpeg(12000, 12000, True), '.jpg')  # Found: 1.0 GB, read as grey.
@example(_forged_tiff(12000, 12000, 'zlib', False), '.tif')  # Found: 0.4 GB for 158 bytes.
@example(_forged_tiff(60000, 60000, None, True), '.tif')  # One 60000² tile: 10 GB as a slide.
def test_any_image_file_reads_or_is_one_line_in_bounded_memory(tmp_path_factory, peak_memory,
                                                              content, extension):
  path = tmp_path_factory.mktemp('fuzz') / f'input{extension}'
  path.write_bytes(content)
  for read in READERS:
    try:
      out = read(path)
    except errors.DataError as e:
      assert '\n' not in str(e).strip() and str(path) in str(e)
      continue
    if isinstance(out, np.ndarray):
      assert out.dtype == np.uint8 and out.ndim in (2, 3)
  assert peak_memory(path) < MEMORY_SLACK + 50 * len(content)


# --- Arrays to iterseg.infer --------------------------------------------------------------------------


@pytest.fixture(scope='module')
def networks():
  config = tiny(num_patches=4)
  return config, inference.init_params(config, jax.random.key(0))


ARRAYS = st.tuples(
    st.lists(st.integers(0, 70), min_size=0, max_size=5),  # Shape.
    st.sampled_from(['uint8', 'float32', 'float64', 'int32', 'bool', 'float16']),
    st.sampled_from([0.0, 0.5, 1.0, 255.0, -1.0, np.nan, np.inf]))


@FUZZ
@given(ARRAYS)
def test_any_array_to_infer_gives_a_prediction_or_one_line(networks, array):
  config, params = networks
  shape, dtype, value = array
  if np.prod(shape) > 2_000_000:
    return
  with np.errstate(invalid='ignore'):
    images = np.full(shape, value).astype(dtype)
  try:
    pred = iterseg.infer(params, images, config)
  except errors.InputError as e:
    assert '\n' not in str(e)
    return
  assert pred.probs.shape == (*images.shape[:3], 1)
  assert np.isfinite(np.asarray(pred.probs)).all()
