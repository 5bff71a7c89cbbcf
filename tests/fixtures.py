"""Tiny datasets written in the official archives' layouts (and file quirks), for the data tests.

Every image is 40 x 48 (height x width) unless said otherwise; every mask's foreground is its left
`FG_COLUMNS` columns, so the foreground fraction of each case is known: 12 / 48 = 25 %.
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
from PIL import Image

from iterseg import settings
from iterseg.configs import default

HEIGHT, WIDTH = 40, 48
FG_COLUMNS = 12
FG_PERCENT = 100.0 * FG_COLUMNS / WIDTH


def config(data_dir: Path, name: str, manual_dir: Path | str = '', hi_size: int = 32, **data):
  """The DataSpec of the default config for dataset `name` at hi_size, writing to data_dir; extra
  data.* fields."""
  c = default.get_config()
  c.hi_size = hi_size
  c.model.depth, c.num_patches, c.train.num_patches_list = 1, 2, (2,)  # Data only: any tiny net.
  c.data.name = name
  c.data.manual_dir = str(manual_dir)
  c.data.data_dir = str(data_dir)
  for key, value in data.items():
    c.data[key] = value
  return settings.from_config(c).data


def rgb(seed: int, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def binary(height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
  """bool [h, w]: the left FG_COLUMNS columns."""
  mask = np.zeros((height, width), bool)
  mask[:, :FG_COLUMNS] = True
  return mask


def save(image: Image.Image, path: Path, fmt: str | None = None, gz: bool = False) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  if gz:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    path.write_bytes(gzip.compress(buffer.getvalue()))
  else:
    image.save(path, format=fmt)
  return path


def upper_extensions(root: Path) -> Path:
  """Renames every file under root to upper-case extensions ('a.ah.ppm.gz' -> 'a.AH.PPM.GZ'), as some
  archives and Windows tools ship them."""
  for path in sorted(p for p in root.rglob('*') if p.is_file()):
    dot = path.name.find('.', 1)
    if dot > 0:
      path.rename(path.with_name(path.name[:dot] + path.name[dot:].upper()))
  return root


def write_ph2(root: Path, num_cases: int = 6, rgb_mask_case: int = 1) -> Path:
  """root/PH2Dataset/PH2 Dataset images/IMDxxx/...: 24-bit BMP images, 1-bit BMP lesion masks except
  case `rgb_mask_case` (24-bit RGB {0, 255}), plus the archive's non-case entries."""
  images = root / 'PH2Dataset' / 'PH2 Dataset images'
  for i in range(num_cases):
    case = f'IMD{i + 2:03d}'
    save(Image.fromarray(rgb(i)), images / case / f'{case}_Dermoscopic_Image' / f'{case}.bmp')
    mask = binary()
    if i == rgb_mask_case:
      lesion = Image.fromarray(np.repeat(mask[..., None] * np.uint8(255), 3, axis=-1), 'RGB')
    else:
      lesion = Image.fromarray(mask).convert('1')
    save(lesion, images / case / f'{case}_lesion' / f'{case}_lesion.bmp')
    roi = images / case / f'{case}_roi'  # Colour-class masks: present in the archive, unused.
    roi.mkdir()
    save(Image.fromarray(rgb(100 + i)), roi / f'{case}_R1_Label2.bmp')
  (root / 'PH2Dataset' / 'PH2_dataset.txt').write_text('|| Name || Histological Diagnosis ||\n')
  (images / 'Thumbs.db').write_bytes(b'\0' * 10)  # Stray entries that are not cases.
  (images / 'notes').mkdir()
  return root


def write_drive(root: Path, test_manual: bool = True) -> Path:
  """root/DRIVE/{training: 21, 22; test: 01}/images/NN_<split>.tif + 1st_manual/NN_manual1.gif + mask/."""
  for split, numbers in (('training', (21, 22)), ('test', (1,))):
    for n in numbers:
      folder = root / 'DRIVE' / split
      save(Image.fromarray(rgb(n)), folder / 'images' / f'{n:02d}_{split}.tif')
      fov = Image.fromarray(np.full((HEIGHT, WIDTH), 255, np.uint8))
      save(fov, folder / 'mask' / f'{n:02d}_{split}_mask.gif')
      if split == 'training' or test_manual:
        vessels = Image.fromarray(binary().astype(np.uint8) * 255)  # Saved as a palette GIF {0, 255}.
        save(vessels, folder / '1st_manual' / f'{n:02d}_manual1.gif')
  return root


def write_stare(root: Path) -> Path:
  """root/STARE/stare-images/im0001.ppm.gz + labels-ah/im0001.ah.ppm.gz (gzipped) and im0002 (plain)."""
  for n, gz in ((1, True), (2, False)):
    suffix = '.ppm.gz' if gz else '.ppm'
    save(Image.fromarray(rgb(30 + n)), root / 'STARE' / 'stare-images' / f'im{n:04d}{suffix}', 'PPM', gz)
    label = Image.fromarray(binary().astype(np.uint8) * 255)  # Grey {0, 255}.
    save(label, root / 'STARE' / 'labels-ah' / f'im{n:04d}.ah{suffix}', 'PPM', gz)
  return root


def write_chase(root: Path) -> Path:
  """root/CHASE_DB1/Image_01L.jpg + Image_01L_1stHO.png + Image_01L_2ndHO.png."""
  folder = root / 'CHASE_DB1'
  save(Image.fromarray(rgb(50)), folder / 'Image_01L.jpg')
  save(Image.fromarray(binary()).convert('1'), folder / 'Image_01L_1stHO.png')
  save(Image.fromarray(~binary()).convert('1'), folder / 'Image_01L_2ndHO.png')  # Not used.
  return root


KITTI_LABELS = np.array([26, 7, 27, 11, 31, 32, 25, 24])  # Vehicle ids 26, 27, 31 (25, 24, 32 are not).


def write_kitti(root: Path, num_frames: int = 3) -> Path:
  """root/data_semantics/training/{image_2, semantic}/NNNNNN_10.png; each label column j of the 8 ids in
  KITTI_LABELS covers 6 image columns, so vehicles (26, 27, 31) cover 3/8 of every frame."""
  folder = root / 'data_semantics' / 'training'
  labels = np.repeat(KITTI_LABELS, WIDTH // len(KITTI_LABELS))[None, :].repeat(HEIGHT, 0)
  for i in range(num_frames):
    save(Image.fromarray(rgb(60 + i)), folder / 'image_2' / f'{i:06d}_10.png')
    save(Image.fromarray(labels.astype(np.uint8), 'L'), folder / 'semantic' / f'{i:06d}_10.png')
  (root / 'data_semantics' / 'testing' / 'image_2').mkdir(parents=True)  # Unlabelled: ignored.
  return root


def write_folder(root: Path, size: int = 32) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """root/images + root/masks in mixed formats, square size x size; returns {stem: (image, mask)}."""
  formats = [  # (image file, mask file, how the mask is stored)
      ('a.png', 'a.png', 'L255'),
      ('b.bmp', 'b.gif', 'L255'),
      ('c.tif', 'c.bmp', '1'),
      ('d.jpg', 'd.png', 'RGB'),
      ('e.png', 'e.png', 'P'),
      ('f.ppm.gz', 'f.png', 'L1'),
      ('g.png', 'g.png', 'RGBA'),
  ]
  cases = {}
  for i, (image_name, mask_name, mask_mode) in enumerate(formats):
    stem = image_name.split('.')[0]
    image = rgb(70 + i, size, size)
    mask = np.random.default_rng(80 + i).random((size, size)) < 0.3
    if image_name == 'g.png':  # An RGBA image: converted to RGB.
      pil = Image.fromarray(np.concatenate([image, np.full((size, size, 1), 255, np.uint8)], -1), 'RGBA')
    else:
      pil = Image.fromarray(image)
    gz = image_name.endswith('.gz')
    save(pil, root / 'images' / image_name, 'PPM' if gz else None, gz=gz)
    if mask_mode == 'L255':
      m = Image.fromarray(mask.astype(np.uint8) * 255)
    elif mask_mode == 'L1':
      m = Image.fromarray(mask.astype(np.uint8))
    elif mask_mode == '1':
      m = Image.fromarray(mask).convert('1')
    elif mask_mode == 'RGB':
      m = Image.fromarray(np.stack([mask * 255, mask * 0, mask * 0], -1).astype(np.uint8))
    elif mask_mode == 'RGBA':
      m = Image.fromarray(np.stack([mask * 255] * 3 + [np.full_like(mask, 255)], -1).astype(np.uint8))
    else:  # 'P' with a palette where index 0 is WHITE (foreground) and index 1 black (background).
      m = Image.fromarray((~mask).astype(np.uint8), 'P')
      m.putpalette([255, 255, 255, 0, 0, 0])
    save(m, root / 'masks' / mask_name)
    cases[stem] = (image, mask.astype(np.uint8))
  (root / 'images' / 'README.txt').write_text('not an image')
  (root / 'masks' / '.DS_Store').write_bytes(b'\0')
  return cases
