"""Training of the three networks (baseline, stage 1, stage 2 per Np) with one pmapped optax step.

`train` trains the plan's networks in order (stage 1, whose probabilities stage 2 learns from,
stage 2 per Np, the baseline), each resuming from its latest checkpoint; hooks (`hooks.py`) run
after every step. A run killed at any point (even while writing a checkpoint) and started again
ends with the bits of an uninterrupted run on the same devices: a step's randomness is the state's
key folded with the step, the data order is a function of (seed, epoch) entered at the step's
batch, a checkpoint counts only once orbax has finished writing it, and the metric lines logged
after it are dropped. SIGINT and SIGTERM save the current step first, then stop with `Interrupted`.
"""

import contextlib
import functools
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from tqdm import tqdm

from iterseg import augment, checkpoints, evaluate, files, hooks, inference, losses, models, state
from iterseg.data import pipeline
from iterseg.errors import Interrupted
from iterseg.plans import TrainPlan
from iterseg.run import Run
from iterseg.settings import Settings
from iterseg.spec import Spec


def sample_patches(key, scores, k: int, how: str):
  """Grid indices [B, k] (distinct per image) of the stage-2 training patches; scores [B, Np^2].
  'random': uniform (the authors); 'entropy_weighted': in proportion to the patch score, without
  replacement (Gumbel top-k); 'top': the k patches inference would refine."""
  if how == 'top':
    return lax.top_k(scores, k)[1]
  gumbel = jax.random.gumbel(key, scores.shape)
  if how == 'entropy_weighted':
    gumbel = gumbel + jnp.log(jnp.maximum(scores, 1e-12))
  return lax.top_k(gumbel, k)[1]


def network_inputs(network: str, key, images, masks, frozen, *, spec: Spec, sampling: str):
  """(inputs [N, h, w, C_in], labels [N, h', w']) each network learns from full-resolution images
  [B, H, W, 3] and masks [B, H, W]. baseline: the batch itself. stage1: images resized to
  stage1_size, binary masks area-averaged to soft labels (the foreground share of each pixel, so
  that stage 1 learns to be unsure where detail is), class ids resized nearest. stage2: k patches
  per image chosen by `sample_patches` from the frozen stage 1's scores, cut as inference cuts them,
  labelled by their centres."""
  b = images.shape[0]
  if network == 'baseline':
    return images, masks
  if network == 'stage1':
    small = inference.downscale(images, spec)
    if spec.num_classes == 1:
      return small, inference.downscale(masks.astype(jnp.float32), spec)
    return small, jax.image.resize(masks, (b, spec.stage1_size, spec.stage1_size), 'nearest')
  low, coarse = lax.stop_gradient(inference.stage1_maps(frozen, images, spec))
  scores = inference.scores_of(low, coarse, spec)
  flat = (sample_patches(key, scores, spec.refine_count, sampling)
          + spec.num_patches ** 2 * jnp.arange(b)[:, None]).reshape(-1)  # Indices in the batch.
  labels = inference.cut(masks[..., None], flat, spec)[..., 0]
  return inference.stage2_inputs(images, coarse, flat, spec), labels


def train_step(train_state: state.TrainState, batch, frozen, *, network: str, spec: Spec,
               plan: TrainPlan, tx: optax.GradientTransformation):
  """One Adam step on a per-device batch {'image': [b, H, W, 3], 'mask': [b, H, W]}; returns (the
  new state, metrics). Under pmap(axis_name='batch') each device augments its own examples with its
  own key; gradients and metrics are averaged over all devices, so the new state is the same
  everywhere. `frozen` is stage 1's parameters when training stage 2 (else None)."""
  key = jax.random.fold_in(jax.random.wrap_key_data(train_state.rng), train_state.step)
  aug_key, sample_key = jax.random.split(jax.random.fold_in(key, lax.axis_index('batch')))
  images, masks = augment.augment(
      aug_key, inference.as_float(batch['image']), batch['mask'], flip=plan.flip,
      brightness_contrast=plan.brightness_contrast, rotate=plan.rotate, gamma=plan.gamma)
  inputs, labels = network_inputs(network, sample_key, inference.normalize(images, spec), masks,
                                  frozen, spec=spec, sampling=plan.patch_sampling)

  def loss_fn(params):
    logits = (inference.stage2_logits(params, inputs, spec) if network == 'stage2' else
              models.unet(spec, network).apply({'params': params}, inputs))
    c = spec.num_classes
    loss, aux = losses.segmentation_loss(logits[..., :c], labels, num_classes=c,
                                         alpha=plan.focal_alpha, gamma=plan.focal_gamma)
    if network == 'stage1' and spec.error_head:  # Stage 1 also learns where it is wrong.
      probs = lax.stop_gradient(models.probabilities(logits[..., :c]))
      target = inference.error_share(probs, masks, spec)
      aux['error'] = optax.losses.sigmoid_binary_cross_entropy(logits[..., c], target).mean()
      loss = loss + plan.error_weight * aux['error']
    return loss, aux

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(train_state.params)
  grads = lax.pmean(grads, 'batch')
  updates, opt_state = tx.update(grads, train_state.opt_state, train_state.params)
  params = optax.apply_updates(train_state.params, updates)
  metrics = {**lax.pmean({'loss': loss, **aux}, 'batch'), 'grad_norm': optax.tree.norm(grads),
             'param_norm': optax.tree.norm(params)}
  return train_state.replace(step=train_state.step + 1, params=params, opt_state=opt_state), metrics


def make_train_step(network: str, spec: Spec, plan: TrainPlan, total_steps: int):
  """train_step pmapped over the local devices: state and frozen replicated, batch split, state
  donated."""
  step = functools.partial(train_step, network=network, spec=spec, plan=plan,
                           tx=state.create_optimizer(plan, total_steps))
  return jax.pmap(step, axis_name='batch', in_axes=(None, 0, None), out_axes=(None, None),
                  donate_argnums=0)


def replicate(tree):
  """`tree` copied to every local device, laid out as the pmapped step returns its state: one
  compilation (not a second one for a fresh or restored state), and no resharding of the donated
  state, which multi-host pmap cannot do in place."""
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ('batch',))
  return jax.device_put(tree, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


# --- The loop ----------------------------------------------------------------------------------


def train_network(s: Settings, workdir: str, network: str, *, num_patches: Optional[int] = None,
                  frozen=None, source=None, validation=None, extra_hooks: Sequence[hooks.Hook] = (),
                  stop: Optional[hooks.StopSignals] = None) -> Any:
  """Trains one network to its planned number of epochs, resuming from its latest checkpoint;
  returns its parameters (with train.select_checkpoint='best', those of its checkpoint scoring best
  on the `validation` examples). `source` and `validation` default to what `train` gives them,
  `training_data(s)` (the holdout left out with train.exclude_holdout); `extra_hooks` run after the
  built-in ones."""
  spec = s.spec_for(num_patches) if network == 'stage2' else s.spec
  name = models.name(network, spec.num_patches)
  plan = s.train
  if source is None:
    source, validation = training_data(s)
  per_epoch = pipeline.steps_per_epoch(len(source), plan.batch_size)
  total = per_epoch * plan.epochs[network]
  Run(workdir).write_plan(name, total)

  copied = network == 'stage2' and plan.stage2_init == 'stage1'
  fresh = state.create_train_state(
      plan, spec, network, total,
      params=state.from_stage1(jax.device_get(frozen), spec) if copied else None)
  best = plan.select_checkpoint == 'best'
  manager = checkpoints.manager(workdir, name, plan.keep_checkpoints, best=best)
  chosen = lambda: (checkpoints.restore_latest(manager, fresh, name, best=True).params if best
                    else train_state.params)
  with contextlib.ExitStack() as closing:
    closing.callback(manager.close)  # Waits for the checkpoint being written, also after an error.
    train_state = replicate(checkpoints.restore_latest(manager, fresh, name))
    step = int(train_state.step)
    if step >= total:
      return chosen()
    hooks.trim_metrics(workdir, name, step)

    frozen = None if frozen is None else replicate(frozen)
    p_step = make_train_step(network, spec, plan, total)
    unit, per_step = ('patches', plan.batch_size * spec.refine_count) if network == 'stage2' else (
        'images', plan.batch_size)
    bar = closing.enter_context(tqdm(total=total, initial=step, desc=f'train {name}', unit='step',
                                     disable=jax.process_index() != 0, dynamic_ncols=True))
    every = [hooks.FiniteCheck(workdir, plan.checkpoint_every)]
    if best:
      every.append(hooks.Validator(workdir, plan.checkpoint_every, functools.partial(
          evaluate.validation_score, s, network, examples=validation, num_patches=spec.num_patches,
          stage1=None if frozen is None else jax.device_get(frozen))))
    every += [hooks.Checkpointer(manager, plan.checkpoint_every),
             hooks.MetricsWriter(workdir, plan.log_every, per_epoch, unit, per_step, bar)]
    if plan.profile_steps and network == 'stage1':
      every.append(hooks.Profiler(workdir, *plan.profile_steps))
    while step < total:
      epoch, start = divmod(step, per_epoch)
      for batch in pipeline.prefetch_to_device(pipeline.batches(
          source, batch_size=plan.batch_size, seed=plan.seed, epoch=epoch, start_batch=start,
          crop=spec.crop)):
        train_state, metrics = p_step(train_state, batch, frozen)
        step += 1
        bar.update(1)
        interrupted = stop is not None and stop.requested(manager, step)
        info = hooks.Step(name, step, total, train_state, metrics,
                          last=step >= total or interrupted)
        for hook in (*every, *extra_hooks):
          hook(info)
        if interrupted:
          manager.wait_until_finished()
          raise Interrupted(f'interrupted ({stop.received or "preempted"}) at step {step} of '
                            f'{name}; its checkpoint is saved: rerun the same command to resume.')
        if step >= total:
          break
    manager.wait_until_finished()
    return chosen()


def training_data(s: Settings) -> tuple:
  """(the train split, less the calibration holdout with train.exclude_holdout, checked to split
  into s.train.batch_size batches over this run's devices, decompressed once (not every epoch:
  native steps crop a few whole images); the validation examples: that holdout, or None when it is
  trained on)."""
  from iterseg import data  # pylint: disable=g-import-not-at-top  # (TFDS is slow to import)
  source, validation = data.load_split(s.data, 'train'), None
  if s.train.exclude_holdout:
    held = data.holdout_indices(len(source), s.calibrate.holdout, s.seed)
    validation = data.Subset(source, held)
    source = data.Subset(source, sorted(set(range(len(source))) - set(held.tolist())))
  pipeline.check_batch_size(s.train.batch_size, len(source))
  return pipeline.Decoded(source), validation


def preflight(s: Settings, workdir: str):
  """Checks all that can refuse --mode=train before it writes anything: the geometry of the
  workdir's networks, the training data, the batch over this run's processes and devices, the stage
  1 that stage 2 learns from, the metadata of each checkpoint it resumes. Returns (the train split,
  the validation examples or None (`training_data`), stage 1's parameters when stage 2 learns from
  a stage 1 trained before, else None)."""
  run = Run(workdir)
  if run.trained_networks() and os.path.exists(run.file('config.json')):
    run.check_geometry(s)
  source, validation = training_data(s)
  stage1 = None
  if 'stage2' in s.train.networks and 'stage1' not in s.train.networks:
    stage1 = checkpoints.load_network(workdir, 'stage1', s)
  for network, n in s.jobs():
    spec = s.spec_for(n) if n else s.spec
    template = jax.eval_shape(lambda: state.create_train_state(s.train, spec, network))
    checkpoints.check_latest(workdir, models.name(network, n), template)
  return source, validation, stage1


def train(s: Settings, workdir: str, *, extra_hooks: Sequence[hooks.Hook] = ()) -> Settings:
  """Trains stage 1, stage 2 for each Np, then the baseline (as s.train.networks says); returns the
  settings they were trained with (with input_norm='standardize', the training images' statistics
  measured here, or the run's when it resumes; config.json holds them). A refused command leaves
  the workdir as it was: `preflight` checks what it can before the first write, and what is written
  before the first step (config.json, plan.json, metrics.jsonl trimmed on resume) is put back if the
  command fails before that step (e.g. unreadable checkpoint arrays)."""
  run = Run(workdir)
  s = run.with_statistics(s)
  source, validation, stage1 = preflight(s, workdir)
  if s.spec.input_norm == 'standardize' and s.spec.input_mean is None:
    mean, std = inference.input_statistics([source[i]['image'] for i in range(len(source))],
                                           progress=jax.process_index() == 0)
    s = s.vary('spec', input_mean=mean, input_std=std)
  names = [models.name(network, n) for network, n in s.jobs()]
  undo = files.Undo([run.file('config.json'), run.file('metrics.jsonl')] +
                    [os.path.join(run.network_dir(n), 'plan.json') for n in names],
                    folders=[run.network_dir('')] + [run.network_dir(n) for n in names])
  stepped = []
  try:
    run.save_settings(s)
    with hooks.StopSignals(coordinated=True) as stop:
      train_one = functools.partial(train_network, s, workdir, source=source,
                                    validation=validation, stop=stop,
                                    extra_hooks=(lambda _: stepped.append(1), *extra_hooks))
      for network, n in s.jobs():
        params = train_one(network, num_patches=n, frozen=stage1 if network == 'stage2' else None)
        stage1 = params if network == 'stage1' else stage1
    return s
  except BaseException:
    if not stepped and jax.process_index() == 0:
      undo.restore()
    raise
