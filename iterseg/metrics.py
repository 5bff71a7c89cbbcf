"""Per-image segmentation metrics (the paper's Dice, with hard Dice and IoU beside it).

  soft_dice  (2 sum(p y) + 1) / (sum(p) + sum(y) + 1) on the probabilities (`losses.per_image_soft_dice`);
  hard_dice  2 |P n Y| / (|P| + |Y|) with P = {p > 0.5}; 1 when both are empty;
  iou        |P n Y| / |P u Y|; 1 when both are empty;
  sensitivity |P n Y| / |Y| and specificity |not P n not Y| / |not Y|; 1 when the denominator is 0.
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

METRICS = ('soft_dice', 'hard_dice', 'iou', 'sensitivity', 'specificity')
FOV_DARKNESS = 25  # field_of_view: pixels whose brightest channel is at most this are outside.


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
    inside = jnp.ones_like(labels) if region is None else jnp.broadcast_to(region, labels.shape)
    negatives = jnp.sum(inside, axes) - jnp.sum(labels, axes)
    return {'soft_dice': soft, 'hard_dice': _ratio(2 * inter, total),
            'iou': _ratio(inter, total - inter), 'sensitivity': _ratio(inter, jnp.sum(labels, axes)),
            'specificity': _ratio(negatives - (jnp.sum(pred, axes) - inter), negatives)}
  onehot = jax.nn.one_hot(masks.astype(jnp.int32), num_classes, dtype=jnp.float32)  # [B, H, W, C]
  pred = jax.nn.one_hot(jnp.argmax(probs, -1), num_classes, dtype=jnp.float32)
  inside = jnp.ones(onehot.shape[:3]) if region is None else jnp.broadcast_to(
      region, onehot.shape[:3]).astype(jnp.float32)
  if region is not None:
    r = region[..., None]
    onehot, pred, probs = onehot * r, pred * r, probs * r
  soft = losses.soft_dice(probs, onehot, axis=axes)  # [B, C], smooth 1.
  inter = jnp.sum(pred * onehot, axes)
  total = jnp.sum(pred, axes) + jnp.sum(onehot, axes)
  negatives = jnp.sum(inside, axes)[:, None] - jnp.sum(onehot, axes)
  per_class = {'soft_dice': soft, 'hard_dice': _ratio(2 * inter, total),
               'iou': _ratio(inter, total - inter),
               'sensitivity': _ratio(inter, jnp.sum(onehot, axes)),
               'specificity': _ratio(negatives - (jnp.sum(pred, axes) - inter), negatives)}
  return {name: v[:, 1:].mean(-1) for name, v in per_class.items()}  # Foreground classes only.


def seam_band(hi_size: int, num_patches: int, width: int) -> np.ndarray:
  """bool [hi, hi]: the pixels within `width` of an inner border of the Np x Np patch grid."""
  s = hi_size // num_patches
  offset = np.arange(hi_size) % s
  near = (offset < width) | (offset >= s - width)
  near &= (np.arange(hi_size) >= width) & (np.arange(hi_size) < hi_size - width)
  return near[:, None] | near[None, :]


def one_image_metrics(probs: np.ndarray, mask: np.ndarray, num_classes: int,
                      region: Optional[np.ndarray] = None, bucket: int = 256) -> dict:
  """{metric: float} of one image of any size, probs [H, W, C] and mask [H, W] (within region [H, W]
  where given): `image_metrics` on them zero-padded to multiples of `bucket`, the padding outside
  the region (one compilation per bucket)."""
  h, w = mask.shape
  bh, bw = -(-h // bucket) * bucket, -(-w // bucket) * bucket
  p = np.zeros((1, bh, bw, probs.shape[-1]), np.float32)
  y = np.zeros((1, bh, bw), np.uint8)
  inside = np.zeros((1, bh, bw), bool)
  p[0, :h, :w], y[0, :h, :w], inside[0, :h, :w] = probs, mask, True if region is None else region
  values = jax.device_get(image_metrics(p, y, num_classes, inside))
  return {k: float(v[0]) for k, v in values.items()}


def field_of_view(images: np.ndarray) -> np.ndarray:
  """bool [..., H, W]: the pixels of uint8 images [..., H, W, 3] inside their field of view, those
  brighter than the dark frame around it (fundus photographs, microscopy): their brightest channel
  above FOV_DARKNESS."""
  return np.asarray(images).max(axis=-1) > FOV_DARKNESS
