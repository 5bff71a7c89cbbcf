"""Choosing the patches with what stage 1 cannot see (thin structures): the learned selection score
(stage 1's error head), a calibration holdout that training leaves out, synthetic vessels, and a
halo that costs its own pixels."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iterseg import calibrate, flops, inference, models, settings, state, train
from iterseg.data import pipeline
from iterseg.data.synthetic import make_vessel_example
from iterseg.run import Run
from tests.helpers import save_random_networks, set_fields, tiny


def learned(**overrides):
  """Stage 1 at 16 px of 64 (4 stage-1 pixels per 16-px patch of a 4 x 4 grid), with an error head."""
  return tiny(**{'stage1_size': 16, 'model.error_head': True, 'score': 'learned',
                 'refine_count': 3, 'train.num_patches_list': (4,), **overrides})


def test_the_error_target_is_the_expected_share_of_wrong_full_resolution_pixels_under_each_pixel():
  s = settings.from_config(learned(resolution='native'))  # Native: block means, exact by hand.
  rng = np.random.default_rng(0)
  probs = rng.uniform(size=(2, 16, 16, 1)).astype(np.float32)
  masks = rng.integers(0, 2, (2, 64, 64)).astype(np.uint8)
  target = np.asarray(inference.error_share(jnp.asarray(probs), jnp.asarray(masks), s.spec))
  coarse = np.asarray(inference.upscale(jnp.asarray(probs), (64, 64), s.spec))[..., 0]
  wrong = np.abs(coarse - masks)
  np.testing.assert_allclose(target, wrong.reshape(2, 16, 4, 16, 4).mean(axis=(2, 4)), atol=1e-6)


def test_the_learned_score_is_the_mean_predicted_error_of_each_patch_and_top_k_follows_it():
  config = learned()
  s = settings.from_config(config)
  nets = models.random_networks(s.spec, jax.random.key(0))
  assert nets.stage1['head']['kernel'].shape[-1] == 2  # The class logit, then the error logit.
  images = jax.random.uniform(jax.random.key(1), (2, 64, 64, 3))
  low, _ = inference.stage1_maps(nets.stage1, images, s.spec)
  by_hand = np.asarray(low)[..., 1].reshape(2, 4, 4, 4, 4).mean(axis=(2, 4)).reshape(2, 16)
  pred = inference.two_stage(nets, images, s.spec)
  np.testing.assert_allclose(pred.scores, by_hand, rtol=1e-5)
  for b in range(2):
    assert set(np.flatnonzero(pred.refined[b])) == set(np.argsort(-by_hand[b])[:3])
  # The same networks scored by entropy choose from the class probabilities alone.
  entropy = inference.two_stage(nets, images, dataclasses.replace(s.spec, score='entropy'))
  np.testing.assert_allclose(entropy.coarse, pred.coarse)
  assert not np.allclose(entropy.scores, pred.scores)


def test_stage1_learns_its_own_error_beside_the_segmentation():
  """After 80 steps on a toy batch the predicted error share of each stage-1 pixel follows the
  measured one (correlation 0.96 when measured; it swings while the segmentation still moves)."""
  config = learned(**{'train.learning_rate': 1e-2, 'train.flip': False, 'train.rotate': False,
                      'train.brightness_contrast': 0.0})
  s = settings.from_config(config)
  from iterseg.data.synthetic import make_synthetic_example  # pylint: disable=g-import-not-at-top
  batch = next(iter(pipeline.batches([make_synthetic_example(i, 64) for i in range(8)],
                                     batch_size=8, seed=0, epoch=0)))
  train_state = state.create_train_state(s.train, s.spec, 'stage1')
  step = train.make_train_step('stage1', s.spec, s.train, 80)
  for _ in range(80):
    train_state, metrics = step(train_state, batch, None)
  assert np.isfinite(float(metrics['error']))
  images = inference.normalize(batch['image'].reshape(8, 64, 64, 3), s.spec)
  low, _ = inference.stage1_maps(train_state.params, images, s.spec)
  target = inference.error_share(low[..., :1], batch['mask'].reshape(8, 64, 64), s.spec)
  assert np.corrcoef(np.ravel(low[..., 1]), np.ravel(target))[0, 1] > 0.8
  # Stage 2 started from this stage 1 drops the error head.
  copied = state.from_stage1(jax.device_get(train_state.params), s.spec_for(4))
  expected = jax.eval_shape(models.init_unet, jax.random.key(0), s.spec_for(4), 'stage2')
  assert jax.tree.map(jnp.shape, copied) == jax.tree.map(lambda a: a.shape, expected)


@pytest.mark.parametrize('fields, words', [
    ({'score': 'learned'}, 'needs config.model.error_head=True'),
    ({'score': 'learned', 'model.error_head': True, 'stage1_size': 10, 'hi_size': 40},
     'multiple of num_patches'),
])
def test_the_learned_score_is_checked(fields, words):
  with pytest.raises(settings.SettingsError, match=words):
    settings.from_config(tiny(**fields))


def test_an_error_head_changes_the_geometry_so_old_workdirs_are_refused(tmp_path):
  from iterseg import checkpoints  # pylint: disable=g-import-not-at-top
  save_random_networks(tiny(**{'stage1_size': 16, 'train.num_patches_list': (4,)}), tmp_path)
  with pytest.raises(checkpoints.CheckpointError, match='model.error_head'):
    checkpoints.load_networks(str(tmp_path), settings.from_config(learned()))


def test_exclude_holdout_trains_without_exactly_the_images_calibrate_and_validation_use(tmp_path):
  from iterseg import data  # pylint: disable=g-import-not-at-top
  config = tiny(**{'data.data_dir': str(tmp_path / 'tfds'), 'data.num_examples': 20,
                   'calibrate.holdout': 0.25})
  everything, no_validation = train.training_data(settings.from_config(config))
  held = data.holdout_indices(len(everything), 0.25, config.seed)
  kept, validation = train.training_data(settings.from_config(set_fields(config, **{
      'train.exclude_holdout': True})))
  names = lambda examples: [e['name'] for e in examples]
  held_names = {everything[int(i)]['name'] for i in held}
  assert no_validation is None and len(kept) == len(everything) - len(held) and len(held) == 4
  assert set(names(kept)) == set(names(everything)) - held_names
  assert set(names(validation)) == held_names


def test_calibrate_says_whether_its_images_were_seen_in_training(tmp_path):
  config = tiny(**{'calibrate.holdout': 0.25})
  Run(str(tmp_path / 'seen')).save_settings(settings.from_config(config))
  assert calibrate.seen_in_training(settings.from_config(config), str(tmp_path / 'seen'))
  unseen = set_fields(config.copy_and_resolve_references(), **{'train.exclude_holdout': True})
  Run(str(tmp_path / 'unseen')).save_settings(settings.from_config(unseen))
  assert not calibrate.seen_in_training(settings.from_config(config), str(tmp_path / 'unseen'))
  other = set_fields(config.copy_and_resolve_references(), **{'calibrate.holdout': 0.5})
  assert calibrate.seen_in_training(settings.from_config(other), str(tmp_path / 'unseen'))


def test_synthetic_vessels_are_thin_trees_in_a_field_of_view():
  a, b = make_vessel_example(3, 256), make_vessel_example(3, 256)
  np.testing.assert_array_equal(a['image'], b['image'])  # A pure function of the index.
  mask = a['mask'].astype(bool)
  assert 0.02 < mask.mean() < 0.12 and set(np.unique(a['mask'])) == {0, 1}
  core = mask.copy()  # 3 x 3 erosion: what survives is at least 3 px wide.
  for dy in (-1, 0, 1):
    for dx in (-1, 0, 1):
      core &= np.roll(np.roll(mask, dy, 0), dx, 1)
  assert core.sum() < 0.2 * mask.sum()  # Almost every vessel pixel is within 1 px of an edge.
  assert (a['image'][0, 0] == 0).all() and not mask[0, 0]  # Outside the field of view.
  assert a['image'][mask].mean() < a['image'][~mask & (a['image'].sum(-1) > 0)].mean()


def test_a_halo_costs_its_own_pixels_not_the_next_multiple_of_the_unet():
  """A 32-px patch with a 4-px halo is a 40-px input: it costs about twice the bare patch (1.97x
  when measured: (40/32)^2, and odd sides rounded up at the deep levels), not the 4x of padding it
  to 64, the next multiple of 2**5."""
  s = settings.from_config(tiny(**{'model.depth': 5, 'model.width': 4, 'hi_size': 256,
                                   'stage1_size': 32, 'num_patches': 8}))
  bare, halo, padded = (flops.unet_flops(s.spec, side, 'stage2') for side in (32, 40, 64))
  assert padded == pytest.approx(4 * bare, rel=0.05)
  assert 1.4 < halo / bare < 2.1
