"""PH2 dermoscopy (paper Table 1: 200 images, avg 575x766, hi_size 768, 31.4 % foreground).

The unpacked PH2 database (`Ph2.HOMEPAGES`); manual_dir may be the folder holding `PH2Dataset/`,
`PH2Dataset/` itself, or `PH2 Dataset images/` itself:

  PH2Dataset/PH2 Dataset images/IMDxxx/IMDxxx_Dermoscopic_Image/IMDxxx.bmp   24-bit RGB, ~765x574
  PH2Dataset/PH2 Dataset images/IMDxxx/IMDxxx_lesion/IMDxxx_lesion.bmp       1-bit BMP (one: RGB)
  PH2Dataset/PH2 Dataset images/IMDxxx/IMDxxx_roi/...                        colour classes (unused)

A case is a folder named `IMD` + digits; anything else there (Readme, spreadsheets, stray files) is
ignored. The mask is the lesion: any non-zero pixel is 1. Extensions match in any case ('.BMP'). A
case missing its lesion mask (or image) is skipped.
"""

from __future__ import annotations

import re
from pathlib import Path

from iterseg.data import common
from iterseg.data.builder import SegmentationBuilder
from iterseg.data.common import Case

_CASE = re.compile(r'IMD\d+')
_IMAGES = 'PH2 Dataset images'


class Ph2(SegmentationBuilder, skip_registration=True):
  """PH2: one example per IMDxxx case, named 'PH2/IMDxxx.bmp'."""

  name = 'ph2'
  HOMEPAGES = ('https://www.fc.up.pt/addi/ph2%20database.html',)
  LAYOUT = f'PH2Dataset/{_IMAGES}/IMDxxx/ (the unpacked PH2 archive)'
  DESCRIPTION = 'PH2 dermoscopic images with lesion masks.'

  def images_folder(self) -> Path:
    root = self.manual_root()
    for folder in (root / 'PH2Dataset' / _IMAGES, root / _IMAGES, root):
      if folder.is_dir() and any(_CASE.fullmatch(p.name) for p in folder.iterdir() if p.is_dir()):
        return folder
    raise self.missing(root / 'PH2Dataset' / _IMAGES, 'PH2 case folders IMDxxx/')

  def list_cases(self) -> dict[str, Case]:
    cases = {}
    for folder in sorted(self.images_folder().iterdir()):
      if not (folder.is_dir() and _CASE.fullmatch(folder.name)):
        continue  # Not a case: Readme, spreadsheet, thumbnails...
      case_id = folder.name
      image = common.find_file(folder / f'{case_id}_Dermoscopic_Image', case_id, ('.bmp',))
      mask = common.find_file(folder / f'{case_id}_lesion', f'{case_id}_lesion', ('.bmp',))
      cases[f'PH2/{image.name if image else case_id + ".bmp"}'] = Case(image=image, mask=mask)
    return cases


Builder = Ph2  # What iterseg.data.make_builder builds for config.data.name='ph2'.
