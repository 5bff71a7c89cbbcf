"""The config, read and checked once: a ConfigDict in, small frozen typed objects out, and back.

  s = settings.from_config(config)    # SettingsError naming the field on any bad or unknown field
  s.spec          inference, both protocols (spec.py: `Spec`, hashable, a jit static argument)
  s.train         `TrainPlan`      s.data  `DataSpec`     s.eval  `EvalPlan`      (plans.py)
  s.benchmark     `BenchmarkPlan`  s.predict `PredictPlan`  s.calibrate `CalibratePlan`
  settings.to_config(s)               # the ConfigDict of `s` (what config.json holds)
  s.vary('train', stage2_init='stage1')   # a checked variant (dataclasses.replace)

Only this module reads a ConfigDict. configs/default.py lists every field and its default: a field
a config lacks gets it, an unknown one is an error naming the closest, and every value is checked
for its type, its range (as its dataclass field declares: spec.checked) and its relations.
"""

import dataclasses
import difflib
import functools
import os
from typing import Optional

import ml_collections

from iterseg.configs import default as default_config
from iterseg.errors import SettingsError
from iterseg.files import describe_number, is_number
from iterseg.plans import (NETWORKS, BenchmarkPlan, CalibratePlan, DataSpec, EvalPlan, ExportPlan,
                           PredictPlan, TrainPlan)
from iterseg.spec import SCORES, Spec, check_spec, config_field, score_range

MODES = ('train', 'evaluate', 'benchmark', 'prepare', 'predict', 'calibrate', 'ablate', 'export')
ABLATION_FEATURES = ('stage2_init', 'halo', 'refine_budget', 'input_norm', 'patch_sampling',
                     'rotate', 'brightness_contrast', 'gamma', 'lr_schedule', 'select_checkpoint')


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
    k = n if self.refine_count is None else self.refine_count
    return check_spec(dataclasses.replace(self.spec, num_patches=n, refine_count=k))

  def vary(self, section: str, **fields) -> 'Settings':
    """These settings with `fields` of `section` replaced ('spec', 'train', ..., or 'settings' for
    Settings' own fields such as refine_count), the relations between fields checked again."""
    if section == 'spec' and 'refine_count' in fields:
      raise ValueError("refine_count is a Settings field: vary('settings', refine_count=k)")
    if section != 'settings':
      fields = {section: dataclasses.replace(getattr(self, section), **fields)}
    varied = dataclasses.replace(self, **fields)
    varied = dataclasses.replace(varied, spec=varied.spec_for(varied.spec.num_patches))
    return _check_relations(varied)

  def with_placeholder_statistics(self) -> 'Settings':
    """These settings with mid-grey input statistics where 'standardize' has none (to time random
    networks, whose outputs mean nothing)."""
    if self.spec.input_norm != 'standardize' or self.spec.input_mean is not None:
      return self
    return self.vary('spec', input_mean=(0.5,) * 3, input_std=(0.25,) * 3)

  def at_operating_point(self, point: dict) -> 'Settings':
    """Settings at what --mode=calibrate chose (run.Run.operating_point): Np = point['num_patches']
    alone (train.num_patches_list = (Np,): a fixed k need not fit the other grids), and its
    refine_count and refine_fraction where set, and its threshold."""
    n = int(point['num_patches'])
    fraction = point.get('refine_fraction') or self.spec.refine_fraction
    spec = dataclasses.replace(self.spec, num_patches=n, threshold=point.get('threshold'),
                               refine_fraction=fraction)
    train = dataclasses.replace(self.train, num_patches_list=(n,))
    return self.vary('settings', spec=spec, train=train,
                     refine_count=point.get('refine_count') or self.refine_count)


_SECTIONS = ('spec', 'train', 'data', 'eval', 'benchmark', 'predict', 'calibrate', 'export')


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


def complete(config) -> ml_collections.ConfigDict:
  """A copy of `config` (ConfigDict or dict) with every field it lacks taken from configs/default.py
  (references resolved); SettingsError naming the first field default.py does not have, with the
  closest known one (a misspelled field in a config file must not be ignored)."""
  flat = known_fields()
  given = flatten(config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config)
  for field, value in given.items():
    if field in flat:
      continue
    if any(k.startswith(field + '.') for k in flat):
      raise SettingsError(f'config: {field}={value!r} replaces a whole section; set its fields '
                          f'instead (configs/default.py lists them).')
    close = difflib.get_close_matches(field, list(flat), n=1, cutoff=0.6)
    hint = f'; did you mean {close[0]}?' if close else ''
    raise SettingsError(f'config: unknown field {field}{hint} (configs/default.py lists every '
                        f'field).')
  flat.update({k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})
  return ml_collections.ConfigDict(_unflatten(flat))


def _fail(field: str, value, valid: str):
  raise SettingsError(f'config.{field}={value!r} is not valid: {valid}.')


class _Reader:
  """Reads fields of a complete ConfigDict with one check each; every error names the field."""

  def __init__(self, config):
    self.config = config

  def raw(self, field: str):
    return functools.reduce(lambda node, key: node[key], field.split('.'), self.config)

  def number(self, field: str, low=None, high=None, *, whole=False, low_open=False,
             high_open=False, optional=False):
    """A finite number (an int if `whole`) within the bounds; None where `optional`."""
    value = self.raw(field)
    if value is None and optional:
      return None
    if whole and isinstance(value, float) and value.is_integer():
      value = int(value)
    if not is_number(value, low, high, low_open, high_open, whole):
      _fail(field, value, f'it must be {describe_number(low, high, low_open, high_open, whole)}')
    return int(value) if whole else float(value)

  float = number
  int = functools.partialmethod(number, whole=True)

  def value(self, field: str, good, valid: str):
    """The value at `field` if `good`, else SettingsError saying what is `valid`."""
    value = self.raw(field)
    if not good(value):
      _fail(field, value, valid)
    return value

  def bool(self, field: str, optional=False):
    return self.value(field, lambda v: isinstance(v, bool) or (optional and v is None),
                      f'it must be True or False{" (or None)" if optional else ""}')

  def choice(self, field: str, choices):
    return self.value(field, lambda v: v in choices,
                      f'choose one of {", ".join(map(repr, choices))}')

  def str(self, field: str):
    return self.value(field, lambda v: v is None or isinstance(v, str), 'it must be a string') or ''

  def items(self, field: str, good, valid: str, *, optional=False, empty=False, size=None,
            split=False) -> Optional[tuple]:
    """The tuple at `field`, every item `good`, else SettingsError saying `valid`: None where
    `optional`, () where `empty`, exactly `size` items where given; `split`: 'a,b' is ('a', 'b')."""
    value = self.raw(field)
    if value is None and optional:
      return None
    if split and isinstance(value, str):
      value = tuple(v.strip() for v in value.split(',') if v.strip())
    seq = None if isinstance(value, str) or not hasattr(value, '__iter__') else tuple(value)
    if seq is None or not (seq or empty) or size not in (None, len(seq)) or not all(map(good, seq)):
      _fail(field, value, valid)
    return seq

  def ints(self, field: str, low=None, high=None, *, allow_empty=False, optional=False):
    """A tuple of whole numbers within the bounds (None where `optional`)."""
    seq = self.items(field, lambda v: is_number(v, low, high, whole=True),
                     f'it must be a {"" if allow_empty else "non-empty "}tuple, each '
                     f'{describe_number(low, high, whole=True)}',
                     optional=optional, empty=allow_empty)
    return None if seq is None else tuple(map(int, seq))

  def channels(self, field: str, low: float, high: float, *, low_open=False):
    """None, or one finite number per RGB channel in [low, high] ((low, high] with low_open)."""
    seq = self.items(field, lambda v: is_number(v, low, high, low_open),
                     f'None or 3 numbers (R, G, B), each {describe_number(low, high, low_open)}',
                     optional=True, size=3)
    return None if seq is None else tuple(map(float, seq))

  def section(self, cls, prefix: str = '', **given):
    """A `cls` of the fields `given`, and of the others each read with the check it declares
    (spec.checked) from its config path (<prefix><name> unless it names one)."""
    for f in dataclasses.fields(cls):
      if f.name not in given:
        kind, bounds, options = f.metadata['check']
        path = f.metadata.get('config', prefix + f.name)
        given[f.name] = getattr(self, kind)(path, *bounds, **options)
    return cls(**given)

  def names(self, field: str, choices) -> tuple:
    """A non-empty tuple of names among `choices` (a string 'a,b' is split), repeats dropped."""
    return tuple(dict.fromkeys(self.items(field, lambda v: v in choices,
                                          f'a non-empty tuple among {choices}', split=True)))


def from_config(config) -> Settings:
  """Checks every field of `config` (see configs/default.py) and returns the typed Settings."""
  if not isinstance(config, (ml_collections.ConfigDict, dict)):
    raise SettingsError(f'a config must be an ml_collections.ConfigDict (e.g. '
                        f'iterseg.get_config("ph2")), got {type(config).__name__}')
  r = _Reader(complete(config))
  seed = r.int('seed', 0, 2 ** 32 - 1)
  hi = r.int('hi_size', 1)
  num_classes = r.int('num_classes', 1, 255)
  score = r.choice('score', SCORES)
  top = score_range(score, num_classes)
  refine_count = r.int('refine_count', 1, optional=True)
  num_patches = r.int('num_patches', 1, hi)
  depth = r.int('model.depth', 1, 10)
  spec = check_spec(r.section(
      Spec, hi_size=hi, stage1_size=r.int('stage1_size', 1, hi), num_classes=num_classes,
      num_patches=num_patches, refine_count=refine_count or num_patches, score=score, depth=depth,
      threshold=r.float('threshold', 0.0, top, optional=True),
      bucket=r.int('native.bucket', 2 ** depth)))
  if spec.score == 'learned' and not spec.error_head:
    _fail('score', 'learned', 'it needs config.model.error_head=True (stage 1 learns its error)')

  valid = f'a non-empty tuple of distinct names among {NETWORKS}'
  networks = r.items('train.networks', lambda n: n in NETWORKS, valid)
  if len(set(networks)) != len(networks):
    _fail('train.networks', networks, valid)
  nps = r.ints('train.num_patches_list', 1, hi)
  plan = r.section(
      TrainPlan, 'train.', seed=seed, networks=networks, num_patches_list=nps,
      epochs={n: r.int(f'train.{n}_epochs', 1 if n in networks else 0) for n in NETWORKS})
  if plan.select_checkpoint == 'best' and not plan.exclude_holdout:
    _fail('train.select_checkpoint', 'best', 'it needs config.train.exclude_holdout=True (the '
          'checkpoints are scored on the held-out images, which must not be trained on)')
  if plan.profile_steps and (len(plan.profile_steps) != 2 or
                             plan.profile_steps[0] > plan.profile_steps[1]):
    _fail('train.profile_steps', plan.profile_steps, 'give (first, last) steps, or () for none')

  data = r.section(DataSpec, 'data.', hi_size=hi, num_classes=num_classes,
                   data_dir=r.str('data.data_dir') or '~/tensorflow_datasets',
                   resolution=spec.resolution,
                   synthetic_sides=r.ints('data.synthetic_sides', 2 ** depth, 65536))
  if data.name == 'synthetic' and data.synthetic_kind == 'vessels' and spec.resolution == 'native':
    _fail('data.synthetic_kind', 'vessels', "vessels are square only (resolution='square')")
  if len(data.synthetic_sides) != 2 or data.synthetic_sides[0] > data.synthetic_sides[1]:
    _fail('data.synthetic_sides', data.synthetic_sides, 'give (smallest, largest) side in px')

  predict = r.section(PredictPlan, 'predict.')
  paths = {os.path.realpath(os.path.expanduser(p)) for p in (predict.input, predict.output)}
  if predict.input and predict.output and len(paths) == 1:
    _fail('predict.output', predict.output, 'it must differ from config.predict.input, or the '
          'next run would segment its own outputs')

  refine_counts = r.ints('calibrate.refine_counts', 1, max(n * n for n in {num_patches, *nps}),
                         optional=True)
  thresholds = r.items('calibrate.thresholds', lambda t: t is None or is_number(t, 0, top),
                       f'a non-empty tuple of None or numbers in [0, {top:g}] (the range of '
                       f'config.score)')
  fractions = r.items('calibrate.refine_fractions', lambda v: is_number(v, 0, 1, low_open=True),
                      'a non-empty tuple of numbers in (0, 1]')
  calibrate = r.section(
      CalibratePlan, 'calibrate.',
      refine_counts=None if refine_counts is None else tuple(sorted(set(refine_counts))),
      thresholds=tuple(dict.fromkeys(None if t is None else float(t) for t in thresholds)),
      refine_fractions=tuple(sorted({float(v) for v in fractions})))
  if calibrate.target == 'latency' and calibrate.latency_budget_ms is None:
    _fail('calibrate.latency_budget_ms', None, "set it > 0 (ms per image) for "
          "calibrate.target='latency'")
  return _check_relations(Settings(
      seed=seed, spec=spec, train=plan, data=data, eval=r.section(EvalPlan, 'eval.'),
      benchmark=r.section(BenchmarkPlan, 'benchmark.',
                          native_sides=r.ints('benchmark.native_sides', 2 ** depth),
                          slide_sides=r.ints('benchmark.slide_sides', 2 ** depth,
                                             allow_empty=True)),
      export=r.section(ExportPlan, 'export.'), predict=predict, calibrate=calibrate,
      refine_count=refine_count, ablation_features=r.names('ablation.features', ABLATION_FEATURES)))


def _check_relations(s: Settings) -> Settings:
  """The relations between fields that a variant can break: the geometry at every Np, and the
  threshold within the score's range."""
  for n in sorted({s.spec.num_patches, *s.train.num_patches_list}):
    s.spec_for(n)
  top = score_range(s.spec.score, s.spec.num_classes)
  if s.spec.threshold is not None and not 0.0 <= s.spec.threshold <= top:
    _fail('threshold', s.spec.threshold, f'it must be a finite number in [0.0, {top}]')
  if s.spec.resolution == 'native':
    _check_native(s)
  return s


def _check_native(s: Settings):
  """What resolution='native' needs of the geometry: an exact downscale factor, tiles made of whole
  stage-1 pixels, one tile size, and windows a U-Net of this depth can take."""
  spec, native = s.spec, "resolution='native' needs"
  if spec.hi_size % spec.stage1_size:
    _fail('stage1_size', spec.stage1_size, f'{native} hi_size={spec.hi_size} (the crop side) to '
          f'be a multiple of it, so that stage 1 downscales by a whole factor')
  if spec.patch_size % spec.downscale:
    _fail('num_patches', spec.num_patches, f'{native} the tile side hi_size / num_patches = '
          f'{spec.patch_size} to be a multiple of the downscale factor {spec.downscale}')
  cell = spec.patch_size // spec.downscale
  if spec.bucket % cell:
    _fail('native.bucket', spec.bucket, f"it must be a multiple of a tile's stage-1 side, {cell}")
  if tuple(s.train.num_patches_list) != (spec.num_patches,):
    _fail('train.num_patches_list', s.train.num_patches_list,
          f'{native} (num_patches,) = ({spec.num_patches},), the one tile size')
  if spec.window and spec.window < 2 ** spec.depth:
    _fail('native.window', spec.window,
          f'it must be 0 (hi_size) or at least 2**depth = {2 ** spec.depth} px')


def to_dict(s: Settings) -> dict:
  """The nested config dict that `s` stands for: from_config(to_dict(s)) == s."""
  flat = {'seed': s.seed, 'refine_count': s.refine_count, 'ablation.features': s.ablation_features}
  for section in _SECTIONS:
    part, prefix = getattr(s, section), '' if section == 'spec' else f'{section}.'
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
  return from_config(saved)
