"""Tests for iterseg.augment: identity at p = 0, rotation convention, image/mask agreement."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iterseg import augment as aug


def _batch(seed=0, b=4, h=12, w=12, mask_dtype=np.uint8):
  rng = np.random.default_rng(seed)
  images = rng.random((b, h, w, 3)).astype(np.float32)
  masks = (rng.random((b, h, w)) < 0.4).astype(mask_dtype)
  return images, masks


def _blobs(b=8, h=16, w=16):
  """Masks made of 4x4 blocks (so rotation has regions to agree on), and images equal to them."""
  rng = np.random.default_rng(1)
  coarse = (rng.random((b, h // 4, w // 4)) < 0.5).astype(np.uint8)
  masks = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)
  images = np.repeat(masks[..., None].astype(np.float32), 3, axis=-1)
  return images, masks


def test_zero_probability_is_exactly_the_identity():
  images, masks = _batch()
  out_i, out_m = aug.augment(jax.random.key(0), images, masks, p=0.0)
  assert out_i.dtype == images.dtype and out_m.dtype == masks.dtype
  np.testing.assert_array_equal(out_i, images)
  np.testing.assert_array_equal(out_m, masks)


@pytest.mark.parametrize('size', [5, 6])
def test_rotate_90_is_np_rot90_for_image_and_mask(size):
  # Counter-clockwise as displayed, like np.rot90. The image is bilinear; cos(90 deg) is -4e-8 in
  # float32, so it agrees to ~1e-7 rather than bit for bit. The mask (nearest) is exact.
  images, masks = _batch(b=2, h=size, w=size)
  for angle, k in [(90.0, 1), (-90.0, -1), (180.0, 2)]:
    np.testing.assert_allclose(aug.rotate(images, angle, 1), np.rot90(images, k, axes=(1, 2)),
                               atol=1e-6)
    rotated = aug.rotate(masks, angle, 0)
    assert rotated.dtype == masks.dtype
    np.testing.assert_array_equal(rotated, np.rot90(masks, k, axes=(1, 2)))


def test_rotate_by_zero_is_exact_and_angles_are_per_example():
  images, masks = _batch(b=2)
  np.testing.assert_array_equal(aug.rotate(images, 0.0, 1), images)
  out = aug.rotate(masks, jnp.array([0.0, 90.0]), 0)
  np.testing.assert_array_equal(out[0], masks[0])
  np.testing.assert_array_equal(out[1], np.rot90(masks[1]))


def test_rotation_fills_with_zero_from_outside():
  ones = np.ones((1, 9, 9, 3), np.float32)
  out = np.asarray(aug.rotate(ones, 45.0, 1))
  assert out[0, 4, 4, 0] == 1.0  # The centre stays.
  assert np.all(out[0, 0, 0] == 0.0) and np.all(out[0, -1, -1] == 0.0)  # Corners come from outside.
  out_m = np.asarray(aug.rotate(np.ones((1, 9, 9), np.uint8), 45.0, 0))
  assert out_m[0, 4, 4] == 1 and out_m[0, 0, 0] == 0


@pytest.mark.parametrize('mask_dtype', [np.uint8, np.int32, np.float32])
def test_masks_keep_their_values_under_random_augmentation(mask_dtype):
  images, masks = _batch(b=6, mask_dtype=mask_dtype)
  for seed in range(4):
    _, out = aug.augment(jax.random.key(seed), images, masks, p=0.5)
    assert out.dtype == mask_dtype and out.shape == masks.shape
    assert set(np.unique(np.asarray(out))) <= {0, 1}


def test_multiclass_masks_keep_their_label_set():
  rng = np.random.default_rng(2)
  masks = rng.choice(np.array([0, 1, 2, 5], np.uint8), size=(4, 10, 10))
  images = rng.random((4, 10, 10, 3)).astype(np.float32)
  _, out = aug.augment(jax.random.key(3), images, masks, p=1.0)
  assert set(np.unique(np.asarray(out))) <= {0, 1, 2, 5}


def test_flip_moves_image_and_mask_together():
  images, masks = _blobs()
  images[:, :, :3] *= 0.5  # Left-right asymmetric content, so a flip is visible.
  masks = (images[..., 0] > 0).astype(np.uint8)
  out_i, out_m = aug.augment(jax.random.key(4), images, masks, flip=True, brightness_contrast=0.0,
                             rotate=False, p=0.5)
  np.testing.assert_array_equal(np.asarray(out_i[..., 0]) > 0, np.asarray(out_m) == 1)
  flipped = np.all(np.asarray(out_i) == images[:, :, ::-1], axis=(1, 2, 3))
  kept = np.all(np.asarray(out_i) == images, axis=(1, 2, 3))
  assert np.all(flipped | kept) and flipped.any() and kept.any()
  # p = 1 flips every example.
  out_i, out_m = aug.augment(jax.random.key(4), images, masks, brightness_contrast=0.0,
                             rotate=False, p=1.0)
  np.testing.assert_array_equal(out_i, images[:, :, ::-1])
  np.testing.assert_array_equal(out_m, masks[:, :, ::-1])


def test_rotation_moves_image_and_mask_together():
  images, masks = _blobs()
  out_i, out_m = aug.augment(jax.random.key(5), images, masks, flip=False, brightness_contrast=0.0,
                             rotate=True, p=1.0)
  assert not np.array_equal(out_m, masks)
  # Bilinear image vs nearest mask differ only along block borders.
  agree = np.mean((np.asarray(out_i[..., 0]) > 0.5) == (np.asarray(out_m) == 1))
  assert agree > 0.95


def test_brightness_contrast_stay_in_unit_range_and_leave_mask_alone():
  images, masks = _batch(b=8)
  images[0] = 0.0
  images[1] = 1.0
  out_i, out_m = aug.augment(jax.random.key(6), images, masks, flip=False, brightness_contrast=0.5,
                             rotate=False, p=1.0)
  out_i = np.asarray(out_i)
  assert out_i.min() >= 0.0 and out_i.max() <= 1.0
  assert not np.allclose(out_i, images)
  np.testing.assert_array_equal(out_m, masks)
  # With strength 0.1, a pixel moves by at most 0.1 (brightness) + 0.1 * |x - mean| <= 0.2.
  out_i, _ = aug.augment(jax.random.key(6), images, masks, flip=False, brightness_contrast=0.1,
                         rotate=False, p=1.0)
  diff = np.abs(np.asarray(out_i) - images).max()
  assert 0.0 < diff <= 0.2 + 1e-6


def test_each_transformation_fires_with_probability_p():
  images, masks = _batch(b=1000, h=4, w=4)
  out_i, _ = aug.augment(jax.random.key(10), images, masks, brightness_contrast=0.0, rotate=False,
                         p=0.3)
  flipped = np.any(np.asarray(out_i) != images, axis=(1, 2, 3))
  assert 0.25 < flipped.mean() < 0.35


def test_different_keys_give_different_outputs():
  images, masks = _batch()
  a = aug.augment(jax.random.key(7), images, masks)
  b = aug.augment(jax.random.key(8), images, masks)
  assert not np.array_equal(a[0], b[0])
  c = aug.augment(jax.random.key(7), images, masks)
  np.testing.assert_array_equal(a[0], c[0])
  np.testing.assert_array_equal(a[1], c[1])


def test_augment_jits_with_traced_probability_and_strength():
  images, masks = _batch()
  f = jax.jit(functools.partial(aug.augment, flip=True, rotate=True))
  key = jax.random.key(9)
  got = f(key, images, masks, brightness_contrast=0.1, p=0.5)
  want = aug.augment(key, images, masks)
  np.testing.assert_allclose(got[0], want[0], atol=1e-6)
  np.testing.assert_array_equal(got[1], want[1])
  ident = f(key, images, masks, brightness_contrast=0.1, p=0.0)
  np.testing.assert_array_equal(ident[0], images)


def test_gamma_jitter_raises_each_image_to_one_power_in_range_and_leaves_the_mask_alone():
  images, masks = _batch(b=8)
  images = np.clip(images, 0.05, 0.95)
  out_i, out_m = aug.augment(jax.random.key(7), images, masks, flip=False, brightness_contrast=0.0,
                             rotate=False, p=1.0, gamma=0.5)
  np.testing.assert_array_equal(out_m, masks)
  powers = np.log(np.asarray(out_i)) / np.log(images)  # One exponent per image.
  for power in powers:
    assert np.ptp(power) < 1e-3 and np.exp(-0.5) - 1e-4 <= power.mean() <= np.exp(0.5) + 1e-4
  assert np.ptp(powers.mean((1, 2, 3))) > 0.01  # Drawn per image.
  # Gamma on top of brightness and contrast leaves their draws as they were: the same images, raised.
  adjusted, _ = aug.augment(jax.random.key(7), images, masks, flip=False, brightness_contrast=0.1,
                            rotate=False, p=1.0)
  both, _ = aug.augment(jax.random.key(7), images, masks, flip=False, brightness_contrast=0.1,
                        rotate=False, p=1.0, gamma=0.5)
  np.testing.assert_allclose(np.asarray(both), np.asarray(adjusted) ** powers.mean(
      (1, 2, 3), keepdims=True), rtol=1e-4, atol=1e-6)
