"""FLOPs from XLA's cost analysis, and the paper's FLOP accounting (Figure 4).

The authors count FLOPs = stage1(hi/8) + k * stage2(hi/Np) against baseline(hi), per image, with
k = Np refined patches. `report` gives those figures measured by XLA on the compiled networks, plus the
compiled two-stage function as a whole (which also pays for resizing, scoring and patch copies).
"""

from typing import Optional

import jax
import jax.numpy as jnp

from iterseg import inference, methods
from iterseg.settings import Settings, Spec


def compiled_flops(compiled) -> Optional[float]:
  """FLOPs of one call of a compiled executable (`jit(f).lower(...).compile()`), as XLA's cost
  analysis counts them; None where the backend gives none."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # Unsupported on some backends.
    return None
  if not isinstance(analysis, dict) or 'flops' not in analysis:
    return None
  return float(analysis['flops'])


def xla_flops(fn, *args) -> float:
  """FLOPs of `jax.jit(fn)(*args)` on this backend; RuntimeError where XLA gives none."""
  flops = compiled_flops(jax.jit(fn).lower(*args).compile())
  if flops is None:
    raise RuntimeError(f'XLA gave no FLOP count on backend {jax.default_backend()!r}.')
  return flops


def analytic_unet_flops(size: int, in_channels: int, width: int, depth: int,
                        num_classes: int = 1) -> float:
  """2 x the multiply-adds of the U-Net's convolutions on one size x size input.

  The input is padded to a multiple of 2**depth first, as the model does. A 3x3 stride-2 transposed
  convolution costs 9 * C_in * C_out multiply-adds per *input* pixel.
  """
  p = -(-size // 2 ** depth) * 2 ** depth
  macs = 0
  c_in = in_channels
  for i in range(depth):  # Encoder: output side p / 2**(i+1).
    c_out = width * 2 ** i
    macs += (p // 2 ** (i + 1)) ** 2 * 9 * c_in * c_out
    c_in = c_out
  for i in reversed(range(depth)):  # Decoder: input side p / 2**(i+1).
    c_out = max(width * 2 ** i // 2, 1)
    macs += (p // 2 ** (i + 1)) ** 2 * 9 * c_in * c_out
    c_in = c_out + (width * 2 ** (i - 1) if i else in_channels)  # Concatenated skip.
  macs += p * p * c_in * num_classes  # 1x1 head.
  return 2.0 * macs


def unet_flops(spec: Spec, size: int, in_channels: int) -> float:
  """XLA's FLOPs of the U-Net on one size x size input with `in_channels` channels."""
  params = jax.eval_shape(inference.init_unet, jax.random.key(0), spec, in_channels)
  x = jax.ShapeDtypeStruct((1, size, size, in_channels), jnp.float32)
  return xla_flops(inference.unet(spec).apply, {'params': params}, x)


def report(s: Settings, num_patches_list) -> dict:
  """FLOPs per image (batch 1), measured by XLA, for each method (they do not depend on weights).

  Returns {'baseline': f, 'stage1': f, 'stage2': {Np: f per patch}, 'two_stage': {Np: stage1 + k *
  stage2 (the authors' accounting)}, 'two_stage_compiled': {Np: the whole compiled function}}.
  """
  spec = s.spec
  out = {'baseline': unet_flops(spec, spec.hi_size, 3),
         'stage1': unet_flops(spec, spec.stage1_size, 3),
         'stage2': {}, 'two_stage': {}, 'two_stage_compiled': {}}
  images = jax.ShapeDtypeStruct((1, spec.hi_size, spec.hi_size, 3), jnp.float32)
  for n in num_patches_list:
    sn = s.spec_for(n)
    out['stage2'][n] = unet_flops(sn, sn.patch_size + 2 * sn.halo, sn.stage2_in_channels)
    out['two_stage'][n] = out['stage1'] + sn.refine_count * out['stage2'][n]
    nets = jax.eval_shape(lambda: inference.Networks(
        stage1=inference.init_unet(jax.random.key(0), sn, 3),
        stage2={n: inference.init_unet(jax.random.key(0), sn, sn.stage2_in_channels)}))
    out['two_stage_compiled'][n] = compiled_flops(
        methods.Method('two_stage', n, methods.two_stage_probs, nets, sn).lower(images).compile())
  return out
