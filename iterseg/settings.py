"""The config, read and checked once: a ConfigDict in, small frozen typed objects out, and back.

  s = settings.from_config(config)    # SettingsError naming the field on any bad or unknown field
  s.spec          inference, both protocols (spec.py: `Spec`, hashable, a jit static argument)
  s.train         `TrainPlan`      s.data  `DataSpec`     s.eval  `EvalPlan`      (plans.py)
  s.benchmark     `BenchmarkPlan`  s.predict `PredictPlan`  s.calibrate `CalibratePlan`
  settings.to_config(s)               # the ConfigDict of `s` (what config.json holds)
  s.vary('train', stage2_init='stage1')   # a checked variant (dataclasses.replace)

This is the only module that reads an ml_collections ConfigDict field by field. After `from_config`
the rest of the package takes these objects; variants are made with `dataclasses.replace`, never by
editing a ConfigDict. configs/default.py is the one list of fields and their defaults: a config that
lacks a field gets the default, a field that default.py does not have is an error naming the closest
one, and every value is checked for its type, its range and its relations to other fields.
"""

import dataclasses
import difflib
import math
import os
from typing import Optional

import ml_collections

from iterseg.configs import default as default_config
from iterseg.errors import SettingsError
from iterseg.plans import (CALIBRATE_TARGETS, DATASETS, NETWORKS, PLATFORMS, PREDICT_OUTPUTS,
                           SAMPLING, BenchmarkPlan, CalibratePlan, DataSpec, EvalPlan, ExportPlan,
                           PredictPlan, TrainPlan)
from iterseg.spec import (BUDGETS, RESOLUTIONS, SCORES, Spec, check_spec, config_field,
                          score_range)

MODES = ('train', 'evaluate', 'benchmark', 'prepare', 'predict', 'calibrate', 'ablate', 'export')
ABLATION_FEATURES = ('stage2_init', 'halo', 'refine_budget', 'input_norm')


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
  """Everything a mode needs, checked; `to_config` gives back the ConfigDict it stands for."""
  seed: int
  spec: Spec
  train: TrainPlan
  data: DataSpec
  eval: EvalPlan
  benchmark: BenchmarkPlan
  predict: PredictPlan
  calibrate: CalibratePlan
  export: ExportPlan
  refine_count: Optional[int]  # As configured; None = Np patches per image (the authors).
  ablation_features: tuple = config_field('ablation.features')

  def jobs(self) -> list:
    """[(network, Np or None)] that --mode=train trains, in order: stage 1, stage 2 for each Np of
    train.num_patches_list, the baseline (those of train.networks)."""
    order = ([('stage1', None)] + [('stage2', n) for n in self.train.num_patches_list] +
             [('baseline', None)])
    return [(network, n) for network, n in order if network in self.train.networks]

  def spec_for(self, num_patches: int) -> Spec:
    """The inference Spec at another Np (refine_count: Np unless the config fixed it)."""
    n = int(num_patches)
    return check_spec(dataclasses.replace(
        self.spec, num_patches=n, refine_count=n if self.refine_count is None else self.refine_count))

  def vary(self, section: str, **fields) -> 'Settings':
    """These settings with `fields` of `section` replaced ('spec', 'train', ..., or 'settings' for
    Settings' own fields such as refine_count), the relations between fields checked again."""
    if section == 'spec' and 'refine_count' in fields:
      raise ValueError("refine_count is a Settings field: vary('settings', refine_count=k)")
    if section == 'settings':
      varied = dataclasses.replace(self, **fields)
    else:
      varied = dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section),
                                                                         **fields)})
    varied = dataclasses.replace(varied, spec=varied.spec_for(varied.spec.num_patches))
    return _check_relations(varied)

  def with_placeholder_statistics(self) -> 'Settings':
    """These settings, with mid-grey input statistics where input_norm='standardize' has none: for
    timing random networks, whose outputs mean nothing."""
    if self.spec.input_norm != 'standardize' or self.spec.input_mean is not None:
      return self
    return self.vary('spec', input_mean=(0.5,) * 3, input_std=(0.25,) * 3)

  def at_operating_point(self, point: dict) -> 'Settings':
    """Settings for inference at an operating point (run.Run.operating_point's schema: the
    point --mode=calibrate chose): Np = point['num_patches'] only (train.num_patches_list = (Np,),
    since a fixed k need not fit the other grids), its refine_count and refine_fraction where set,
    and its threshold."""
    n = int(point['num_patches'])
    spec = dataclasses.replace(self.spec, num_patches=n, threshold=point.get('threshold'))
    train = dataclasses.replace(self.train, num_patches_list=(n,))
    if point.get('refine_fraction') is not None:
      spec = dataclasses.replace(spec, refine_fraction=point['refine_fraction'])
    count = point.get('refine_count')
    return self.vary('settings', spec=spec, train=train,
                     refine_count=self.refine_count if count is None else count)


_SECTIONS = (('spec', ''), ('train', 'train.'), ('data', 'data.'), ('eval', 'eval.'),
             ('benchmark', 'benchmark.'), ('predict', 'predict.'), ('calibrate', 'calibrate.'),
             ('export', 'export.'))


# --- Reading ------------------------------------------------------------------------------------------


def get_field(config, dotted: str):
  """config['model']['width'] for 'model.width'."""
  node = config
  for key in dotted.split('.'):
    node = node[key]
  return node


def flatten(config, prefix: str = '') -> dict:
  """{'model.width': 64, ...}: every leaf field of a nested ConfigDict or dict."""
  out = {}
  for key, value in config.items():
    if hasattr(value, 'items'):
      out.update(flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def _unflatten(flat: dict) -> dict:
  out = {}
  for dotted, value in flat.items():
    node = out
    *path, leaf = dotted.split('.')
    for key in path:
      node = node.setdefault(key, {})
    node[leaf] = value
  return out


def known_fields() -> dict:
  """{dotted field: default value} of configs/default.py, references resolved."""
  return flatten(default_config.get_config().to_dict())


def check_known(config, where: str = 'config') -> None:
  """SettingsError naming the first field of `config` that configs/default.py does not have, with
  the closest known one (a misspelled field in a config file must not be ignored)."""
  known = known_fields()
  sections = {k.rsplit('.', 1)[0] for k in known if '.' in k}
  for field, value in flatten(config).items():
    if field in known:
      continue
    if field in sections or any(k.startswith(field + '.') for k in known):
      raise SettingsError(f'{where}: {field}={value!r} replaces a whole section; set its fields '
                          f'instead (configs/default.py lists them).')
    close = difflib.get_close_matches(field, list(known), n=1, cutoff=0.6)
    hint = f'; did you mean {close[0]}?' if close else ''
    raise SettingsError(f'{where}: unknown field {field}{hint} (configs/default.py lists every '
                        f'field).')


def complete(config) -> ml_collections.ConfigDict:
  """A copy of `config` (ConfigDict or dict) with every field it lacks taken from configs/default.py,
  references resolved."""
  flat = known_fields()
  given = flatten(config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config)
  flat.update({k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})
  return ml_collections.ConfigDict(_unflatten(flat))


class _Reader:
  """Reads fields of a complete ConfigDict with one check each; every error names the field."""

  def __init__(self, config):
    self.config = config

  def raw(self, field: str):
    return get_field(self.config, field)

  def fail(self, field: str, value, valid: str):
    raise SettingsError(f'config.{field}={value!r} is not valid: {valid}.')

  def int(self, field: str, low: Optional[int] = None, high: Optional[int] = None,
          optional: bool = False) -> Optional[int]:
    value = self.raw(field)
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
            low_open: bool = False, high_open: bool = False,
            optional: bool = False) -> Optional[float]:
    value = self.raw(field)
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

  def bool(self, field: str) -> bool:
    value = self.raw(field)
    if not isinstance(value, bool):
      self.fail(field, value, 'it must be True or False')
    return value

  def choice(self, field: str, choices) -> str:
    value = self.raw(field)
    if value not in choices:
      self.fail(field, value, f'choose one of {", ".join(map(repr, choices))}')
    return str(value)

  def str(self, field: str) -> str:
    value = self.raw(field)
    if value is None:
      return ''
    if not isinstance(value, str):
      self.fail(field, value, 'it must be a string')
    return value

  def names(self, field: str, choices) -> tuple:
    """A non-empty tuple of distinct names among `choices` (a string 'a,b' is split)."""
    value = self.raw(field)
    if isinstance(value, str):
      value = tuple(v.strip() for v in value.split(',') if v.strip())
    if not hasattr(value, '__iter__') or not value or any(v not in choices for v in value):
      self.fail(field, value, f'a non-empty tuple among {choices}')
    return tuple(dict.fromkeys(value))

  def channels(self, field: str, low: float, high: float, *, low_open: bool = False
               ) -> Optional[tuple]:
    """None, or one finite number per RGB channel in [low, high] ((low, high] with low_open)."""
    value = self.raw(field)
    if value is None:
      return None
    if isinstance(value, (str, int, float)) or not hasattr(value, '__iter__') or len(value) != 3 or any(
        isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v > high or
        v < low or (low_open and v == low) for v in value):
      self.fail(field, value, f'None or 3 numbers (R, G, B) each{_range(low, high, low_open)}')
    return tuple(float(v) for v in value)

  def ints(self, field: str, low: Optional[int] = None, high: Optional[int] = None, *,
           allow_empty: bool = False, optional: bool = False) -> Optional[tuple]:
    value = self.raw(field)
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


def from_config(config) -> Settings:
  """Checks every field of `config` (see configs/default.py) and returns the typed Settings."""
  if not isinstance(config, (ml_collections.ConfigDict, dict)):
    raise SettingsError(f'a config must be an ml_collections.ConfigDict (e.g. '
                        f'iterseg.get_config("ph2")), got {type(config).__name__}')
  check_known(config)
  r = _Reader(complete(config))
  seed = r.int('seed', 0, 2 ** 32 - 1)
  hi = r.int('hi_size', 1)
  num_classes = r.int('num_classes', 1, 255)
  score = r.choice('score', SCORES)
  refine_count = r.int('refine_count', 1, optional=True)
  num_patches = r.int('num_patches', 1, hi)
  depth = r.int('model.depth', 1, 10)
  spec = Spec(hi_size=hi, stage1_size=r.int('stage1_size', 1, hi), num_classes=num_classes,
              num_patches=num_patches,
              refine_count=num_patches if refine_count is None else refine_count, score=score,
              stage2_uses_coarse=r.bool('stage2_uses_coarse'),
              threshold=r.float('threshold', 0.0, score_range(score, num_classes), optional=True),
              width=r.int('model.width', 1), depth=depth,
              halo=r.int('halo', 0), input_norm=r.choice('model.input_norm', ('none', 'standardize')),
              input_mean=r.channels('model.input_mean', 0.0, 1.0),
              input_std=r.channels('model.input_std', 0.0, 1.0, low_open=True),
              refine_budget=r.choice('refine_budget', BUDGETS),
              resolution=r.choice('resolution', RESOLUTIONS),
              dtype=r.choice('model.dtype', ('float32', 'bfloat16')),
              error_head=r.bool('model.error_head'),
              refine_fraction=r.float('native.refine_fraction', 0.0, 1.0, low_open=True),
              chunk=r.int('native.chunk', 1), bucket=r.int('native.bucket', 2 ** depth),
              window=r.int('native.window', 0), overlap=r.float('native.overlap', 0.0, 0.9),
              max_pixels=r.int('native.max_pixels', 0))
  check_spec(spec)

  networks = r.raw('train.networks')
  if isinstance(networks, str) or not hasattr(networks, '__iter__') or not networks or any(
      n not in NETWORKS for n in networks) or len(set(networks)) != len(tuple(networks)):
    r.fail('train.networks', networks, f'a non-empty tuple of distinct names among {NETWORKS}')
  networks = tuple(networks)
  nps = r.ints('train.num_patches_list', 1, hi)
  plan = TrainPlan(
      seed=seed, networks=networks, batch_size=r.int('train.batch_size', 1),
      learning_rate=r.float('train.learning_rate', 0.0, 1.0, low_open=True),
      warmup_steps=r.int('train.warmup_steps', 0),
      lr_schedule=r.choice('train.lr_schedule', ('constant', 'cosine')),
      epochs={n: r.int(f'train.{n}_epochs', 1 if n in networks else 0) for n in NETWORKS},
      num_patches_list=nps, patch_sampling=r.choice('train.patch_sampling', SAMPLING),
      focal_alpha=r.float('train.focal_alpha', 0.0, 1.0),
      focal_gamma=r.float('train.focal_gamma', 0.0, 10.0),
      error_weight=r.float('train.error_weight', 0.0),
      exclude_holdout=r.bool('train.exclude_holdout'),
      head_bias_prior=r.float('train.head_bias_prior', 0.0, 1.0, low_open=True, high_open=True,
                              optional=True),
      stage2_init=r.choice('train.stage2_init', ('random', 'stage1')),
      flip=r.bool('train.flip'),
      brightness_contrast=r.float('train.brightness_contrast', 0.0, 0.99),
      rotate=r.bool('train.rotate'), log_every=r.int('train.log_every', 1),
      checkpoint_every=r.int('train.checkpoint_every', 1),
      keep_checkpoints=r.int('train.keep_checkpoints', 1),
      profile_steps=r.ints('train.profile_steps', 0, allow_empty=True))
  if plan.profile_steps and (len(plan.profile_steps) != 2 or
                             plan.profile_steps[0] > plan.profile_steps[1]):
    r.fail('train.profile_steps', plan.profile_steps, 'give (first, last) steps, or () for none')

  data = DataSpec(
      name=r.choice('data.name', DATASETS), hi_size=hi, num_classes=num_classes,
      manual_dir=r.str('data.manual_dir'), data_dir=r.str('data.data_dir') or '~/tensorflow_datasets',
      split_seed=r.int('data.split_seed', 0, 2 ** 32 - 1),
      train_fraction=r.float('data.train_fraction', 0.0, 1.0, low_open=True),
      num_examples=r.int('data.num_examples', 2),
      kitti_label_ids=r.ints('data.kitti_label_ids', 0, 255), resolution=spec.resolution,
      scale=r.float('data.scale', 0.0, 16.0, low_open=True),
      synthetic_sides=r.ints('data.synthetic_sides', 2 ** spec.depth, 65536),
      synthetic_kind=r.choice('data.synthetic_kind', ('lesions', 'vessels')))
  if data.name == 'synthetic' and data.synthetic_kind == 'vessels' and spec.resolution == 'native':
    r.fail('data.synthetic_kind', 'vessels', "synthetic vessels are square only (resolution='square')")
  if len(data.synthetic_sides) != 2 or data.synthetic_sides[0] > data.synthetic_sides[1]:
    r.fail('data.synthetic_sides', data.synthetic_sides, 'give (smallest, largest) side in px')
  if data.train_fraction >= 1.0:
    r.fail('data.train_fraction', data.train_fraction, 'it must be in (0, 1): some cases are tested')

  sliding = r.raw('benchmark.sliding_window')
  if sliding is not None and not isinstance(sliding, bool):
    r.fail('benchmark.sliding_window', sliding, 'True, False, or None for the backend default')
  predict = PredictPlan(
      input=r.str('predict.input'), output=r.str('predict.output'),
      batch_size=r.int('predict.batch_size', 1),
      outputs=r.names('predict.outputs', PREDICT_OUTPUTS),
      png_compression=r.int('predict.png_compression', 0, 9),
      skip_existing=r.bool('predict.skip_existing'))
  if spec.score == 'learned' and not spec.error_head:
    r.fail('score', 'learned', 'it needs config.model.error_head=True (stage 1 learns its error)')
  if predict.input and predict.output and _same_path(predict.input, predict.output):
    r.fail('predict.output', predict.output, 'it must differ from config.predict.input, or the '
           'next run would segment its own outputs')
  settings = Settings(
      seed=seed, spec=spec, train=plan, data=data,
      eval=EvalPlan(batch_size=r.int('eval.batch_size', 1)),
      benchmark=BenchmarkPlan(batch_sizes=r.ints('benchmark.batch_sizes', 1, optional=True),
                              repeats=r.int('benchmark.repeats', 1), sliding_window=sliding,
                              max_seconds=r.float('benchmark.max_seconds', 0.0, low_open=True),
                              native_sides=r.ints('benchmark.native_sides', 2 ** depth),
                              peak_tflops=r.float('benchmark.peak_tflops', 0.0, low_open=True,
                                                  optional=True),
                              train=r.bool('benchmark.train')),
      export=ExportPlan(batch_size=r.int('export.batch_size', 1),
                        platforms=r.names('export.platforms', PLATFORMS),
                        output=r.str('export.output')),
      predict=predict,
      calibrate=_calibrate_plan(r, score_range(score, num_classes),
                                max(n * n for n in {num_patches, *nps})),
      refine_count=refine_count,
      ablation_features=r.names('ablation.features', ABLATION_FEATURES))
  return _check_relations(settings)


def _check_relations(s: Settings) -> Settings:
  """The relations between fields that a variant can break: the geometry at every Np, and the
  threshold within the score's range."""
  for n in sorted({s.spec.num_patches, *s.train.num_patches_list}):
    s.spec_for(n)
  top = score_range(s.spec.score, s.spec.num_classes)
  if s.spec.threshold is not None and not 0.0 <= s.spec.threshold <= top:
    raise SettingsError(f'config.threshold={s.spec.threshold!r} is not valid: it must be a finite '
                        f'number in [0.0, {top}].')
  if s.spec.resolution == 'native':
    _check_native(s)
  return s


def _check_native(s: Settings):
  """What resolution='native' needs of the geometry: an exact downscale factor and tiles made of
  whole stage-1 pixels, a U-Net deep enough for neither, one grid size."""
  spec = s.spec
  if spec.hi_size % spec.stage1_size:
    raise SettingsError(f'config.stage1_size={spec.stage1_size} is not valid for '
                        f"resolution='native': hi_size={spec.hi_size} (the crop side) must be a "
                        f'multiple of it, so that stage 1 downscales by a whole factor.')
  if spec.patch_size % spec.downscale:
    raise SettingsError(f'config.num_patches={spec.num_patches} is not valid for '
                        f"resolution='native': the tile side hi_size / num_patches = "
                        f'{spec.patch_size} must be a multiple of the downscale factor '
                        f'{spec.downscale} (hi_size / stage1_size).')
  cell = spec.patch_size // spec.downscale
  if spec.bucket % cell:
    raise SettingsError(f'config.native.bucket={spec.bucket} is not valid: it must be a multiple '
                        f'of a tile\'s side in stage-1 pixels, {cell}.')
  if tuple(s.train.num_patches_list) != (spec.num_patches,):
    raise SettingsError(f'config.train.num_patches_list={s.train.num_patches_list} is not valid '
                        f"for resolution='native': it must be (num_patches,) = "
                        f'({spec.num_patches},), the one tile size.')
  if spec.window and spec.window < 2 ** spec.depth:
    raise SettingsError(f'config.native.window={spec.window} is not valid: it must be 0 '
                        f'(hi_size) or at least 2**depth = {2 ** spec.depth} px.')


def _calibrate_plan(r: _Reader, max_threshold: float, max_refine: int) -> CalibratePlan:
  """The `calibrate.*` fields."""
  refine_counts = r.ints('calibrate.refine_counts', 1, max_refine, optional=True)
  thresholds = r.raw('calibrate.thresholds')
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
      holdout=r.float('calibrate.holdout', 0.0, 1.0, low_open=True),
      refine_counts=None if refine_counts is None else tuple(sorted(set(refine_counts))),
      thresholds=tuple(dict.fromkeys(None if t is None else float(t) for t in thresholds)),
      target=r.choice('calibrate.target', CALIBRATE_TARGETS),
      max_dice_drop=r.float('calibrate.max_dice_drop', 0.0, 1.0),
      latency_budget_ms=r.float('calibrate.latency_budget_ms', 0.0, low_open=True, optional=True),
      refine_fractions=_fractions(r, 'calibrate.refine_fractions'))
  if plan.target == 'latency' and plan.latency_budget_ms is None:
    r.fail('calibrate.latency_budget_ms', None, "set it > 0 (ms per image) for "
           "calibrate.target='latency'")
  return plan


def _fractions(r: _Reader, field: str) -> tuple:
  """A non-empty tuple of numbers in (0, 1], sorted, without repeats."""
  value = r.raw(field)
  if isinstance(value, (str, int, float)) or not hasattr(value, '__iter__') or not value or any(
      isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1 for v in value):
    r.fail(field, value, 'a non-empty tuple of numbers in (0, 1]')
  return tuple(sorted({float(v) for v in value}))


def _same_path(a: str, b: str) -> bool:
  return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


# --- Writing ------------------------------------------------------------------------------------------


def to_dict(s: Settings) -> dict:
  """The nested config dict that `s` stands for: from_config(to_dict(s)) == s."""
  flat = {'seed': s.seed, 'refine_count': s.refine_count, 'ablation.features': s.ablation_features}
  for section, prefix in _SECTIONS:
    part = getattr(s, section)
    for f in dataclasses.fields(part):
      path = f.metadata.get('config', prefix + f.name)
      if path is not None:
        flat[path] = getattr(part, f.name)
  flat.update({f'train.{n}_epochs': e for n, e in s.train.epochs.items()})
  return _unflatten(flat)


def to_config(s: Settings) -> ml_collections.ConfigDict:
  """The ConfigDict that `s` stands for (what config.json holds)."""
  return ml_collections.ConfigDict(to_dict(s))


def from_json(saved: dict) -> Settings:
  """The Settings of a workdir's config.json (lists read as tuples; fields it predates get the
  defaults)."""
  return from_config(complete(saved))
