"""Two-stage inference: selection, extraction, write-back, batching, compilation, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import iterseg
from iterseg import inference, models
from tests.helpers import tiny


def input_passthrough(params, gain=20.0, bias=-10.0, channel=0):
  """U-Net params whose logits are gain * x[..., channel] + bias: every weight is zero except the
  1x1 head's weight on that input channel (the input is concatenated before the head)."""
  params = jax.tree.map(jnp.zeros_like, params)
  kernel = params['head']['kernel']
  in_channels = params['down0']['kernel'].shape[2]
  kernel = kernel.at[0, 0, kernel.shape[2] - in_channels + channel, 0].set(gain)
  params['head'] = {'kernel': kernel, 'bias': jnp.full_like(params['head']['bias'], bias)}
  return params


def images_unsure_at(patches_per_image, config):
  """Images whose channel 0 is 0.5 (logit 0, p = 0.5) on the given grid patches, 1 elsewhere."""
  n, s = config.num_patches, config.hi_size // config.num_patches
  images = np.ones((len(patches_per_image), config.hi_size, config.hi_size, 3), np.float32)
  for b, patches in enumerate(patches_per_image):
    for idx in patches:
      r, c = divmod(idx, n)
      images[b, r * s:(r + 1) * s, c * s:(c + 1) * s, 0] = 0.5
  return jnp.asarray(images)


@pytest.fixture
def setup():
  config = tiny(num_patches=4, refine_count=3, **{'train.num_patches_list': (4,)})
  params = iterseg.init_params(config, jax.random.key(0))
  params = params.replace(stage1=input_passthrough(params.stage1))
  return config, params


@pytest.mark.parametrize('score', ['entropy', 'margin', 'distance'])
def test_refined_are_exactly_the_uncertain_patches(setup, score):
  config, params = setup
  config.score = score
  unsure = {1, 6, 11}
  pred = iterseg.infer(params, images_unsure_at([unsure], config), config)
  assert set(np.flatnonzero(pred.refined[0])) == unsure
  assert pred.scores.shape == (1, 16)


def test_each_image_of_a_batch_selects_its_own_patches(setup):
  config, params = setup
  wanted = [{0, 5, 10}, {3, 12, 15}, {2, 7, 9}]
  pred = iterseg.infer(params, images_unsure_at(wanted, config), config)
  assert [set(np.flatnonzero(r)) for r in pred.refined] == wanted


def refined_mask(pred, config):
  n, s = config.num_patches, config.hi_size // config.num_patches
  mask = np.zeros(pred.probs.shape[:3], bool)
  for b, grid in enumerate(np.asarray(pred.refined)):
    for idx in np.flatnonzero(grid):
      r, c = divmod(int(idx), n)
      mask[b, r * s:(r + 1) * s, c * s:(c + 1) * s] = True
  return mask


def test_pixels_outside_refined_patches_equal_coarse_exactly(tiny_config):
  params = iterseg.init_params(tiny_config, jax.random.key(1))
  images = jax.random.uniform(jax.random.key(2), (2, 64, 64, 3))
  pred = iterseg.infer(params, images, tiny_config)
  outside = ~refined_mask(pred, tiny_config)
  np.testing.assert_array_equal(np.asarray(pred.probs)[outside], np.asarray(pred.coarse)[outside])
  assert not np.array_equal(np.asarray(pred.probs)[~outside], np.asarray(pred.coarse)[~outside])


@pytest.mark.parametrize('uses_coarse, halo', [(True, 0), (False, 0), (True, 4), (False, 4)])
def test_a_refined_patch_equals_stage2_run_by_hand_on_the_patch_and_its_neighbourhood(uses_coarse,
                                                                                      halo):
  config = tiny(stage2_uses_coarse=uses_coarse, halo=halo)
  params = iterseg.init_params(config, jax.random.key(3))
  images = jax.random.uniform(jax.random.key(4), (2, 64, 64, 3))
  pred = iterseg.infer(params, images, config)
  s, unet = 16, models.UNet(1, config.model.width, config.model.depth)
  inputs = jnp.concatenate([images, pred.coarse], -1) if uses_coarse else images
  padded = jnp.pad(inputs, ((0, 0), (halo, halo), (halo, halo), (0, 0)))  # Zeros past the border.
  for b in range(2):
    for idx in np.flatnonzero(pred.refined[b]):
      r, c = divmod(int(idx), 4)
      window = padded[b:b + 1, r * s:r * s + s + 2 * halo, c * s:c * s + s + 2 * halo]
      expected = models.probabilities(unet.apply({'params': params.stage2[4]}, window))[
          0, halo:halo + s, halo:halo + s]
      np.testing.assert_allclose(pred.probs[b, r * s:(r + 1) * s, c * s:(c + 1) * s], expected,
                                 atol=1e-5)


def test_coarse_is_stage1_on_the_resized_image_upsampled(tiny_config):
  params = iterseg.init_params(tiny_config, jax.random.key(5))
  images = jax.random.uniform(jax.random.key(6), (1, 64, 64, 3))
  pred = iterseg.infer(params, images, tiny_config)
  small = jax.image.resize(images, (1, 8, 8, 3), 'linear')
  unet = models.UNet(1, 4, 3)
  low = models.probabilities(unet.apply({'params': params.stage1}, small))
  np.testing.assert_allclose(pred.coarse, jax.image.resize(low, (1, 64, 64, 1), 'linear'), atol=1e-6)


def test_repeated_calls_do_not_retrace(tiny_config):
  params = iterseg.init_params(tiny_config, jax.random.key(0))
  images = jnp.zeros((2, 64, 64, 3))
  inference.two_stage.clear_cache()
  for _ in range(3):
    iterseg.infer(params, images + 0.1, tiny_config)
    iterseg.infer(params, images, tiny_config.copy_and_resolve_references())
  assert inference.two_stage._cache_size() == 1
  iterseg.infer(params, jnp.zeros((3, 64, 64, 3)), tiny_config)  # A new shape compiles once more.
  assert inference.two_stage._cache_size() == 2


def test_multiclass_path():
  config = tiny(num_classes=3)
  params = iterseg.init_params(config, jax.random.key(0))
  images = jax.random.uniform(jax.random.key(1), (2, 64, 64, 3))
  pred = iterseg.infer(params, images, config)
  assert pred.probs.shape == pred.coarse.shape == (2, 64, 64, 3)
  np.testing.assert_allclose(pred.probs.sum(-1), 1.0, atol=1e-5)
  assert params.stage2[4]['down0']['kernel'].shape[2] == 3 + 3
  assert iterseg.infer_baseline(params, images, config).shape == (2, 64, 64, 3)


def test_threshold_keeps_stage1_where_patches_are_confident_enough(setup):
  config, params = setup
  images = images_unsure_at([{1, 6, 11}], config)
  config.threshold = 0.2  # Unsure patches score 0.26-0.38 nats here (blurred by the 8x8 stage 1),
  # confident ones below 0.07.
  config.refine_count = 5  # The 2 extra patches are confident: they keep stage 1.
  pred = iterseg.infer(params, images, config)
  n, s = 4, 16
  assert set(np.flatnonzero(pred.refined[0])) == {1, 6, 11}  # Chosen and unsure enough.
  for idx in range(n * n):
    r, c = divmod(idx, n)
    block = (slice(r * s, (r + 1) * s), slice(c * s, (c + 1) * s))
    same = np.array_equal(pred.probs[0][block], pred.coarse[0][block])
    assert same == (idx not in {1, 6, 11})
  assert refined_mask(pred, config).sum() == 3 * s * s


def test_patch_scores_by_hand():
  p = jnp.zeros((1, 4, 4, 1)).at[0, :2, :2].set(0.5).at[0, 2:, 2:].set(1.0)
  np.testing.assert_allclose(inference.patch_scores(p, 2, 'entropy'), [[np.log(2), 0, 0, 0]],
                             atol=1e-6)
  np.testing.assert_allclose(inference.patch_scores(p, 2, 'margin'), [[1, 0, 0, 0]], atol=1e-6)
  q = jnp.zeros((1, 2, 2, 1)).at[0, 0, 0].set(0.8)  # One patch per pixel.
  np.testing.assert_allclose(inference.patch_scores(q, 2, 'distance'), [[0.2, 0, 0, 0]], atol=1e-6)


def test_infer_baseline_is_the_unet_on_the_full_image(tiny_config):
  params = iterseg.init_params(tiny_config, jax.random.key(0))
  images = jax.random.uniform(jax.random.key(1), (1, 64, 64, 3))
  expected = models.probabilities(models.UNet(1, 4, 3).apply({'params': params.baseline}, images))
  np.testing.assert_allclose(iterseg.infer_baseline(params, images, tiny_config), expected, atol=1e-6)


@pytest.mark.parametrize('images, match', [
    (np.zeros((1, 32, 32, 3), np.float32), r'images must be \[B, 64, 64, 3\]'),
    (np.zeros((64, 64, 3), np.float32), r'images must be'),
    (np.full((1, 64, 64, 3), np.nan, np.float32), 'NaN or inf'),
    (np.full((1, 64, 64, 3), np.inf, np.float32), 'NaN or inf'),
])
def test_bad_images_get_a_clear_error(tiny_config, images, match):
  params = iterseg.init_params(tiny_config, jax.random.key(0))
  with pytest.raises(ValueError, match=match):
    iterseg.infer(params, images, tiny_config)


def test_np_not_dividing_hi_size_is_a_clear_error(tiny_config):
  tiny_config.num_patches = 5
  with pytest.raises(ValueError, match='not divisible by num_patches'):
    iterseg.init_params(tiny_config, jax.random.key(0))


def test_params_of_another_config_are_refused(tiny_config):
  params = iterseg.init_params(tiny_config, jax.random.key(0))
  tiny_config.stage2_uses_coarse = False
  with pytest.raises(ValueError, match='do not belong together'):
    iterseg.infer(params, jnp.zeros((1, 64, 64, 3)), tiny_config)


def test_uint8_images_give_the_result_of_their_float_copy(tiny_config):
  params = iterseg.init_params(tiny_config, jax.random.key(0))
  images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
  from_uint8 = iterseg.infer(params, images, tiny_config)
  from_float = iterseg.infer(params, images.astype(np.float32) / 255, tiny_config)
  np.testing.assert_allclose(from_uint8.probs, from_float.probs, atol=1e-6)
  np.testing.assert_array_equal(from_uint8.refined, from_float.refined)
  np.testing.assert_allclose(iterseg.infer_baseline(params, images, tiny_config),
                             iterseg.infer_baseline(params, images / np.float32(255), tiny_config),
                             atol=1e-6)


@pytest.mark.parametrize('images, match', [
    (np.full((1, 64, 64, 3), 200.0, np.float32), r'must lie in \[0, 1\].*look like 0\.\.255'),
    (np.full((1, 64, 64, 3), -0.5, np.float32), r'must lie in \[0, 1\]'),
    (np.zeros((0, 64, 64, 3), np.uint8), 'empty batch'),
    (np.zeros((1, 64, 64, 3), np.uint16), 'dtype uint16'),
    (np.zeros((1, 64, 64, 3), np.int32), 'dtype int32'),
])
def test_images_outside_the_input_contract_are_refused(tiny_config, images, match):
  params = iterseg.init_params(tiny_config, jax.random.key(0))
  with pytest.raises(ValueError, match=match):
    iterseg.infer(params, images, tiny_config)
  with pytest.raises(ValueError, match=match):
    iterseg.infer_baseline(params, images, tiny_config)


def test_device_arrays_are_checked_only_when_asked(tiny_config):
  params = iterseg.init_params(tiny_config, jax.random.key(0))
  images = jnp.full((1, 64, 64, 3), 200.0)
  iterseg.infer(params, images, tiny_config)  # No device-to-host sync by default.
  with pytest.raises(ValueError, match=r'must lie in \[0, 1\]'):
    iterseg.infer(params, images, tiny_config, check_values=True)


def test_a_batch_sharded_over_devices_is_computed_in_place_and_stays_sharded(tiny_config):
  params = iterseg.init_params(tiny_config, jax.random.key(0))
  images = np.random.default_rng(1).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('batch',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('batch'))
  sharded = iterseg.infer(params, jax.device_put(images, sharding), tiny_config)
  whole = iterseg.infer(params, images, tiny_config)
  assert len(sharded.probs.sharding.device_set) == 4
  assert sharded.probs.sharding.is_equivalent_to(sharding, 4)
  np.testing.assert_allclose(sharded.probs, whole.probs, atol=1e-6)
  np.testing.assert_array_equal(sharded.refined, whole.refined)


def test_a_pooled_budget_gives_hard_images_more_patches(setup):
  config, params = setup
  config.refine_budget = 'batch'
  wanted = [set(range(6)), {7}]  # Image 0 has 6 unsure patches, image 1 one: 2 * 3 = 6 refined.
  pred = iterseg.infer(params, images_unsure_at(wanted, config), config)
  counts = np.asarray(pred.refined).sum(1)
  assert counts.sum() == 6 and counts[0] > 3 and counts[1] < 3
  assert set(np.flatnonzero(pred.refined[0])) <= wanted[0]
