"""The config, read and checked once: a ConfigDict in, small frozen typed objects out.

  settings = settings.from_config(config)     # SettingsError naming the field on any bad value
  settings.spec          inference geometry (`Spec`: hashable, a jit static argument)
  settings.train         `TrainPlan`      settings.data  `DataSpec`     settings.eval  `EvalPlan`
  settings.benchmark     `BenchmarkPlan`  settings.predict `PredictPlan`
  settings.calibrate     `CalibratePlan`

This is the only module that reads an ml_collections ConfigDict field by field (the command line,
`iterseg.infer` and `iterseg.load` call it at the boundary); the rest of the package takes these
objects. Every field of configs/default.py is checked here for its type, its range and its relations
to other fields, before anything is computed or written.
"""

import dataclasses
import math
import os
from typing import Any, Optional

import ml_collections

SCORES = ('entropy', 'margin', 'distance')
NETWORKS = ('stage1', 'stage2', 'baseline')
SAMPLING = ('random', 'entropy_weighted', 'top')
DATASETS = ('ph2', 'retina', 'kitti', 'folder', 'synthetic')
BUDGETS = ('image', 'batch')
ABLATION_FEATURES = ('stage2_init', 'halo', 'refine_budget', 'input_norm')
PREDICT_OUTPUTS = ('mask', 'probs', 'overlay')
CALIBRATE_TARGETS = ('dice_drop', 'latency')
# Config fields the weights depend on: a workdir's networks only fit a config that agrees on these.
GEOMETRY = ('hi_size', 'stage1_size', 'num_classes', 'stage2_uses_coarse', 'model.width',
            'model.depth', 'model.input_norm')


class SettingsError(ValueError):
  """A config field has a value that cannot work (the message names the field and what is valid)."""


@dataclasses.dataclass(frozen=True)
class Spec:
  """The static configuration of two-stage inference for one Np (hashable: a jit static argument)."""
  hi_size: int
  stage1_size: int
  num_classes: int
  num_patches: int
  refine_count: int
  score: str
  stage2_uses_coarse: bool
  threshold: Optional[float]
  width: int
  depth: int
  halo: int = 0  # Real context pixels around each stage-2 patch (0 = the paper's bare patches).
  input_norm: str = 'none'  # 'standardize': each image to zero mean, unit std per channel.
  refine_budget: str = 'image'  # 'image': k patches per image; 'batch': B * k over the batch.

  @property
  def patch_size(self) -> int:
    """The side of a grid patch, hi_size / Np."""
    return self.hi_size // self.num_patches

  @property
  def stage2_in_channels(self) -> int:
    return 3 + self.num_classes if self.stage2_uses_coarse else 3


@dataclasses.dataclass(frozen=True)
class TrainPlan:
  """What --mode=train does (configs/default.py, `train.*`)."""
  seed: int
  networks: tuple
  batch_size: int
  learning_rate: float
  warmup_steps: int
  lr_schedule: str
  epochs: dict  # {'stage1': n, 'stage2': n, 'baseline': n}
  num_patches_list: tuple
  patch_sampling: str
  focal_alpha: float
  focal_gamma: float
  head_bias_prior: Optional[float]
  stage2_init: str
  flip: bool
  brightness_contrast: float
  rotate: bool
  log_every: int
  checkpoint_every: int
  keep_checkpoints: int
  profile_steps: tuple  # (first, last) steps of stage 1 to trace with jax.profiler, or ().


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """Which dataset, where, and at what size (configs/default.py, `data.*`)."""
  name: str
  hi_size: int
  num_classes: int
  manual_dir: str
  data_dir: str
  split_seed: int
  train_fraction: float
  num_examples: int
  kitti_label_ids: tuple


@dataclasses.dataclass(frozen=True)
class EvalPlan:
  batch_size: int


@dataclasses.dataclass(frozen=True)
class BenchmarkPlan:
  batch_sizes: Optional[tuple]  # None: the backend's default plan.
  repeats: int
  sliding_window: Optional[bool]  # None: the backend's default plan.
  max_seconds: float


@dataclasses.dataclass(frozen=True)
class PredictPlan:
  input: str
  output: str  # '' = <workdir>/predictions
  batch_size: int
  outputs: tuple
  png_compression: int


@dataclasses.dataclass(frozen=True)
class CalibratePlan:
  """What --mode=calibrate sweeps and how it picks the operating point (`calibrate.*`)."""
  holdout: float = 0.2  # Share of the train split held back for the sweep (seeded by `seed`).
  refine_counts: Optional[tuple] = None  # None: 1, 2, 4, ... up to Np*Np, and Np.
  thresholds: tuple = (None,)  # Each a float or None (no threshold).
  target: str = 'dice_drop'  # 'dice_drop' | 'latency'.
  max_dice_drop: float = 0.01
  latency_budget_ms: Optional[float] = None  # Required (> 0) for target 'latency'.


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything a mode needs, checked. `config` is the resolved ConfigDict, kept only to be saved."""
  seed: int
  spec: Spec
  train: TrainPlan
  data: DataSpec
  eval: EvalPlan
  benchmark: BenchmarkPlan
  predict: PredictPlan
  refine_count: Optional[int] = None  # As configured; None = Np patches per image (the authors).
  ablation_features: tuple = ('stage2_init', 'halo', 'refine_budget')
  calibrate: CalibratePlan = CalibratePlan()
  config: Any = dataclasses.field(repr=False, compare=False, default=None)

  def spec_for(self, num_patches: int) -> Spec:
    """The inference Spec at another Np (refine_count: Np unless the config fixed it)."""
    n = int(num_patches)
    return _check_spec(dataclasses.replace(
        self.spec, num_patches=n, refine_count=n if self.refine_count is None else self.refine_count))

  def geometry(self) -> dict:
    return {f: getattr(self.spec, 'input_norm') if f == 'model.input_norm' else
            get_field(self.config, f) for f in GEOMETRY}


# --- Reading ------------------------------------------------------------------------------------------


def get_field(config, dotted: str):
  """config['model']['width'] for 'model.width'."""
  node = config
  for key in dotted.split('.'):
    node = node[key]
  return node


class _Reader:
  """Reads fields of a ConfigDict with one check each; every error names the field and its value."""

  def __init__(self, config):
    self.config = config

  def raw(self, field: str, default=None):
    try:
      return get_field(self.config, field)
    except (KeyError, AttributeError):
      return default

  def fail(self, field: str, value, valid: str):
    raise SettingsError(f'config.{field}={value!r} is not valid: {valid}.')

  def int(self, field: str, low: Optional[int] = None, high: Optional[int] = None,
          default=None, optional: bool = False) -> Optional[int]:
    value = self.raw(field, default)
    if value is None and optional:
      return None
    if isinstance(value, bool) or not isinstance(value, int):
      if isinstance(value, float) and value.is_integer():
        value = int(value)
      else:
        self.fail(field, value, f'it must be a whole number{_range(low, high)}')
    if (low is not None and value < low) or (high is not None and value > high):
      self.fail(field, value, f'it must be a whole number{_range(low, high)}')
    return int(value)

  def float(self, field: str, low: Optional[float] = None, high: Optional[float] = None, *,
            low_open: bool = False, high_open: bool = False, default=None,
            optional: bool = False) -> Optional[float]:
    value = self.raw(field, default)
    if value is None and optional:
      return None
    valid = f'it must be a finite number{_range(low, high, low_open, high_open)}'
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
      self.fail(field, value, valid)
    if low is not None and (value < low or (low_open and value == low)):
      self.fail(field, value, valid)
    if high is not None and (value > high or (high_open and value == high)):
      self.fail(field, value, valid)
    return float(value)

  def bool(self, field: str, default=None) -> bool:
    value = self.raw(field, default)
    if not isinstance(value, bool):
      self.fail(field, value, 'it must be True or False')
    return value

  def choice(self, field: str, choices, default=None) -> str:
    value = self.raw(field, default)
    if value not in choices:
      self.fail(field, value, f'choose one of {", ".join(map(repr, choices))}')
    return str(value)

  def str(self, field: str, default='') -> str:
    value = self.raw(field, default)
    if value is None:
      return ''
    if not isinstance(value, str):
      self.fail(field, value, 'it must be a string')
    return value

  def ints(self, field: str, low: Optional[int] = None, high: Optional[int] = None, *,
           allow_empty: bool = False, default=None, optional: bool = False) -> Optional[tuple]:
    value = self.raw(field, default)
    if value is None and optional:
      return None
    valid = f'it must be a tuple of whole numbers{_range(low, high)}'
    if isinstance(value, (int, str)) or not hasattr(value, '__iter__'):
      self.fail(field, value, valid)
    value = tuple(value)
    if not value and not allow_empty:
      self.fail(field, value, valid + ', not empty')
    for v in value:
      if isinstance(v, bool) or not isinstance(v, int) or (low is not None and v < low) or (
          high is not None and v > high):
        self.fail(field, value, valid)
    return tuple(int(v) for v in value)


def _range(low, high, low_open: bool = False, high_open: bool = False) -> str:
  if low is not None and high is not None:
    return f' in {"(" if low_open else "["}{low}, {high}{")" if high_open else "]"}'
  if low is not None:
    return f' {">" if low_open else ">="} {low}'
  if high is not None:
    return f' <= {high}'
  return ''


def score_range(score: str, num_classes: int) -> float:
  """The largest value a patch score can take (the smallest is 0)."""
  classes = max(num_classes, 2)
  if score == 'entropy':
    return math.log(classes)
  if score == 'margin':
    return 1.0
  return 1.0 - 1.0 / classes  # 'distance'


def _check_spec(spec: Spec) -> Spec:
  """The relations between the geometry fields of one Spec (SettingsError naming the field)."""
  hi, n = spec.hi_size, spec.num_patches
  if hi % n:
    divisors = [d for d in range(1, min(hi, 64) + 1) if hi % d == 0]
    raise SettingsError(
        f'config.hi_size={hi} is not divisible by num_patches (Np)={n}: patches must tile the '
        f'image. Pick Np among the divisors of {hi} (e.g. {divisors[-6:]}) or change hi_size.')
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
  if spec.halo and spec.halo >= spec.patch_size * n:
    raise SettingsError(f'config.halo={spec.halo} is not valid: it must be smaller than hi_size.')
  return spec


def from_config(config) -> Settings:
  """Checks every field of `config` (see configs/default.py) and returns the typed Settings."""
  if not isinstance(config, (ml_collections.ConfigDict, dict)):
    raise SettingsError(f'config must be an ml_collections.ConfigDict (e.g. '
                        f'iterseg.get_config("ph2")), got {type(config).__name__}')
  r = _Reader(config)
  for section in ('model', 'data', 'train', 'eval', 'benchmark', 'predict'):
    if not hasattr(r.raw(section), 'get'):
      raise SettingsError(f'config.{section} is missing: start from configs/default.py.')
  seed = r.int('seed', 0, 2 ** 32 - 1)
  hi = r.int('hi_size', 1)
  num_classes = r.int('num_classes', 1, 255)
  stage1_size = r.int('stage1_size', 1, hi)
  width, depth = r.int('model.width', 1), r.int('model.depth', 1, 10)
  num_patches = r.int('num_patches', 1, hi)
  score = r.choice('score', SCORES)
  threshold = r.float('threshold', 0.0, score_range(score, num_classes), optional=True)
  refine_count = r.int('refine_count', 1, optional=True)
  spec = Spec(hi_size=hi, stage1_size=stage1_size, num_classes=num_classes,
              num_patches=num_patches, refine_count=num_patches if refine_count is None else
              refine_count, score=score, stage2_uses_coarse=r.bool('stage2_uses_coarse'),
              threshold=threshold, width=width, depth=depth,
              halo=r.int('halo', 0, default=0),
              input_norm=r.choice('model.input_norm', ('none', 'standardize'), default='none'),
              refine_budget=r.choice('refine_budget', BUDGETS, default='image'))
  _check_spec(spec)

  networks = r.raw('train.networks')
  if isinstance(networks, str) or not hasattr(networks, '__iter__') or not networks or any(
      n not in NETWORKS for n in networks) or len(set(networks)) != len(tuple(networks)):
    r.fail('train.networks', networks, f'a non-empty tuple of distinct names among {NETWORKS}')
  networks = tuple(networks)
  epochs = {n: r.int(f'train.{n}_epochs', 1 if n in networks else 0) for n in NETWORKS}
  nps = r.ints('train.num_patches_list', 1, hi)
  plan = TrainPlan(
      seed=seed, networks=networks, batch_size=r.int('train.batch_size', 1),
      learning_rate=r.float('train.learning_rate', 0.0, 1.0, low_open=True),
      warmup_steps=r.int('train.warmup_steps', 0, default=0),
      lr_schedule=r.choice('train.lr_schedule', ('constant', 'cosine'), default='constant'),
      epochs=epochs, num_patches_list=nps,
      patch_sampling=r.choice('train.patch_sampling', SAMPLING),
      focal_alpha=r.float('train.focal_alpha', 0.0, 1.0),
      focal_gamma=r.float('train.focal_gamma', 0.0, 10.0),
      head_bias_prior=r.float('train.head_bias_prior', 0.0, 1.0, low_open=True, high_open=True,
                              optional=True),
      stage2_init=r.choice('train.stage2_init', ('random', 'stage1'), default='random'),
      flip=r.bool('train.flip'),
      brightness_contrast=r.float('train.brightness_contrast', 0.0, 0.99),
      rotate=r.bool('train.rotate'), log_every=r.int('train.log_every', 1),
      checkpoint_every=r.int('train.checkpoint_every', 1),
      keep_checkpoints=r.int('train.keep_checkpoints', 1),
      profile_steps=r.ints('train.profile_steps', 0, allow_empty=True, default=()))
  if plan.profile_steps and (len(plan.profile_steps) != 2 or
                             plan.profile_steps[0] > plan.profile_steps[1]):
    r.fail('train.profile_steps', plan.profile_steps, 'give (first, last) steps, or () for none')

  data_name = r.choice('data.name', DATASETS)
  data = DataSpec(
      name=data_name, hi_size=hi, num_classes=num_classes,
      manual_dir=r.str('data.manual_dir'), data_dir=r.str('data.data_dir') or '~/tensorflow_datasets',
      split_seed=r.int('data.split_seed', 0, 2 ** 32 - 1),
      train_fraction=r.float('data.train_fraction', 0.0, 1.0, low_open=True),
      num_examples=r.int('data.num_examples', 2),
      kitti_label_ids=r.ints('data.kitti_label_ids', 0, 255))
  if data.train_fraction >= 1.0:
    r.fail('data.train_fraction', data.train_fraction, 'it must be in (0, 1): some cases are tested')

  batch_sizes = r.ints('benchmark.batch_sizes', 1, optional=True)
  sliding = r.raw('benchmark.sliding_window')
  if sliding is not None and not isinstance(sliding, bool):
    r.fail('benchmark.sliding_window', sliding, 'True, False, or None for the backend default')
  outputs = r.raw('predict.outputs', PREDICT_OUTPUTS)
  if isinstance(outputs, str):
    outputs = tuple(o.strip() for o in outputs.split(',') if o.strip())
  if not outputs or any(o not in PREDICT_OUTPUTS for o in outputs):
    r.fail('predict.outputs', outputs, f'a non-empty tuple among {PREDICT_OUTPUTS}')
  predict = PredictPlan(
      input=r.str('predict.input'), output=r.str('predict.output'),
      batch_size=r.int('predict.batch_size', 1, default=8), outputs=tuple(dict.fromkeys(outputs)),
      png_compression=r.int('predict.png_compression', 0, 9, default=0))
  if predict.input and predict.output and _same_path(predict.input, predict.output):
    r.fail('predict.output', predict.output, 'it must differ from config.predict.input, or the '
           'next run would segment its own outputs')
  settings = Settings(
      seed=seed, spec=spec, train=plan, data=data,
      eval=EvalPlan(batch_size=r.int('eval.batch_size', 1)),
      benchmark=BenchmarkPlan(batch_sizes=batch_sizes, repeats=r.int('benchmark.repeats', 1),
                              sliding_window=sliding,
                              max_seconds=r.float('benchmark.max_seconds', 0.0, low_open=True,
                                                  default=180.0)),
      predict=predict, refine_count=refine_count, ablation_features=_features(r),
      calibrate=_calibrate_plan(r, score_range(score, num_classes),
                                max(n * n for n in {num_patches, *nps})),
      config=config)
  for n in sorted({num_patches, *nps}):
    settings.spec_for(n)
  return settings


def _calibrate_plan(r: _Reader, max_threshold: float, max_refine: int) -> CalibratePlan:
  """The `calibrate.*` fields (each has a default, so a config without the section still works)."""
  d = CalibratePlan()
  refine_counts = r.ints('calibrate.refine_counts', 1, max_refine, optional=True,
                         default=d.refine_counts)
  thresholds = r.raw('calibrate.thresholds', d.thresholds)
  valid = (f'a non-empty tuple of None or numbers in [0, {max_threshold:g}] (the range of '
           f'config.score)')
  if isinstance(thresholds, (str, int, float)) or not hasattr(thresholds, '__iter__'):
    r.fail('calibrate.thresholds', thresholds, valid)
  thresholds = tuple(thresholds)
  if not thresholds or any(t is not None and (
      isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or
      not 0.0 <= t <= max_threshold) for t in thresholds):
    r.fail('calibrate.thresholds', thresholds, valid)
  plan = CalibratePlan(
      holdout=r.float('calibrate.holdout', 0.0, 1.0, low_open=True, default=d.holdout),
      refine_counts=None if refine_counts is None else tuple(sorted(set(refine_counts))),
      thresholds=tuple(dict.fromkeys(None if t is None else float(t) for t in thresholds)),
      target=r.choice('calibrate.target', CALIBRATE_TARGETS, default=d.target),
      max_dice_drop=r.float('calibrate.max_dice_drop', 0.0, 1.0, default=d.max_dice_drop),
      latency_budget_ms=r.float('calibrate.latency_budget_ms', 0.0, low_open=True, optional=True,
                                default=d.latency_budget_ms))
  if plan.target == 'latency' and plan.latency_budget_ms is None:
    r.fail('calibrate.latency_budget_ms', None, "set it > 0 (ms per image) for "
           "calibrate.target='latency'")
  return plan


def _features(r: _Reader) -> tuple:
  names = r.raw('ablation.features', ('stage2_init', 'halo', 'refine_budget'))
  if isinstance(names, str) or not hasattr(names, '__iter__') or not names or any(
      n not in ABLATION_FEATURES for n in names):
    r.fail('ablation.features', names, f'a non-empty tuple among {ABLATION_FEATURES}')
  return tuple(dict.fromkeys(names))


def _same_path(a: str, b: str) -> bool:
  return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


def complete(saved: dict, defaults: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A config read from an older workdir's config.json, with the fields it lacks from `defaults`."""
  config = ml_collections.ConfigDict(defaults.to_dict())
  _merge(config, saved)
  return config


def _merge(node, saved: dict):
  for key, value in saved.items():
    if isinstance(value, dict) and key in node and hasattr(node[key], 'keys'):
      _merge(node[key], value)
    else:
      with node.ignore_type():
        node[key] = tuple(value) if isinstance(value, list) else value
