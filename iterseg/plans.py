"""What each mode does: the typed plans of configs/default.py's sections (settings.from_config
makes them; it reads a field without a check, spec.checked, itself: its range depends on others).
"""

import dataclasses
from typing import Optional

from iterseg.spec import checked, config_field

PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')
NETWORKS = ('stage1', 'stage2', 'baseline')
SAMPLING = ('random', 'entropy_weighted', 'top')
DATASETS = ('ph2', 'retina', 'kitti', 'folder', 'synthetic')  # Modules of iterseg.data.
PREDICT_OUTPUTS = ('mask', 'probs', 'overlay')
SLIDE_FORMATS = ('tiff', 'zarr')
CALIBRATE_TARGETS = ('dice_drop', 'latency')


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainPlan:
  """What --mode=train does (configs/default.py, `train.*`)."""
  seed: int = config_field(None)  # Settings.seed.
  networks: tuple
  batch_size: int = checked('int', 1)
  learning_rate: float = checked('float', 0.0, 1.0, low_open=True)
  warmup_steps: int = checked('int', 0)
  lr_schedule: str = checked('choice', ('constant', 'cosine'))
  epochs: dict = config_field(None)  # {'stage1': n, ...}: train.<network>_epochs.
  num_patches_list: tuple
  patch_sampling: str = checked('choice', SAMPLING)
  focal_alpha: float = checked('float', 0.0, 1.0)
  focal_gamma: float = checked('float', 0.0, 10.0)
  error_weight: float = checked('float', 0.0)
  exclude_holdout: bool = checked('bool')
  select_checkpoint: str = checked('choice', ('last', 'best'))  # Which step the modes load.
  head_bias_prior: Optional[float] = checked('float', 0.0, 1.0, low_open=True, high_open=True,
                                             optional=True)
  stage2_init: str = checked('choice', ('random', 'stage1'))
  flip: bool = checked('bool')
  brightness_contrast: float = checked('float', 0.0, 0.99)
  gamma: float = checked('float', 0.0, 2.0)  # Gamma jitter: images ** e^U(-gamma, gamma).
  rotate: bool = checked('bool')
  log_every: int = checked('int', 1)
  checkpoint_every: int = checked('int', 1)
  keep_checkpoints: int = checked('int', 1)
  profile_steps: tuple = checked('ints', 0, allow_empty=True)  # (first, last) stage-1 step traced.


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSpec:
  """Which dataset, where, and at what size (configs/default.py, `data.*`)."""
  name: str = checked('choice', DATASETS)
  hi_size: int = config_field(None)  # Spec.hi_size.
  num_classes: int = config_field(None)  # Spec.num_classes.
  manual_dir: str = checked('str')
  data_dir: str
  split_seed: int = checked('int', 0, 2 ** 32 - 1)
  train_fraction: float = checked('float', 0.0, 1.0, low_open=True, high_open=True)
  num_examples: int = checked('int', 2)
  kitti_label_ids: tuple = checked('ints', 0, 255)
  resolution: str = config_field(None)  # Spec.resolution.
  scale: float = checked('float', 0.0, 16.0, low_open=True)  # Native: images scaled when prepared.
  synthetic_sides: tuple  # Native synthetic: (smallest, largest) side in px.
  synthetic_kind: str = checked('choice', ('lesions', 'vessels'))

  @property
  def side(self) -> int:
    """The side examples are prepared at: hi_size (square), or 0: each its own size (native)."""
    return 0 if self.resolution == 'native' else self.hi_size


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalPlan:
  batch_size: int = checked('int', 1)
  # Metrics also inside each image's field of view: 'dark_border' (the pixels brighter than its dark
  # frame, as fundus photographs have), or 'none'.
  fov: str = checked('choice', ('none', 'dark_border'))
  errors: bool = checked('bool')  # An image of each test image's errors (errors/<name>.png).


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchmarkPlan:
  batch_sizes: Optional[tuple] = checked('ints', 1, optional=True)  # None: the backend's default.
  repeats: int = checked('int', 1)
  sliding_window: Optional[bool] = checked('bool', optional=True)  # None: the backend's default.
  max_seconds: float = checked('float', 0.0, low_open=True)
  native_sides: tuple  # resolution='native': the image sides timed.
  slide_sides: tuple  # resolution='native': the sides of the slides timed out of core.
  # The device's peak, for utilisation (None: known devices only).
  peak_tflops: Optional[float] = checked('float', 0.0, low_open=True, optional=True)
  train: bool = checked('bool')  # Also time each network's training step.


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportPlan:
  batch_size: int = checked('int', 1)  # The artifact's fixed batch.
  platforms: tuple = checked('names', PLATFORMS)  # What it compiles for (jax.export platforms).
  output: str = checked('str')  # '' = <workdir>/export


@dataclasses.dataclass(frozen=True, kw_only=True)
class PredictPlan:
  input: str = checked('str')
  output: str = checked('str')  # '' = <workdir>/predictions
  batch_size: int = checked('int', 1)
  outputs: tuple = checked('names', PREDICT_OUTPUTS)
  png_compression: int = checked('int', 0, 9)
  skip_existing: bool = checked('bool')  # Skip inputs whose outputs all exist (go on after Ctrl-C).
  slide_format: str = checked('choice', SLIDE_FORMATS)  # A slide's outputs: OME-TIFF or OME-Zarr.


@dataclasses.dataclass(frozen=True, kw_only=True)
class CalibratePlan:
  """What --mode=calibrate sweeps and how it picks the operating point (`calibrate.*`)."""
  holdout: float = checked('float', 0.0, 1.0, low_open=True)  # Train share swept (seeded by seed).
  refine_counts: Optional[tuple]  # None: 1, 2, 4, ... up to Np*Np, and Np.
  thresholds: tuple  # Each a float or None (no threshold).
  target: str = checked('choice', CALIBRATE_TARGETS)
  max_dice_drop: float = checked('float', 0.0, 1.0)
  latency_budget_ms: Optional[float] = checked('float', 0.0, low_open=True, optional=True)
  refine_fractions: tuple  # resolution='native': the shares of tiles swept.
