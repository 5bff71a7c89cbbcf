"""KITTI semantic segmentation, binary "vehicle" masks (paper Table 1: 200 images, avg 375x1271,
hi_size 512, 6.6 % foreground).

Unpack data_semantics.zip from the KITTI semantic segmentation benchmark (`Kitti.HOMEPAGES`);
manual_dir may hold `KITTI/data_semantics/` or `data_semantics/`, or be `data_semantics/` itself:

  data_semantics/training/image_2/NNNNNN_10.png    RGB, ~1242x375 (sizes vary between sequences)
  data_semantics/training/semantic/NNNNNN_10.png   8-bit Cityscapes label ids

The mask is 1 where the label id is in config.data.kitti_label_ids (default 26-31: car, truck,
bus, caravan, trailer, train), a set the config name holds (e.g. '..._ids26-27-28-29-30-31').
`testing/` has no labels and is not used. Extensions match in any case. A frame without its label
(or a label without its frame) is skipped; a missing `semantic/` folder is a DataError.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from iterseg.data import common
from iterseg.data.builder import SegmentationBuilder, SegmentationConfig
from iterseg.data.common import Case


@dataclasses.dataclass(eq=False)
class KittiConfig(SegmentationConfig):
  label_ids: tuple[int, ...] = (26, 27, 28, 29, 30, 31)


class Kitti(SegmentationBuilder, skip_registration=True):
  """KITTI `data_semantics/training`: 200 frames named 'KITTI/NNNNNN_10.png'."""

  name = 'kitti'
  BUILDER_CONFIG_CLASS = KittiConfig
  HOMEPAGES = ('https://www.cvlibs.net/datasets/kitti',
               'https://www.cvlibs.net/datasets/kitti/eval_semseg.php?benchmark=semantics2015')
  LAYOUT = 'data_semantics/training/{image_2,semantic}/ (the unpacked data_semantics.zip)'
  DESCRIPTION = 'KITTI semantic segmentation (training frames), binary vehicle masks.'

  @classmethod
  def extra_config(cls, spec):
    ids = tuple(sorted(set(spec.kitti_label_ids)))
    return {'label_ids': ids}, '_ids' + '-'.join(str(i) for i in ids)

  def training_folder(self) -> Path:
    root = self.manual_root()
    for folder in (root / 'KITTI/data_semantics/training', root / 'data_semantics/training',
                   root / 'training'):
      if (folder / 'image_2').is_dir():
        return folder
    raise self.missing(root / 'data_semantics/training/image_2', 'KITTI training images')

  def list_cases(self) -> dict[str, Case]:
    folder = self.training_folder()
    labels = folder / 'semantic'
    if not labels.is_dir():
      raise self.missing(labels, 'KITTI semantic label folder')
    images = common.files_with_suffix(folder / 'image_2', ('.png',))
    cases = {f'KITTI/{image.name}': Case(image, common.find_file(labels, image.stem, ('.png',)))
             for image in images}  # mask None: skipped.
    stems = {image.stem for image in images}
    for mask in common.files_with_suffix(labels, ('.png',)):
      if mask.stem not in stems:  # Labels without their frame: skipped.
        cases[f'KITTI/{mask.name}'] = Case(image=None, mask=mask)
    return cases

  def read_mask(self, path: Path) -> np.ndarray:
    return np.isin(common.read_label_map(path), self.builder_config.label_ids).astype(np.uint8)


Builder = Kitti  # What iterseg.data.make_builder builds for config.data.name='kitti'.
