"""What training carries from step to step: `TrainState`, its optimizer and its creation (apart from
the loop, so that checkpoints, which restore into a TrainState template, sit below the loop)."""

import zlib
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from iterseg import models
from iterseg.plans import TrainPlan
from iterseg.spec import Spec


@flax.struct.dataclass
class TrainState:
  """Everything a step changes: the step, the parameters, Adam's state and a raw uint32 [2] key."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def learning_rate(plan: TrainPlan, total_steps: int):
  """The learning rate: constant (the paper), or a linear warm-up then cosine decay to 0."""
  if plan.lr_schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        0.0, plan.learning_rate, plan.warmup_steps, max(total_steps, plan.warmup_steps + 1))
  if plan.warmup_steps:
    return optax.linear_schedule(0.0, plan.learning_rate, plan.warmup_steps)
  return plan.learning_rate


def create_optimizer(plan: TrainPlan, total_steps: int) -> optax.GradientTransformation:
  """Adam at `learning_rate(plan, total_steps)`."""
  return optax.adam(learning_rate(plan, total_steps))


def create_train_state(plan: TrainPlan, spec: Spec, network: str, total_steps: int = 1,
                       params: Optional[Any] = None) -> TrainState:
  """A fresh state; its key (and its random parameters, unless `params` are given, e.g.
  `from_stage1`) depend only on the seed and the network's name."""
  name = models.name(network, spec.num_patches)
  key = jax.random.fold_in(jax.random.key(plan.seed), zlib.crc32(name.encode()))
  init_key, step_key = jax.random.split(key)
  if params is None:
    params = models.init_unet(init_key, spec, network)
    if plan.head_bias_prior is not None and spec.num_classes == 1:
      prior = plan.head_bias_prior  # The focal-loss paper's prior: p = prior everywhere at step 0.
      params['head']['bias'] = params['head']['bias'].at[0].set(jnp.log(prior / (1 - prior)))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=create_optimizer(plan, total_steps).init(params),
                    rng=jax.random.key_data(step_key))


def from_stage1(stage1_params, spec: Spec):
  """Stage 2's initial parameters copied from stage 1's, as the authors' follow-up does. The extra
  coarse-probability input channels (stage2_uses_coarse) get zero weights in the two layers that
  see the input, down0 and the head (the input is the top skip), so stage 2 starts as stage 1
  applied at full resolution."""
  extra = spec.in_channels('stage2') - 3
  params = dict(stage1_params)
  for layer in ('down0', 'head'):  # Kernels [kh, kw, C_in, C_out] get `extra` zero C_in rows.
    kernel = jnp.pad(params[layer]['kernel'], [(0, 0), (0, 0), (0, extra), (0, 0)])
    params[layer] = dict(params[layer], kernel=kernel)
  c = spec.num_classes  # Stage 1's error head (model.error_head) has no place in stage 2.
  params['head'] = {'kernel': params['head']['kernel'][..., :c], 'bias': params['head']['bias'][:c]}
  return params
