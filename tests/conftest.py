"""Tests run on CPU with 4 fake devices, so pmap and multi-device code runs in CI."""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=4').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # noqa: E402  (after XLA_FLAGS, before anything imports jax)

from iterseg.configs import default  # noqa: E402


def tiny(**overrides):
  """The default config shrunk to seconds on CPU: 64 x 64 images, a 3-level U-Net of width 4."""
  c = default.get_config()
  c.hi_size = 64
  c.model.width = 4
  c.model.depth = 3
  c.num_patches = 4
  c.train.num_patches_list = (2, 4)
  c.train.batch_size = 8
  c.train.stage1_epochs = c.train.stage2_epochs = c.train.baseline_epochs = 1
  c.train.log_every = 1
  c.data.num_examples = 20
  for key, value in overrides.items():
    node = c
    *path, leaf = key.split('.')
    for p in path:
      node = node[p]
    node[leaf] = value
  return c


@pytest.fixture
def tiny_config():
  return tiny()
