"""The networks: the paper's U-Net (Sec. 4, "Model") as a Flax linen module, its random parameters,
and `Networks`, the one layout of the parameters iterseg trains and loads.

Encoder: `depth` 3x3 stride-2 convolutions + ReLU with `width * 2**i` channels. Decoder: `depth` 3x3
stride-2 transposed convolutions + ReLU halving the channels, each output concatenated with the
encoder feature of its resolution (the input itself at full resolution). Head: a 1x1 convolution to
`num_classes` logits. No normalisation, as the authors. Any input size works, at the cost of its own
pixels: stride-2 convolutions pad odd sides at the bottom/right (an output pixel always covers the
same input pixels) and upsampled maps are cropped to their skip's size, so a 40-px stage-2 input (a
32-px patch, a 4-px halo) costs 40^2, not the 64^2 of padding it to a multiple of 32.
"""

import dataclasses
import functools
import re
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from iterseg.errors import InputError
from iterseg.spec import Spec


class UpConv(nn.Module):
  """nn.ConvTranspose(features, (3, 3), strides=(2, 2)): the same parameters and products (results
  agree to float rounding), but on inputs of side <= 2 (a 48- or 64-px patch's deepest level),
  where XLA:CPU's lax.conv_transpose is 60x slower, zeros inserted and a plain convolution."""
  features: int
  dtype: Any = jnp.float32  # The computation's; the parameters stay float32.

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (3, 3, x.shape[-1], self.features))
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,))
    x, kernel, bias = (a.astype(self.dtype) for a in (x, kernel, bias))
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
  """x: [B, H, W, C_in] float32 -> logits [B, H - 2 crop, W - 2 crop, num_classes] float32. `dtype`
  is the convolutions' and activations' (bfloat16 for the matrix units of GPUs and TPUs); the
  parameters stay float32. `crop` drops that many output px on every side (a stage-2 patch's halo);
  the decoder computes only the rows and columns the kept outputs read, so the halo costs nothing
  (the kept values are the uncropped network's)."""
  num_classes: int = 1
  width: int = 64
  depth: int = 5
  dtype: Any = jnp.float32
  crop: int = 0

  @nn.compact
  def __call__(self, x):
    skips = [x.astype(self.dtype)]  # Features at H, ceil(H/2), ...; the deepest is not a skip.
    for i in range(self.depth):
      h, w = skips[-1].shape[1:3]  # 'SAME' for even sides; odd ones padded at the bottom/right.
      skips.append(nn.relu(nn.Conv(self.width * 2 ** i, (3, 3), strides=(2, 2),
                                   padding=((0, 1 + h % 2), (0, 1 + w % 2)), dtype=self.dtype,
                                   param_dtype=jnp.float32, name=f'down{i}')(skips[-1])))
    # The rows (and columns) [lo, hi) of each level the kept outputs need: output 2m of a
    # transposed convolution reads inputs m - 1 and m, output 2m + 1 reads m.
    need = [[(self.crop, n - self.crop) for n in x.shape[1:3]]]
    for level in skips[1:]:
      need.append([(max(0, (lo - 1) // 2), min(n, (hi + 1) // 2))
                   for (lo, hi), n in zip(need[-1], level.shape[1:3])])
    (r0, r1), (c0, c1) = need[-1]
    y = skips.pop()[:, r0:r1, c0:c1]

    for i in reversed(range(self.depth)):  # y: need[i + 1] of level i + 1.
      (r0, _), (c0, _) = need[i + 1]
      y = nn.relu(UpConv(max(self.width * 2 ** i // 2, 1), dtype=self.dtype, name=f'up{i}')(y))
      (h0, h1), (w0, w1) = need[i]  # y starts at row 2 r0 and column 2 c0 of level i.
      y = jnp.concatenate([y[:, h0 - 2 * r0:h1 - 2 * r0, w0 - 2 * c0:w1 - 2 * c0],
                           skips.pop()[:, h0:h1, w0:w1]], axis=-1)

    return nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, param_dtype=jnp.float32,
                   name='head')(y).astype(jnp.float32)


def probabilities(logits):
  """Sigmoid for one class, softmax over the last axis for more. [..., C] -> [..., C]."""
  return nn.sigmoid(logits) if logits.shape[-1] == 1 else nn.softmax(logits, axis=-1)


def unet(spec: Spec, network: str = 'baseline', crop: int = 0) -> UNet:
  """The U-Net of `network`: spec.out_channels(network) outputs (stage 1 with an error head has
  one more than the classes), without `crop` px of its output on every side."""
  return UNet(num_classes=spec.out_channels(network), width=spec.width, depth=spec.depth,
              dtype=jnp.dtype(spec.dtype), crop=crop)


@functools.partial(jax.jit, static_argnames=('spec', 'network'))
def init_unet(rng, spec: Spec, network: str) -> dict:
  """Random U-Net parameters of `network` ('stage1', 'stage2', 'baseline'; they depend on
  spec.in_channels(network), not on the image size), drawn from an 'rbg' key derived from `rng`
  (XLA compiles the default threefry for every parameter: 13 s on a 2-core CPU, 2 s for rbg)."""
  size = 2 ** spec.depth
  rbg = jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl='rbg')
  x = jnp.zeros((1, size, size, spec.in_channels(network)), jnp.float32)
  return unet(spec, network).init(rbg, x)['params']


# --- Names and layout -----------------------------------------------------------------------------


def name(network: str, num_patches: Optional[int] = None) -> str:
  """'stage1', 'baseline', or 'stage2_np<Np>' (one stage 2 per grid size Np): a network's name in
  checkpoints, metrics and reports, which `parse` reads."""
  if network == 'stage2':
    if num_patches is None:
      raise ValueError('stage 2 is named by its Np: name("stage2", num_patches)')
    return f'stage2_np{int(num_patches)}'
  return network


def parse(network_name: str) -> tuple:
  """('stage2', 8) for 'stage2_np8', ('stage1', None) for 'stage1'; ValueError for other names."""
  if network_name in ('stage1', 'baseline'):
    return network_name, None
  match = re.fullmatch(r'stage2_np(\d+)', network_name)
  if match is None:
    raise ValueError(f'{network_name!r} is not a network name (stage1, baseline, stage2_np<N>)')
  return 'stage2', int(match.group(1))


@flax.struct.dataclass
class Networks:
  """The parameters of iterseg's networks, one layout everywhere (init_params, load, evaluate, ...):
  stage1, baseline: U-Net params, or None when not trained; stage2: {Np: U-Net params}."""
  stage1: Any = None
  baseline: Any = None
  stage2: dict = dataclasses.field(default_factory=dict)

  def names(self) -> list:
    """Names of the networks present: 'stage1', 'baseline', 'stage2_np8', ..."""
    present = [n for n in ('stage1', 'baseline') if getattr(self, n) is not None]
    return present + [name('stage2', n) for n in sorted(self.stage2)]

  def get(self, network_name: str):
    """The parameters of network `network_name` ('stage2_np8', ...), or None."""
    network, n = parse(network_name)
    return self.stage2.get(n) if network == 'stage2' else getattr(self, network)

  def at(self, num_patches: int) -> 'Networks':
    """Stage 1 and the stage 2 of `num_patches`: what two-stage inference at that Np needs
    (InputError naming what is missing)."""
    n = int(num_patches)
    if self.stage1 is None or n not in self.stage2:
      missing = 'stage 1' if self.stage1 is None else f'stage 2 for Np={n}'
      raise InputError(f'these networks have no {missing} (they have {self.names() or "none"}): '
                       f'two-stage inference at Np={n} needs stage 1 and stage 2 at that Np.')
    return Networks(stage1=self.stage1, stage2={n: self.stage2[n]})


def random_networks(spec: Spec, rng, num_patches=None) -> Networks:
  """Random Networks for `spec`: baseline, stage 1, and stage 2 at each of `num_patches` (default
  spec.num_patches; stage 2's parameters do not depend on Np)."""
  keys = jax.random.split(rng, 3)
  stage2 = init_unet(keys[2], spec, 'stage2')
  return Networks(baseline=init_unet(keys[0], spec, 'baseline'),
                  stage1=init_unet(keys[1], spec, 'stage1'),
                  stage2={int(n): stage2 for n in (num_patches or [spec.num_patches])})
