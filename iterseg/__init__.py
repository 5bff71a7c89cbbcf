"""iterseg: fast two-stage semantic segmentation of high-resolution images in JAX.

  config = iterseg.get_config('ph2')                        # or any configs/*.py by name
  params = iterseg.init_params(config, jax.random.key(0))   # or: params, config = iterseg.load(workdir)
  pred = iterseg.infer(params, images, config)              # images: [B, hi, hi, 3] uint8 or [0, 1]
  pred.probs, pred.coarse, pred.scores, pred.refined
  # resolution='native' (e.g. get_config('native_demo')): one image [H, W, 3] of any size, or a list.

Attributes load on first use, so `import iterseg` (and the config files) stay cheap.
"""

import importlib

__all__ = ['Networks', 'Prediction', 'Settings', 'errors', 'get_config', 'infer', 'infer_baseline',
           'init_params', 'load']

_LAZY = {'Networks': 'models', 'Prediction': 'inference', 'Settings': 'settings',
         'infer': 'native', 'infer_baseline': 'native', 'init_params': 'inference',
         'load': 'checkpoints'}


def get_config(name: str = 'default'):
  """The ConfigDict of configs/<name>.py, shipped with the package: 'default' (the paper's recipe),
  'ph2', 'retina', 'kitti', 'demo', ..."""
  from iterseg import errors  # pylint: disable=g-import-not-at-top
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
  if name == 'errors':
    return importlib.import_module('iterseg.errors')
  if name in _LAZY:
    return getattr(importlib.import_module(f'iterseg.{_LAZY[name]}'), name)
  raise AttributeError(f'module iterseg has no attribute {name!r}')
