"""Data augmentation on device, inside the train step (paper Sec. 4, "Training").

Horizontal flip; brightness and contrast changes in +-0.1; rotation by an angle in [-180, 180]
degrees (biomedical datasets only); each applied to each example independently with probability
0.5. Every transformation is computed for every example and `jnp.where` keeps it or not, so
`augment` jits (static shapes) and a zero probability is exactly the identity. A positive angle
turns the content counter-clockwise as displayed (row 0 at the top), like `np.rot90` and
`scipy.ndimage.rotate`, around the centre of the pixel grid, ((H - 1) / 2, (W - 1) / 2).
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
  src = [ci + cos * di + sin * dj, cj - sin * di + cos * dj]

  def sample(plane):  # [H, W] -> [H, W]
    return ndimage.map_coordinates(plane, src, order=order, mode='constant', cval=0)

  return jax.vmap(sample, in_axes=-1, out_axes=-1)(x.reshape(h, w, -1)).reshape(x.shape)


def rotate(images_or_masks, angle_degrees, order):
  """Rotates each example counter-clockwise by its angle around the image centre: images_or_masks
  [B, H, W] or [B, H, W, C], angle_degrees a scalar or [B], order 1 (bilinear, for images) or 0
  (nearest, for masks, so a mask keeps its label set). Pixels from outside are 0; masks are sampled
  as float32 and cast back (exact for class ids < 2**24). Returns the same shape and dtype;
  `rotate(x, 90, order)` is `np.rot90(x, axes=(1, 2))` for square images."""
  x = jnp.asarray(images_or_masks)
  angles = jnp.broadcast_to(jnp.asarray(angle_degrees, jnp.float32), x.shape[:1])
  out = jax.vmap(_rotate_one, in_axes=(0, 0, None))(x.astype(jnp.float32), angles, order)
  return out.astype(x.dtype)


_rotate_batch = rotate  # Inside `augment`, the argument `rotate` shadows this function's name.


def _adjust(key, image, bc, p, gamma=0.0):
  """Adds b to image [H, W, 3], then scales its deviation from its mean (over all channels, as
  torchvision's `adjust_contrast`) by 1 + c, b, c ~ U(-bc, bc), each with probability p and clipped
  to [0, 1], then raises it to the power e^g, g ~ U(-gamma, gamma), with probability p; an
  operation not applied leaves the image untouched (no clipping either)."""
  k_do_b, k_b, k_do_c, k_c = jax.random.split(key, 4)
  k_do_g, k_g = jax.random.split(jax.random.fold_in(key, 7))  # Leaves the others' draws as they were.
  do_b, do_c = (jax.random.bernoulli(k, p) & (jnp.asarray(bc) > 0) for k in (k_do_b, k_do_c))
  b, c = (jax.random.uniform(k, (), minval=-bc, maxval=bc) for k in (k_b, k_c))
  image = jnp.where(do_b, jnp.clip(image + b, 0.0, 1.0), image)
  mean = jnp.mean(image)
  image = jnp.where(do_c, jnp.clip((image - mean) * (1.0 + c) + mean, 0.0, 1.0), image)
  do_g = jax.random.bernoulli(k_do_g, p) & (jnp.asarray(gamma) > 0)
  g = jax.random.uniform(k_g, (), minval=-gamma, maxval=gamma)
  return jnp.where(do_g, image ** jnp.exp(g), image)


def augment(key, images, masks, *, flip=True, brightness_contrast=0.1, rotate=True, p=0.5,
            gamma=0.0):
  """Randomly augments a batch, image and mask together; returns (images, masks) with the input
  shapes and dtypes. key: a jax.random key; images: [B, H, W, 3] float32 in [0, 1]; masks:
  [B, H, W] (uint8/int class ids, or float {0, 1}). Per example, independently, in this order, each
  with probability p: a horizontal flip (when `flip`); a brightness shift and a contrast change in
  +-brightness_contrast and a gamma of e^U(-gamma, gamma) (images only, in [0, 1]; see
  `_adjust`); a rotation by an angle
  ~ U[-180, 180] degrees (when `rotate`), images bilinear, masks nearest (keeping their label set),
  pixels from outside 0 in both (done last, so they stay black in the image). p = 0 is exactly the
  identity. `flip` and `rotate` are Python bools (static under jit); p and brightness_contrast may
  be traced."""
  images, masks = jnp.asarray(images), jnp.asarray(masks)
  k_flip, k_adjust, k_do_rot, k_angle = jax.random.split(key, 4)
  batch = images.shape[0]

  def where(do, new, old):  # do: [B]; per example, new where do is set, else old.
    return jnp.where(do.reshape((-1,) + (1,) * (old.ndim - 1)), new, old)

  if flip:
    do = jax.random.bernoulli(k_flip, p, (batch,))
    images, masks = where(do, images[:, :, ::-1], images), where(do, masks[:, :, ::-1], masks)
  adjusted = jax.vmap(_adjust, in_axes=(0, 0, None, None, None))(
      jax.random.split(k_adjust, batch), images.astype(jnp.float32), brightness_contrast, p, gamma)
  images = adjusted.astype(images.dtype)
  if rotate:
    do = jax.random.bernoulli(k_do_rot, p, (batch,))
    angles = jax.random.uniform(k_angle, (batch,), minval=-180.0, maxval=180.0)
    images = where(do, _rotate_batch(images, angles, 1), images)
    masks = where(do, _rotate_batch(masks, angles, 0), masks)
  return images, masks
