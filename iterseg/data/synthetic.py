"""The embedded default dataset: procedurally generated images where the fine detail matters.

Each image: a skin-like textured background, one dark, speckled, lesion-like blob with a border
ragged at a few pixels' scale, and 2-4 thin (2-3 px) dark-red vessel-like curves leaving it; the
mask is blob + curves (~10-20 % foreground, mean 15 %). So the paper's method has something to do:
foreground differs in colour and texture (a small U-Net learns it in a couple of CPU minutes); the
border's teeth (~4-14 px) and the curves' width are below one stage-1 pixel (hi / 8), so the 1/8
copy keeps only the smooth blob; and detail is local, in a minority of the Np x Np patches (Np = 8,
hi 128, 40 images, a perfect 1/8 stage 1: Dice ~0.91; ~20 of 64 patches hold any error, the 12
worst ~85 % of the error pixels). Everything is a pure function of (index, size), drawn in relative
coordinates: an index is the same scene at any size; the split and the examples are reproducible.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw

from iterseg.data import common
from iterseg.data.builder import SegmentationBuilder, SegmentationConfig

_ANGLES = 4096  # Resolution of the tabulated border radius r(theta).


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
  """float32 [size, size], ~unit std: a cells x cells grid of N(0, 1), bilinearly upsampled."""
  grid = Image.fromarray(rng.standard_normal((cells, cells)).astype(np.float32), mode='F')
  field = np.asarray(grid.resize((size, size), Image.Resampling.BILINEAR))
  return field / max(float(field.std()), 1e-6)


def _border_radius(shape_rng: np.random.Generator, texture_rng: np.random.Generator,
                   radius: float) -> np.ndarray:
  """float [_ANGLES]: the blob's radius in pixels at angles 2 pi i / _ANGLES: a smooth lobed outline
  (harmonics 2-5: what stage 1 can see) plus random teeth of wavelength 4-14 px (below two stage-1
  pixels at any size) and an amplitude (2-5 px) that varies around it (smooth to very ragged)."""
  theta = np.linspace(0, 2 * np.pi, _ANGLES, endpoint=False)
  lobes = sum(shape_rng.uniform(0, 0.12 / k) * np.cos(k * theta + shape_rng.uniform(0, 2 * np.pi))
              for k in range(2, 6))
  envelope = 0.4 + 0.6 * (0.5 + 0.5 * np.cos(shape_rng.integers(1, 4) * theta
                                             + shape_rng.uniform(0, 2 * np.pi)))
  ks = np.arange(max(6, int(2 * np.pi * radius / 14)), max(12, int(2 * np.pi * radius / 4)) + 1)
  teeth = (texture_rng.standard_normal(len(ks))[:, None] * np.cos(
      ks[:, None] * theta + texture_rng.uniform(0, 2 * np.pi, len(ks))[:, None])).sum(0)
  teeth /= teeth.std()
  return radius * (1 + lobes) + np.clip(0.1 * radius, 2.0, 5.0) * envelope * teeth


def _curve(rng: np.random.Generator, start: np.ndarray, heading: float,
           length: float) -> np.ndarray:
  """float [100, 2] (x, y) points of a gently bending curve of `length` px (same at any size)."""
  t = np.linspace(0, 1, 100)
  bend = rng.normal(0, 0.8) * t + rng.uniform(0, 0.5) * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t
                                                             + rng.uniform(0, 2 * np.pi))
  headings = heading + bend
  deltas = (length / (len(t) - 1)) * np.stack([np.cos(headings), np.sin(headings)], axis=-1)
  return start + np.concatenate([np.zeros((1, 2)), np.cumsum(deltas[:-1], axis=0)])


def make_synthetic_example(rng: np.random.Generator | int, size: int,
                           num_classes: int = 1) -> dict[str, np.ndarray]:
  """One synthetic scene: {'image': uint8 [size, size, 3], 'mask': uint8 [size, size] in {0, 1}}
  (num_classes >= 3: 1 for the lesion and 2 for the vessels). rng: a Generator, or the dataset's
  example index i (np.random.default_rng(i)). The layout (colours, outline, curves) and the pixel
  texture (grain, teeth, globules, noise) have their own streams: i is one scene at every size."""
  if not isinstance(rng, np.random.Generator):
    rng = np.random.default_rng(int(rng))
  shape_rng, texture_rng = rng.spawn(2)
  s = size
  yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5

  # Background: skin tone, slow shading, fine grain.
  skin = np.array([214, 168, 140], np.float32) + shape_rng.uniform(-18, 18, 3)
  shading = _smooth_noise(shape_rng, s, 3)[..., None] * 10
  grain = _smooth_noise(texture_rng, s, max(s // 3, 4))[..., None] * 5
  image = skin + shading + grain * np.array([1.0, 0.9, 0.8], np.float32)

  # The lesion: a blob with a ragged border.
  radius = shape_rng.uniform(0.17, 0.25) * s
  cx, cy = shape_rng.uniform(0.35, 0.65, 2) * s
  dx, dy = xx - cx, yy - cy
  angle_index = ((np.arctan2(dy, dx) % (2 * np.pi)) * (_ANGLES / (2 * np.pi))).astype(np.int64)
  border = _border_radius(shape_rng, texture_rng, radius)
  blob = np.hypot(dx, dy) < border[angle_index % _ANGLES]

  # Vessel-like curves leaving the blob, 2-3 px wide at any size (always below one stage-1 pixel).
  width = 2 if s <= 384 else 3
  curves = Image.new('L', (s, s), 0)
  draw = ImageDraw.Draw(curves)
  for _ in range(shape_rng.integers(2, 5)):
    phi = shape_rng.uniform(0, 2 * np.pi)
    r_start = border[int(phi / (2 * np.pi) * _ANGLES) % _ANGLES] - 2 * width  # Inside: attached.
    start = np.array([cx + r_start * np.cos(phi), cy + r_start * np.sin(phi)])
    heading = phi + shape_rng.normal(0, 0.3)
    points = _curve(shape_rng, start, heading, shape_rng.uniform(0.12, 0.3) * s)
    draw.line([tuple(p) for p in points], fill=1, width=width, joint='curve')
  vessels = np.asarray(curves, dtype=bool) & ~blob

  # Lesion colour: dark brown, darker towards the centre, speckled with darker globules.
  brown = np.array([112, 70, 52], np.float32) + shape_rng.uniform(-15, 15, 3)
  red = np.array([128, 32, 40], np.float32) + shape_rng.uniform(-12, 12, 3)
  depth = np.clip(np.hypot(dx, dy) / radius, 0, 1)[..., None]
  globules = (_smooth_noise(texture_rng, s, max(s // 6, 4)) > 1.0)[..., None]
  lesion = brown * (0.8 + 0.25 * depth) - 25 * globules + grain * 4

  image = np.where(blob[..., None], lesion, image)
  image = np.where(vessels[..., None], red, image)
  image += texture_rng.normal(0, 5, image.shape).astype(np.float32)  # Sensor noise.
  mask = (blob + (2 if num_classes >= 3 else 1) * vessels).astype(np.uint8)  # Disjoint.
  return {'image': np.clip(image, 0, 255).astype(np.uint8), 'mask': mask}


def make_vessel_example(index: int, size: int) -> dict[str, np.ndarray]:
  """One fundus-like scene (data.synthetic_kind='vessels'): {'image': uint8 [size, size, 3], 'mask':
  uint8 [size, size] in {0, 1}}: an orange field of view, a bright optic disc from which 5-7 darker
  vessel trunks fork three times, 3 -> 2 -> 1 px wide at any size (below one stage-1 pixel; ~5 % of
  the pixels at 256 px, RETINA's 7 %)."""
  rng = np.random.default_rng([int(index), 11])
  shape_rng, texture_rng = rng.spawn(2)
  s = size
  yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
  cx, cy, fov = s / 2, s / 2, 0.47 * s
  centre_distance = np.hypot(xx - cx, yy - cy)
  inside = centre_distance < fov
  disc = np.array([cx + shape_rng.choice([-1, 1]) * shape_rng.uniform(0.18, 0.28) * s,
                   cy + shape_rng.uniform(-0.08, 0.08) * s])
  tone = np.array([150, 62, 28], np.float32) + shape_rng.uniform(-20, 20, 3)
  shading = 1 - 0.35 * (centre_distance / fov) ** 2 + 0.1 * _smooth_noise(shape_rng, s, 4)
  glow = 60 * np.exp(-np.hypot(xx - disc[0], yy - disc[1]) ** 2 / (2 * (0.05 * s) ** 2))
  image = tone * shading[..., None] + glow[..., None] * np.array([1.0, 0.9, 0.6], np.float32)

  canvas = Image.new('L', (s, s), 0)
  draw = ImageDraw.Draw(canvas)

  def grow(start, heading, length, width, level):
    points = _curve(shape_rng, start, heading, length)
    draw.line([tuple(p) for p in points], fill=1, width=width, joint='curve')
    if level < 3:
      for at in shape_rng.uniform(0.3, 0.9, 2):
        grow(points[int(at * (len(points) - 1))],
             heading + shape_rng.choice([-1, 1]) * shape_rng.uniform(0.4, 1.0),
             length * shape_rng.uniform(0.4, 0.7), max(width - 1, 1), level + 1)

  for phi in np.linspace(0, 2 * np.pi, int(shape_rng.integers(5, 8)), endpoint=False):
    grow(disc, phi + shape_rng.normal(0, 0.3), shape_rng.uniform(0.35, 0.6) * s, 3, 0)
  vessels = np.asarray(canvas, dtype=bool) & inside
  darker = 0.7 + 0.1 * _smooth_noise(texture_rng, s, max(s // 8, 4))
  image = np.where(vessels[..., None], image * darker[..., None], image)
  image += texture_rng.normal(0, 4, image.shape).astype(np.float32)  # Sensor noise.
  image = np.where(inside[..., None], image, 0)
  return {'image': np.clip(image, 0, 255).astype(np.uint8), 'mask': vessels.astype(np.uint8)}


# --- High resolution (resolution='native') -------------------------------------------------------

_BAND = 512  # Rows rendered at a time: memory stays the image, its mask, and a band.


def _field_band(grid: np.ndarray, cell: float, y0: int, y1: int, width: int) -> np.ndarray:
  """float32 [y1 - y0, width]: rows y0..y1 of `grid` bilinearly upsampled by `cell` px per grid
  point (a band of one smooth field, seamless with its neighbours)."""
  pil = Image.fromarray(grid.astype(np.float32), mode='F')
  box = (0.0, y0 / cell, width / cell, y1 / cell)
  return np.asarray(pil.resize((width, y1 - y0), Image.Resampling.BILINEAR, box=box))


def highres_scene(index: int, height: int, width: int) -> dict:
  """The layout of high-resolution scene `index`, in pixels: lesions (centre, radius, border,
  colours) and vessel polylines. Detail has one scale (4-14 px teeth, 2-3 px vessels) and density
  at any size (per megapixel ~0.4 lesions, radius 100-400 px, with vessels, and 0.5 free curves)."""
  rng = np.random.default_rng([int(index), height, width])
  shape_rng, texture_rng = rng.spawn(2)
  area = height * width / 2 ** 20
  count = max(1, int(shape_rng.poisson(0.4 * area)))
  lesions = []
  for _ in range(count):
    radius = float(shape_rng.uniform(100, 400))
    cx, cy = shape_rng.uniform(0, width), shape_rng.uniform(0, height)
    lesions.append({'centre': (cx, cy), 'radius': radius,
                    'border': _border_radius(shape_rng, texture_rng, radius),
                    'brown': np.array([112, 70, 52], np.float32) + shape_rng.uniform(-15, 15, 3),
                    'seed': int(shape_rng.integers(2 ** 31))})
  curves = []
  for lesion in lesions:  # Vessel-like curves leaving each lesion, and a few free ones.
    cx, cy = lesion['centre']
    for _ in range(int(shape_rng.integers(2, 5))):
      phi = shape_rng.uniform(0, 2 * np.pi)
      r = lesion['border'][int(phi / (2 * np.pi) * _ANGLES) % _ANGLES] - 6
      start = np.array([cx + r * np.cos(phi), cy + r * np.sin(phi)])
      curves.append(_curve(shape_rng, start, phi + shape_rng.normal(0, 0.3),
                           shape_rng.uniform(0.8, 2.0) * lesion['radius']))
  for _ in range(int(shape_rng.poisson(0.5 * area))):
    start = shape_rng.uniform(0, 1, 2) * (width, height)
    curves.append(_curve(shape_rng, start, shape_rng.uniform(0, 2 * np.pi),
                         shape_rng.uniform(150, 450)))
  return {'lesions': lesions, 'curves': curves, 'widths': shape_rng.integers(2, 4, len(curves)),
          'skin': np.array([214, 168, 140], np.float32) + shape_rng.uniform(-18, 18, 3),
          'red': np.array([128, 32, 40], np.float32) + shape_rng.uniform(-12, 12, 3),
          'seed': int(shape_rng.integers(2 ** 31))}


def make_highres_example(index: int, height: int, width: int, num_classes: int = 1) -> dict:
  """One high-resolution scene: {'image': uint8 [height, width, 3], 'mask': uint8 [height, width]}
  (binary, or lesion 1 / vessels 2 for num_classes >= 3). A pure function of (index, height,
  width), rendered band by band: a 16384 x 16384 scene takes the image, its mask and a band."""
  scene = highres_scene(index, height, width)
  seed = scene['seed']
  grid_rng = np.random.default_rng([seed, 0])
  shading = grid_rng.standard_normal((height // 256 + 2, width // 256 + 2))
  grain = grid_rng.standard_normal((height // 3 + 2, width // 3 + 2)).astype(np.float32)
  image = np.empty((height, width, 3), np.uint8)
  tone = np.array([1.0, 0.9, 0.8], np.float32)
  for y0 in range(0, height, _BAND):  # Skin: tone, slow shading, fine grain, sensor noise.
    y1 = min(y0 + _BAND, height)
    band_rng = np.random.default_rng([seed, 1, y0])
    light = _field_band(shading, 256, y0, y1, width)[..., None] * 10
    fine = _field_band(grain, 3, y0, y1, width)[..., None] * 5 * tone
    noise = band_rng.normal(0, 5, (y1 - y0, width, 3)).astype(np.float32)
    image[y0:y1] = np.clip(scene['skin'] + light + fine + noise, 0, 255).astype(np.uint8)

  lesion_mask = np.zeros((height, width), bool)
  for lesion in scene['lesions']:  # Each lesion inside its own bounding box.
    cx, cy = lesion['centre']
    reach = float(lesion['border'].max()) + 2
    x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 1, width)
    y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 1, height)
    if x0 >= x1 or y0 >= y1:
      continue
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    index_ = ((np.arctan2(dy, dx) % (2 * np.pi)) * (_ANGLES / (2 * np.pi))).astype(np.int64)
    blob = np.hypot(dx, dy) < lesion['border'][index_ % _ANGLES]
    rng = np.random.default_rng(lesion['seed'])
    depth = np.clip(np.hypot(dx, dy) / lesion['radius'], 0, 1)[..., None]
    spots = rng.standard_normal(((y1 - y0) // 6 + 2, (x1 - x0) // 6 + 2))
    globules = (_field_band(spots, 6, 0, y1 - y0, x1 - x0) > 1.0)[..., None]
    colour = (lesion['brown'] * (0.8 + 0.25 * depth) - 25 * globules +
              rng.normal(0, 5, (y1 - y0, x1 - x0, 3)))
    image[y0:y1, x0:x1][blob] = np.clip(colour[blob], 0, 255).astype(np.uint8)
    lesion_mask[y0:y1, x0:x1] |= blob

  canvas = Image.new('L', (width, height), 0)
  draw = ImageDraw.Draw(canvas)
  for points, line_width in zip(scene['curves'], scene['widths']):
    draw.line([tuple(p) for p in points], fill=1, width=int(line_width), joint='curve')
  vessels = np.asarray(canvas, dtype=bool)
  del canvas, draw
  mask = np.zeros((height, width), np.uint8)
  red_rng = np.random.default_rng([seed, 2])
  for y0 in range(0, height, _BAND):
    y1 = min(y0 + _BAND, height)
    v = vessels[y0:y1] & ~lesion_mask[y0:y1]
    noise = red_rng.normal(0, 5, (int(v.sum()), 3))
    image[y0:y1][v] = np.clip(scene['red'] + noise, 0, 255).astype(np.uint8)
    mask[y0:y1] = lesion_mask[y0:y1] + (2 if num_classes >= 3 else 1) * v  # Disjoint.
  return {'image': image, 'mask': mask}


@dataclasses.dataclass(eq=False)
class SyntheticConfig(SegmentationConfig):
  num_examples: int = 200
  num_classes: int = 1
  sides: tuple[int, int] = (1024, 2048)  # Native: height and width drawn in this range.
  kind: str = 'lesions'  # Or 'vessels' (square): make_vessel_example.


class Synthetic(SegmentationBuilder, skip_registration=True):
  """config.data.num_examples scenes 'synthetic/00000'... at hi_size; needs no manual_dir."""

  name = 'synthetic'
  BUILDER_CONFIG_CLASS = SyntheticConfig
  SOURCE_FILES = False
  DESCRIPTION = __doc__

  @classmethod
  def extra_config(cls, spec):
    sides = tuple(spec.synthetic_sides)
    suffix = f'_n{spec.num_examples}'
    suffix += f'_classes{spec.num_classes}' if spec.num_classes >= 3 else ''
    suffix += '' if spec.side else f'_sides{sides[0]}-{sides[1]}'
    suffix += '_vessels' if spec.synthetic_kind == 'vessels' else ''
    return dict(num_examples=spec.num_examples, num_classes=spec.num_classes, sides=sides,
                kind=spec.synthetic_kind), suffix

  def find_cases(self) -> dict[str, int]:
    return {f'synthetic/{i:05d}': i for i in range(self.builder_config.num_examples)}

  def load_example(self, name: str, case: int) -> dict:
    config = self.builder_config
    if config.hi_size and config.kind == 'vessels':
      example = make_vessel_example(case, config.hi_size)
    elif config.hi_size:  # The paper's protocol: the low-resolution scenes, square.
      example = make_synthetic_example(case, config.hi_size, config.num_classes)
    else:  # Native: a high-resolution scene of its own size (scaled, if asked).
      example = make_highres_example(case, *native_size(case, config.sides), config.num_classes)
      if config.scale != 1.0:
        example = common.make_example(example['image'], example['mask'], name=name, size=None,
                                      scale=config.scale)
    return dict(image=example['image'], mask=example['mask'],
                original_size=np.array(example['mask'].shape, np.int32), name=name)


def native_size(index: int, sides) -> tuple[int, int]:
  """(height, width) of native synthetic example `index`, each in [sides[0], sides[1]]."""
  rng = np.random.default_rng([int(index), 7])
  low, high = int(sides[0]), int(sides[1])
  return int(rng.integers(low, high + 1)), int(rng.integers(low, high + 1))


Builder = Synthetic  # What iterseg.data.make_builder builds for config.data.name='synthetic'.


def write_slide(path, side: int, *, compression: str = 'jpeg', tissue: float = 1 / 3) -> dict:
  """A synthetic side x side whole-slide image written to `path` as a pyramidal OME-TIFF with tiles
  of 512 (`slides.write_pyramid`), band by band (never held in RAM): about `tissue` of it covered by
  a few large ellipses holding copies of high-resolution scene 20 000 (2048 px, lesions and
  vessels), the rest bright glass with noise. Returns {'tissue': the share covered}."""
  from iterseg import slides  # pylint: disable=g-import-not-at-top
  scene = make_highres_example(20_000, 2048, 2048)['image']
  rng = np.random.default_rng(side)
  blobs = []  # (cy, cx, ry, rx): ellipses of tissue, added until they cover `tissue` (roughly).
  while sum(np.pi * ry * rx for _, _, ry, rx in blobs) < tissue * side * side * 1.15:
    ry, rx = rng.uniform(0.08, 0.2, 2) * side
    blobs.append((rng.uniform(0.15, 0.85) * side, rng.uniform(0.15, 0.85) * side, ry, rx))
  covered = [0]
  xs = np.arange(side, dtype=np.float32) + 0.5

  def bands():
    for y0 in range(0, side, slides.TILE):
      y1 = min(y0 + slides.TILE, side)
      ys = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5
      inside = np.zeros((y1 - y0, side), bool)
      for cy, cx, ry, rx in blobs:
        inside |= ((ys - cy) / ry) ** 2 + ((xs[None] - cx) / rx) ** 2 < 1
      covered[0] += int(inside.sum())
      band = np.tile(scene[np.arange(y0, y1) % 2048], (1, -(-side // 2048), 1))[:, :side]
      glass = 238 + rng.integers(0, 8, (y1 - y0, side, 1), np.uint8)
      yield np.where(inside[..., None], band, glass)

  slides.write_pyramid(path, side, side, bands(), compression=compression)
  return {'tissue': covered[0] / side ** 2}
