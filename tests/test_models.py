import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from iterseg import models


def rbg(seed: int):
  """A key whose initialisers compile in a fraction of threefry's time (as models.init_unet)."""
  return jax.random.key(seed, impl='rbg')


@pytest.mark.parametrize('shape', [(1, 64, 64, 3), (2, 97, 131, 3), (1, 48, 48, 4), (1, 5, 7, 3)])
def test_unet_logits_have_the_input_size_at_any_size(shape):
  """Traced, not run: the padding to 2**depth and the crop back are shape code."""
  net = models.UNet(num_classes=1, width=4, depth=5)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  params = jax.eval_shape(net.init, rbg(0), x)['params']
  assert jax.eval_shape(net.apply, {'params': params}, x).shape == shape[:3] + (1,)


def test_unet_parameters_do_not_depend_on_input_size():
  net = models.UNet(num_classes=3, width=4, depth=3)
  params = net.init(rbg(0), jnp.ones((1, 8, 8, 3)))['params']
  assert net.apply({'params': params}, jnp.ones((2, 50, 70, 3))).shape == (2, 50, 70, 3)


@pytest.mark.parametrize('side,crop,depth', [(80, 8, 4), (37, 3, 3), (48, 8, 5), (9, 2, 2)])
def test_a_cropped_unet_computes_only_the_centre_and_gives_the_full_networks_values(side, crop, depth):
  """crop: the decoder computes what the centre needs, so its FLOPs fall, and the centre is the
  uncropped network's (odd sides and a tiny deepest level included)."""
  full = models.UNet(num_classes=2, width=4, depth=depth)
  cut = models.UNet(num_classes=2, width=4, depth=depth, crop=crop)
  x = jax.random.normal(jax.random.key(1), (2, side, side, 4))
  params = full.init(rbg(0), x)
  expected = full.apply(params, x)[:, crop:side - crop, crop:side - crop]
  np.testing.assert_allclose(cut.apply(params, x), expected, rtol=1e-5, atol=1e-6)
  cost = lambda net: jax.jit(net.apply).lower(params, x).compile().cost_analysis()['flops']
  assert cost(cut) < 0.95 * cost(full)


def test_unet_has_the_papers_channels():
  net = models.UNet(num_classes=1, width=64, depth=5)
  params = jax.eval_shape(net.init, jax.random.key(0), jnp.ones((1, 32, 32, 3)))['params']
  down = [params[f'down{i}']['kernel'].shape for i in range(5)]
  assert down == [(3, 3, 3, 64), (3, 3, 64, 128), (3, 3, 128, 256), (3, 3, 256, 512),
                  (3, 3, 512, 1024)]
  up = [params[f'up{i}']['kernel'].shape[-1] for i in reversed(range(5))]
  assert up == [512, 256, 128, 64, 32]
  assert params['up3']['kernel'].shape[2] == 512 + 512  # Skip concatenated with the encoder.
  assert params['head']['kernel'].shape == (1, 1, 32 + 3, 1)


def test_padding_does_not_leak_into_the_valid_region_statistics():
  # The crop keeps the top-left H x W: a 40 x 40 input equals the 64 x 64 zero-padded one there.
  net = models.UNet(num_classes=1, width=4, depth=5)
  x = jax.random.uniform(jax.random.key(1), (1, 40, 40, 3))
  params = net.init(rbg(0), x)['params']
  padded = jnp.pad(x, ((0, 0), (0, 24), (0, 24), (0, 0)))
  np.testing.assert_allclose(net.apply({'params': params}, x),
                             net.apply({'params': params}, padded)[:, :40, :40], atol=1e-6)


def test_probabilities_sigmoid_for_one_class_softmax_for_more():
  np.testing.assert_allclose(models.probabilities(jnp.zeros((2, 1))), 0.5)
  p = models.probabilities(jnp.array([[0.0, 0.0, jnp.log(2.0)]]))
  np.testing.assert_allclose(p, [[0.25, 0.25, 0.5]], rtol=1e-6)


@pytest.mark.parametrize('side', [1, 2, 3, 5])
def test_upconv_is_flax_conv_transpose_with_the_same_parameters(side):
  width = side if side <= 2 else side + 1  # Side <= 2 takes the explicit-zeros path.
  x = jax.random.normal(jax.random.key(0), (3, side, width, 16))
  ours = models.UpConv(8)
  theirs = nn.ConvTranspose(8, (3, 3), strides=(2, 2))
  params = ours.init(rbg(1), x)
  reference = theirs.init(rbg(1), x)
  jax.tree.map(np.testing.assert_array_equal, params, reference)  # Same names, shapes, values.
  np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), atol=1e-5, rtol=1e-5)
