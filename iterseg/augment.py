"""Data augmentation on device, inside the train step (paper Sec. 4, "Training").

Horizontal flip; brightness and contrast changes in +-0.1; rotation by an angle in [-180, 180]
degrees (biomedical datasets only). Each transformation is applied to each example independently
with probability p = 0.5. Everything has static shapes: every transformation is computed for every
example and `jnp.where` keeps it or not, so `augment` jits and a zero probability is exactly the
identity.

Rotation convention: a positive angle turns the content counter-clockwise as the array is displayed
(row 0 at the top), like `np.rot90` and `scipy.ndimage.rotate`; `rotate(x, 90, order)` equals
`np.rot90(x, axes=(1, 2))` for square images. The centre of rotation is the centre of the pixel grid,
((H - 1) / 2, (W - 1) / 2).
"""

import jax
import jax.numpy as jnp
from jax.scipy import ndimage


def _rotate_one(x, angle_degrees, order):
  """Rotates one x: [H, W] or [H, W, ...] by a scalar angle; pixels from outside become 0."""
  h, w = x.shape[:2]
  theta = jnp.deg2rad(jnp.asarray(angle_degrees, jnp.float32))
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  ci, cj = (h - 1) / 2.0, (w - 1) / 2.0
  di, dj = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) - ci,
                        jnp.arange(w, dtype=jnp.float32) - cj, indexing='ij')
  # Output pixel (i, j) reads the input at the point that the rotation carries onto it.
  src_i = ci + cos * di + sin * dj
  src_j = cj - sin * di + cos * dj

  def sample(plane):  # [H, W] -> [H, W]
    return ndimage.map_coordinates(plane, [src_i, src_j], order=order, mode='constant', cval=0)

  flat = x.reshape(h, w, -1)
  out = jax.vmap(sample, in_axes=-1, out_axes=-1)(flat)
  return out.reshape(x.shape)


def rotate(images_or_masks, angle_degrees, order):
  """Rotates each example counter-clockwise by its angle around the image centre.

  images_or_masks: [B, H, W] or [B, H, W, C]; angle_degrees: scalar or [B]; order: 1 (bilinear,
  for images) or 0 (nearest, for masks, so a mask keeps its label set). Pixels rotated in from
  outside the image are 0. Masks of any dtype are sampled as float32 and cast back (exact for
  class ids < 2**24). Returns the same shape and dtype.
  """
  x = jnp.asarray(images_or_masks)
  angles = jnp.broadcast_to(jnp.asarray(angle_degrees, jnp.float32), x.shape[:1])
  out = jax.vmap(_rotate_one, in_axes=(0, 0, None))(x.astype(jnp.float32), angles, order)
  return out.astype(x.dtype)


_rotate_batch = rotate  # Inside `augment`, the argument `rotate` shadows this function's name.


def _adjust(key, image, brightness_contrast, p):
  """Brightness shift b and contrast factor 1 + c, b, c ~ U(-bc, bc), each with probability p.

  image: [H, W, 3]. Brightness adds b; contrast scales the deviation from the image's mean intensity
  by 1 + c (as torchvision's `adjust_contrast`, on the mean over all channels). Results are clipped
  to [0, 1]; an operation not applied leaves the image untouched (no clipping either).
  """
  k_do_b, k_b, k_do_c, k_c = jax.random.split(key, 4)
  on = jnp.asarray(brightness_contrast) > 0
  b = jax.random.uniform(k_b, (), minval=-brightness_contrast, maxval=brightness_contrast)
  c = jax.random.uniform(k_c, (), minval=-brightness_contrast, maxval=brightness_contrast)
  do_b = jax.random.bernoulli(k_do_b, p) & on
  image = jnp.where(do_b, jnp.clip(image + b, 0.0, 1.0), image)
  do_c = jax.random.bernoulli(k_do_c, p) & on
  mean = jnp.mean(image)
  image = jnp.where(do_c, jnp.clip((image - mean) * (1.0 + c) + mean, 0.0, 1.0), image)
  return image


def augment(key, images, masks, *, flip=True, brightness_contrast=0.1, rotate=True, p=0.5):
  """Randomly augments a batch; image and mask move together.

  key: a jax.random key; images: [B, H, W, 3] float32 in [0, 1]; masks: [B, H, W] (uint8/int class
  ids, or float {0, 1}). Per example, independently, in this order:
    - horizontal flip with probability p (when `flip`);
    - brightness shift and contrast change, each in +-brightness_contrast, with probability p each
      (images only, clipped to [0, 1]; see `_adjust`);
    - rotation by an angle ~ U[-180, 180] degrees with probability p (when `rotate`): images
      bilinear, masks nearest so they keep their label set; pixels rotated in from outside are 0 in
      both. Done last, so these pixels stay 0 (black) in the image.
  p = 0 is exactly the identity. `flip` and `rotate` are Python bools (static under jit); p and
  brightness_contrast may be traced. Returns (images, masks) with the input shapes and dtypes.
  """
  images = jnp.asarray(images)
  masks = jnp.asarray(masks)
  k_flip, k_adjust, k_do_rot, k_angle = jax.random.split(key, 4)
  batch = images.shape[0]
  per_example = lambda do, x: do.reshape((-1,) + (1,) * (x.ndim - 1))  # [B] -> [B, 1, ...]

  if flip:
    do = jax.random.bernoulli(k_flip, p, (batch,))
    images = jnp.where(per_example(do, images), images[:, :, ::-1], images)
    masks = jnp.where(per_example(do, masks), masks[:, :, ::-1], masks)

  adjust_keys = jax.random.split(k_adjust, batch)
  adjusted = jax.vmap(_adjust, in_axes=(0, 0, None, None))(
      adjust_keys, images.astype(jnp.float32), brightness_contrast, p)
  images = adjusted.astype(images.dtype)

  if rotate:
    do = jax.random.bernoulli(k_do_rot, p, (batch,))
    angles = jax.random.uniform(k_angle, (batch,), minval=-180.0, maxval=180.0)
    images = jnp.where(per_example(do, images), _rotate_batch(images, angles, 1), images)
    masks = jnp.where(per_example(do, masks), _rotate_batch(masks, angles, 0), masks)
  return images, masks
