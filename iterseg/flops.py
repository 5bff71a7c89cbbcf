"""FLOPs from XLA's cost analysis, and the paper's FLOP accounting (Figure 4): the authors count
stage1(hi/8) + k * stage2(hi/Np) against baseline(hi) per image, k = Np refined patches (written
once, in `NetworkFlops.two_stage`). `report` gives these figures as XLA counts the compiled
networks, and the whole compiled two-stage function (which also pays for resizing, scoring and
patch copies).
"""

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from iterseg import methods, models
from iterseg.settings import Settings
from iterseg.spec import Spec


def compiled_flops(compiled) -> Optional[float]:
  """FLOPs of one call of a compiled executable (`jit(f).lower(...).compile()`), as XLA's cost
  analysis counts them; None where the backend gives none."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # Unsupported on some backends.
    return None
  flops = analysis.get('flops') if isinstance(analysis, dict) else None
  return None if flops is None else float(flops)


def xla_flops(fn, *args) -> float:
  """FLOPs of `jax.jit(fn)(*args)` on this backend; RuntimeError where XLA gives none."""
  flops = compiled_flops(jax.jit(fn).lower(*args).compile())
  if flops is None:
    raise RuntimeError(f'XLA gave no FLOP count on backend {jax.default_backend()!r}.')
  return flops


def analytic_unet_flops(size: int, in_channels: int, width: int, depth: int,
                        num_classes: int = 1) -> float:
  """2 x the multiply-adds of the U-Net's convolutions on one size x size input: each level halves
  the side, rounding up (odd sides are padded, as the model does); a 3x3 stride-2 transposed
  convolution costs 9 * C_in * C_out multiply-adds per *input* pixel."""
  sides = [-(-size // 2 ** i) for i in range(depth + 1)]
  macs, c_in = 0, in_channels
  for i in range(depth):  # Encoder: output side sides[i + 1].
    c_out = width * 2 ** i
    macs += sides[i + 1] ** 2 * 9 * c_in * c_out
    c_in = c_out
  for i in reversed(range(depth)):  # Decoder: input side sides[i + 1].
    c_out = max(width * 2 ** i // 2, 1)
    macs += sides[i + 1] ** 2 * 9 * c_in * c_out
    c_in = c_out + (width * 2 ** (i - 1) if i else in_channels)  # Concatenated skip.
  macs += size * size * c_in * num_classes  # 1x1 head.
  return 2.0 * macs


@functools.lru_cache(maxsize=256)
def unet_flops(spec: Spec, size: int, network: str) -> float:
  """XLA's FLOPs of the U-Net `network` on one size x size input, stage 2's decoder computing only
  the centre inside spec.halo (compiled once per process: they depend on the geometry only)."""
  params = jax.eval_shape(models.init_unet, jax.random.key(0), spec, network)
  x = jax.ShapeDtypeStruct((1, size, size, spec.in_channels(network)), jnp.float32)
  crop = spec.halo if network == 'stage2' else 0
  return xla_flops(models.unet(spec, network, crop).apply, {'params': params}, x)


@dataclasses.dataclass(frozen=True)
class NetworkFlops:
  """XLA's FLOPs per image (batch 1) of each network, and the authors' accounting of two-stage."""
  baseline: float  # The U-Net on hi_size x hi_size.
  stage1: float  # The U-Net on stage1_size x stage1_size.
  stage2: dict  # {Np: the U-Net on one patch and its halo, (hi/Np + 2 halo)^2 in, (hi/Np)^2 out}.

  def two_stage(self, spec: Spec) -> float:
    """stage1(hi/8) + k * stage2(hi/Np + 2 halo), k = spec.refine_count: the paper's Figure 4."""
    return self.stage1 + spec.refine_count * self.stage2[spec.num_patches]


def network_flops(s: Settings, num_patches_list) -> NetworkFlops:
  """NetworkFlops for the geometry of `s`, stage 2 at each Np of `num_patches_list`."""
  return NetworkFlops(
      baseline=unet_flops(s.spec, s.spec.hi_size, 'baseline'),
      stage1=unet_flops(s.spec, s.spec.stage1_size, 'stage1'),
      stage2={n: unet_flops(s.spec_for(n), s.spec_for(n).stage2_side, 'stage2')
              for n in num_patches_list})


def report(s: Settings, num_patches_list) -> dict:
  """FLOPs per image (batch 1), measured by XLA, for each method (they do not depend on weights):
  {'baseline': f, 'stage1': f, 'stage2': {Np: f per patch}, 'two_stage': {Np: stage1 + k * stage2
  (the authors' accounting)}, 'two_stage_compiled': {Np: the whole compiled function}}."""
  counts = network_flops(s, num_patches_list)
  return {'baseline': counts.baseline, 'stage1': counts.stage1, 'stage2': dict(counts.stage2),
          'two_stage': {n: counts.two_stage(s.spec_for(n)) for n in num_patches_list},
          'two_stage_compiled': {n: two_stage_compiled_flops(s.spec_for(n))
                                 for n in num_patches_list}}


@functools.lru_cache(maxsize=64)
def two_stage_compiled_flops(spec: Spec) -> Optional[float]:
  """XLA's FLOPs of the whole compiled two-stage function on one image (resizes, scores and patch
  copies included); compiled once per process and Spec."""
  images = jax.ShapeDtypeStruct((1, spec.hi_size, spec.hi_size, 3), jnp.float32)
  nets = jax.eval_shape(lambda: models.random_networks(spec, jax.random.key(0)))
  return compiled_flops(methods.two_stage(nets, spec).lower(images).compile())
