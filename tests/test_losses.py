"""Tests for iterseg.losses: hand-computed values, a numpy reference, limits and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iterseg import losses

LN2 = np.log(2.0)


# --- numpy references (written from the formulas, independent of the JAX code) ----------------

def np_sigmoid_focal(x, y, alpha=0.25, gamma=2.0):
  x = x.astype(np.float64)
  y = y.astype(np.float64)
  p = 1.0 / (1.0 + np.exp(-x))
  ce = np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))
  p_t = p * y + (1 - p) * (1 - y)
  loss = ce * (1 - p_t) ** gamma
  if alpha is not None:
    loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
  return loss.mean()


def np_softmax_focal(x, onehot, alpha=0.25, gamma=2.0):
  x = x.astype(np.float64)
  z = x - x.max(-1, keepdims=True)
  log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
  p = np.exp(log_p)
  return (-(onehot * alpha * (1 - p) ** gamma * log_p).sum(-1)).mean()


def np_dice(p, y, axis=None, smooth=1.0):
  return (2 * (p * y).sum(axis) + smooth) / (p.sum(axis) + y.sum(axis) + smooth)


# --- sigmoid focal loss -------------------------------------------------------------------------

def test_sigmoid_focal_at_zero_logits_matches_hand_values():
  # p = 0.5, BCE = ln 2, (1 - p_t)^2 = 0.25; alpha_t = 0.25 (y = 1) or 0.75 (y = 0).
  x = jnp.zeros(2)
  assert np.isclose(losses.sigmoid_focal_loss(x[:1], jnp.ones(1)), 0.25 * 0.25 * LN2, rtol=1e-6)
  assert np.isclose(losses.sigmoid_focal_loss(x[:1], jnp.zeros(1)), 0.75 * 0.25 * LN2, rtol=1e-6)
  # Mean over elements of the two.
  assert np.isclose(losses.sigmoid_focal_loss(x, jnp.array([1.0, 0.0])), 0.5 * LN2 * 0.25, rtol=1e-6)


def test_sigmoid_focal_at_p_three_quarters_matches_hand_value():
  # logit ln 3 -> p = 0.75; y = 1: BCE = ln(4/3), (1 - p_t)^2 = 1/16, alpha_t = 0.25.
  x = jnp.array([np.log(3.0)], jnp.float32)
  expected = 0.25 * (1 / 16) * np.log(4 / 3)
  assert np.isclose(losses.sigmoid_focal_loss(x, jnp.ones(1)), expected, rtol=1e-5)


def test_sigmoid_focal_without_alpha_and_gamma_is_mean_bce():
  x = jnp.array([-2.0, 0.5, 3.0])
  y = jnp.array([0.0, 1.0, 0.0])
  bce = np.mean(np.log1p(np.exp(-np.array([2.0, 0.5, -3.0]))))
  got = losses.sigmoid_focal_loss(x, y, alpha=None, gamma=0.0)
  assert np.isclose(got, bce, rtol=1e-6)


@pytest.mark.parametrize('alpha,gamma', [(0.25, 2.0), (None, 2.0), (0.5, 0.0), (0.25, 1.5)])
def test_sigmoid_focal_matches_numpy_reference_on_random_inputs(alpha, gamma):
  rng = np.random.default_rng(0)
  x = rng.normal(scale=4.0, size=(2, 5, 6, 1)).astype(np.float32)
  y = (rng.random((2, 5, 6, 1)) < 0.3).astype(np.float32)
  got = losses.sigmoid_focal_loss(x, y, alpha=alpha, gamma=gamma)
  assert got.dtype == jnp.float32 and got.shape == ()
  np.testing.assert_allclose(got, np_sigmoid_focal(x, y, alpha, gamma), rtol=1e-5)


# --- softmax focal loss -------------------------------------------------------------------------

def test_softmax_focal_at_zero_logits_matches_hand_value():
  # C = 4, p_c = 1/4 everywhere: -0.25 * (3/4)^2 * ln(1/4) per pixel.
  x = jnp.zeros((1, 2, 3, 4))
  onehot = jax.nn.one_hot(jnp.array([[[0, 1, 2], [3, 0, 1]]]), 4)
  assert np.isclose(losses.softmax_focal_loss(x, onehot), 0.25 * 0.5625 * np.log(4.0), rtol=1e-6)


def test_softmax_focal_matches_numpy_reference_and_accepts_per_class_alpha():
  rng = np.random.default_rng(1)
  x = rng.normal(scale=3.0, size=(2, 4, 5, 3)).astype(np.float32)
  onehot = np.eye(3, dtype=np.float32)[rng.integers(0, 3, size=(2, 4, 5))]
  np.testing.assert_allclose(losses.softmax_focal_loss(x, onehot),
                             np_softmax_focal(x, onehot), rtol=1e-5)
  alpha = np.array([0.2, 0.3, 0.5], np.float32)
  np.testing.assert_allclose(losses.softmax_focal_loss(x, onehot, alpha=alpha, gamma=1.0),
                             np_softmax_focal(x, onehot, alpha, 1.0), rtol=1e-5)


# --- soft Dice ----------------------------------------------------------------------------------

def test_soft_dice_matches_hand_value():
  # sum(p y) = 1.5, sum(p) = 2, sum(y) = 2 -> (3 + 1) / (4 + 1).
  p = jnp.array([0.5, 0.5, 0.0, 1.0])
  y = jnp.array([1.0, 0.0, 0.0, 1.0])
  assert np.isclose(losses.soft_dice(p, y), 0.8)
  assert np.isclose(losses.soft_dice(p, y, smooth=0.0), 0.75)


def test_soft_dice_of_two_empty_masks_is_one_thanks_to_smoothing():
  z = jnp.zeros((2, 3, 3, 1))
  assert losses.soft_dice(z, z) == 1.0


def test_per_image_soft_dice_reduces_all_but_batch_and_accepts_bhw_mask():
  rng = np.random.default_rng(2)
  p = rng.random((3, 4, 5, 1)).astype(np.float32)
  y = (rng.random((3, 4, 5)) < 0.5).astype(np.uint8)
  got = losses.per_image_soft_dice(p, y)
  assert got.shape == (3,)
  np.testing.assert_allclose(got, np_dice(p[..., 0], y, axis=(1, 2)), rtol=1e-6)


def test_soft_dice_refuses_mismatched_shapes():
  with pytest.raises(ValueError):
    losses.soft_dice(jnp.zeros((2, 4, 4, 3)), jnp.zeros((2, 4, 4)))


# --- segmentation_loss --------------------------------------------------------------------------

def _binary_batch(seed=3):
  rng = np.random.default_rng(seed)
  mask = (rng.random((2, 6, 6)) < 0.3).astype(np.uint8)
  logits = rng.normal(scale=2.0, size=(2, 6, 6, 1)).astype(np.float32)
  return logits, mask


def test_binary_loss_is_focal_plus_one_minus_batch_dice():
  logits, mask = _binary_batch()
  loss, aux = losses.segmentation_loss(logits, mask)
  y = mask[..., None].astype(np.float64)
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  focal, dice = np_sigmoid_focal(logits, y), np_dice(p, y)
  np.testing.assert_allclose(aux['focal'], focal, rtol=1e-5)
  np.testing.assert_allclose(aux['dice'], dice, rtol=1e-5)
  np.testing.assert_allclose(loss, focal + 1 - dice, rtol=1e-5)


def test_binary_loss_same_for_integer_and_float_masks():
  logits, mask = _binary_batch()
  a, _ = losses.segmentation_loss(logits, mask)
  b, _ = losses.segmentation_loss(logits, mask.astype(np.float32))
  assert a == b


def test_perfect_binary_prediction_has_dice_one_and_near_zero_loss():
  _, mask = _binary_batch()
  logits = np.where(mask[..., None] == 1, 30.0, -30.0).astype(np.float32)
  loss, aux = losses.segmentation_loss(logits, mask)
  assert np.isclose(aux['dice'], 1.0, atol=1e-6)
  assert 0.0 <= loss < 1e-6
  # And a wrong prediction is far worse.
  bad, _ = losses.segmentation_loss(-logits, mask)
  assert bad > 1.0


def test_multiclass_loss_matches_numpy_reference():
  rng = np.random.default_rng(4)
  logits = rng.normal(scale=2.0, size=(2, 5, 5, 3)).astype(np.float32)
  mask = rng.integers(0, 3, size=(2, 5, 5)).astype(np.uint8)
  loss, aux = losses.segmentation_loss(logits, mask, num_classes=3)
  onehot = np.eye(3)[mask]
  z = logits - logits.max(-1, keepdims=True)
  p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  dice = np_dice(p, onehot, axis=(0, 1, 2)).mean()
  focal = np_softmax_focal(logits, onehot)
  np.testing.assert_allclose(aux['dice'], dice, rtol=1e-5)
  np.testing.assert_allclose(aux['focal'], focal, rtol=1e-5)
  np.testing.assert_allclose(loss, focal + 1 - dice, rtol=1e-5)


def test_perfect_multiclass_prediction_has_dice_one():
  mask = np.random.default_rng(5).integers(0, 4, size=(2, 4, 4))
  logits = 30.0 * (2 * np.eye(4, dtype=np.float32)[mask] - 1)
  loss, aux = losses.segmentation_loss(logits, mask, num_classes=4)
  assert np.isclose(aux['dice'], 1.0, atol=1e-6)
  assert 0.0 <= loss < 1e-6


def test_num_classes_must_match_logits():
  with pytest.raises(ValueError):
    losses.segmentation_loss(jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 4, 4)))


@pytest.mark.parametrize('num_classes', [1, 3])
@pytest.mark.parametrize('gamma', [2.0, 0.5, 0.0])
def test_gradient_is_finite_for_extreme_logits(num_classes, gamma):
  rng = np.random.default_rng(6)
  logits = 100.0 * rng.choice([-1.0, 1.0], size=(2, 4, 4, num_classes)).astype(np.float32)
  mask = rng.integers(0, max(num_classes, 2), size=(2, 4, 4))
  grad = jax.grad(lambda x: losses.segmentation_loss(x, mask, num_classes=num_classes,
                                                     gamma=gamma)[0])(jnp.asarray(logits))
  assert np.all(np.isfinite(grad))


def test_loss_jits_with_traced_hyperparameters():
  logits, mask = _binary_batch()
  f = jax.jit(lambda x, m, a, g: losses.segmentation_loss(x, m, alpha=a, gamma=g)[0])
  np.testing.assert_allclose(f(logits, mask, 0.25, 2.0),
                             losses.segmentation_loss(logits, mask)[0], rtol=1e-6)
  np.testing.assert_allclose(f(logits, mask, 0.5, 1.0),
                             losses.segmentation_loss(logits, mask, alpha=0.5, gamma=1.0)[0],
                             rtol=1e-6)
