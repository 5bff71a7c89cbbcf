"""Segmentation losses: focal loss + (1 - soft Dice), as in the paper (Sec. 4, "Training").

The paper trains with L(y, y_hat) = L_f(y, y_hat) + (1 - D(y, y_hat)): the focal loss of Lin et al.
(alpha 0.25, gamma 2, mean over elements; optax's for the binary case) plus one minus the soft Dice
coefficient (smooth 1, computed
over the whole batch, as the authors' code does). Every function here is jittable and differentiable;
the hyperparameters may be Python numbers or traced scalars.
"""

from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax

Axis = Optional[Union[int, Sequence[int]]]

# The softmax focal loss (which optax lacks) clamps 1 - p below by this before `** gamma`, so that
# the gradient stays finite when the prediction saturates (1 - p == 0) and gamma < 1 (for gamma == 0
# it would otherwise be 0 * inf). The loss changes by at most ce * _EPS**gamma: nothing in float32.
_EPS = 1e-12


def _modulating_factor(one_minus_pt, gamma):
  return jnp.maximum(one_minus_pt, _EPS) ** gamma


def sigmoid_focal_loss(logits, labels, *, alpha=0.25, gamma=2.0):
  """Binary focal loss, mean over all elements (torchvision `sigmoid_focal_loss(reduction='mean')`).

  logits: float array, any shape; labels: same shape, targets in [0, 1] (usually {0, 1}).
  loss = alpha_t * (1 - p_t)**gamma * BCE(logits, labels), with p = sigmoid(logits),
  p_t = p * y + (1 - p) * (1 - y) and alpha_t = alpha * y + (1 - alpha) * (1 - y); alpha=None turns
  the weighting off. Computed by `optax.losses.sigmoid_focal_loss`, which takes (1 - p_t)**gamma in
  log space: its gradient stays finite for saturated logits and gamma < 1, so it needs no guard.
  Returns a float32 scalar.
  """
  logits = jnp.asarray(logits, jnp.float32)
  labels = jnp.asarray(labels, jnp.float32)
  return jnp.mean(optax.losses.sigmoid_focal_loss(logits, labels, alpha=alpha, gamma=gamma))


def softmax_focal_loss(logits, labels_onehot, *, alpha=0.25, gamma=2.0):
  """Multi-class focal loss, mean over pixels (all axes but the last).

  logits: [..., C] float; labels_onehot: [..., C] one-hot (or soft) targets.
  Per pixel: -sum_c y_c * alpha_c * (1 - p_c)**gamma * log p_c with p = softmax(logits).

  Choice of alpha: a scalar alpha weighs every class alike (as kornia's `focal_loss`), so it only
  scales the loss; pass a [C] array for per-class weights. Note that with C = 2 this is *not* the
  sigmoid loss above, which weighs the background by 1 - alpha (0.75) and the foreground by alpha.
  Returns a float32 scalar.
  """
  logits = jnp.asarray(logits, jnp.float32)
  labels_onehot = jnp.asarray(labels_onehot, jnp.float32)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  p = jnp.exp(log_p)
  alpha_c = jnp.broadcast_to(jnp.asarray(alpha, jnp.float32), logits.shape[-1:])
  per_class = -alpha_c * _modulating_factor(1.0 - p, gamma) * log_p
  return jnp.mean(jnp.sum(labels_onehot * per_class, axis=-1))


def _match_labels(probs, labels):
  """Gives [B, H, W] labels a trailing axis to match [B, H, W, 1] probs; refuses other mismatches.

  (Broadcasting [B, H, W] against [B, H, W, 1] would silently give [B, H, W, W].)
  """
  probs = jnp.asarray(probs, jnp.float32)
  labels = jnp.asarray(labels, jnp.float32)
  if labels.ndim == probs.ndim - 1 and probs.shape[-1] == 1:
    labels = labels[..., None]
  if labels.shape != probs.shape:
    raise ValueError(f'labels {labels.shape} do not match probs {probs.shape}')
  return probs, labels


def soft_dice(probs, labels, *, smooth=1.0, axis: Axis = None):
  """Soft Dice (2 * sum(p * y) + smooth) / (sum(p) + sum(y) + smooth), the sums over `axis`.

  probs: float array in [0, 1]; labels: same shape (a [B, H, W] mask is accepted for [B, H, W, 1]
  probs). axis=None sums over everything (the authors' training Dice, over the whole batch) and
  returns a scalar; otherwise the reduced axes are removed.
  """
  probs, labels = _match_labels(probs, labels)
  intersection = jnp.sum(probs * labels, axis=axis)
  total = jnp.sum(probs, axis=axis) + jnp.sum(labels, axis=axis)
  return (2.0 * intersection + smooth) / (total + smooth)


def per_image_soft_dice(probs, labels, *, smooth=1.0):
  """Soft Dice of each image: probs [B, H, W, C] (or [B, H, W]), labels alike -> [B] float32.

  Reduces over every axis but the first (H, W and C together), as the authors' evaluation
  (per-image soft Dice on probabilities, then averaged over the test set).
  """
  probs, labels = _match_labels(probs, labels)
  return soft_dice(probs, labels, smooth=smooth, axis=tuple(range(1, probs.ndim)))


def segmentation_loss(logits, mask, *, num_classes=1, alpha=0.25, gamma=2.0):
  """The paper's loss L = L_f + (1 - D) for a batch.

  logits: [B, H, W, C] float, C == num_classes; mask: [B, H, W] integer class ids (binary: {0, 1})
  or float targets in [0, 1] (binary only).
  C == 1: sigmoid focal loss + (1 - soft Dice(sigmoid(logits), mask)), Dice over the whole batch.
  C > 1: softmax focal loss + (1 - mean over classes of soft Dice(softmax(logits), one_hot(mask))),
  each class's Dice over the whole batch.
  Returns (loss, {'focal': focal term, 'dice': Dice coefficient (not 1 - Dice)}), float32 scalars.
  """
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
