"""RETINA: fundus images with vessel masks from DRIVE, STARE and CHASE_DB1 (paper Table 1: 66
images, avg 745x782, hi_size 768, 7.3 % foreground).

manual_dir holds whichever of these unpacked archives you have (`SUBSET_HOMEPAGES`; STARE: its
stare-images.tar and labels-ah.tar), at least one:

  DRIVE/training/images/NN_training.tif       DRIVE/training/1st_manual/NN_manual1.gif
  DRIVE/test/images/NN_test.tif               DRIVE/test/1st_manual/NN_manual1.gif
  STARE/stare-images/imNNNN.ppm[.gz]          STARE/labels-ah/imNNNN.ah.ppm[.gz]
  CHASE_DB1/Image_NNX.jpg                     CHASE_DB1/Image_NNX_1stHO.png

The first observer's annotation is the mask (DRIVE `1st_manual`, STARE Hoover `labels-ah`, CHASE_DB1
`_1stHO`), any non-zero pixel = vessel. A DRIVE `test/` without `1st_manual/` (the grand-challenge
release keeps the test labels back) is skipped with a warning. STARE cases are those with a label
(the full set has 400 unlabelled images). Names record the source: 'DRIVE/21_training.tif',
'STARE/im0002.ppm.gz', 'CHASE_DB1/Image_01L.jpg'. Extensions match in any case ('.TIF'). A DRIVE or
CHASE_DB1 image without its annotation, or a STARE or CHASE_DB1 annotation without its image, is
skipped; a missing annotation folder (DRIVE training `1st_manual/`, STARE `labels-ah/`) is an error.
"""

from __future__ import annotations

from pathlib import Path

from absl import logging

from iterseg.data import common
from iterseg.data.builder import SegmentationBuilder
from iterseg.data.common import Case, DataError

SUBSET_HOMEPAGES = {
    'CHASE_DB1': 'https://blogs.kingston.ac.uk/retinal/chasedb1',
    'STARE': 'https://cecas.clemson.edu/~ahoover/stare',
    'DRIVE': 'https://drive.grand-challenge.org',
}


class Retina(SegmentationBuilder, skip_registration=True):
  """DRIVE + STARE + CHASE_DB1, whichever are present in manual_dir."""

  name = 'retina'
  HOMEPAGES = tuple(SUBSET_HOMEPAGES.values())
  LAYOUT = 'DRIVE/, STARE/ and/or CHASE_DB1/ (the unpacked archives)'
  DESCRIPTION = 'Retinal fundus images with vessel masks: DRIVE, STARE and CHASE_DB1.'

  def list_cases(self) -> dict[str, Case]:
    root = self.manual_root()
    readers = {'DRIVE': self._drive, 'STARE': self._stare, 'CHASE_DB1': self._chase}
    present = [s for s in readers if (root / s).is_dir()]
    if not present:
      raise DataError(f'retina: none of {", ".join(str(root / s) for s in readers)} exists '
                      f'({self.download_hint()})')
    cases = {}
    for subset in present:
      found = readers[subset](root / subset)
      if not found:
        raise DataError(f'retina: no images found in {root / subset} (download {subset} from '
                        f'{SUBSET_HOMEPAGES[subset]})')
      cases.update(found)
    return cases

  def _drive(self, folder: Path) -> dict[str, Case]:
    if not any((folder / split / 'images').is_dir() for split in ('training', 'test')):
      raise self.missing(folder / 'training' / 'images', 'DRIVE images folder')
    cases = {}
    for split in ('training', 'test'):
      images, manuals = folder / split / 'images', folder / split / '1st_manual'
      if not images.is_dir():
        continue
      if not manuals.is_dir():
        if split == 'test':
          logging.warning('retina: %s has no 1st_manual/ (test labels not released): DRIVE test '
                          'images skipped.', folder / split)
          continue
        raise self.missing(manuals, 'DRIVE vessel annotations')
      for image in common.files_with_suffix(images, ('.tif', '.tiff')):
        number = image.name.split('_')[0]  # '21_training.tif' -> '21'
        mask = common.find_file(manuals, f'{number}_manual1', ('.gif', '.png', '.tif'))
        cases[f'DRIVE/{image.name}'] = Case(image=image, mask=mask)  # mask None: skipped.
    return cases

  def _stare(self, folder: Path) -> dict[str, Case]:
    images, labels = folder / 'stare-images', folder / 'labels-ah'
    for path in (images, labels):
      if not path.is_dir():
        raise self.missing(path, 'STARE folder')
    cases = {}
    for label in common.files_with_suffix(labels, ('.ppm', '.ppm.gz')):  # 'im0002.ah.ppm[.gz]'
      stem = common.strip_suffixes(label.name).split('.')[0]  # 'im0002'
      image = common.find_file(images, stem, ('.ppm', '.ppm.gz'))  # None: skipped.
      name = f'STARE/{image.name if image else stem + ".ppm"}'
      cases.setdefault(name, Case(image=image, mask=label))  # .ppm before .ppm.gz.
    return cases

  def _chase(self, folder: Path) -> dict[str, Case]:
    cases = {}
    images = common.files_with_suffix(folder, ('.jpg',))
    for image in images:
      mask = common.find_file(folder, f'{image.stem}_1stHO', ('.png',))  # None: skipped.
      cases[f'CHASE_DB1/{image.name}'] = Case(image=image, mask=mask)
    stems = {image.stem for image in images}
    for mask in common.files_with_suffix(folder, ('_1stHO.png',)):
      stem = mask.name[:-len('_1stHO.png')]
      if stem not in stems:  # An annotation without its image: skipped.
        cases[f'CHASE_DB1/{stem}.jpg'] = Case(image=None, mask=mask)
    return cases


Builder = Retina  # What iterseg.data.make_builder builds for config.data.name='retina'.
