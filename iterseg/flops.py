"""FLOPs from XLA's cost analysis, and the paper's FLOP accounting (Figure 4).

The authors count FLOPs = stage1(hi/8) + k * stage2(hi/Np) against baseline(hi), per image, with
k = Np refined patches. `report` gives those figures measured by XLA on the compiled networks, plus the
compiled two-stage function as a whole (which also pays for resizing, scoring and patch copies).
"""

import functools
from typing import Callable, Iterable, Optional

import jax
import jax.numpy as jnp

from iterseg import inference


def xla_flops(fn: Callable, *args) -> float:
  """FLOPs of `jax.jit(fn)(*args)` as XLA's cost analysis counts them on this backend.

  `cost_analysis()` is a dict (a list of dicts before jax 0.4.38, None on some backends).
  """
  analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or 'flops' not in analysis:
    raise RuntimeError(f'XLA gave no FLOP count on backend {jax.default_backend()!r}.')
  return float(analysis['flops'])


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


def _unet_flops(params, size: int, in_channels: int, spec: inference.Spec, batch: int = 1) -> float:
  x = jnp.zeros((batch, size, size, in_channels), jnp.float32)
  return xla_flops(spec.unet().apply, {'params': params}, x) / batch


def report(config, params: Optional[dict] = None,
           num_patches_list: Optional[Iterable[int]] = None) -> dict:
  """FLOPs per image (batch 1), measured by XLA, for each method.

  Returns {'baseline': f, 'stage1': f, 'stage2': {Np: f per patch}, 'two_stage': {Np: stage1 + k *
  stage2 (the authors' accounting)}, 'two_stage_compiled': {Np: the whole compiled function}}.
  params default to random ones (FLOPs do not depend on their values).
  """
  spec = inference.spec_from_config(config)
  params = params or inference.init_params(config, jax.random.key(0))
  nps = tuple(num_patches_list or config.train.num_patches_list)
  out = {
      'baseline': _unet_flops(params['baseline'], spec.hi_size, 3, spec),
      'stage1': _unet_flops(params['stage1'], spec.stage1_size, 3, spec),
      'stage2': {}, 'two_stage': {}, 'two_stage_compiled': {},
  }
  images = jnp.zeros((1, spec.hi_size, spec.hi_size, 3), jnp.float32)
  for n in nps:
    s = inference.spec_from_config(config, n)
    out['stage2'][n] = _unet_flops(params['stage2'], s.patch_size, s.stage2_in_channels, s)
    out['two_stage'][n] = out['stage1'] + s.refine_count * out['stage2'][n]
    fn = functools.partial(inference.two_stage.__wrapped__, spec=s)
    out['two_stage_compiled'][n] = xla_flops(fn, params, images)
  return out


def format_report(rep: dict) -> str:
  """A small text table of `report`'s GFLOPs per image."""
  lines = [f'{"method":<22}{"GFLOPs/image":>14}{"vs baseline":>13}']
  base = rep['baseline']
  rows = [('baseline', base), ('stage 1', rep['stage1'])]
  rows += [(f'two-stage Np={n}', f) for n, f in rep['two_stage'].items()]
  for name, f in rows:
    lines.append(f'{name:<22}{f / 1e9:>14.3f}{base / f:>12.1f}x')
  return '\n'.join(lines)
