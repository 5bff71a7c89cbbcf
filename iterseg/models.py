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
      y = nn.relu(nn.ConvTranspose(channels, (3, 3), strides=(2, 2), name=f'up{i}')(y))
      y = jnp.concatenate([y, skips.pop()], axis=-1)

    y = nn.Conv(self.num_classes, (1, 1), name='head')(y)
    return y[:, :h, :w, :]


def probabilities(logits):
  """Sigmoid for one class, softmax over the last axis for more. [..., C] -> [..., C]."""
  if logits.shape[-1] == 1:
    return nn.sigmoid(logits)
  return nn.softmax(logits, axis=-1)
