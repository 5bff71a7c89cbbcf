import jax
import jax.numpy as jnp
import pytest

from iterseg import flops, models, settings
from tests.helpers import tiny


def test_xla_flops_agree_with_the_analytic_count_for_the_papers_unet_at_768():
  net = models.UNet(num_classes=1, width=64, depth=5)
  params = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
  measured = flops.xla_flops(net.apply, {'params': params},
                             jax.ShapeDtypeStruct((1, 768, 768, 3), jnp.float32))
  analytic = flops.analytic_unet_flops(768, 3, 64, 5)
  assert analytic == pytest.approx(71.2e9, rel=0.01)  # 35.6 G multiply-adds.
  assert measured == pytest.approx(analytic, rel=0.05)


@pytest.mark.parametrize('size, in_channels', [(150, 4), (100, 3)])
def test_analytic_count_matches_xla_on_sizes_that_are_not_multiples(size, in_channels):
  net = models.UNet(num_classes=1, width=8, depth=4)
  x = jax.ShapeDtypeStruct((1, size, size, in_channels), jnp.float32)
  params = jax.eval_shape(net.init, jax.random.key(0), x)['params']
  measured = flops.xla_flops(net.apply, {'params': params}, x)
  assert measured == pytest.approx(flops.analytic_unet_flops(size, in_channels, 8, 4), rel=0.05)


def test_two_stage_flops_are_below_baseline_and_fall_with_np():
  rep = flops.report(settings.from_config(tiny()), (2, 4, 8))
  two = [rep['two_stage'][n] for n in (2, 4, 8)]
  assert all(t < rep['baseline'] for t in two)
  assert all(a > b for a, b in zip(two, two[1:]))
  for n in (2, 4, 8):  # The compiled function also pays for resizing, scoring and copies.
    assert rep['two_stage'][n] <= rep['two_stage_compiled'][n]
