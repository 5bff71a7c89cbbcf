"""The image-reading contract (iterseg.data.common): every mode and bit depth -> uint8 RGB in its real range,
EXIF orientation applied to images and masks, case-insensitive file lookup."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

import fixtures
from iterseg.data import common
from iterseg.data.common import DataError

H, W = 6, 8  # Not square, so a rotation shows in the shape.
REF = fixtures.rgb(7, H, W)  # uint8 [H, W, 3]
GREY = REF[..., 0]  # uint8 [H, W]


def as_rgb(grey: np.ndarray) -> np.ndarray:
  return np.repeat(grey[..., None], 3, axis=-1)


def png16(path, values: np.ndarray):
  """Writes uint16 [h, w] (grey) or [h, w, 3] (RGB) as a 16-bit PNG (Pillow cannot write 16-bit RGB)."""
  h, w = values.shape[:2]
  colour = 2 if values.ndim == 3 else 0
  rows = values.astype('>u2').reshape(h, -1)
  raw = b''.join(b'\0' + row.tobytes() for row in rows)

  def chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))

  header = struct.pack('>IIBBBBB', w, h, 16, colour, 0, 0, 0)
  path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(raw))
                   + chunk(b'IEND', b''))
  return path


def with_orientation(image: Image.Image, path, value: int, **kwargs):
  exif = Image.Exif()
  exif[0x0112] = value
  image.save(path, exif=exif, **kwargs)
  return path


# --- Lossless formats: exact --------------------------------------------------------------------------


def palette_image():
  image = Image.fromarray(GREY % 4, 'P')
  image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255])  # Index 0 is red, not black.
  colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]], np.uint8)
  return image, colours[GREY % 4]


def cases(tmp_path):
  """{name: (path, expected uint8 [H, W, 3])} of the lossless formats."""
  palette, palette_rgb = palette_image()
  alpha = np.full((H, W, 1), 100, np.uint8)
  one_bit = GREY > 127
  float_path = tmp_path / 'float.tif'
  Image.fromarray(GREY.astype(np.float32) / 255, 'F').save(float_path)
  float255_path = tmp_path / 'float255.tif'
  Image.fromarray(GREY.astype(np.float32), 'F').save(float255_path)
  int32_path = tmp_path / 'int32.tif'
  int32 = GREY.astype(np.int64) * 16843009 // 2  # 255 -> 2**31 - 1, the top of a signed int32.
  Image.fromarray(int32.astype(np.int32), 'I').save(int32_path)
  saved = {
      'rgb.png': Image.fromarray(REF),
      'grey.png': Image.fromarray(GREY),
      'grey16.tif': Image.fromarray(GREY.astype(np.uint16) * 257),
      'one_bit.png': Image.fromarray(one_bit).convert('1'),
      'palette.png': palette,
      'palette.gif': palette,
      'la.png': Image.fromarray(np.concatenate([as_rgb(GREY)[..., :1], alpha], -1), 'LA'),
      'rgba.png': Image.fromarray(np.concatenate([REF, alpha], -1), 'RGBA'),
      'cmyk.tif': Image.fromarray(REF).convert('CMYK'),
      'rgb.bmp': Image.fromarray(REF),
  }
  for name, image in saved.items():
    image.save(tmp_path / name)
  expected = {
      'rgb.png': REF, 'grey.png': as_rgb(GREY), 'grey16.tif': as_rgb(GREY),
      'one_bit.png': as_rgb(one_bit.astype(np.uint8) * 255), 'palette.png': palette_rgb,
      'palette.gif': palette_rgb, 'la.png': as_rgb(GREY), 'rgba.png': REF, 'cmyk.tif': REF,
      'rgb.bmp': REF,
  }
  out = {name: (tmp_path / name, expected[name]) for name in saved}
  out['grey16.png'] = (png16(tmp_path / 'grey16.png', GREY.astype(np.uint16) * 257), as_rgb(GREY))
  out['rgb16.png'] = (png16(tmp_path / 'rgb16.png', REF.astype(np.uint16) * 257), REF)
  pgm = tmp_path / 'grey16.pgm'  # Pillow opens a 16-bit PGM as mode 'I'.
  pgm.write_bytes(f'P5 {W} {H} 65535\n'.encode() + (GREY.astype('>u2') * 257).tobytes())
  out['grey16.pgm'] = (pgm, as_rgb(GREY))
  out['float.tif'] = (float_path, as_rgb(GREY))
  out['float255.tif'] = (float255_path, as_rgb(GREY))
  out['int32.tif'] = (int32_path, as_rgb(GREY))
  return out


def test_every_lossless_format_reads_as_the_same_uint8_rgb(tmp_path):
  for name, (path, expected) in cases(tmp_path).items():
    image = common.read_image(path)
    assert image.dtype == np.uint8 and image.shape == (H, W, 3), name
    np.testing.assert_array_equal(image, expected, err_msg=name)


def test_16bit_grey_png_mode_and_rounding(tmp_path):
  path = png16(tmp_path / 'ramp.png', np.array([[0, 128, 129, 32767, 65535, 65534]], np.uint16))
  assert Image.open(path).mode in ('I;16', 'I')  # Pillow 13: 'I;16'; older Pillow: 'I'.
  np.testing.assert_array_equal(common.read_image(path)[0, :, 0], [0, 0, 1, 127, 255, 255])


def test_float_rule_and_nan(tmp_path):
  values = np.array([[0.0, 0.5, 1.0, np.nan, -1.0]], np.float32)
  Image.fromarray(values, 'F').save(tmp_path / 'unit.tif')
  np.testing.assert_array_equal(common.read_image(tmp_path / 'unit.tif')[0, :, 0], [0, 128, 255, 0, 0])
  Image.fromarray(np.array([[0, 500, 1000]], np.float32), 'F').save(tmp_path / 'wide.tif')
  np.testing.assert_array_equal(common.read_image(tmp_path / 'wide.tif')[0, :, 0], [0, 128, 255])


def test_to_uint8_rgb_takes_an_open_image(tmp_path):
  path = png16(tmp_path / 'grey16.png', GREY.astype(np.uint16) * 257)
  np.testing.assert_array_equal(common.to_uint8_rgb(common.open_image(path)), as_rgb(GREY))
  np.testing.assert_array_equal(common.to_uint8_rgb(Image.fromarray(REF)), REF)


# --- JPEG: within a tolerance --------------------------------------------------------------------------


def smooth(height=40, width=48):
  """uint8 [h, w, 3] gradients, which JPEG keeps within a few levels."""
  y, x = np.mgrid[:height, :width]
  return np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1) \
      .astype(np.uint8)


def test_cmyk_jpeg(tmp_path):
  Image.fromarray(smooth()).convert('CMYK').save(tmp_path / 'cmyk.jpg', quality=95)
  assert Image.open(tmp_path / 'cmyk.jpg').mode == 'CMYK'
  image = common.read_image(tmp_path / 'cmyk.jpg')
  assert image.shape == (40, 48, 3)
  assert np.abs(image.astype(int) - smooth()).mean() < 4


def test_exif_orientation_turns_jpeg_upright(tmp_path):
  path = with_orientation(Image.fromarray(smooth()), tmp_path / 'rotated.jpg', 6, quality=95)
  assert Image.open(path).size == (48, 40)  # Stored sideways: width 48, height 40.
  image = common.read_image(path)
  assert image.shape == (48, 40, 3)  # Orientation 6: shown turned 90 degrees clockwise.
  assert np.abs(image.astype(int) - np.rot90(smooth(), k=-1)).mean() < 4
  assert common.image_size(path) == (48, 40)


# --- Masks ---------------------------------------------------------------------------------------------


def test_masks_of_any_depth_and_orientation(tmp_path):
  mask = fixtures.binary(H, W)
  png16(tmp_path / 'mask16.png', mask.astype(np.uint16) * 65535)
  Image.fromarray(mask.astype(np.uint16)).save(tmp_path / 'mask16_one.tif')  # Values {0, 1}.
  Image.fromarray(mask.astype(np.float32) * 0.5, 'F').save(tmp_path / 'mask_float.tif')
  for name in ('mask16.png', 'mask16_one.tif', 'mask_float.tif'):
    np.testing.assert_array_equal(common.read_binary_mask(tmp_path / name), mask, err_msg=name)
  # Image and mask stored sideways with the same tag: both upright, still aligned.
  image_path = with_orientation(Image.fromarray(REF), tmp_path / 'image.png', 6)
  mask_path = with_orientation(Image.fromarray(mask.astype(np.uint8) * 255), tmp_path / 'mask.png', 6)
  np.testing.assert_array_equal(common.read_image(image_path), np.rot90(REF, k=-1))
  np.testing.assert_array_equal(common.read_binary_mask(mask_path), np.rot90(mask, k=-1))
  ids_path = with_orientation(Image.fromarray(GREY % 5), tmp_path / 'ids.png', 8)
  np.testing.assert_array_equal(common.read_label_map(ids_path), np.rot90(GREY % 5, k=1))


# --- Errors and lookup ---------------------------------------------------------------------------------


def test_errors_name_the_file(tmp_path):
  with pytest.raises(DataError, match=f'missing file: {tmp_path / "nope.png"}'):
    common.read_image(tmp_path / 'nope.png')
  (tmp_path / 'junk.png').write_bytes(b'not an image')
  with pytest.raises(DataError, match=f'cannot read image {tmp_path / "junk.png"}'):
    common.open_image(tmp_path / 'junk.png')


def test_find_file_matches_extensions_in_any_case(tmp_path):
  for name in ('IMD003.BMP', 'im0002.PPM.GZ', 'x.gif', 'x.Png', '.hidden.bmp'):
    (tmp_path / name).write_bytes(b'')
  assert common.find_file(tmp_path, 'IMD003', ('.bmp',)) == tmp_path / 'IMD003.BMP'
  assert common.find_file(tmp_path, 'im0002', ('.ppm', '.ppm.gz')) == tmp_path / 'im0002.PPM.GZ'
  assert common.find_file(tmp_path, 'x', ('.png', '.gif')) == tmp_path / 'x.Png'  # First extension.
  assert common.find_file(tmp_path, 'IMD00', ('.bmp',)) is None
  assert common.find_file(tmp_path / 'absent', 'x', ('.gif',)) is None
  assert common.files_with_suffix(tmp_path, ('.BMP', '.gif')) == [tmp_path / 'IMD003.BMP',
                                                                tmp_path / 'x.gif']
  assert common.list_names([str(i) for i in range(12)]) == '0, 1, 2, 3, 4, 5, 6, 7, 8, 9 and 2 more'


def test_a_mask_saved_as_jpeg_is_thresholded_and_its_ambiguous_pixels_counted(tmp_path):
  """Real annotators' masks come as JPEG: values smeared around 0 and 255 are not all foreground."""
  mask = np.zeros((64, 80), np.uint8)
  mask[10:40, 20:30] = 1  # A vessel-like bar.
  Image.fromarray(mask * 255).save(tmp_path / 'mask.jpg', quality=75)
  smeared = np.asarray(Image.open(tmp_path / 'mask.jpg'))
  assert ((smeared > 0) & (mask == 0)).sum() > 20  # What "non-zero = foreground" would add.
  got, _ = common.binary_mask(tmp_path / 'mask.jpg')
  np.testing.assert_array_equal(got, mask)
  grey = mask * 255
  grey[50:52, :5] = 128  # Ten pixels an annotator's tool left half-way.
  Image.fromarray(grey).save(tmp_path / 'grey.png')
  got, ambiguous = common.binary_mask(tmp_path / 'grey.png')
  assert ambiguous == 10 and got[50, 0] == 1 and got[10, 20] == 1 and got[0, 0] == 0
