"""Two-stage inference, as the paper's Figure 2.

  images --resize--> stage 1 U-Net --upsample--> coarse map --Np x Np patch scores--> lax.top_k
  --> lax.dynamic_slice the chosen full-resolution patches --> stage 2 U-Net (one batch)
  --> lax.dynamic_update_slice the refined probabilities back into the coarse map.

`two_stage` is jit-compiled once per input shape and `Spec` (settings.Spec, the static geometry).
`stage2_inputs` cuts stage 2's inputs for inference and training alike. `infer`, `infer_baseline`
and `init_params` are the library's entry points: they check the config (once per distinct config)
and the images, then call the compiled functions.
"""

import functools
from typing import Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax import lax
from tqdm import tqdm

from iterseg import models, settings
from iterseg.errors import InputError
from iterseg.models import Networks, random_networks
from iterseg.settings import Settings
from iterseg.spec import SCORES, Spec


@flax.struct.dataclass
class Prediction:
  """What two-stage inference returns for a batch of B images of side H = W = hi_size.

  probs:   [B, H, W, C] final probabilities (stage 1 everywhere, stage 2 in refined patches).
  coarse:  [B, H, W, C] stage-1 probabilities upsampled to H.
  scores:  [B, Np*Np] patch uncertainty, row-major over the grid; higher = less confident.
  refined: [B, Np*Np] bool, the patches whose pixels stage 2 recomputed (threshold applied).
  """
  probs: jax.Array
  coarse: jax.Array
  scores: jax.Array
  refined: jax.Array


# --- The steps of the method --------------------------------------------------------------------------


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
  b, h, _, _ = probs.shape
  return grid_scores(probs, h // num_patches, score).reshape(b, num_patches ** 2)


def grid_scores(probs, cell: int, score: str = 'entropy'):
  """probs [B, gh * cell, gw * cell, C] -> [B, gh, gw]: the uncertainty of each cell x cell patch
  (the formulas of `patch_scores`; 'learned': the mean of the last channel, stage 1's predicted
  error share)."""
  b, h, w, _ = probs.shape
  if score == 'learned':
    return probs[..., -1].reshape(b, h // cell, cell, w // cell, cell).mean(axis=(2, 4))
  q = class_probabilities(probs)
  grid = q.reshape(b, h // cell, cell, w // cell, cell, q.shape[-1])  # [B, gh, s, gw, s, C]
  if score == 'entropy':
    out = jax.scipy.special.entr(grid).sum(-1).mean(axis=(2, 4))
  elif score == 'margin':
    top2 = lax.top_k(grid, 2)[0]
    out = (1.0 - (top2[..., 0] - top2[..., 1])).mean(axis=(2, 4))
  elif score == 'distance':
    out = 1.0 - grid.mean(axis=(2, 4)).max(-1)
  else:
    raise ValueError(f'score={score!r} is not one of {SCORES}.')  # Settings checked it.
  return out


def select(scores, count: int, threshold: Optional[float] = None):
  """The selection of both protocols: the `count` highest of each row of scores [B, N] by
  lax.top_k (ties to the lower index) -> (indices [B, count], kept [B, count] bool: scoring at
  least `threshold`; all True without one). A chosen patch not kept keeps stage 1's probabilities."""
  values, indices = lax.top_k(scores, count)
  kept = jnp.ones(values.shape, bool) if threshold is None else values >= threshold
  return indices, kept


def select_patches(scores, spec: Spec):
  """The patches stage 2 refines: (flat indices [M] into the B * Np*Np patches of the batch, kept
  [M] bool: at least spec.threshold).

  refine_budget 'image': the k = refine_count highest-scoring patches of each image (M = B * k, image
  by image, by decreasing score); 'batch': the B * k highest over the whole batch, so a hard image
  gets more than k and an easy one fewer. M is static either way.
  """
  b, cells = scores.shape
  k = spec.refine_count
  if spec.refine_budget == 'batch':
    top, kept = select(scores.reshape(1, -1), b * k, spec.threshold)
    return top[0], kept[0]
  top, kept = select(scores, k, spec.threshold)  # [B, k]
  return (top + cells * jnp.arange(b)[:, None]).reshape(-1), kept.reshape(-1)


def patch_corners(flat, spec: Spec):
  """(image, row, col) [M] each: the image index and the top-left pixel of each flat patch index."""
  cells = spec.num_patches ** 2
  image, cell = flat // cells, flat % cells
  return image, (cell // spec.num_patches) * spec.patch_size, (cell % spec.num_patches) * spec.patch_size


def cut(maps, flat, spec: Spec, margin: int = 0):
  """maps [B, H, W, C] -> [M, s + 2 margin, s + 2 margin, C]: the patches `flat`, each with `margin`
  pixels of its real neighbourhood (zeros past the image border)."""
  image, rows, cols = patch_corners(flat, spec)
  if margin:
    maps = jnp.pad(maps, ((0, 0), (margin, margin), (margin, margin), (0, 0)))
  side = spec.patch_size + 2 * margin

  def one(i, r, c):
    return lax.dynamic_slice(maps, (i, r, c, 0), (1, side, side, maps.shape[-1]))[0]
  return jax.vmap(one)(image, rows, cols)


def stage2_inputs(images, coarse, flat, spec: Spec):
  """Stage 2's input patches [M, s + 2 halo, s + 2 halo, C_in], for training and inference alike:
  the full-resolution image (and the coarse probabilities when spec.stage2_uses_coarse) around
  each chosen patch."""
  inputs = jnp.concatenate([images, coarse], -1) if spec.stage2_uses_coarse else images
  return cut(inputs, flat, spec, spec.halo)


def stage2_logits(params, inputs, spec: Spec):
  """Stage 2 on its input patches [M, s + 2 halo, ...] -> logits of the patch centres [M, s, s, C]
  (the decoder computes only what the centres need)."""
  return models.unet(spec, 'stage2', crop=spec.halo).apply({'params': params}, inputs)


def paste(maps, patches, corners, count=None):
  """The one paste of both protocols: maps [B, H, W, C] with patches [M, s, s, C] written at
  corners (image, row, col) [M] each (`patch_corners`; native: its tiles, into an image's output),
  by lax.dynamic_update_slice; with `count` (may be traced), the first `count` patches only."""
  image, rows, cols = corners

  def body(i, m):
    return lax.dynamic_update_slice(m, patches[i][None].astype(m.dtype),
                                    (image[i], rows[i], cols[i], 0))
  return lax.fori_loop(0, patches.shape[0] if count is None else count, body, maps)


def stage1_maps(params, images, spec: Spec):
  """(low, coarse): stage 1's outputs at stage1_size [B, s, s, C (+1)], and its probabilities
  upscaled to the images' [B, H, W, C]. low holds the class probabilities, then, with
  spec.error_head, the predicted error share (see `stage1_outputs`)."""
  low = stage1_outputs(models.unet(spec, 'stage1').apply({'params': params},
                                                         downscale(images, spec)), spec)
  return low, upscale(low[..., :spec.num_classes], images.shape[1:3], spec)


def stage1_outputs(logits, spec: Spec):
  """Stage 1's logits [..., C (+1)] -> probabilities over the classes [..., C], then with
  spec.error_head the sigmoid of the last channel [..., 1]: the share of the full-resolution pixels
  under each stage-1 pixel that the upscaled map gets wrong, as stage 1 predicts it."""
  c = spec.num_classes
  probs = models.probabilities(logits[..., :c])
  if spec.error_head:
    return jnp.concatenate([probs, jax.nn.sigmoid(logits[..., c:])], -1)
  return probs


def upscale(low, size, spec: Spec):
  """low [B, s, s, C] -> [B, H, W, C] (size = (H, W)): the coarse map."""
  b, h, w = low.shape[0], *size
  if spec.rescale == 'blocks':
    return jax.vmap(lambda p: bilinear(p, spec.downscale, 0, 0, h, w))(low)
  return jax.image.resize(low, (b, h, w, low.shape[-1]), 'linear')


def error_share(probs, masks, spec: Spec):
  """What the error head learns: probs [B, s, s, C] (stage 1's, at stage1_size) and the
  full-resolution masks [B, H, W] -> [B, s, s] in [0, 1], the expected share of the pixels under
  each stage-1 pixel that the upscaled map gets wrong: the mean of |p - y| (binary), or of half the
  L1 distance between the class probabilities and the one-hot mask. Soft, so that it moves smoothly
  with stage 1 while both learn; it is high where stage 1 misses a structure it cannot see and where
  it is unsure, low where it is confidently right."""
  coarse = upscale(probs, masks.shape[1:3], spec)
  if spec.num_classes == 1:
    wrong = jnp.abs(coarse[..., 0] - masks.astype(jnp.float32))
  else:
    wrong = 0.5 * jnp.abs(coarse - jax.nn.one_hot(masks, spec.num_classes)).sum(-1)
  return downscale(wrong, spec)


def scores_of(low, coarse, spec: Spec):
  """[B, Np*Np] patch scores: of the upscaled map (the paper's protocol), or, at native resolution
  and for the learned score, of the low-resolution map (`tile_scores`)."""
  if spec.scores_on_low_map:
    return tile_scores(low, spec).reshape(low.shape[0], -1)
  return patch_scores(coarse, spec.num_patches, spec.score)


def tile_scores(low, spec: Spec):
  """Stage 1's outputs low [B, h, w, C (+1)] -> [B, h / cell, w / cell]: each patch scored on its
  cell x cell stage-1 pixels (native: the tile's (hi / Np / f)^2, so no full-resolution map is made
  to choose), from the class probabilities, or with score='learned' from the predicted error share.
  """
  cell = spec.stage1_size // spec.num_patches
  channels = low if spec.score == 'learned' else low[..., :spec.num_classes]
  return grid_scores(channels, cell, spec.score)


def downscale(maps, spec: Spec):
  """[B, H, W, ...] -> [B, stage1_size, stage1_size, ...]: what stage 1 sees (and learns from).

  The paper's square protocol resizes bilinearly (antialiased); resolution='native' takes the mean
  of each spec.downscale x spec.downscale block (`block_means`), which native inference computes in
  bands of any image.
  """
  b, s = maps.shape[0], spec.stage1_size
  if spec.rescale == 'blocks':
    return block_means(maps, spec.downscale)
  return jax.image.resize(maps.astype(jnp.float32), (b, s, s, *maps.shape[3:]), 'linear')


def block_means(maps, factor: int):
  """maps [B, h * f, w * f, ...] -> float32 [B, h, w, ...]: the mean of each f x f block (native's
  host thumbnail, `native.thumbnail`, computes the same of an image of any size)."""
  b, height, width = maps.shape[:3]
  blocks = maps.reshape(b, height // factor, factor, width // factor, factor, *maps.shape[3:])
  return blocks.sum(axis=(2, 4), dtype=jnp.float32) / factor ** 2


def bilinear(low, factor: int, y0, x0, rows: int, cols: int):
  """Rows y0.. and columns x0.. (rows x cols) of low [h, w, C] upscaled by the whole `factor`,
  bilinear with half-pixel centres and edges clamped: exactly jax.image.resize's 'linear' upscale,
  but of any window, so an image's map is made in bands and tiles. y0, x0 >= 0 may be traced, and
  the window must lie inside the upscaled [h * f, w * f]."""
  up = upsample_axis(upsample_axis(low, factor, 0), factor, 1)
  return lax.dynamic_slice(up, (y0, x0, 0), (rows, cols, up.shape[2]))


def upsample_axis(x, factor: int, axis: int):
  """x upscaled `factor` times along `axis` (bilinear, half-pixel centres, edges clamped): output
  i * f + k lies (k + 0.5) / f - 0.5 of a pixel from input i, so each of the f phases is a fixed
  blend of x and a neighbour, computed on the small input and interleaved (no gather, no transpose)."""
  n = x.shape[axis]
  take = lambda start, stop: lax.slice_in_dim(x, start, stop, axis=axis)
  before = jnp.concatenate([take(0, 1), take(0, n - 1)], axis)
  after = jnp.concatenate([take(1, n), take(n - 1, n)], axis)
  phases = []
  for k in range(factor):
    d = (k + 0.5) / factor - 0.5
    phases.append(x + d * (after - x) if d >= 0 else x - d * (before - x))
  up = jnp.stack(phases, axis + 1)
  return up.reshape(*x.shape[:axis], n * factor, *x.shape[axis + 1:])


def as_float(images):
  """uint8 images are scaled to [0, 1] on the device; floats are taken as they are."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def normalize(images, spec: Spec):
  """What every network sees, [..., 3] uint8 or in [0, 1] -> float32: the images as they are (the
  paper), or with spec.input_norm='standardize' (x - input_mean) / input_std per channel, with the
  training images' fixed statistics. The same pixels give the same input whatever surrounds them
  (a training crop, a whole image, a tile, a thumbnail), and augmentation is not undone."""
  images = as_float(images)
  if spec.input_norm != 'standardize':
    return images
  if spec.input_mean is None:
    raise InputError("config.model.input_norm='standardize' but model.input_mean and input_std are "
                     'unset: use the config of the trained run (iterseg.load(workdir) returns it), '
                     'or set the training images\' per-channel statistics.')
  return (images - jnp.asarray(spec.input_mean)) / jnp.asarray(spec.input_std)


def input_statistics(images, progress: bool = False) -> tuple:
  """((mean R, G, B), (std R, G, B)) in [0, 1] of a sequence of uint8 images [H, W, 3] (any sizes),
  over all their pixels: what input_norm='standardize' subtracts and divides by."""
  total, sums, squares = 0, np.zeros(3), np.zeros(3)
  for image in tqdm(images, desc='input statistics', unit='image', disable=not progress):
    pixels = np.asarray(image).reshape(-1, 3)
    total += len(pixels)
    sums += pixels.sum(0, dtype=np.float64)
    squares += np.einsum('ij,ij->j', pixels, pixels, dtype=np.float64)
  mean = sums / total
  std = np.sqrt(np.maximum(squares / total - mean ** 2, 0.0))
  return (tuple(float(m / 255) for m in mean),
          tuple(float(max(s / 255, 1e-3)) for s in std))


@functools.partial(jax.jit, static_argnames='spec')
def two_stage(params, images, spec: Spec) -> Prediction:
  """The compiled two-stage method. params: Networks (stage1, stage2[Np]); images: [B, H, W, 3]
  uint8, or float32 in [0, 1]."""
  images = normalize(images, spec)
  b = images.shape[0]
  low, coarse = stage1_maps(params.stage1, images, spec)
  scores = scores_of(low, coarse, spec)
  flat, kept = select_patches(scores, spec)
  logits = stage2_logits(params.stage2[spec.num_patches], stage2_inputs(images, coarse, flat, spec),
                         spec)
  fine = models.probabilities(logits)
  chosen = jnp.zeros(b * spec.num_patches ** 2, bool).at[flat].set(kept)
  if spec.threshold is not None:  # Static shapes: stage 2 ran on all k; those not kept keep stage 1.
    fine = jnp.where(kept[:, None, None, None], fine, cut(coarse, flat, spec))
  probs = paste(coarse, fine, patch_corners(flat, spec))
  return Prediction(probs=probs, coarse=coarse, scores=scores, refined=chosen.reshape(scores.shape))


@functools.partial(jax.jit, static_argnames='spec')
def baseline(params, images, spec: Spec):
  """The same U-Net on the full image: [B, H, W, 3] -> probabilities [B, H, W, C]."""
  return models.probabilities(models.unet(spec).apply({'params': params}, normalize(images, spec)))


@functools.partial(jax.jit, static_argnames='spec')
def stage1_only(params, images, spec: Spec):
  """Stage 1 on images [B, H, W, 3] downscaled to stage1_size; probabilities upscaled to
  [B, H, W, C]."""
  return stage1_maps(params, normalize(images, spec), spec)[1]


# --- The library's entry points -----------------------------------------------------------------------


def settings_of(config) -> Settings:
  """The checked Settings of `config`: a Settings as it is, a ConfigDict (or dict) checked once per
  distinct content (a later change to the same object is seen: the cache is keyed by value)."""
  if isinstance(config, Settings):
    return config
  if not hasattr(config, 'items'):
    raise settings.SettingsError(f'config must be an ml_collections.ConfigDict (e.g. '
                                 f'iterseg.get_config("ph2")), got {type(config).__name__}')
  return _checked(ml_collections.FrozenConfigDict(config))


@functools.lru_cache(maxsize=64)
def _checked(frozen: ml_collections.FrozenConfigDict) -> Settings:
  return settings.from_config(frozen.as_configdict())


def init_params(config, rng) -> Networks:
  """Random Networks for `config`: baseline, stage 1, and stage 2 at config.num_patches."""
  return random_networks(settings_of(config).spec, rng)


def check_images(images, spec: Spec, check_values: Optional[bool] = None):
  """InputError unless images are [B >= 1, hi, hi, 3] uint8, or floats in [0, 1].

  Values are checked on the host for host (numpy) arrays, where it costs one pass and no device
  sync; device arrays only when check_values=True (that waits for the device).
  """
  shape = tuple(getattr(images, 'shape', ()))
  wanted = f'[B, {spec.hi_size}, {spec.hi_size}, 3] uint8, or float32 in [0, 1]'
  if len(shape) != 4 or shape[1:] != (spec.hi_size, spec.hi_size, 3):
    raise InputError(f'images must be {wanted} (config.hi_size={spec.hi_size}); got shape {shape}. '
                     f'Resize them first (--mode=predict maps any size to hi_size and back).')
  if shape[0] == 0:
    raise InputError(f'images is an empty batch (shape {shape}): give at least one image.')
  dtype = np.dtype(images.dtype)
  if dtype == np.uint8:
    return
  if dtype.kind != 'f':
    raise InputError(f'images have dtype {dtype}; give uint8 (0..255) or floats in [0, 1] '
                     f'(e.g. images.astype(np.float32) / 65535 for 16-bit data).')
  if check_values is None:
    check_values = not isinstance(images, jax.Array)
  if check_values and not isinstance(images, jax.core.Tracer):
    check_range(*(float(v) for v in jax.device_get((images.min(), images.max()))))


def check_range(low: float, high: float):
  """InputError unless float images whose values span [low, high] are finite and in [0, 1]."""
  if not (np.isfinite(low) and np.isfinite(high)):
    raise InputError('images contain NaN or inf; iterseg.infer needs finite values in [0, 1].')
  if low < 0.0 or high > 1.0:
    hint = ' (they look like 0..255: pass uint8, or divide by 255)' if high > 1.0 else ''
    raise InputError(f'float images must lie in [0, 1], got values in [{low:g}, {high:g}]{hint}.')


def check_params(params: Networks, spec: Spec, network: str):
  """InputError unless `params` holds `network` ('stage1', 'stage2', 'baseline') made for `spec`."""
  if not isinstance(params, Networks):
    raise InputError(f'params must be iterseg Networks (from iterseg.init_params or iterseg.load), '
                     f'got {type(params).__name__}.')
  in_channels = spec.in_channels(network)
  if network == 'stage2':
    tree, label = params.stage2.get(spec.num_patches), f'stage 2 for Np={spec.num_patches}'
    if tree is None:
      raise InputError(f'params has no {label} (it has {params.names()}); pass num_patches= one '
                       f'of {sorted(params.stage2)} or train it.')
  else:
    tree, label = getattr(params, network), network
    if tree is None:
      raise InputError(f'params has no {network} network (it has {params.names()}).')
  kernel, head = tree['down0']['kernel'], tree['head']['kernel']
  if kernel.shape[2] != in_channels or head.shape[-1] != spec.num_classes or (
      kernel.shape[-1] != spec.width):
    raise InputError(
        f'params of {label} take {kernel.shape[2]} input channels, width {kernel.shape[-1]} and give '
        f'{head.shape[-1]} classes, but the config asks for {in_channels} inputs '
        f'(stage2_uses_coarse={spec.stage2_uses_coarse}), width {spec.width} and '
        f'num_classes={spec.num_classes}: params and config do not belong together.')


def replicate_like(params, images):
  """params copied to every device of a batch sharded over several (NamedSharding); else as is."""
  sharding = getattr(images, 'sharding', None)
  if isinstance(sharding, jax.sharding.NamedSharding) and len(sharding.device_set) > 1:
    return jax.device_put(params, jax.sharding.NamedSharding(sharding.mesh,
                                                             jax.sharding.PartitionSpec()))
  return params


def infer(params: Networks, images, config, *, num_patches: Optional[int] = None,
          check_values: Optional[bool] = None) -> Prediction:
  """Two-stage segmentation of images [B, hi_size, hi_size, 3]: uint8, or float32 in [0, 1].

  params: Networks (from `init_params` or `iterseg.load`); config: a ConfigDict with the fields of
  configs/default.py (or its checked `iterseg.settings.Settings`); num_patches overrides
  config.num_patches. A batch sharded over several
  devices is computed where it lies, and the result keeps its sharding.
  """
  s = settings_of(config)
  spec = s.spec_for(num_patches or s.spec.num_patches)
  check_images(images, spec, check_values)
  check_params(params, spec, 'stage1')
  check_params(params, spec, 'stage2')
  return two_stage(replicate_like(params.at(spec.num_patches), images), images, spec)


def infer_baseline(params: Networks, images, config, *, check_values: Optional[bool] = None):
  """The baseline U-Net on the full-resolution images: [B, H, W, 3] -> probabilities [B, H, W, C]."""
  spec = settings_of(config).spec
  check_images(images, spec, check_values)
  check_params(params, spec, 'baseline')
  return baseline(replicate_like(params.baseline, images), images, spec)
