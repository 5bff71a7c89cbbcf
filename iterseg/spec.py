"""`Spec`, the static configuration of two-stage inference (hashable: a jit static argument), its
derived geometry, and the relations between its fields; settings.from_config makes it. The square
protocol (the paper: every image resized to hi_size) and native resolution (any H x W) are one Spec:
`resolution` chooses how stage 1's input and map change scale (`rescale`) and where patches are
scored (`scores_on_low_map`); the native.* fields say how an image is cut into calls.
"""

import dataclasses
import math
from typing import Optional

from iterseg.errors import SettingsError

SCORES = ('entropy', 'margin', 'distance', 'learned')
BUDGETS = ('image', 'batch')
RESOLUTIONS = ('square', 'native')
BLENDS = ('gaussian', 'constant')
# What the weights depend on: a workdir's networks only fit settings that agree on these fields.
GEOMETRY = ('resolution', 'hi_size', 'stage1_size', 'num_classes', 'stage2_uses_coarse',
            'model.width', 'model.depth', 'model.input_norm', 'model.input_mean', 'model.input_std',
            'model.error_head')


def config_field(path: Optional[str]):
  """A field stored at another place in the config (the dotted `path`), or (None) derived and not
  stored. The other fields sit at <section>.<name> (settings._SECTIONS), a Spec's at <name>."""
  return dataclasses.field(metadata={'config': path})


def checked(kind: str, *bounds, config: Optional[str] = None, **options):
  """A field that settings reads with `_Reader.<kind>(field, *bounds, **options)` (from the dotted
  `config` path where given), e.g. checked('int', 1): a whole number >= 1."""
  where = {'config': config} if config else {}
  return dataclasses.field(metadata={'check': (kind, bounds, options), **where})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Spec:
  """The static configuration of two-stage inference for one Np."""
  hi_size: int
  stage1_size: int
  num_classes: int
  num_patches: int
  refine_count: int = config_field(None)  # Resolved: Settings.refine_count, or Np.
  score: str
  stage2_uses_coarse: bool = checked('bool')
  threshold: Optional[float]
  width: int = checked('int', 1, config='model.width')
  depth: int = config_field('model.depth')
  halo: int = checked('int', 0)  # Real context pixels around each stage-2 patch (0: bare patches).
  # 'standardize': (x - input_mean) / input_std per channel, measured on the train split (None: not
  # yet; --mode=train measures them).
  input_norm: str = checked('choice', ('none', 'standardize'), config='model.input_norm')
  input_mean: Optional[tuple] = checked('channels', 0.0, 1.0, config='model.input_mean')
  input_std: Optional[tuple] = checked('channels', 0.0, 1.0, low_open=True,
                                       config='model.input_std')
  refine_budget: str = checked('choice', BUDGETS)  # 'image': k patches per image; 'batch': B * k.
  # 'square' (the paper) or 'native' (hi_size: the side of the training crops).
  resolution: str = checked('choice', RESOLUTIONS)
  # The U-Nets' computation ('float32' or 'bfloat16'), and stage 1's extra output: its error share.
  dtype: str = checked('choice', ('float32', 'bfloat16'), config='model.dtype')
  error_head: bool = checked('bool', config='model.error_head')
  # Native resolution (native.*): any H x W, stage 1 on the image downscaled by `downscale`, stage 2
  # on the least confident tiles of side patch_size (with halo), as trained on crops of hi_size.
  refine_fraction: float = checked('float', 0.0, 1.0, low_open=True,
                                   config='native.refine_fraction')  # Share of the tiles refined.
  chunk: int = checked('int', 1, config='native.chunk')  # Tiles per stage-2 call.
  bucket: int = config_field('native.bucket')  # Stage 1's input padded to a multiple (stage-1 px).
  window: int = checked('int', 0, config='native.window')  # Dense reference: window (0: hi_size)
  overlap: float = checked('float', 0.0, 0.9, config='native.overlap')  # ... and their overlap,
  blend: str = checked('choice', BLENDS, config='native.blend')  # ... blended (MONAI's modes).
  max_pixels: int = checked('int', 0, config='native.max_pixels')  # Larger refused (0: by memory).

  @property
  def window_side(self) -> int:
    return self.window or self.hi_size

  @property
  def downscale(self) -> int:
    """How many image pixels a stage-1 pixel covers along a side (native: an exact factor)."""
    return self.hi_size // self.stage1_size

  @property
  def rescale(self) -> str:
    """How stage 1's input is made and its map brought back: 'resize' (the paper: antialiased
    bilinear) or 'blocks' (native: f x f block means, and `inference.bilinear` back, per tile)."""
    return 'blocks' if self.resolution == 'native' else 'resize'

  @property
  def scores_on_low_map(self) -> bool:
    """Patches are scored on stage 1's own low-resolution map (native: no full-resolution map is
    made; the learned score: the error head's), not on the upscaled map (the paper's)."""
    return self.score == 'learned' or self.resolution == 'native'

  @property
  def crop(self) -> Optional[int]:
    """Training examples are random crops of this side (native), or whole images (None)."""
    return self.hi_size if self.resolution == 'native' else None

  @property
  def patch_size(self) -> int:
    """The side of a grid patch, hi_size / Np."""
    return self.hi_size // self.num_patches

  @property
  def stage2_side(self) -> int:
    """The side of stage 2's input: a patch and its halo on each side."""
    return self.patch_size + 2 * self.halo

  def out_channels(self, network: str) -> int:
    """Output channels: the class logits, and for stage 1 with error_head one more, last."""
    return self.num_classes + (network == 'stage1' and self.error_head)

  def in_channels(self, network: str) -> int:
    """Input channels: RGB, and for stage 2 with stage2_uses_coarse the stage-1 probabilities."""
    return 3 + self.num_classes if network == 'stage2' and self.stage2_uses_coarse else 3

  def geometry(self) -> dict:
    """{config field: value} of the fields the weights depend on (GEOMETRY)."""
    fields = {f.metadata.get('config', f.name): f.name for f in dataclasses.fields(self)}
    unused = () if self.input_norm == 'standardize' else ('model.input_mean', 'model.input_std')
    return {path: None if path in unused else getattr(self, fields[path]) for path in GEOMETRY}


def score_range(score: str, num_classes: int) -> float:
  """The largest value a patch score can take (the smallest is 0): ln C for entropy, 1 - 1/C for
  distance, 1 for margin and learned (a share of pixels), with C = max(num_classes, 2)."""
  classes = max(num_classes, 2)
  return {'entropy': math.log(classes), 'distance': 1.0 - 1.0 / classes}.get(score, 1.0)


def _fits(spec: Spec) -> bool:
  try:
    return bool(check_spec(spec))
  except SettingsError:
    return False


def check_spec(spec: Spec) -> Spec:
  """The relations between the geometry fields of one Spec (SettingsError naming the field)."""
  hi, n = spec.hi_size, spec.num_patches
  if hi % n:
    fit = [d for d in range(1, min(hi, 64) + 1) if hi % d == 0 and _fits(dataclasses.replace(
        spec, num_patches=d, refine_count=d if spec.refine_count == n else spec.refine_count))]
    raise SettingsError(
        f'config.hi_size={hi} is not divisible by num_patches (Np)={n}: patches must tile the '
        f'image. Pick Np among the divisors of {hi} that fit the other fields (e.g. {fit[-6:]}) or '
        f'change hi_size.')
  if not 0 < spec.refine_count <= n * n:
    raise SettingsError(f'config.refine_count={spec.refine_count} is not valid: it must be in '
                        f'[1, Np*Np={n * n}] for Np={n}.')
  side = 2 ** spec.depth
  if side > min(spec.stage1_size, spec.patch_size):
    raise SettingsError(
        f'config.model.depth={spec.depth} is too deep: a {spec.depth}-level U-Net needs inputs of '
        f'at least 2**depth={side} px, but stage 1 sees {spec.stage1_size} px and a stage-2 patch '
        f'at Np={n} is {spec.patch_size} px (everything would be zero-padded). Use depth <= '
        f'{int(math.log2(min(spec.stage1_size, spec.patch_size)))} or larger sizes.')
  if spec.score == 'learned' and spec.resolution == 'square' and spec.stage1_size % n:
    raise SettingsError(f"config.score='learned' needs stage1_size={spec.stage1_size} to be a "
                        f'multiple of num_patches={n}: patches are scored on whole stage-1 pixels.')
  if (spec.input_mean is None) != (spec.input_std is None):
    raise SettingsError(f'config.model.input_mean={spec.input_mean} and model.input_std='
                        f"{spec.input_std}: set both (the training images' per-channel "
                        f'statistics) or neither (--mode=train measures them).')
  if spec.halo and spec.halo >= spec.patch_size * n:
    raise SettingsError(f'config.halo={spec.halo} is not valid: it must be smaller than hi_size.')
  return spec
