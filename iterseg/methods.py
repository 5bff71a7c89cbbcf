"""The methods that evaluation and benchmarking compare, written once.

  baseline            the U-Net on the full-resolution image;
  stage1              stage 1 alone, its output upsampled to hi_size (`Prediction.coarse`);
  two_stage (Np)      the two-stage method (`Prediction.probs`), for each Np with a stage 2;
  sliding_window (Np) the reference that refines every patch (refine_count = Np * Np, no threshold),
                      i.e. what patch selection saves (benchmark only).

Each is a jitted fn(params, images, spec=...) -> (probs [B, H, W, C], refined fraction [B] or None).
"""

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from iterseg import inference
from iterseg.inference import Networks
from iterseg.settings import Settings, Spec


@dataclasses.dataclass(frozen=True)
class Method:
  """One row of a comparison: `fn(params, images, spec=spec)` -> (probs, refined fraction or None)."""
  name: str
  num_patches: Optional[int]
  fn: Callable
  params: Any
  spec: Spec

  @property
  def key(self) -> str:
    """'baseline', 'stage1', 'two_stage_np8', ...: the method's name in files."""
    return self.name if self.num_patches is None else f'{self.name}_np{self.num_patches}'

  def __call__(self, images):
    return self.fn(self.params, images, spec=self.spec)

  def lower(self, images):
    return self.fn.lower(self.params, images, spec=self.spec)


@functools.partial(jax.jit, static_argnames='spec')
def baseline_probs(params, images, spec):
  return inference.baseline(params, images, spec), None


@functools.partial(jax.jit, static_argnames='spec')
def stage1_probs(params, images, spec):
  return inference.stage1_only(params, images, spec), None


@functools.partial(jax.jit, static_argnames='spec')
def two_stage_probs(params, images, spec):
  pred = inference.two_stage(params, images, spec)
  return pred.probs, jnp.mean(pred.refined, axis=1, dtype=jnp.float32)


def methods(nets: Networks, s: Settings, *, sliding_window: bool = False) -> list:
  """[Method] for every network in `nets` (two-stage needs stage 1 and a stage 2 at that Np)."""
  out = []
  if nets.baseline is not None:
    out.append(Method('baseline', None, baseline_probs, nets.baseline, s.spec))
  if nets.stage1 is None:
    return out
  out.append(Method('stage1', None, stage1_probs, nets.stage1, s.spec))
  pairs = {n: Networks(stage1=nets.stage1, stage2={n: p}) for n, p in sorted(nets.stage2.items())}
  for n, params in pairs.items():
    out.append(Method('two_stage', n, two_stage_probs, params, s.spec_for(n)))
  for n, params in pairs.items() if sliding_window else ():
    every = dataclasses.replace(s.spec_for(n), refine_count=n * n, threshold=None,
                                refine_budget='image')
    out.append(Method('sliding_window', n, two_stage_probs, params, every))
  return out
