"""The config is checked once, field by field: every bad value is one SettingsError naming the field,
its value and what would be valid; good configs give typed, frozen settings."""

import dataclasses

import pytest

from iterseg import settings
from iterseg.configs import (default, demo, fundus, kitti, kitti_native, native_demo, ph2, ph2_native,
                              retina, retina_vessels)
from tests.helpers import set_fields, tiny

SHIPPED = [default, demo, ph2, retina, kitti, retina_vessels, native_demo, kitti_native, ph2_native,
           fundus]  # Every file in configs/.

# (field, bad value, words the message must hold). One case per checked field.
BAD = [
    ('seed', -1, 'whole number'),
    ('seed', 1.5, 'whole number'),
    ('hi_size', 0, 'hi_size=0'),
    ('hi_size', -64, 'hi_size=-64'),
    ('stage1_size', 0, 'stage1_size=0'),
    ('stage1_size', 128, 'stage1_size=128'),  # Above hi_size: two-stage would cost more than BL.
    ('num_classes', 0, 'num_classes=0'),
    ('num_classes', 300, 'num_classes=300'),
    ('num_patches', 5, 'not divisible by num_patches'),
    ('num_patches', 0, 'num_patches=0'),
    ('refine_count', 0, 'refine_count=0'),
    ('refine_count', 17, 'refine_count=17'),
    ('score', 'foo', "score='foo'"),
    ('threshold', 0.9, 'threshold=0.9'),  # Binary entropy is at most ln 2 = 0.69.
    ('threshold', -0.1, 'threshold=-0.1'),
    ('stage2_uses_coarse', 1, 'True or False'),
    ('halo', -1, 'halo=-1'),
    ('refine_budget', 'dataset', "refine_budget='dataset'"),
    ('model.width', 0, 'model.width=0'),
    ('model.depth', 0, 'model.depth=0'),
    ('model.depth', 5, 'model.depth=5 is too deep'),  # 32 px > stage 1's 8 px.
    ('data.name', 'mnist', "data.name='mnist'"),
    ('data.split_seed', -3, 'data.split_seed=-3'),
    ('data.train_fraction', 1.0, 'data.train_fraction=1.0'),
    ('data.train_fraction', 0.0, 'data.train_fraction=0.0'),
    ('data.num_examples', 1, 'data.num_examples=1'),
    ('data.kitti_label_ids', (26, 300), 'data.kitti_label_ids'),
    ('data.data_dir', 3, 'data.data_dir=3'),
    ('train.networks', ('stage1', 'stage3'), 'train.networks'),
    ('train.networks', (), 'train.networks'),
    ('train.batch_size', 0, 'train.batch_size=0'),
    ('train.learning_rate', 0.0, 'train.learning_rate=0.0'),
    ('train.learning_rate', -1e-3, 'train.learning_rate=-0.001'),
    ('train.learning_rate', float('nan'), 'train.learning_rate=nan'),
    ('train.lr_schedule', 'step', "train.lr_schedule='step'"),
    ('train.warmup_steps', -1, 'train.warmup_steps=-1'),
    ('train.stage1_epochs', 0, 'train.stage1_epochs=0'),  # Stage 2 would learn from a random S1.
    ('train.stage2_epochs', 0, 'train.stage2_epochs=0'),
    ('train.baseline_epochs', -1, 'train.baseline_epochs=-1'),
    ('train.num_patches_list', (), 'train.num_patches_list'),
    ('train.num_patches_list', (4, 3), 'not divisible by num_patches (Np)=3'),
    ('train.patch_sampling', 'foo', "train.patch_sampling='foo'"),
    ('train.stage2_init', 'imagenet', "train.stage2_init='imagenet'"),
    ('train.focal_alpha', 1.5, 'train.focal_alpha=1.5'),
    ('train.focal_gamma', -1.0, 'train.focal_gamma=-1.0'),
    ('train.head_bias_prior', 1.0, 'train.head_bias_prior=1.0'),
    ('train.flip', 'yes', 'train.flip'),
    ('train.brightness_contrast', 1.0, 'train.brightness_contrast=1.0'),
    ('train.rotate', None, 'train.rotate'),
    ('train.log_every', 0, 'train.log_every=0'),
    ('train.checkpoint_every', 0, 'train.checkpoint_every=0'),
    ('train.keep_checkpoints', 0, 'train.keep_checkpoints=0'),
    ('train.profile_steps', (5, 2), 'train.profile_steps'),
    ('eval.batch_size', 0, 'eval.batch_size=0'),
    ('benchmark.batch_sizes', (1, 0), 'benchmark.batch_sizes'),
    ('benchmark.repeats', 0, 'benchmark.repeats=0'),
    ('benchmark.sliding_window', 'no', 'benchmark.sliding_window'),
    ('benchmark.max_seconds', 0.0, 'benchmark.max_seconds=0.0'),
    ('predict.batch_size', 0, 'predict.batch_size=0'),
    ('predict.outputs', ('mask', 'heatmap'), 'predict.outputs'),
    ('predict.png_compression', 10, 'predict.png_compression=10'),
    ('predict.slide_format', 'png', 'predict.slide_format'),
    ('ablation.features', ('halo', 'dropout'), 'ablation.features'),
    ('calibrate.holdout', 0.0, 'calibrate.holdout=0.0'),
    ('calibrate.holdout', 1.5, 'calibrate.holdout=1.5'),
    ('calibrate.refine_counts', (0, 2), 'calibrate.refine_counts'),
    ('calibrate.refine_counts', (), 'calibrate.refine_counts'),
    ('calibrate.refine_counts', (17,), 'calibrate.refine_counts'),  # Above the largest Np*Np (16).
    ('calibrate.thresholds', (), 'calibrate.thresholds'),
    ('calibrate.thresholds', (0.9,), 'calibrate.thresholds'),  # Binary entropy is at most 0.69.
    ('calibrate.thresholds', ('low',), 'calibrate.thresholds'),
    ('calibrate.thresholds', 0.1, 'calibrate.thresholds'),
    ('calibrate.target', 'speed', "calibrate.target='speed'"),
    ('calibrate.max_dice_drop', -0.01, 'calibrate.max_dice_drop=-0.01'),
    ('calibrate.latency_budget_ms', 0.0, 'calibrate.latency_budget_ms=0.0'),
]


@pytest.mark.parametrize('field, value, words', BAD, ids=[f'{f}={v!r}' for f, v, _ in BAD])
def test_every_bad_value_is_one_error_naming_the_field(field, value, words):
  config = set_fields(tiny(), **{field: value})
  with pytest.raises(settings.SettingsError) as error:
    settings.from_config(config)
  message = str(error.value)
  assert words in message and '\n' not in message
  assert 'valid' in message or 'divisible' in message or 'too deep' in message


def test_predict_output_equal_to_its_input_is_refused(tmp_path):
  config = tiny(**{'predict.input': str(tmp_path), 'predict.output': str(tmp_path / '.')})
  with pytest.raises(settings.SettingsError, match='predict.output=.* must differ'):
    settings.from_config(config)


def test_every_config_file_is_checked():
  from pathlib import Path  # pylint: disable=g-import-not-at-top
  files = sorted(p.stem for p in (Path(default.__file__).parent).glob('*.py')
                 if not p.stem.startswith('_'))
  assert files == sorted(m.__name__.rsplit('.', 1)[1] for m in SHIPPED)


@pytest.mark.parametrize('module', SHIPPED, ids=lambda m: m.__name__.rsplit('.', 1)[1])
def test_the_shipped_configs_are_valid_and_round_trip(module):
  config = module.get_config()
  s = settings.from_config(config)
  assert dataclasses.is_dataclass(s.spec) and hash(s.spec)  # A jit static argument.
  for n in s.train.num_patches_list:
    assert s.spec_for(n).num_patches == n
  back = settings.to_config(s)
  assert settings.flatten(back.to_dict()) == settings.flatten(config.to_dict())
  assert settings.from_config(back) == s


def test_every_field_survives_the_round_trip_with_a_value_other_than_its_default():
  """to_config(from_config(c)) == c for a config where every field differs from its default, so
  that no field is lost on the way to config.json."""
  other = {
      'seed': 7, 'resolution': 'native', 'hi_size': 96, 'stage1_size': 24, 'num_classes': 3, 'num_patches': 4,
      'refine_count': 3, 'score': 'margin', 'stage2_uses_coarse': False, 'threshold': 0.2,
      'halo': 2, 'refine_budget': 'batch', 'model.width': 6, 'model.depth': 2,
      'model.input_norm': 'standardize', 'model.dtype': 'bfloat16', 'model.error_head': True,
      'model.input_mean': (0.4, 0.3, 0.2), 'model.input_std': (0.2, 0.1, 0.05),
      'train.error_weight': 0.5, 'train.exclude_holdout': True, 'train.select_checkpoint': 'best',
      'data.synthetic_kind': 'vessels',
      'data.name': 'folder',
      'data.manual_dir': '/m',
      'data.data_dir': '/d', 'data.split_seed': 5, 'data.train_fraction': 0.6,
      'data.num_examples': 9, 'data.kitti_label_ids': (26,), 'data.scale': 0.5,
      'data.synthetic_sides': (64, 128), 'native.refine_fraction': 0.2, 'native.chunk': 8,
      'native.bucket': 12, 'native.window': 64, 'native.overlap': 0.5, 'native.max_pixels': 10 ** 7, 'train.networks': ('stage1',),
      'train.batch_size': 3, 'train.learning_rate': 0.01, 'train.lr_schedule': 'cosine',
      'train.warmup_steps': 4, 'train.stage1_epochs': 2, 'train.stage2_epochs': 3,
      'train.baseline_epochs': 4, 'train.num_patches_list': (4,), 'train.patch_sampling': 'top',
      'train.stage2_init': 'stage1', 'train.focal_alpha': 0.5, 'train.focal_gamma': 1.0,
      'train.head_bias_prior': 0.1, 'train.flip': False, 'train.brightness_contrast': 0.2,
      'train.rotate': False, 'train.log_every': 3, 'train.checkpoint_every': 4,
      'train.keep_checkpoints': 2, 'train.profile_steps': (1, 2), 'eval.batch_size': 3,
      'eval.fov': 'dark_border', 'eval.errors': True, 'native.blend': 'constant',
      'benchmark.batch_sizes': (2,), 'benchmark.repeats': 2, 'benchmark.sliding_window': True,
      'benchmark.max_seconds': 9.0, 'predict.input': '/in', 'predict.output': '/out',
      'predict.batch_size': 3, 'predict.outputs': ('mask',), 'predict.png_compression': 3,
      'predict.skip_existing': True, 'predict.slide_format': 'zarr',
      'calibrate.holdout': 0.3, 'calibrate.refine_counts': (1, 2), 'calibrate.thresholds': (0.1,),
      'calibrate.target': 'latency', 'calibrate.max_dice_drop': 0.02,
      'calibrate.latency_budget_ms': 5.0, 'calibrate.refine_fractions': (0.1, 0.4),
      'benchmark.native_sides': (128, 256), 'benchmark.slide_sides': (512,), 'train.gamma': 0.3,
      'ablation.features': ('halo',),
      'export.batch_size': 2, 'export.platforms': ('cuda',), 'export.output': '/x',
      'benchmark.peak_tflops': 100.0, 'benchmark.train': True}
  defaults = settings.known_fields()
  assert sorted(other) == sorted(defaults)  # Every field, once.
  assert all(other[k] != defaults[k] for k in other)
  config = set_fields(default.get_config(), **other)
  back = settings.flatten(settings.to_config(settings.from_config(config)).to_dict())
  assert back == settings.flatten(config.to_dict())


@pytest.mark.parametrize('field, close', [('train.bach_size', 'train.batch_size'),
                                          ('hi_sise', 'hi_size'),
                                          ('model.widht', 'model.width')])
def test_an_unknown_field_is_an_error_naming_the_closest_known_one(field, close):
  config = tiny().to_dict()
  node = config
  *path, leaf = field.split('.')
  for p in path:
    node = node[p]
  node[leaf] = 8
  with pytest.raises(settings.SettingsError, match=f'unknown field {field}; did you mean {close}'):
    settings.from_config(config)


def test_a_missing_field_takes_its_default():
  config = tiny().to_dict()
  del config['halo'], config['train']['stage2_init'], config['predict']
  s = settings.from_config(config)
  assert s.spec.halo == 0 and s.train.stage2_init == 'random' and s.predict.batch_size == 8


def test_refine_count_follows_np_unless_fixed():
  s = settings.from_config(tiny())
  assert s.spec_for(2).refine_count == 2 and s.spec_for(4).refine_count == 4
  fixed = settings.from_config(tiny(refine_count=3))
  assert fixed.spec_for(2).refine_count == 3 and fixed.spec_for(4).refine_count == 3


def test_an_older_config_json_gets_the_fields_it_lacks_from_the_defaults():
  import json  # pylint: disable=g-import-not-at-top
  saved = json.loads(json.dumps(default.get_config().to_dict()))  # Tuples become lists.
  del saved['halo'], saved['train']['stage2_init'], saved['predict']
  saved['hi_size'] = 512
  s = settings.from_json(saved)
  assert s.spec.halo == 0 and s.train.stage2_init == 'random' and s.spec.hi_size == 512
  assert s.train.num_patches_list == (2, 4, 8, 16)


def test_a_variant_is_checked_again():
  s = settings.from_config(tiny())
  assert s.vary('spec', halo=2).spec.halo == 2 and s.spec.halo == 0
  with pytest.raises(settings.SettingsError, match='not divisible'):
    s.vary('spec', num_patches=5)
  at = s.at_operating_point({'num_patches': 2, 'refine_count': 1, 'threshold': 0.1})
  assert (at.spec.num_patches, at.spec.refine_count, at.spec.threshold) == (2, 1, 0.1)
  assert at.spec_for(4).refine_count == 1  # Fixed by the operating point, at every Np.
