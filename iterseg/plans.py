"""What each mode does: the typed plans of configs/default.py's sections (train.*, data.*, eval.*,
benchmark.*, export.*, predict.*, calibrate.*), made by settings.from_config.
"""

import dataclasses
from typing import Optional

from iterseg.spec import config_field

PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')
NETWORKS = ('stage1', 'stage2', 'baseline')
SAMPLING = ('random', 'entropy_weighted', 'top')
DATASETS = ('ph2', 'retina', 'kitti', 'folder', 'synthetic')  # Modules of iterseg.data.
PREDICT_OUTPUTS = ('mask', 'probs', 'overlay')
CALIBRATE_TARGETS = ('dice_drop', 'latency')


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainPlan:
  """What --mode=train does (configs/default.py, `train.*`)."""
  seed: int = config_field(None)  # Settings.seed.
  networks: tuple
  batch_size: int
  learning_rate: float
  warmup_steps: int
  lr_schedule: str
  epochs: dict = config_field(None)  # {'stage1': n, ...}: train.<network>_epochs.
  num_patches_list: tuple
  patch_sampling: str
  focal_alpha: float
  focal_gamma: float
  error_weight: float
  exclude_holdout: bool
  head_bias_prior: Optional[float]
  stage2_init: str
  flip: bool
  brightness_contrast: float
  rotate: bool
  log_every: int
  checkpoint_every: int
  keep_checkpoints: int
  profile_steps: tuple  # (first, last) steps of stage 1 to trace with jax.profiler, or ().


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSpec:
  """Which dataset, where, and at what size (configs/default.py, `data.*`)."""
  name: str
  hi_size: int = config_field(None)  # Spec.hi_size.
  num_classes: int = config_field(None)  # Spec.num_classes.
  manual_dir: str
  data_dir: str
  split_seed: int
  train_fraction: float
  num_examples: int
  kitti_label_ids: tuple
  resolution: str = config_field(None)  # Spec.resolution.
  scale: float  # Native: images scaled by this factor when prepared.

  @property
  def side(self) -> int:
    """The side examples are prepared at: hi_size (square), or 0: each its own size (native)."""
    return 0 if self.resolution == 'native' else self.hi_size
  synthetic_sides: tuple  # Native synthetic: (smallest, largest) side in px.
  synthetic_kind: str  # 'lesions' | 'vessels'.


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalPlan:
  batch_size: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchmarkPlan:
  batch_sizes: Optional[tuple]  # None: the backend's default plan.
  repeats: int
  sliding_window: Optional[bool]  # None: the backend's default plan.
  max_seconds: float
  native_sides: tuple  # resolution='native': the image sides timed.
  peak_tflops: Optional[float]  # The device's peak, for utilisation (None: known devices only).
  train: bool  # Also time each network's training step.


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportPlan:
  batch_size: int  # The artifact's fixed batch.
  platforms: tuple  # What it compiles for (jax.export platforms).
  output: str  # '' = <workdir>/export


@dataclasses.dataclass(frozen=True, kw_only=True)
class PredictPlan:
  input: str
  output: str  # '' = <workdir>/predictions
  batch_size: int
  outputs: tuple
  png_compression: int
  skip_existing: bool  # Skip an input whose outputs all exist (go on after an interruption).


@dataclasses.dataclass(frozen=True, kw_only=True)
class CalibratePlan:
  """What --mode=calibrate sweeps and how it picks the operating point (`calibrate.*`)."""
  holdout: float  # Share of the train split held back for the sweep (seeded by `seed`).
  refine_counts: Optional[tuple]  # None: 1, 2, 4, ... up to Np*Np, and Np.
  thresholds: tuple  # Each a float or None (no threshold).
  target: str  # 'dice_drop' | 'latency'.
  max_dice_drop: float
  latency_budget_ms: Optional[float]  # Required (> 0) for target 'latency'.
  refine_fractions: tuple  # resolution='native': the shares of tiles swept.
