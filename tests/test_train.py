"""Training: the pmapped step on 4 fake devices, learning, checkpoints and resume."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iterseg import checkpoints, inference, settings, state, train
from iterseg.data import pipeline
from iterseg.data.synthetic import make_synthetic_example
from iterseg.run import Run
from tests.helpers import tiny



@pytest.fixture(scope='module')
def source():
  return [make_synthetic_example(i, 64) for i in range(16)]


def first_batch(source, config, epoch=0):
  return next(iter(pipeline.batches(source, batch_size=config.train.batch_size, seed=0, epoch=epoch)))


@pytest.mark.parametrize('network', ['baseline', 'stage1', 'stage2'])
def test_one_pmapped_step_on_four_devices(source, network):
  assert jax.local_device_count() == 4
  config = tiny()
  n = 4 if network == 'stage2' else None
  s = settings.from_config(config)
  spec = s.spec_for(n) if n else s.spec
  train_state = state.create_train_state(s.train, spec, network)
  before = jax.tree.map(np.asarray, train_state.params)
  frozen = inference.init_params(config, jax.random.key(0)).stage1 if n else None
  batch = first_batch(source, config)
  assert batch['image'].shape == (4, 2, 64, 64, 3)
  train_state, metrics = train.make_train_step(network, spec, s.train, 1)(train_state, batch, frozen)
  assert int(train_state.step) == 1
  assert all(np.isfinite(float(v)) for v in metrics.values())
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, jax.tree.map(np.asarray, train_state.params))
  assert all(jax.tree.leaves(changed))


def test_stage2_learns_from_patches_of_the_frozen_stage1():
  config = tiny()
  spec = settings.from_config(config).spec_for(4)
  images = jax.random.uniform(jax.random.key(0), (2, 64, 64, 3))
  masks = (images[..., 0] > 0.5).astype(jnp.uint8)
  params = inference.init_params(config, jax.random.key(1))
  frozen = params.stage1
  inputs, labels = train.network_inputs('stage2', jax.random.key(2), images, masks, frozen,
                                        spec=spec, sampling='top')
  assert inputs.shape == (2 * 4, 16, 16, 4) and labels.shape == (8, 16, 16)
  pred = inference.two_stage(params, images, spec)
  top = np.argsort(-np.asarray(pred.scores[1]), kind='stable')[0]
  assert pred.refined[1, top]  # 'top' takes exactly the patches inference refines, in its order.
  r, c = divmod(int(top), 4)
  np.testing.assert_array_equal(inputs[4, ..., :3], images[1, r * 16:(r + 1) * 16, c * 16:(c + 1) * 16])
  np.testing.assert_array_equal(labels[4], masks[1, r * 16:(r + 1) * 16, c * 16:(c + 1) * 16])


@pytest.mark.parametrize('how', ['random', 'entropy_weighted', 'top'])
def test_sampled_patches_are_distinct_and_follow_the_rule(how):
  scores = jnp.array([[0.0, 0.0, 5.0, 1e-9, 7.0, 0.0]] * 50)
  idx = np.asarray(train.sample_patches(jax.random.key(0), scores, 2, how))
  assert all(len(set(row)) == 2 for row in idx)
  if how in ('top', 'entropy_weighted'):  # Zero-score patches are (almost) never drawn.
    assert set(idx.ravel()) <= {2, 4, 3}
  if how == 'top':
    assert (np.sort(idx, 1) == [2, 4]).all()
  if how == 'random':
    assert len(set(idx.ravel())) == 6


def test_loss_falls_on_a_learnable_toy(source):
  config = tiny()
  config.train.learning_rate = 1e-2
  config.train.flip = config.train.rotate = False
  s = settings.from_config(config)
  train_state = state.create_train_state(s.train, s.spec, 'baseline')
  step = train.make_train_step('baseline', s.spec, s.train, 30)
  batch = first_batch(source, config)
  losses = []
  for _ in range(30):
    train_state, metrics = step(train_state, batch, None)
    losses.append(float(metrics['loss']))
  assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5])  # 0.92 -> 0.75 when measured.


def test_checkpoint_save_restore_round_trips_exactly(tmp_path):
  s = settings.from_config(tiny())
  fresh = state.create_train_state(s.train, s.spec_for(4), 'stage2')
  saved = fresh.replace(step=jnp.asarray(7, jnp.int32),
                        params=jax.tree.map(lambda x: x + 0.5, fresh.params))
  mngr = checkpoints.manager(str(tmp_path), 'stage2_np4', 3)
  mngr.save(7, args=checkpoints.save_args(saved))
  mngr.wait_until_finished()
  restored = checkpoints.restore_latest(mngr, fresh)
  for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(restored.step) == 7


def steps_logged(workdir, name):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r['step'] for r in map(json.loads, f) if r['network'] == name]


def test_a_rerun_resumes_at_the_saved_step(tmp_path, source):
  config = tiny()
  config.train.checkpoint_every = 2
  workdir = str(tmp_path)
  train.train_network(settings.from_config(config), workdir, 'stage1', source=source)  # 2 steps.
  assert steps_logged(workdir, 'stage1') == [1, 2]
  config.train.stage1_epochs = 2
  s = settings.from_config(config)
  params = train.train_network(s, workdir, 'stage1', source=source)
  assert steps_logged(workdir, 'stage1') == [1, 2, 3, 4]  # Started at step 2, not 0.
  again = train.train_network(s, workdir, 'stage1', source=source)  # Done: nothing to do.
  assert steps_logged(workdir, 'stage1') == [1, 2, 3, 4]
  jax.tree.map(np.testing.assert_array_equal, params, again)
  assert sorted(os.listdir(Run(workdir).network_dir('stage1'))) == ['2', '4', 'plan.json']


@pytest.mark.parametrize('bad', ['{"network": "stage1", "st', '[1]',
                                 '{"network": "stage1", "step": "3"}'],
                         ids=['cut-short', 'not-a-record', 'mistyped-step'])
def test_a_damaged_line_of_the_log_is_named_and_deleting_it_trims_the_log(tmp_path, bad):
  """metrics.jsonl is read back when training resumes (its steps after the checkpoint dropped): a
  damaged line is named, never dropped silently nor a traceback, except a killed run's last line."""
  from iterseg import errors, hooks  # pylint: disable=g-import-not-at-top
  good = [json.dumps({'network': 'stage1', 'step': i, 'loss': 1.0}) + '\n' for i in (1, 2, 3)]
  path = tmp_path / 'metrics.jsonl'
  path.write_text(good[0] + bad + '\n' + good[1] + good[2])
  with pytest.raises(errors.CheckpointError, match=r'metrics.jsonl line 2 cannot be read \(.*\): '
                     r'delete that line') as e:
    hooks.trim_metrics(str(tmp_path), 'stage1', 2)
  assert '\n' not in str(e.value)
  path.write_text(good[0] + good[1] + good[2])  # What the line says.
  hooks.trim_metrics(str(tmp_path), 'stage1', 2)
  assert path.read_text() == good[0] + good[1]
  path.write_text(good[0] + good[1][:12])  # A run killed while writing its last line.
  hooks.trim_metrics(str(tmp_path), 'stage1', 2)
  assert path.read_text() == good[0]


def best_config(**overrides):
  config = tiny(**{'train.exclude_holdout': True, 'train.select_checkpoint': 'best',
                   'train.checkpoint_every': 1, 'train.keep_checkpoints': 1,
                   'train.stage1_epochs': 3, **overrides})  # 2 steps an epoch.
  return settings.from_config(config)


def test_select_best_needs_the_holdout_left_out_of_training():
  with pytest.raises(settings.SettingsError, match='exclude_holdout=True'):
    settings.from_config(tiny(**{'train.select_checkpoint': 'best'}))


def test_the_best_scoring_checkpoint_is_kept_beside_the_latest_and_is_what_loads(
    tmp_path, source, monkeypatch):
  scores = iter([0.2, 0.5, 0.9, 0.4, 0.3, 0.1])  # Steps 1..6: step 3 is the best.
  seen = {}

  def score(s, network, params, examples, **kwargs):
    del s, network, examples, kwargs
    value = next(scores)
    seen[value] = jax.tree.map(np.array, params)
    return value

  monkeypatch.setattr(train.evaluate, 'validation_score', score)
  s = best_config()
  workdir = str(tmp_path)
  returned = train.train_network(s, workdir, 'stage1', source=source, validation=source[:2])
  assert sorted(os.listdir(Run(workdir).network_dir('stage1'))) == ['3', '6', 'plan.json']
  logged = [r for r in map(json.loads, open(os.path.join(workdir, 'metrics.jsonl')))
            if checkpoints.METRIC in r]
  assert [(r['step'], r[checkpoints.METRIC]) for r in logged] == list(
      zip(range(1, 7), [0.2, 0.5, 0.9, 0.4, 0.3, 0.1]))
  Run(workdir).save_settings(s)
  loaded = checkpoints.load_network(workdir, 'stage1', s)
  jax.tree.map(np.testing.assert_array_equal, loaded, seen[0.9])
  jax.tree.map(np.testing.assert_array_equal, returned, seen[0.9])
  last = checkpoints.load_network(workdir, 'stage1', s.vary('train', select_checkpoint='last'))
  jax.tree.map(np.testing.assert_array_equal, last, seen[0.1])


def test_validation_scores_are_the_hard_dice_evaluate_measures(tmp_path, source):
  s = best_config(**{'train.stage1_epochs': 1, 'train.checkpoint_every': 2})
  workdir = str(tmp_path)
  validation = [dict(e, original_size=(64, 64), name=f'held{i}') for i, e in enumerate(source[:3])]
  params = train.train_network(s, workdir, 'stage1', source=source, validation=validation)
  logged = [r for r in map(json.loads, open(os.path.join(workdir, 'metrics.jsonl')))
            if checkpoints.METRIC in r]
  assert [r['step'] for r in logged] == [2]
  from iterseg import evaluate, models, native  # pylint: disable=g-import-not-at-top
  measured = evaluate.evaluate(native.segmenter(models.Networks(stage1=params), s).only('stage1'),
                               validation, progress=False)
  assert logged[0][checkpoints.METRIC] == pytest.approx(measured['methods']['stage1']['hard_dice'])
  assert 0.0 <= logged[0][checkpoints.METRIC] <= 1.0
