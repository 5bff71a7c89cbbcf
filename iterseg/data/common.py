"""What every dataset shares: reading files with Pillow, the resize, the split, finding files.

Nothing here imports TensorFlow or tensorflow-datasets (cheap for tests and the synthetic data).
Conventions:
  * images are read as uint8 RGB `[h, w, 3]` from the file's real range (16-bit, float too);
  * images, masks and label maps are turned upright by their EXIF orientation, so they stay aligned;
  * binary masks are uint8 `{0, 1}` (`binary_mask`): above half their range in any channel, so a
    JPEG mask is thresholded, or non-zero for masks below it (palettes through their colours);
  * `.gz` files (STARE) are decompressed; extensions match in any case ('.BMP' is '.bmp');
  * every problem with the files is a `DataError` with one line that names the file(s).
"""

from __future__ import annotations

import contextlib
import gzip
import io
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import numpy as np
from PIL import Image
from PIL import ImageOps

from iterseg import files
from iterseg.errors import DataError  # noqa: F401  (every data module raises it from here)


class Case(NamedTuple):
  """An image file and its mask file; a None one makes the case incomplete (skipped). `list_cases`
  gives {name: Case}, each name '<dataset>/<image file name>' (e.g. 'DRIVE/21_training.tif'),
  unique within the dataset: the example's key and 'name' feature, and what the split sorts by."""

  image: Path | None
  mask: Path | None


_ORIENTATION = 0x0112  # The EXIF tag; 1 is upright, 5-8 swap width and height.


@contextlib.contextmanager
def _reading(path: Path):
  """DataError naming `path` when it is missing, or when reading it in the block fails."""
  if not Path(path).is_file():
    raise DataError(f'missing file: {path}')
  message = None
  try:
    yield
  except Image.DecompressionBombError:
    message = (f'it is above Pillow\'s limit against decompression bombs ({Image.MAX_IMAGE_PIXELS} '
               f'pixels; Pillow decodes a whole image at once). Convert it to a tiled pyramidal '
               f'TIFF, which resolution=native reads a tile at a time (e.g. `vips tiffsave {path} '
               f'out.tif --tile --pyramid --compression=jpeg --bigtiff`).')
  except (OSError, ValueError, EOFError, SyntaxError) as e:
    message = str(e)
  if message is not None:  # Raised here, not in the handler: the failed decode (its frames and
    raise DataError(f'cannot read image {path}: {message}')  # buffers) is let go at once.


def open_image(path: Path) -> Image.Image:
  """Opens and fully decodes `path` (gunzipped when it ends in .gz); DataError naming it if not."""
  path = Path(path)
  with _reading(path):
    gzipped = path.suffix.lower() == '.gz'
    data = gzip.decompress(path.read_bytes()) if gzipped else None
    image = Image.open(io.BytesIO(data) if gzipped else path)
    _check_declared(image, len(data) if gzipped else path.stat().st_size)
    image.load()  # Pillow decodes lazily: force it here so a truncated file fails with its name.
  return image


def _check_declared(image: Image.Image, size: int) -> None:
  """files.check_declared for a PNG (each row a filter byte and at least a bit a pixel, deflated at most
  1032:1; a 60-byte file can claim 65 M rows: 0.5 GB of row pointers), a JPEG (512 pixels a byte at
  most) or a TIFF (TIFF_RATIO), before Pillow allocates the image."""
  w, h = image.size
  if image.format == 'PNG':
    declared, ratio = h * (1 + -(-w // 8)), 1032
  elif image.format == 'JPEG':
    declared, ratio = w * h, 512
  elif image.format == 'TIFF':
    bits = sum(np.ravel(image.tag_v2.get(258, 8)).tolist()) if hasattr(image, 'tag_v2') else 8
    declared, ratio = w * h * bits // 8, files.TIFF_RATIO.get(int(image.tag_v2.get(259, 1)))
  else:
    return
  files.check_declared(declared, size, ratio, f'{w} x {h} pixels')


def orientation(image: Image.Image) -> int:
  """The image's EXIF orientation, 1 (upright) to 8; 1 when there is no (valid) tag."""
  try:
    value = image.getexif().get(_ORIENTATION, 1)
  except (OSError, ValueError, SyntaxError):  # Malformed EXIF: treat as upright.
    return 1
  return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright(image: Image.Image) -> Image.Image:
  """`image` turned by its EXIF orientation (`ImageOps.exif_transpose`); itself if upright."""
  return image if orientation(image) == 1 else ImageOps.exif_transpose(image)


def sample_max(image: Image.Image) -> int:
  """The largest value of the integer type the file stores `image`'s samples in: 255 for '1' and
  the 8-bit modes (Pillow reads 16-bit RGB(A) and grey+alpha PNGs as 8-bit, keeping the high byte);
  65535 for 'I;16*', and for 'I' (int32) from a PNG or PPM/PGM (16-bit grey; Pillow rescales a PGM's
  maxval to 65535); a TIFF's BitsPerSample range (2**bits - 1, or 2**(bits-1) - 1 if SampleFormat
  says signed); else 2**31 - 1. Needs the image as opened (a copy forgets its format)."""
  if image.mode.startswith('I;16'):
    return 65535
  if image.mode != 'I':
    return 255
  if image.format in ('PNG', 'PPM'):
    return 65535
  tags = getattr(image, 'tag_v2', None)
  if image.format == 'TIFF' and tags is not None and 258 in tags:
    # Tags 258: BitsPerSample, 339: SampleFormat (2 is signed).
    bits, signed = int(np.ravel(tags[258])[0]), int(np.ravel(tags.get(339, 1))[0]) == 2
    return 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
  return 2 ** 31 - 1


def _to_uint8(values: np.ndarray, top: float) -> np.ndarray:
  """uint8, same shape: `values` in [0, top] (clipped) mapped linearly to [0, 255], rounded."""
  values = np.clip(values.astype(np.float64), 0, top)
  return np.rint(values * (255.0 / top)).astype(np.uint8)


def to_uint8_rgb(image: Image.Image) -> np.ndarray:
  """uint8 [h, w, 3] RGB of an opened Pillow image, upright (EXIF orientation applied). Integers
  scale by the full range of their bit depth (`sample_max`: 16-bit v -> round(v / 65535 * 255));
  floats ('F'; NaN, infinities read as 0) by the range the peak suggests: [0, 1], [0, 255] or [0,
  peak]. Grey is repeated into 3 channels, '1' is {0, 255}, palettes are resolved, other modes
  converted by Pillow (ValueError if it cannot), alpha dropped (the colour as stored)."""
  top = sample_max(image)  # Before `upright`, whose copy forgets the file's format and tags.
  image = upright(image)
  if image.mode == 'F':
    values = np.nan_to_num(np.asarray(image, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    peak = float(values.max(initial=0.0))
    grey = _to_uint8(values, 1.0 if peak <= 1.0 else 255.0 if peak <= 255.0 else peak)
  elif top > 255:
    grey = _to_uint8(np.asarray(image), top)
  elif image.mode == 'RGB':
    return np.asarray(image, np.uint8)
  else:
    try:
      return np.asarray(image.convert('RGB'), np.uint8)
    except ValueError as e:
      raise ValueError(f'unsupported image mode {image.mode!r} ({e})') from e
  return np.repeat(grey[..., None], 3, axis=-1)


def header_size(path: Path) -> tuple[int, int]:
  """(height, width) of the image at `path` from its header (as stored: EXIF rotation aside);
  DataError naming the file if it cannot be opened or is above Pillow's decompression-bomb limit."""
  with _reading(path), Image.open(path) as image:
    width, height = image.size
  return height, width


def image_size(path: Path) -> tuple[int, int]:
  """(height, width) of the upright image at `path` (decodes it)."""
  image = open_image(path)
  width, height = image.size
  return (width, height) if orientation(image) in (5, 6, 7, 8) else (height, width)


def _decoded(path: Path, convert):
  """convert(the opened image at `path`), any decoding error a DataError naming the file."""
  image = open_image(path)
  with _reading(path):
    return convert(image)


def read_image(path: Path) -> np.ndarray:
  """uint8 [h, w, 3]: the upright RGB image at `path`, from its real range (`to_uint8_rgb`)."""
  return _decoded(path, to_uint8_rgb)


def read_binary_mask(path: Path) -> np.ndarray:
  """uint8 [h, w] in {0, 1}, upright: `binary_mask` of the file (palette colours resolved; any bit
  depth; float NaN is 0; alpha ignored)."""
  return binary_mask(path)[0]


def binary_mask(path: Path) -> tuple[np.ndarray, int]:
  """(uint8 [h, w] in {0, 1}, the number of ambiguous pixels): where the mask reaches above half of
  its range (255, or 65535 for larger values), 1 above that half, so that a mask saved as JPEG,
  its values smeared around 0 and 255, is thresholded rather than read as all foreground (ambiguous:
  between a quarter and three quarters of the range); a mask whose values stay below it ({0, 1},
  {0, 38}, floats in [0, 1]) is 1 wherever it is non-zero in any channel."""
  image = _decoded(path, upright)
  if image.mode in ('1', 'L', 'I', 'F') or image.mode.startswith('I;16'):
    values = np.nan_to_num(np.asarray(image, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
  elif image.mode in ('LA', 'PA', 'RGBA', 'RGBa', 'RGBX', 'P', 'RGB', 'CMYK', 'YCbCr', 'HSV',
                      'LAB'):
    # Palette indices are not values (index 0 may be white): look the colours up. Alpha is ignored.
    values = np.asarray(image.convert('RGB')).max(axis=-1)
  else:
    raise DataError(f'unsupported mask mode {image.mode!r}: {path}')
  top = 255.0 if values.max(initial=0) <= 255 else 65535.0
  if values.max(initial=0) <= top / 2:  # {0, 1}, {0, 38}, floats in [0, 1]: any non-zero value.
    return (values > 0).astype(np.uint8), 0
  ambiguous = int(np.count_nonzero((values > top / 4) & (values < 3 * top / 4)))
  return (values > top / 2).astype(np.uint8), ambiguous


def read_label_map(path: Path) -> np.ndarray:
  """int32 [h, w] class ids, upright, from a single-channel file (grey, or 'P' palette indices)."""
  image = _decoded(path, upright)
  if image.mode in ('RGB', 'RGBA'):
    rgb = np.asarray(image)[..., :3]
    if (rgb != rgb[..., :1]).any():
      raise DataError(f'label map must be single-channel (grey or palette ids), got colours: '
                      f'{path}')
    return rgb[..., 0].astype(np.int32)
  if image.mode in ('LA', 'PA'):
    image = image.getchannel(0)
  return np.asarray(image).astype(np.int32)


def _resize(array: np.ndarray, size, resample: Image.Resampling) -> np.ndarray:
  h, w = (size, size) if isinstance(size, int) else size
  if array.shape[:2] == (h, w):
    return array
  return np.asarray(Image.fromarray(array).resize((w, h), resample))


def resize_image(image: np.ndarray, size) -> np.ndarray:
  """uint8 [h, w, 3] for size (h, w), or [size, size, 3] for an int (the paper's square), with
  Pillow's bilinear filter, whose support widens when shrinking: a downscale averages like area."""
  return _resize(image, size, Image.Resampling.BILINEAR)


def resize_mask(mask: np.ndarray, size) -> np.ndarray:
  """uint8 [h, w] (or [size, size]): nearest neighbour, so class ids stay class ids."""
  return _resize(mask, size, Image.Resampling.NEAREST)


def make_example(image: np.ndarray, mask: np.ndarray, *, name: str, size: int | None,
                 scale: float = 1.0, image_path: Path | str = '',
                 mask_path: Path | str = '') -> dict:
  """The stored example: both arrays resized to size x size (or, size None, to their own size times
  `scale`, rounded, at least 1: aspect kept), plus the original (height, width)."""
  if image.shape[:2] != mask.shape[:2]:
    raise DataError(f'image/mask size mismatch: {image_path} is {image.shape[1]}x{image.shape[0]} '
                    f'but {mask_path} is {mask.shape[1]}x{mask.shape[0]} (width x height)')
  shape = (size, size) if size else tuple(max(1, round(n * scale)) for n in image.shape[:2])
  return {'image': resize_image(image, shape), 'mask': resize_mask(mask, shape),
          'original_size': np.asarray(image.shape[:2], np.int32), 'name': name}


def split_names(names: Iterable[str], *, seed: int, train_fraction: float) -> dict[str, list[str]]:
  """{'train': [...], 'test': [...]}, each sorted: the first round(n * train_fraction) (at least 1,
  at most n - 1) of the sorted names permuted by `np.random.default_rng(seed).permutation` go to
  train. So the split depends only on the set of names, the seed and the fraction."""
  names = sorted(names)
  if len(set(names)) != len(names):
    duplicates = sorted({n for n in names if names.count(n) > 1})
    raise DataError(f'duplicate case names: {duplicates[:5]}')
  if len(names) < 2:
    raise DataError(f'need at least 2 cases for a train/test split, found {len(names)}: {names}')
  if not 0.0 < train_fraction < 1.0:
    raise ValueError(f'train_fraction must be in (0, 1), got {train_fraction}')
  order = np.random.default_rng(seed).permutation(len(names))
  num_train = min(max(round(len(names) * train_fraction), 1), len(names) - 1)
  return {'train': sorted(names[i] for i in order[:num_train]),
          'test': sorted(names[i] for i in order[num_train:])}


def strip_suffixes(name: str) -> str:
  """'im0001.ah.ppm.gz' -> 'im0001.ah'; 'IMD003.bmp' -> 'IMD003' (drops .gz, then one extension)."""
  return Path(name[:-3] if name.lower().endswith('.gz') else name).stem


def find_file(folder: Path, stem: str, extensions: Sequence[str]) -> Path | None:
  """`folder/<stem><ext>` for the first of `extensions` present, in any case ('IMD003' + '.bmp'
  finds 'IMD003.BMP'; an exact spelling wins); None if none is, or no folder."""
  if not folder.is_dir():
    return None
  files = sorted(p for p in folder.iterdir() if p.name.startswith(stem) and p.is_file())
  for ext in extensions:
    matches = [p for p in files if p.name[len(stem):].lower() == ext.lower()]
    if matches:  # The exact spelling, else the first in sorted order.
      return min(matches, key=lambda p: p.name != f'{stem}{ext}')
  return None


def files_with_suffix(folder: Path, suffixes: Sequence[str]) -> list[Path]:
  """Sorted files in `folder` whose name ends with one of `suffixes` ('.ppm.gz'), in any case,
  hidden files ('.DS_Store', '._x.jpg') left out."""
  suffixes = tuple(s.lower() for s in suffixes)
  return sorted(p for p in folder.iterdir()
                if p.name.lower().endswith(suffixes) and not p.name.startswith('.') and p.is_file())


def list_names(names: Iterable[str], limit: int = 10) -> str:
  """'a, b, c', or the first `limit` names and 'and N more'."""
  names = list(names)
  shown = ', '.join(names[:limit])
  return f'{shown} and {len(names) - limit} more' if len(names) > limit else shown
