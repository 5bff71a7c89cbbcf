"""The config is checked once, field by field: every bad value is one SettingsError naming the field,
its value and what would be valid; good configs give typed, frozen settings."""

import dataclasses

import pytest

from iterseg import settings
from iterseg.configs import default, demo, kitti, ph2, retina
from tests.conftest import tiny

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


def set_field(config, dotted, value):
  *path, leaf = dotted.split('.')
  node = config
  for p in path:
    node = node[p]
  with node.ignore_type():
    node[leaf] = value


@pytest.mark.parametrize('field, value, words', BAD, ids=[f'{f}={v!r}' for f, v, _ in BAD])
def test_every_bad_value_is_one_error_naming_the_field(field, value, words):
  config = tiny()
  set_field(config, field, value)
  with pytest.raises(settings.SettingsError) as error:
    settings.from_config(config)
  message = str(error.value)
  assert words in message and '\n' not in message
  assert 'valid' in message or 'divisible' in message or 'too deep' in message


def test_predict_output_equal_to_its_input_is_refused(tmp_path):
  config = tiny(**{'predict.input': str(tmp_path), 'predict.output': str(tmp_path / '.')})
  with pytest.raises(settings.SettingsError, match='predict.output=.* must differ'):
    settings.from_config(config)


@pytest.mark.parametrize('module', [default, demo, ph2, retina, kitti])
def test_the_shipped_configs_are_valid(module):
  s = settings.from_config(module.get_config())
  assert dataclasses.is_dataclass(s.spec) and hash(s.spec)  # A jit static argument.
  for n in s.train.num_patches_list:
    assert s.spec_for(n).num_patches == n


def test_refine_count_follows_np_unless_fixed():
  s = settings.from_config(tiny())
  assert s.spec_for(2).refine_count == 2 and s.spec_for(4).refine_count == 4
  fixed = settings.from_config(tiny(refine_count=3))
  assert fixed.spec_for(2).refine_count == 3 and fixed.spec_for(4).refine_count == 3


def test_an_older_config_json_gets_the_fields_it_lacks_from_the_defaults():
  saved = default.get_config().to_dict()
  del saved['halo'], saved['train']['stage2_init'], saved['predict']
  saved['hi_size'] = 512
  config = settings.complete(saved, default.get_config())
  s = settings.from_config(config)
  assert s.spec.halo == 0 and s.train.stage2_init == 'random' and s.spec.hi_size == 512
