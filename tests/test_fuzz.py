"""Fuzzing with hypothesis: whatever a user gives (config values and field names, damaged or forged
image files, arrays to `iterseg.infer`), the answer is a result or one `iterseg.errors` line: never
another exception (a bug keeps its traceback and fails here), a hang, or memory far beyond what the
input's bytes can hold.

The suite runs a short profile; `ITERSEG_FUZZ_EXAMPLES=500 pytest tests/test_fuzz.py` a longer one.
"""

import io
import os
import struct
import zlib

import jax
import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from PIL import Image

import iterseg
from iterseg import errors, inference, settings
from iterseg.data import common
from tests.helpers import tiny

EXAMPLES = int(os.environ.get('ITERSEG_FUZZ_EXAMPLES', 12))
FUZZ = hsettings(max_examples=EXAMPLES, deadline=None, database=None,
                 suppress_health_check=list(HealthCheck))
MEMORY_SLACK = 256 * 2 ** 20  # What a decoded image may take beyond its file's bytes.


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
)


@FUZZ
@given(FILES, st.sampled_from(['.png', '.jpg', '.tif', '.bmp']))
def test_any_image_file_reads_or_is_one_line_in_bounded_memory(tmp_path_factory, content,
                                                              extension):
  path = tmp_path_factory.mktemp('fuzz') / f'input{extension}'
  path.write_bytes(content)
  before = psutil.Process().memory_info().rss
  for read in (common.read_image, common.header_size, common.read_binary_mask):
    try:
      out = read(path)
    except errors.DataError as e:
      assert '\n' not in str(e).strip() and str(path) in str(e)
      continue
    if isinstance(out, np.ndarray):
      assert out.dtype == np.uint8 and out.ndim in (2, 3)
  assert psutil.Process().memory_info().rss - before < MEMORY_SLACK + 50 * len(content)


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
