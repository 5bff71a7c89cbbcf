"""The paper's U-Net (Sec. 4, "Model"), as a pure Flax linen module.

Encoder: `depth` 3x3 stride-2 convolutions + ReLU with `width * 2**i` channels.
Decoder: `depth` 3x3 stride-2 transposed convolutions + ReLU halving the channels, each output
concatenated with the encoder feature of the same resolution (the input itself at full resolution).
Head: a 1x1 convolution to `num_classes` logits. No normalisation, as the authors.

Any input size works: the input is zero-padded (bottom/right) to the next multiple of 2**depth and
the logits are cropped back, so 768 / 16 = 48 or 97 x 131 are fine.
"""

import flax.linen as nn
import jax.numpy as jnp
from jax import lax


class UpConv(nn.Module):
  """nn.ConvTranspose(features, (3, 3), strides=(2, 2)) with the same parameters and result.

  On inputs of side <= 2 (the deepest level of a 48- or 64-px patch with 5 levels) XLA:CPU runs the
  lhs-dilated convolution of lax.conv_transpose at ~0.2 GFLOP/s, 60x slower than inserting the zeros
  explicitly and running a plain convolution; on larger inputs the built-in one is faster. Both sum
  the same products (results agree to float rounding).
  """
  features: int

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (3, 3, x.shape[-1], self.features))
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,))
    dn = ('NHWC', 'HWIO', 'NHWC')
    if max(x.shape[1:3]) > 2:
      y = lax.conv_transpose(x, kernel, (2, 2), 'SAME', dimension_numbers=dn)
    else:
      b, h, w, c = x.shape
      dilated = jnp.zeros((b, 2 * h - 1, 2 * w - 1, c), x.dtype).at[:, ::2, ::2].set(x)
      pad = (2, 1)  # What lax.conv_transpose pads for kernel 3, stride 2, 'SAME': output side 2h.
      y = lax.conv_general_dilated(dilated, kernel, (1, 1), (pad, pad), dimension_numbers=dn)
    return y + bias


class UNet(nn.Module):
  """x: [B, H, W, C_in] float32 -> logits [B, H, W, num_classes] float32."""
  num_classes: int = 1
  width: int = 64
  depth: int = 5

  @nn.compact
  def __call__(self, x):
    h, w = x.shape[1:3]
    m = 2 ** self.depth
    pad_h, pad_w = -h % m, -w % m
    if pad_h or pad_w:
      x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))

    skips = [x]  # Features at H, H/2, ..., H/2**(depth-1); the deepest one is not a skip.
    y = x
    for i in range(self.depth):
      y = nn.relu(nn.Conv(self.width * 2 ** i, (3, 3), strides=(2, 2), name=f'down{i}')(y))
      skips.append(y)
    skips.pop()

    for i in reversed(range(self.depth)):
      channels = max(self.width * 2 ** i // 2, 1)
      y = nn.relu(UpConv(channels, name=f'up{i}')(y))
      y = jnp.concatenate([y, skips.pop()], axis=-1)

    y = nn.Conv(self.num_classes, (1, 1), name='head')(y)
    return y[:, :h, :w, :]


def probabilities(logits):
  """Sigmoid for one class, softmax over the last axis for more. [..., C] -> [..., C]."""
  if logits.shape[-1] == 1:
    return nn.sigmoid(logits)
  return nn.softmax(logits, axis=-1)
