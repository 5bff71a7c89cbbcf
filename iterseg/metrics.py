"""Per-image segmentation metrics (the paper's Dice, with hard Dice and IoU beside it).

  soft_dice  (2 sum(p y) + 1) / (sum(p) + sum(y) + 1) on the probabilities (`losses.per_image_soft_dice`);
  hard_dice  2 |P n Y| / (|P| + |Y|) with P = {p > 0.5}; 1 when both are empty;
  iou        |P n Y| / |P u Y|; 1 when both are empty.
With num_classes > 1 each metric is the mean over the foreground classes 1..C-1 of the one-hot metric
(soft: softmax probability of class c vs. mask == c; hard: argmax == c vs. mask == c), so class 0 is
the background and a class absent from both the prediction and the mask counts as 1 (hard metrics).
A `region` [H, W] bool restricts every metric to its pixels (e.g. the band around patch borders).
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from iterseg import losses

METRICS = ('soft_dice', 'hard_dice', 'iou')


def _ratio(numerator, denominator):
  """numerator / denominator, and 1 where both are 0 (an empty prediction of an empty mask)."""
  empty = denominator == 0
  return jnp.where(empty, 1.0, numerator / jnp.where(empty, 1.0, denominator))


@functools.partial(jax.jit, static_argnames='num_classes')
def image_metrics(probs, masks, num_classes: int, region: Optional[jax.Array] = None) -> dict:
  """Per-image metrics. probs: [B, H, W, C] float32; masks: [B, H, W] class ids -> {name: [B]}."""
  axes = (1, 2)
  if num_classes == 1:
    labels = (masks != 0).astype(jnp.float32)
    p = probs[..., 0]
    pred = (p > 0.5).astype(jnp.float32)
    if region is not None:
      labels, p, pred = labels * region, p * region, pred * region
    soft = losses.per_image_soft_dice(p, labels)
    inter = jnp.sum(pred * labels, axes)
    total = jnp.sum(pred, axes) + jnp.sum(labels, axes)
    return {'soft_dice': soft, 'hard_dice': _ratio(2 * inter, total),
            'iou': _ratio(inter, total - inter)}
  onehot = jax.nn.one_hot(masks.astype(jnp.int32), num_classes, dtype=jnp.float32)  # [B, H, W, C]
  pred = jax.nn.one_hot(jnp.argmax(probs, -1), num_classes, dtype=jnp.float32)
  if region is not None:
    r = region[..., None]
    onehot, pred, probs = onehot * r, pred * r, probs * r
  soft = losses.soft_dice(probs, onehot, axis=axes)  # [B, C], smooth 1.
  inter = jnp.sum(pred * onehot, axes)
  total = jnp.sum(pred, axes) + jnp.sum(onehot, axes)
  per_class = {'soft_dice': soft, 'hard_dice': _ratio(2 * inter, total),
               'iou': _ratio(inter, total - inter)}
  return {name: v[:, 1:].mean(-1) for name, v in per_class.items()}  # Foreground classes only.


def seam_band(hi_size: int, num_patches: int, width: int) -> np.ndarray:
  """bool [hi, hi]: the pixels within `width` of an inner border of the Np x Np patch grid."""
  s = hi_size // num_patches
  offset = np.arange(hi_size) % s
  near = (offset < width) | (offset >= s - width)
  near &= (np.arange(hi_size) >= width) & (np.arange(hi_size) < hi_size - width)
  return near[:, None] | near[None, :]


def one_image_metrics(probs: np.ndarray, mask: np.ndarray, num_classes: int,
                      bucket: int = 256) -> dict:
  """{metric: float} of one image of any size, probs [H, W, C] and mask [H, W]: `image_metrics` on
  both zero-padded to multiples of `bucket` (one compilation per bucket; the padding changes no
  sum: p = 0 and y = 0 there, and argmax 0 is the background)."""
  h, w = mask.shape
  bh, bw = -(-h // bucket) * bucket, -(-w // bucket) * bucket
  p = np.zeros((1, bh, bw, probs.shape[-1]), np.float32)
  y = np.zeros((1, bh, bw), np.uint8)
  p[0, :h, :w], y[0, :h, :w] = probs, mask
  return {k: float(v[0]) for k, v in jax.device_get(image_metrics(p, y, num_classes)).items()}
