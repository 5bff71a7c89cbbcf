"""iterseg: fast two-stage semantic segmentation of high-resolution images in JAX.

  params = iterseg.init_params(config, jax.random.key(0))   # or: params, config = iterseg.load(workdir)
  pred = iterseg.infer(params, images, config)              # images: [B, hi, hi, 3] float32 in [0, 1]
  pred.probs, pred.coarse, pred.scores, pred.refined
"""

from iterseg.inference import Prediction, infer, infer_baseline, init_params

__all__ = ['Prediction', 'infer', 'infer_baseline', 'init_params', 'load']


def load(workdir, num_patches=None):
  """(params, config) of a trained workdir, ready for `iterseg.infer` (see iterseg.checkpoints)."""
  from iterseg import checkpoints  # Imported lazily: orbax is slow to import.
  return checkpoints.load(workdir, num_patches)
