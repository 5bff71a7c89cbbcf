"""What every dataset shares: the error type, reading files with Pillow, the resize and the split.

Nothing here imports TensorFlow or tensorflow-datasets, so tests and the synthetic generator can use it
cheaply.

Conventions:
  * images are read as uint8 RGB `[h, w, 3]` whatever the file holds, scaled from the file's real range
    (16-bit, 32-bit and float files included; see `to_uint8_rgb`);
  * images, masks and label maps are turned upright by their EXIF orientation tag, so they stay aligned;
  * binary masks are uint8 `{0, 1}`: a pixel is foreground when it is non-zero in any channel (1-bit BMP,
    24-bit RGB {0, 255}, GIF {0, 255}, grey PPM, 16-bit and float files all work; palette files are
    mapped through their palette);
  * a `.gz` suffix (STARE) is decompressed before Pillow sees the bytes;
  * file extensions match case-insensitively (`find_file`, `files_with_suffix`): '.BMP' is '.bmp';
  * a case missing its mask (or a mask missing its image) is skipped with one warning, by the builder
    (`complete_cases` says which);
  * every problem with the files is a `DataError` with one line that names the file(s).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from PIL import Image
from PIL import ImageOps

from iterseg.errors import DataError  # noqa: F401  (every data module raises it from here)


@dataclasses.dataclass(frozen=True)
class Case:
  """One image file and its ground-truth mask file, before any decoding.

  A dataset's `list_cases` returns {name: Case}, incomplete cases included, and the builder's
  `find_cases` keeps the complete ones (`complete_cases`). The name, '<dataset>/<image file name>' (e.g.
  'DRIVE/21_training.tif'), is unique within the dataset, is the example's key and 'name' feature, and
  is what the split sorts by.
  """

  image: Path | None  # None: a mask without its image (the builder skips the case with a warning).
  mask: Path | None  # None: an image without its mask (likewise skipped).


# --- Reading ------------------------------------------------------------------------------------------

_ORIENTATION = 0x0112  # The EXIF tag; 1 is upright, 5-8 swap width and height.


def open_image(path: Path) -> Image.Image:
  """Opens and fully decodes `path` (gzip-compressed when it ends in .gz); DataError naming it if not."""
  path = Path(path)
  if not path.is_file():
    raise DataError(f'missing file: {path}')
  try:
    if path.suffix.lower() == '.gz':
      image = Image.open(io.BytesIO(gzip.decompress(path.read_bytes())))
    else:
      image = Image.open(path)
    image.load()  # Pillow decodes lazily: force it here so a truncated file fails with its name.
    return image
  except (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError) as e:
    raise DataError(f'cannot read image {path}: {e}') from e


def orientation(image: Image.Image) -> int:
  """The image's EXIF orientation, 1 (upright) to 8; 1 when there is no (valid) tag."""
  try:
    value = image.getexif().get(_ORIENTATION, 1)
  except (OSError, ValueError, SyntaxError):  # Malformed EXIF: treat as upright.
    return 1
  return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright(image: Image.Image) -> Image.Image:
  """`image` turned by its EXIF orientation (`ImageOps.exif_transpose`); itself when already upright."""
  return image if orientation(image) == 1 else ImageOps.exif_transpose(image)


def sample_max(image: Image.Image) -> int:
  """The largest value of the integer type the file stores `image`'s samples in (full range).

  '1' and the 8-bit modes ('L', 'P', 'RGB', 'RGBA', 'LA', 'CMYK', 'YCbCr', ...): 255 (Pillow reads
  16-bit RGB(A) and grey+alpha PNGs as 8-bit modes, keeping the high byte). 'I;16*': 65535. 'I' (Pillow's
  int32 mode): 65535 when the file is a PNG or PPM/PGM (16-bit grey: PNG has no deeper samples and Pillow
  rescales a PGM's maxval to 65535), the TIFF's own BitsPerSample (2**bits - 1, or 2**(bits-1) - 1 when
  SampleFormat says signed), else 2**31 - 1. Needs the image as opened (a copy forgets its format).
  """
  if image.mode.startswith('I;16'):
    return 65535
  if image.mode != 'I':
    return 255
  if image.format in ('PNG', 'PPM'):
    return 65535
  tags = getattr(image, 'tag_v2', None)
  if image.format == 'TIFF' and tags is not None and 258 in tags:  # 258 BitsPerSample, 339 SampleFormat.
    bits, signed = int(np.ravel(tags[258])[0]), int(np.ravel(tags.get(339, 1))[0]) == 2
    return 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
  return 2 ** 31 - 1


def scale_integers(values: np.ndarray, top: int) -> np.ndarray:
  """uint8, same shape: `values` in [0, top] (clipped) mapped linearly to [0, 255], rounded."""
  values = np.clip(values.astype(np.float64), 0, top)
  return np.rint(values * (255.0 / top)).astype(np.uint8)


def scale_floats(values: np.ndarray) -> np.ndarray:
  """uint8, same shape, from a float image (NaN and infinities read as 0, negatives clipped to 0).

  The range is guessed from the peak: at most 1 -> [0, 1] (x255); at most 255 -> [0, 255] (as is);
  above 255 -> [0, peak] (stretched so the peak is 255).
  """
  values = np.where(np.isfinite(values), values, 0.0).astype(np.float64)
  peak = float(values.max(initial=0.0))
  scale = 255.0 if peak <= 1.0 else 1.0 if peak <= 255.0 else 255.0 / peak
  return np.rint(np.clip(values * scale, 0.0, 255.0)).astype(np.uint8)


def to_uint8_rgb(image: Image.Image) -> np.ndarray:
  """uint8 [h, w, 3] RGB of an opened Pillow image, upright (EXIF orientation applied).

  Integer samples scale by the full range of their bit depth (`sample_max`: 16-bit v -> round(v / 65535
  * 255)); float ('F') samples by `scale_floats` ([0, 1] -> x255). Grey is repeated into the 3 channels,
  '1' is {0, 255}, palettes are resolved through the palette, CMYK/YCbCr/LAB/HSV are converted by Pillow,
  and alpha is dropped (the colour as stored, not composited). ValueError for a mode Pillow cannot turn
  into RGB.
  """
  top = sample_max(image)  # Before `upright`, whose copy forgets the file's format and tags.
  image = upright(image)
  if image.mode == 'F':
    grey = scale_floats(np.asarray(image))
  elif top > 255:
    grey = scale_integers(np.asarray(image), top)
  elif image.mode == 'RGB':
    return np.asarray(image, np.uint8)
  else:
    try:
      return np.asarray(image.convert('RGB'), np.uint8)
    except ValueError as e:
      raise ValueError(f'unsupported image mode {image.mode!r} ({e})') from e
  return np.repeat(grey[..., None], 3, axis=-1)


def header_size(path: Path) -> tuple[int, int]:
  """(height, width) of the image at `path` from its header, nothing decoded (as stored: EXIF
  rotation aside); DataError naming the file if it cannot be opened (or is above Pillow's
  decompression-bomb limit)."""
  path = Path(path)
  if not path.is_file():
    raise DataError(f'missing file: {path}')
  try:
    with Image.open(path) as image:
      width, height = image.size
  except (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError) as e:
    raise DataError(f'cannot read image {path}: {e}') from e
  return height, width


def image_size(path: Path) -> tuple[int, int]:
  """(height, width) of the upright image at `path` (decodes it)."""
  image = open_image(path)
  width, height = image.size
  return (width, height) if orientation(image) in (5, 6, 7, 8) else (height, width)


def _decoded(path: Path, convert):
  """convert(the opened image at `path`), any decoding error a DataError naming the file."""
  image = open_image(path)
  try:
    return convert(image)
  except (OSError, ValueError, SyntaxError) as e:
    raise DataError(f'cannot read image {path}: {e}') from e


def read_image(path: Path) -> np.ndarray:
  """uint8 [h, w, 3]: the upright RGB image at `path`, scaled from its real range (see `to_uint8_rgb`)."""
  return _decoded(path, to_uint8_rgb)


def _open_upright(path: Path) -> Image.Image:
  return _decoded(path, upright)


def read_binary_mask(path: Path) -> np.ndarray:
  """uint8 [h, w] in {0, 1}, upright: 1 where the file is non-zero in any channel (palette colours
  resolved; any bit depth; float NaN is 0; alpha ignored)."""
  image = _open_upright(path)
  if image.mode in ('1', 'L', 'I', 'F') or image.mode.startswith('I;16'):
    values = np.asarray(image)
    if image.mode == 'F':
      values = np.where(np.isfinite(values), values, 0)
    return (values != 0).astype(np.uint8)
  if image.mode in ('LA', 'PA', 'RGBA', 'RGBa', 'RGBX', 'P', 'RGB', 'CMYK', 'YCbCr', 'HSV', 'LAB'):
    # Palette indices are not values (index 0 may be white): look the colours up. Alpha is ignored.
    rgb = np.asarray(image.convert('RGB'))
    return rgb.any(axis=-1).astype(np.uint8)
  raise DataError(f'unsupported mask mode {image.mode!r}: {path}')


def read_label_map(path: Path) -> np.ndarray:
  """int32 [h, w] class ids, upright, from a single-channel file (grey values, or palette indices for
  'P' files)."""
  image = _open_upright(path)
  if image.mode in ('RGB', 'RGBA'):
    rgb = np.asarray(image)[..., :3]
    if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()):
      raise DataError(f'label map must be single-channel (grey or palette ids), got colours: {path}')
    return rgb[..., 0].astype(np.int32)
  if image.mode in ('LA', 'PA'):
    image = image.getchannel(0)
  return np.asarray(image).astype(np.int32)


# --- Resize -------------------------------------------------------------------------------------------


def resize_image(image: np.ndarray, size) -> np.ndarray:
  """uint8 [h, w, 3] for size (h, w), or [size, size, 3] for an int (the paper's square, aspect not
  kept), with Pillow's bilinear filter, which widens its support when shrinking, so a downscale
  averages like an area filter."""
  h, w = (size, size) if isinstance(size, int) else size
  if image.shape[:2] == (h, w):
    return image
  return np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))


def resize_mask(mask: np.ndarray, size) -> np.ndarray:
  """uint8 [h, w] (or [size, size]): nearest neighbour, so class ids stay class ids."""
  h, w = (size, size) if isinstance(size, int) else size
  if mask.shape == (h, w):
    return mask
  return np.asarray(Image.fromarray(mask).resize((w, h), Image.Resampling.NEAREST))


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
  """(height, width) times `scale`, rounded, at least 1 each: the aspect kept."""
  return max(1, round(height * scale)), max(1, round(width * scale))


def make_example(image: np.ndarray, mask: np.ndarray, *, name: str, size: int | None,
                 scale: float = 1.0, image_path: Path | str = '', mask_path: Path | str = '') -> dict:
  """The stored example: both arrays resized to size x size (or, size None, to their own size times
  `scale`, aspect kept), plus the original (height, width)."""
  if image.shape[:2] != mask.shape[:2]:
    raise DataError(f'image/mask size mismatch: {image_path} is {image.shape[1]}x{image.shape[0]} but '
                    f'{mask_path} is {mask.shape[1]}x{mask.shape[0]} (width x height)')
  shape = (size, size) if size else scaled_size(*image.shape[:2], scale)
  return {
      'image': resize_image(image, shape),
      'mask': resize_mask(mask, shape),
      'original_size': np.asarray(image.shape[:2], np.int32),
      'name': name,
  }


# --- Split --------------------------------------------------------------------------------------------


def split_names(names: Iterable[str], *, seed: int, train_fraction: float) -> dict[str, list[str]]:
  """{'train': [...], 'test': [...]}: a random split of the sorted names, reproducible from `seed`.

  The names are sorted, permuted with `np.random.default_rng(seed).permutation`, and the first
  round(n * train_fraction) (at least 1, at most n - 1) go to train. Each list is returned sorted.
  So the split depends only on the set of names, the seed and the fraction, never on file-system order.
  """
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
  return {
      'train': sorted(names[i] for i in order[:num_train]),
      'test': sorted(names[i] for i in order[num_train:]),
  }


# --- Finding files ------------------------------------------------------------------------------------


def strip_suffixes(name: str) -> str:
  """'im0001.ah.ppm.gz' -> 'im0001.ah'; 'IMD003.bmp' -> 'IMD003' (drops .gz, then one extension)."""
  path = Path(name)
  if path.suffix.lower() == '.gz':
    path = Path(path.stem)
  return path.stem


def find_file(folder: Path, stem: str, extensions: Sequence[str]) -> Path | None:
  """`folder/<stem><ext>` for the first of `extensions` present, the extension matched case-insensitively
  ('IMD003' + '.bmp' finds 'IMD003.BMP'; an exact spelling wins); None if none is, or no folder."""
  if not folder.is_dir():
    return None
  files = sorted(p for p in folder.iterdir() if p.name.startswith(stem) and p.is_file())
  for ext in extensions:
    exact = folder / f'{stem}{ext}'
    if exact in files:
      return exact
    for path in files:
      if path.name[len(stem):].lower() == ext.lower():
        return path
  return None


def files_with_suffix(folder: Path, suffixes: Sequence[str]) -> list[Path]:
  """Sorted files in `folder` whose name ends with one of `suffixes`, case-insensitively ('.ppm.gz'
  works); hidden files ('.DS_Store', '._x.jpg') are left out."""
  suffixes = tuple(s.lower() for s in suffixes)
  return sorted(p for p in folder.iterdir()
                if p.name.lower().endswith(suffixes) and not p.name.startswith('.') and p.is_file())


def complete_cases(cases: Mapping[str, Case]) -> tuple[dict[str, Case], dict[str, str]]:
  """(the cases that have both files, {name: 'no mask' | 'no image'} of the others)."""
  kept, skipped = {}, {}
  for name, case in cases.items():
    if case.mask is None:
      skipped[name] = 'no mask'
    elif case.image is None:
      skipped[name] = 'no image'
    else:
      kept[name] = case
  return kept, skipped


def list_names(names: Iterable[str], limit: int = 10) -> str:
  """'a, b, c', or the first `limit` names and 'and N more'."""
  names = list(names)
  shown = ', '.join(names[:limit])
  return f'{shown} and {len(names) - limit} more' if len(names) > limit else shown
