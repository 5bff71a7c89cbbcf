"""iterseg: fast two-stage semantic segmentation of high-resolution images in JAX.

  config = iterseg.get_config('ph2')                       # or any configs/*.py by name
  params = iterseg.init_params(config, jax.random.key(0))  # or: params, config = iterseg.load(dir)
  pred = iterseg.infer(params, images, config)             # images: [B, hi, hi, 3] uint8 or [0, 1]
  pred.probs, pred.coarse, pred.scores, pred.refined
  # resolution='native' (get_config('native_demo')): one image [H, W, 3] of any size, or a list.

Attributes load on first use, so `import iterseg` (and the config files) stay cheap.
"""

import importlib

from iterseg import errors

_LAZY = {'Networks': 'models', 'Prediction': 'inference', 'Settings': 'settings',
         'infer': 'native', 'infer_baseline': 'native', 'init_params': 'inference',
         'load': 'checkpoints'}
__all__ = sorted([*_LAZY, 'errors', 'get_config'])


def get_config(name: str = 'default'):
  """The ConfigDict of configs/<name>.py, shipped with the package: 'default' (the paper's recipe),
  'ph2', 'retina', 'kitti', 'demo', ..."""
  module_name = f'iterseg.configs.{name}'
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name != module_name:  # A module the config file imports is missing: not our message.
      raise
    from importlib import resources  # pylint: disable=g-import-not-at-top
    names = sorted(p.name[:-3] for p in resources.files('iterseg.configs').iterdir()
                   if p.name.endswith('.py') and not p.name.startswith('_'))
    raise errors.SettingsError(f'no config named {name!r}; choose one of {names}') from e
  return module.get_config()


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(f'iterseg.{_LAZY[name]}'), name)
  raise AttributeError(f'module iterseg has no attribute {name!r}')
