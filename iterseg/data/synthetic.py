"""The embedded default dataset: procedurally generated images where the fine detail matters.

Each image is a skin-like textured background with one dark, speckled, lesion-like blob whose border is
ragged at a scale of a few pixels, and 2-4 thin (2-3 px) dark-red vessel-like curves that leave the blob.
The mask is blob + curves. Built so that the paper's method has something to do:

  * learnable: foreground differs from background in colour and texture (a small U-Net learns it in a
    couple of CPU minutes);
  * stage 1 misses detail: the border's teeth (wavelength ~4-14 px, amplitude a few px) and the curves'
    width are below one stage-1 pixel (hi / 8 = 8 px), so the 1/8 copy keeps only the smooth blob;
  * detail is local: everything uncertain lies on the blob's border and along the curves, i.e. in a
    minority of the Np x Np patches. Measured at Np = 8 (hi 128, 40 images) for a perfect stage 1 at 1/8
    resolution: Dice ~0.91; ~20 of the 64 patches hold any error, the 12 worst ~85 % of the error pixels;
  * ~10-20 % foreground (mean 15 %).

Everything is a pure function of (index, size): the scene is drawn in relative coordinates, so the same
index gives the same scene at any size, and the split and the examples are reproducible.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw

from iterseg.data.builder import SegmentationBuilder, SegmentationConfig

_ANGLES = 4096  # Resolution of the tabulated border radius r(theta).


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
  """float32 [size, size], ~unit std: a cells x cells grid of N(0, 1) values, bilinearly upsampled."""
  grid = rng.standard_normal((cells, cells)).astype(np.float32)
  field = np.asarray(Image.fromarray(grid, mode='F').resize((size, size), Image.Resampling.BILINEAR))
  return field / max(float(field.std()), 1e-6)


def _border_radius(shape_rng: np.random.Generator, texture_rng: np.random.Generator,
                   radius: float) -> np.ndarray:
  """float [_ANGLES]: the blob's radius in pixels at angles 2 pi i / _ANGLES.

  A smooth lobed outline (harmonics 2-5: what stage 1 can see) plus ragged teeth: random harmonics whose
  wavelength along the border is 4-14 px (below two stage-1 pixels at any size) and whose amplitude,
  2-5 px, varies around the border (some stretches smooth, some very ragged).
  """
  theta = np.linspace(0, 2 * np.pi, _ANGLES, endpoint=False)
  lobes = sum(shape_rng.uniform(0, 0.12 / k) * np.cos(k * theta + shape_rng.uniform(0, 2 * np.pi))
              for k in range(2, 6))
  envelope = 0.4 + 0.6 * (0.5 + 0.5 * np.cos(shape_rng.integers(1, 4) * theta
                                             + shape_rng.uniform(0, 2 * np.pi)))
  ks = np.arange(max(6, int(2 * np.pi * radius / 14)), max(12, int(2 * np.pi * radius / 4)) + 1)
  teeth = (texture_rng.standard_normal(len(ks))[:, None]
           * np.cos(ks[:, None] * theta + texture_rng.uniform(0, 2 * np.pi, len(ks))[:, None])).sum(0)
  teeth /= teeth.std()
  return radius * (1 + lobes) + np.clip(0.1 * radius, 2.0, 5.0) * envelope * teeth


def _curve(rng: np.random.Generator, start: np.ndarray, heading: float, length: float) -> np.ndarray:
  """float [100, 2] (x, y) points of a gently bending curve of `length` px (same shape at any size)."""
  t = np.linspace(0, 1, 100)
  bend = rng.normal(0, 0.8) * t + rng.uniform(0, 0.5) * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t
                                                             + rng.uniform(0, 2 * np.pi))
  headings = heading + bend
  deltas = (length / (len(t) - 1)) * np.stack([np.cos(headings), np.sin(headings)], axis=-1)
  return start + np.concatenate([np.zeros((1, 2)), np.cumsum(deltas[:-1], axis=0)])


def make_synthetic_example(rng: np.random.Generator | int, size: int,
                           num_classes: int = 1) -> dict[str, np.ndarray]:
  """One synthetic scene: {'image': uint8 [size, size, 3], 'mask': uint8 [size, size] in {0, 1}}.

  num_classes >= 3: the mask holds classes, 1 for the lesion and 2 for the vessels (the same image).

  rng: a numpy Generator, or an int index i (-> np.random.default_rng(i): the dataset's example i).
  The layout (colours, blob outline, curves) comes from one random stream and the pixel-scale texture
  (grain, teeth, globules, noise) from another, so index i shows the same scene at every size.
  """
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
  angle_index = ((np.arctan2(dy, dx) % (2 * np.pi)) * (_ANGLES / (2 * np.pi))).astype(np.int64) % _ANGLES
  border = _border_radius(shape_rng, texture_rng, radius)
  blob = np.hypot(dx, dy) < border[angle_index]

  # Vessel-like curves leaving the blob, 2-3 px wide at any size (always below one stage-1 pixel).
  width = 2 if s <= 384 else 3
  curves = Image.new('L', (s, s), 0)
  draw = ImageDraw.Draw(curves)
  for _ in range(shape_rng.integers(2, 5)):
    phi = shape_rng.uniform(0, 2 * np.pi)
    r_start = border[int(phi / (2 * np.pi) * _ANGLES) % _ANGLES] - 2 * width  # Starts inside: attached.
    start = np.array([cx + r_start * np.cos(phi), cy + r_start * np.sin(phi)])
    points = _curve(shape_rng, start, phi + shape_rng.normal(0, 0.3), shape_rng.uniform(0.12, 0.3) * s)
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
  mask = (blob | vessels).astype(np.uint8) if num_classes < 3 else (
      blob.astype(np.uint8) + 2 * vessels.astype(np.uint8))
  return {'image': np.clip(image, 0, 255).astype(np.uint8), 'mask': mask}


@dataclasses.dataclass(eq=False)
class SyntheticConfig(SegmentationConfig):
  num_examples: int = 200
  num_classes: int = 1


class Synthetic(SegmentationBuilder, skip_registration=True):
  """config.data.num_examples scenes 'synthetic/00000'... at hi_size; needs no manual_dir."""

  name = 'synthetic'
  BUILDER_CONFIG_CLASS = SyntheticConfig
  SOURCE_FILES = False
  DESCRIPTION = __doc__

  @classmethod
  def _config_fields(cls, spec):
    return dict(super()._config_fields(spec), num_examples=spec.num_examples,
                num_classes=spec.num_classes)

  @classmethod
  def _config_name(cls, spec):
    classes = f'_classes{spec.num_classes}' if spec.num_classes >= 3 else ''
    return f'{super()._config_name(spec)}_n{spec.num_examples}{classes}'

  def find_cases(self) -> dict[str, int]:
    return {f'synthetic/{i:05d}': i for i in range(self.builder_config.num_examples)}

  def load_example(self, name: str, case: int) -> dict:
    size = self.builder_config.hi_size
    example = make_synthetic_example(case, size, self.builder_config.num_classes)
    return dict(example, original_size=np.array([size, size], np.int32), name=name)


Builder = Synthetic  # What iterseg.data.make_builder builds for config.data.name='synthetic'.
