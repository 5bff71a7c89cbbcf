"""Your own data: `manual_dir/images/` and `manual_dir/masks/` with matching file stems.

  images/case_a.jpg   masks/case_a.png
  images/case_b.tif   masks/case_b.gif

Any format Pillow reads (or a `.gz` of one), extensions in any case ('.PNG'); other files (notes,
`.DS_Store`) are ignored. An image without a mask of the same stem, or a mask without its image, is
skipped. With config.num_classes == 1 a mask pixel is 1 where any channel is above half its range
(`common.binary_mask`: a JPEG mask is thresholded, its ambiguous pixels counted); with
more classes the mask must be single-channel (grey values or palette indices) holding ids in
[0, num_classes).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image

from iterseg.data import common
from iterseg.data.builder import SegmentationBuilder, SegmentationConfig
from iterseg.data.common import Case, DataError


@dataclasses.dataclass(eq=False)
class FolderConfig(SegmentationConfig):
  num_classes: int = 1


def _image_files(folder: Path) -> dict[str, Path]:
  """{stem: path} of the files in `folder` Pillow can read by extension (DataError on a clash)."""
  extensions = set(Image.registered_extensions())
  files = {}
  for path in sorted(folder.iterdir()):
    suffix = Path(path.name.lower().removesuffix('.gz')).suffix
    if not path.is_file() or path.name.startswith('.') or suffix not in extensions:
      continue
    stem = common.strip_suffixes(path.name)
    if stem in files:
      raise DataError(f'folder: two files with stem {stem!r}: {files[stem]} and {path}')
    files[stem] = path
  return files


class Folder(SegmentationBuilder, skip_registration=True):
  """A user's `images/` + `masks/` folder; examples named by image file name."""

  name = 'folder'
  BUILDER_CONFIG_CLASS = FolderConfig
  LAYOUT = 'images/ and masks/ with matching file stems'
  DESCRIPTION = 'A folder of images and masks with matching file stems.'

  @classmethod
  def extra_config(cls, spec):
    classes = spec.num_classes
    return {'num_classes': classes}, (f'_classes{classes}' if classes > 1 else '')

  def download_hint(self) -> str:
    return f'expected layout: {self.LAYOUT}'

  def list_cases(self) -> dict[str, Case]:
    root = self.manual_root()
    for folder in (root / 'images', root / 'masks'):
      if not folder.is_dir():
        raise self.missing(folder, 'folder')
    images, masks = _image_files(root / 'images'), _image_files(root / 'masks')
    if not images:
      raise DataError(f'folder: no images found in {root / "images"}')
    # An image without its mask, or a mask without its image: a None, skipped by find_cases.
    return {(images.get(s) or masks[s]).name: Case(image=images.get(s), mask=masks.get(s))
            for s in sorted(images.keys() | masks.keys())}

  def read_mask(self, path: Path) -> np.ndarray:
    num_classes = self.builder_config.num_classes
    if num_classes == 1:
      return super().read_mask(path)
    ids = common.read_label_map(path)
    if ids.min() < 0 or ids.max() >= num_classes:
      raise DataError(f'folder: mask {path} holds ids {np.unique(ids)[:8].tolist()}, '
                      f'outside [0, {num_classes})')
    return ids.astype(np.uint8)


Builder = Folder  # What iterseg.data.make_builder builds for config.data.name='folder'.
