"""Segmentation losses: L(y, y_hat) = L_f(y, y_hat) + (1 - D(y, y_hat)) as in the paper (Sec. 4,
"Training"), the focal loss of Lin et al. (alpha 0.25, gamma 2, mean over elements) plus one minus
the soft Dice coefficient (smooth 1, over the whole batch, as the authors' code). Every function is
jittable and differentiable; the hyperparameters may be Python numbers or traced scalars.
"""

from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax


def sigmoid_focal_loss(logits, labels, *, alpha=0.25, gamma=2.0):
  """Binary focal loss, mean over all elements (torchvision `sigmoid_focal_loss(reduction='mean')`):
  logits: float array, any shape; labels: same shape, targets in [0, 1] (usually {0, 1}). Returns
  the float32 mean of alpha_t * (1 - p_t)**gamma * BCE(logits, labels), p = sigmoid(logits),
  p_t = p * y + (1 - p) * (1 - y), alpha_t = alpha * y + (1 - alpha) * (1 - y) (alpha=None: 1),
  by `optax.losses.sigmoid_focal_loss` (its gradient is finite for saturated logits, gamma < 1)."""
  return jnp.mean(optax.losses.sigmoid_focal_loss(
      jnp.asarray(logits, jnp.float32), jnp.asarray(labels, jnp.float32), alpha=alpha, gamma=gamma))


def softmax_focal_loss(logits, labels_onehot, *, alpha=0.25, gamma=2.0):
  """Multi-class focal loss, mean over pixels (all axes but the last); a float32 scalar. logits:
  [..., C] float; labels_onehot: [..., C] one-hot (or soft) targets. Per pixel:
  -sum_c y_c * alpha_c * (1 - p_c)**gamma * log p_c with p = softmax(logits). A scalar alpha weighs
  every class alike (as kornia's `focal_loss`), so it only scales the loss; a [C] array weighs each
  class. With C = 2 this is *not* the sigmoid loss, which weighs background by 1 - alpha."""
  log_p = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  alpha_c = jnp.broadcast_to(jnp.asarray(alpha, jnp.float32), log_p.shape[-1:])
  # 1 - p is clamped below by 1e-12 before `** gamma`, so that the gradient stays finite when p
  # saturates and gamma < 1 (for gamma == 0, 0 * inf): the loss changes by nothing in float32.
  per_class = -alpha_c * jnp.maximum(1.0 - jnp.exp(log_p), 1e-12) ** gamma * log_p
  return jnp.mean(jnp.sum(jnp.asarray(labels_onehot, jnp.float32) * per_class, axis=-1))


def soft_dice(probs, labels, *, smooth=1.0, axis: Optional[Union[int, Sequence[int]]] = None):
  """Soft Dice (2 * sum(p * y) + smooth) / (sum(p) + sum(y) + smooth), the sums over `axis`: probs
  a float array in [0, 1], labels the same shape (a [B, H, W] mask is accepted for [B, H, W, 1]
  probs; broadcasting would give [B, H, W, W]). axis=None sums over everything (the authors'
  training Dice, over the whole batch) and returns a scalar; otherwise the reduced axes are removed.
  """
  probs, labels = jnp.asarray(probs, jnp.float32), jnp.asarray(labels, jnp.float32)
  if labels.ndim == probs.ndim - 1 and probs.shape[-1] == 1:
    labels = labels[..., None]
  if labels.shape != probs.shape:
    raise ValueError(f'labels {labels.shape} do not match probs {probs.shape}')
  intersection = jnp.sum(probs * labels, axis=axis)
  total = jnp.sum(probs, axis=axis) + jnp.sum(labels, axis=axis)
  return (2.0 * intersection + smooth) / (total + smooth)


def per_image_soft_dice(probs, labels, *, smooth=1.0):
  """Soft Dice of each image, over all axes but the first (H, W and C together), as the authors'
  evaluation: probs [B, H, W, C] (or [B, H, W]), labels alike -> [B] float32."""
  return soft_dice(probs, labels, smooth=smooth, axis=tuple(range(1, jnp.ndim(probs))))


def segmentation_loss(logits, mask, *, num_classes=1, alpha=0.25, gamma=2.0):
  """The paper's loss L = L_f + (1 - D) for a batch; returns (L, {'focal': L_f, 'dice': D}), float32
  scalars (D the Dice coefficient, not 1 - D). logits: [B, H, W, C] float, C == num_classes; mask:
  [B, H, W] integer class ids (binary: {0, 1}) or float targets in [0, 1] (binary only). C == 1:
  sigmoid focal loss, D = soft Dice of sigmoid(logits) over the whole batch. C > 1: softmax focal
  loss, D = the mean over classes of soft Dice(softmax(logits), one_hot(mask)), each over the whole
  batch."""
  logits = jnp.asarray(logits, jnp.float32)
  if logits.ndim != 4 or logits.shape[-1] != num_classes:
    raise ValueError(f'logits {logits.shape} are not [B, H, W, num_classes={num_classes}]')
  if num_classes == 1:
    labels = jnp.asarray(mask, jnp.float32)
    if labels.ndim == 3:
      labels = labels[..., None]
    focal = sigmoid_focal_loss(logits, labels, alpha=alpha, gamma=gamma)
    dice = soft_dice(jax.nn.sigmoid(logits), labels, smooth=1.0)
  else:
    onehot = jax.nn.one_hot(jnp.asarray(mask).astype(jnp.int32), num_classes, dtype=jnp.float32)
    focal = softmax_focal_loss(logits, onehot, alpha=alpha, gamma=gamma)
    dice = jnp.mean(soft_dice(jax.nn.softmax(logits, axis=-1), onehot, smooth=1.0, axis=(0, 1, 2)))
  return focal + (1.0 - dice), {'focal': focal, 'dice': dice}
