"""Two-stage inference, as the paper's Figure 2.

  images --resize--> stage 1 U-Net --upsample--> coarse map --Np x Np patch scores--> lax.top_k
  --> lax.dynamic_slice the chosen full-resolution patches --> stage 2 U-Net (one batch of B*k)
  --> lax.dynamic_update_slice the refined probabilities back into the coarse map.

`infer` validates its inputs and calls `two_stage`, a jit-compiled function that is traced once per
input shape and `Spec` (the hashable, static part of the config) and never again.
"""

import dataclasses
import functools
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
from jax import lax

from iterseg import models

SCORES = ('entropy', 'margin', 'distance')


@dataclasses.dataclass(frozen=True)
class Spec:
  """The static configuration of inference (hashable: a jit static argument)."""
  hi_size: int
  stage1_size: int
  num_classes: int
  num_patches: int
  refine_count: int
  score: str
  stage2_uses_coarse: bool
  threshold: Optional[float]
  width: int
  depth: int

  @property
  def patch_size(self) -> int:
    return self.hi_size // self.num_patches

  @property
  def stage2_in_channels(self) -> int:
    return 3 + self.num_classes if self.stage2_uses_coarse else 3

  def unet(self) -> models.UNet:
    return models.UNet(num_classes=self.num_classes, width=self.width, depth=self.depth)


def spec_from_config(config, num_patches: Optional[int] = None) -> Spec:
  """Reads and checks the fields of `config` that inference uses (see configs/default.py)."""
  n = int(num_patches or config.num_patches)
  hi = int(config.hi_size)
  if n < 1 or hi % n:
    raise ValueError(
        f'hi_size={hi} is not divisible by num_patches (Np)={n}: patches must tile the image. '
        f'Pick Np among the divisors of {hi} or change hi_size.')
  k = n if config.get('refine_count') is None else int(config.refine_count)
  if not 0 < k <= n * n:
    raise ValueError(f'refine_count={k} must be in [1, Np*Np={n * n}].')
  if config.score not in SCORES:
    raise ValueError(f'score={config.score!r} is not one of {SCORES}.')
  threshold = config.get('threshold')
  return Spec(
      hi_size=hi, stage1_size=int(config.stage1_size), num_classes=int(config.num_classes),
      num_patches=n, refine_count=k, score=str(config.score),
      stage2_uses_coarse=bool(config.stage2_uses_coarse),
      threshold=None if threshold is None else float(threshold),
      width=int(config.model.width), depth=int(config.model.depth))


@flax.struct.dataclass
class Prediction:
  """What two-stage inference returns for a batch of B images of side H = W = hi_size.

  probs:   [B, H, W, C] final probabilities (stage 1 everywhere, stage 2 in refined patches).
  coarse:  [B, H, W, C] stage-1 probabilities upsampled to H.
  scores:  [B, Np*Np] patch uncertainty, row-major over the grid; higher = less confident.
  refined: [B, k] row-major grid indices of the patches stage 2 refined (by decreasing score).
  """
  probs: jax.Array
  coarse: jax.Array
  scores: jax.Array
  refined: jax.Array


def init_params(config, rng) -> dict:
  """Random parameters {'baseline', 'stage1', 'stage2'} for the networks that `config` describes."""
  spec = spec_from_config(config)
  keys = jax.random.split(rng, 3)
  return {'baseline': init_unet(keys[0], spec, 3), 'stage1': init_unet(keys[1], spec, 3),
          'stage2': init_unet(keys[2], spec, spec.stage2_in_channels)}


@functools.partial(jax.jit, static_argnames=('spec', 'in_channels'))
def init_unet(rng, spec: Spec, in_channels: int) -> dict:
  """Random U-Net parameters for `in_channels` inputs (they do not depend on the image size).

  The initialisers draw from an 'rbg' key derived from `rng`: XLA compiles the default threefry
  for every parameter, which takes 13 s on a 2-core CPU against 2 s for rbg.
  """
  size = 2 ** spec.depth
  rbg = jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl='rbg')
  return spec.unet().init(rbg, jnp.zeros((1, size, size, in_channels), jnp.float32))['params']


def class_probabilities(probs):
  """[..., C] -> [..., max(C, 2)]: a binary map p becomes the two classes (1 - p, p)."""
  if probs.shape[-1] == 1:
    return jnp.concatenate([1.0 - probs, probs], axis=-1)
  return probs


def patch_scores(probs, num_patches: int, score: str = 'entropy'):
  """Uncertainty of each patch of an Np x Np grid; higher = less confident.

  probs: [B, H, W, C] -> [B, Np*Np] (row-major). With class probabilities q (binary: (1-p, p)):
    'entropy':  mean over the patch of -sum_c q_c log q_c (binary entropy for one class).
    'margin':   mean over the patch of 1 - (q_top1 - q_top2) (binary: 1 - 2|p - 0.5|).
    'distance': 1 - max_c mean_patch(q_c), the authors' |mean(p) - 0.5| turned so that higher is
                less sure (binary: 0.5 - |mean(p) - 0.5|).
  """
  b, h, w, _ = probs.shape
  n = num_patches
  q = class_probabilities(probs)
  grid = q.reshape(b, n, h // n, n, w // n, q.shape[-1])  # [B, n, s, n, s, C]
  if score == 'entropy':
    per_pixel = jax.scipy.special.entr(grid).sum(-1)
    out = per_pixel.mean(axis=(2, 4))
  elif score == 'margin':
    top2 = lax.top_k(grid, 2)[0]
    out = (1.0 - (top2[..., 0] - top2[..., 1])).mean(axis=(2, 4))
  elif score == 'distance':
    out = 1.0 - grid.mean(axis=(2, 4)).max(-1)
  else:
    raise ValueError(f'score={score!r} is not one of {SCORES}.')
  return out.reshape(b, n * n)


def extract_patches(images, rows, cols, size: int):
  """images: [B, H, W, C]; rows, cols: [B, k] top-left corners -> [B, k, size, size, C]."""
  def one(image, r, c):
    return lax.dynamic_slice(image, (r, c, 0), (size, size, image.shape[-1]))
  return jax.vmap(jax.vmap(one, in_axes=(None, 0, 0)))(images, rows, cols)


def insert_patches(maps, patches, rows, cols):
  """Writes patches [B, k, s, s, C] into maps [B, H, W, C] at the corners rows, cols [B, k]."""
  def one(m, ps, rs, cs):
    def body(i, m):
      return lax.dynamic_update_slice(m, ps[i], (rs[i], cs[i], 0))
    return lax.fori_loop(0, ps.shape[0], body, m)
  return jax.vmap(one)(maps, patches, rows, cols)


def stage1(params, images, spec: Spec):
  """Stage 1 on images [B, H, W, 3] resized to stage1_size; probabilities upsampled to [B, H, W, C]."""
  b, h, w, _ = images.shape
  small = jax.image.resize(images, (b, spec.stage1_size, spec.stage1_size, 3), 'linear')
  probs = models.probabilities(spec.unet().apply({'params': params}, small))
  return jax.image.resize(probs, (b, h, w, spec.num_classes), 'linear')


@functools.partial(jax.jit, static_argnames='spec')
def two_stage(params, images, spec: Spec) -> Prediction:
  """The jit-compiled two-stage method. params: {'stage1', 'stage2'}; images: [B, H, W, 3]."""
  b = images.shape[0]
  n, s, k, c = spec.num_patches, spec.patch_size, spec.refine_count, spec.num_classes

  coarse = stage1(params['stage1'], images, spec)
  scores = patch_scores(coarse, n, spec.score)
  top_scores, refined = lax.top_k(scores, k)  # [B, k] each.
  rows, cols = (refined // n) * s, (refined % n) * s

  inputs = jnp.concatenate([images, coarse], -1) if spec.stage2_uses_coarse else images
  patches = extract_patches(inputs, rows, cols, s)  # [B, k, s, s, C_in]
  logits = spec.unet().apply({'params': params['stage2']}, patches.reshape(b * k, s, s, -1))
  fine = models.probabilities(logits).reshape(b, k, s, s, c)
  if spec.threshold is not None:  # Adaptive budget: unsure-enough patches only.
    keep = (top_scores >= spec.threshold)[:, :, None, None, None]
    fine = jnp.where(keep, fine, extract_patches(coarse, rows, cols, s))

  probs = insert_patches(coarse, fine, rows, cols)
  return Prediction(probs=probs, coarse=coarse, scores=scores, refined=refined)


@functools.partial(jax.jit, static_argnames='spec')
def baseline(params, images, spec: Spec):
  """The same U-Net on the full image: [B, H, W, 3] -> probabilities [B, H, W, C]."""
  return models.probabilities(spec.unet().apply({'params': params}, images))


def _check_images(images, spec: Spec):
  shape = tuple(getattr(images, 'shape', ()))
  if len(shape) != 4 or shape[1:] != (spec.hi_size, spec.hi_size, 3):
    raise ValueError(
        f'images must be [B, {spec.hi_size}, {spec.hi_size}, 3] float32 in [0, 1] '
        f'(config.hi_size={spec.hi_size}); got shape {shape}. Resize them first '
        f'(iterseg.predict maps any size to hi_size and back).')
  if not isinstance(images, jax.core.Tracer) and not bool(jnp.isfinite(images).all()):
    raise ValueError('images contain NaN or inf; iterseg.infer needs finite values in [0, 1].')


def _check_params(params: Any, name: str, in_channels: int, spec: Spec):
  if name not in params:
    raise ValueError(f'params has no {name!r} network (keys: {sorted(params)}); '
                     f'use iterseg.init_params or iterseg.load.')
  kernel = params[name]['down0']['kernel']
  if kernel.shape[2] != in_channels or params[name]['head']['kernel'].shape[-1] != spec.num_classes:
    raise ValueError(
        f'params[{name!r}] takes {kernel.shape[2]} input channels and gives '
        f'{params[name]["head"]["kernel"].shape[-1]} classes, but the config asks for '
        f'{in_channels} inputs (stage2_uses_coarse={spec.stage2_uses_coarse}) and '
        f'num_classes={spec.num_classes}: params and config do not belong together.')


def infer(params, images, config, *, num_patches: Optional[int] = None) -> Prediction:
  """Two-stage segmentation of images [B, hi_size, hi_size, 3] float32 in [0, 1].

  params: {'stage1', 'stage2', ...} (from `init_params` or `iterseg.load`); config: a ConfigDict
  with the fields of configs/default.py; num_patches overrides config.num_patches.
  """
  spec = spec_from_config(config, num_patches)
  _check_images(images, spec)
  _check_params(params, 'stage1', 3, spec)
  _check_params(params, 'stage2', spec.stage2_in_channels, spec)
  return two_stage({'stage1': params['stage1'], 'stage2': params['stage2']},
                   jnp.asarray(images, jnp.float32), spec)


def infer_baseline(params, images, config):
  """The baseline U-Net on the full-resolution images: [B, H, W, 3] -> probabilities [B, H, W, C]."""
  spec = spec_from_config(config)
  _check_images(images, spec)
  _check_params(params, 'baseline', 3, spec)
  return baseline(params['baseline'], jnp.asarray(images, jnp.float32), spec)
