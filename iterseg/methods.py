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
from iterseg.models import Networks
from iterseg.settings import Settings
from iterseg.spec import Spec


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
    return method_key(self.name, self.num_patches)

  def __call__(self, images):
    return self.fn(self.params, images, spec=self.spec)

  def lower(self, images):
    return self.fn.lower(self.params, images, spec=self.spec)


def method_key(name: str, num_patches: Optional[int] = None) -> str:
  """'baseline', 'stage1', 'two_stage_np8', 'sliding_window_np4': a method's name in files."""
  return name if num_patches is None else f'{name}_np{num_patches}'


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
  for n in sorted(nets.stage2):
    out.append(two_stage(nets, s.spec_for(n)))
  for n in sorted(nets.stage2) if sliding_window else ():
    every = dataclasses.replace(s.spec_for(n), refine_count=n * n, threshold=None,
                                refine_budget='image')
    out.append(Method('sliding_window', n, two_stage_probs, nets.at(n), every))
  return out


def two_stage(nets: Networks, spec: Spec) -> Method:
  """The two-stage method at spec.num_patches (and spec's k and threshold)."""
  return Method('two_stage', spec.num_patches, two_stage_probs, nets.at(spec.num_patches), spec)
