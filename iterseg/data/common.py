"""What every dataset shares: the error type, reading files with Pillow, the resize and the split.

Nothing here imports TensorFlow or tensorflow-datasets, so tests and the synthetic generator can use it
cheaply.

Conventions:
  * images are read as uint8 RGB `[h, w, 3]` whatever the file holds (grey, palette, RGBA, 1-bit);
  * binary masks are uint8 `{0, 1}`: a pixel is foreground when it is non-zero in any channel (1-bit BMP,
    24-bit RGB {0, 255}, GIF {0, 255}, grey PPM all work; palette files are mapped through their palette);
  * a `.gz` suffix (STARE) is decompressed before Pillow sees the bytes;
  * every problem with the files is a `DataError` with one line that names the file(s).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

class DataError(ValueError):
  """A dataset's files are missing, unreadable or inconsistent (the message names the path)."""


@dataclasses.dataclass(frozen=True)
class Case:
  """One image file and its ground-truth mask file, before any decoding.

  A dataset's `find_cases` returns {name: Case}; the name, '<dataset>/<image file name>' (e.g.
  'DRIVE/21_training.tif'), is unique within the dataset, is the example's key and 'name' feature, and
  is what the split sorts by.
  """

  image: Path
  mask: Path


# --- Reading ------------------------------------------------------------------------------------------


def _open(path: Path) -> Image.Image:
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


def image_size(path: Path) -> tuple[int, int]:
  """(height, width) of the image at `path` (decodes it)."""
  width, height = _open(path).size
  return height, width


def read_image(path: Path) -> np.ndarray:
  """uint8 [h, w, 3]: any Pillow-readable file, converted to RGB (grey, palette and RGBA included)."""
  image = _open(path)
  if image.mode != 'RGB':
    image = image.convert('RGB')
  return np.asarray(image, dtype=np.uint8)


def read_binary_mask(path: Path) -> np.ndarray:
  """uint8 [h, w] in {0, 1}: 1 where the file is non-zero in any channel (palette colours resolved)."""
  image = _open(path)
  if image.mode in ('1', 'L', 'I', 'I;16', 'I;16B', 'I;16L', 'F'):
    values = np.asarray(image)
    return (values != 0).astype(np.uint8)
  if image.mode in ('LA', 'PA', 'RGBA', 'P', 'RGB', 'CMYK', 'YCbCr', 'HSV', 'LAB'):
    # Palette indices are not values (index 0 may be white): look the colours up. Alpha is ignored.
    rgb = np.asarray(image.convert('RGB'))
    return rgb.any(axis=-1).astype(np.uint8)
  raise DataError(f'unsupported mask mode {image.mode!r}: {path}')


def read_label_map(path: Path) -> np.ndarray:
  """int32 [h, w] class ids from a single-channel file (grey values, or palette indices for 'P' files)."""
  image = _open(path)
  if image.mode in ('RGB', 'RGBA'):
    rgb = np.asarray(image)[..., :3]
    if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()):
      raise DataError(f'label map must be single-channel (grey or palette ids), got colours: {path}')
    return rgb[..., 0].astype(np.int32)
  if image.mode in ('LA', 'PA'):
    image = image.getchannel(0)
  return np.asarray(image).astype(np.int32)


# --- Resize -------------------------------------------------------------------------------------------


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [size, size, 3]: a square resize (aspect not kept, as in the paper) with Pillow's bilinear
  filter, which widens its support when shrinking, so a downscale averages like an area filter."""
  if image.shape[:2] == (size, size):
    return image
  return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
  """uint8 [size, size]: nearest neighbour, so class ids stay class ids."""
  if mask.shape == (size, size):
    return mask
  return np.asarray(Image.fromarray(mask).resize((size, size), Image.Resampling.NEAREST))


def make_example(image: np.ndarray, mask: np.ndarray, *, name: str, size: int,
                 image_path: Path | str = '', mask_path: Path | str = '') -> dict:
  """The stored example: both arrays resized to size x size, plus the original (height, width)."""
  if image.shape[:2] != mask.shape[:2]:
    raise DataError(f'image/mask size mismatch: {image_path} is {image.shape[1]}x{image.shape[0]} but '
                    f'{mask_path} is {mask.shape[1]}x{mask.shape[0]} (width x height)')
  return {
      'image': resize_image(image, size),
      'mask': resize_mask(mask, size),
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


def first_existing(paths: Sequence[Path]) -> Path | None:
  """The first of `paths` that exists, else None."""
  for path in paths:
    if path.exists():
      return path
  return None


def strip_suffixes(name: str) -> str:
  """'im0001.ah.ppm.gz' -> 'im0001.ah'; 'IMD003.bmp' -> 'IMD003' (drops .gz, then one extension)."""
  path = Path(name)
  if path.suffix.lower() == '.gz':
    path = Path(path.stem)
  return path.stem
