"""Training of the three networks (baseline, stage 1, stage 2 per Np) with one pmapped optax step.

`train_and_evaluate` trains what config.train.networks names, in order: stage 1 first (stage 2
learns from its probabilities), then stage 2 for each Np in config.train.num_patches_list, then the
baseline; each resumes from its latest checkpoint, so rerunning the same command continues.

A run killed at any point (even while writing a checkpoint) and started again ends with the bits of
an uninterrupted run on the same devices: a step's randomness is the state's key folded with the
step, the data order is a function of (seed, epoch) entered at the step's batch, a checkpoint counts
only once orbax has finished writing it, and the metric lines logged after it are dropped.
"""

import functools
import json
import os
import signal
import time
import zlib
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax import lax
from tqdm import tqdm

from iterseg import augment, checkpoints, data, inference, losses
from iterseg.data import pipeline

NETWORKS = ('stage1', 'stage2', 'baseline')
SAMPLING = ('random', 'entropy_weighted', 'top')


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. a non-finite loss)."""


@flax.struct.dataclass
class TrainState:
  """Everything a step changes: the step, the parameters, Adam's state and a raw uint32 [2] key."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def create_optimizer(config) -> optax.GradientTransformation:
  return optax.adam(config.train.learning_rate)


def create_train_state(config, network: str, num_patches: Optional[int] = None) -> TrainState:
  """A fresh state; its parameters and key depend only on config.seed and the network's name."""
  name = checkpoints.network_name(network, num_patches)
  key = jax.random.fold_in(jax.random.key(config.seed), zlib.crc32(name.encode()))
  init_key, step_key = jax.random.split(key)
  spec = inference.spec_from_config(config, num_patches)
  in_channels = spec.stage2_in_channels if network == 'stage2' else 3
  params = inference.init_unet(init_key, spec, in_channels)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=create_optimizer(config).init(params),
                    rng=jax.random.key_data(step_key))


def sample_patches(key, scores, k: int, how: str):
  """Grid indices [B, k] (distinct per image) of the stage-2 training patches.

  'random': uniform (the authors); 'entropy_weighted': in proportion to the patch score, without
  replacement (Gumbel top-k); 'top': the k patches inference would refine.
  """
  if how == 'top':
    return lax.top_k(scores, k)[1]
  gumbel = jax.random.gumbel(key, scores.shape)
  if how == 'entropy_weighted':
    gumbel = gumbel + jnp.log(jnp.maximum(scores, 1e-12))
  elif how != 'random':
    raise ValueError(f'patch_sampling={how!r} is not one of {SAMPLING}.')
  return lax.top_k(gumbel, k)[1]


def network_inputs(network: str, key, images, masks, frozen, *, spec: inference.Spec, sampling: str):
  """What each network learns from a batch of full-resolution images [B, H, W, 3] and masks [B, H, W].

  baseline: the batch itself. stage1: images resized to stage1_size; binary masks area-averaged to
  soft labels (the fraction of foreground under each low-resolution pixel, so that stage 1 learns
  to be unsure where detail is), class ids resized nearest for several classes. stage2: k patches
  per image of side hi/Np, chosen by `sample_patches` from the frozen stage 1's scores, with the
  stage-1 probabilities as an extra channel when spec.stage2_uses_coarse.
  Returns (inputs [N, h, w, C_in], labels [N, h, w]).
  """
  b, h, w, _ = images.shape
  if network == 'baseline':
    return images, masks
  if network == 'stage1':
    s = spec.stage1_size
    small = jax.image.resize(images, (b, s, s, 3), 'linear')
    if spec.num_classes == 1:
      return small, jax.image.resize(masks.astype(jnp.float32), (b, s, s), 'linear')
    return small, jax.image.resize(masks, (b, s, s), 'nearest')
  if network != 'stage2':
    raise ValueError(f'network={network!r} is not one of {NETWORKS}.')
  coarse = lax.stop_gradient(inference.stage1(frozen, images, spec))
  scores = inference.patch_scores(coarse, spec.num_patches, spec.score)
  idx = sample_patches(key, scores, spec.refine_count, sampling)
  rows, cols = (idx // spec.num_patches) * spec.patch_size, (idx % spec.num_patches) * spec.patch_size
  inputs = jnp.concatenate([images, coarse], -1) if spec.stage2_uses_coarse else images
  s = spec.patch_size
  patches = inference.extract_patches(inputs, rows, cols, s).reshape(-1, s, s, inputs.shape[-1])
  labels = inference.extract_patches(masks[..., None], rows, cols, s).reshape(-1, s, s)
  return patches, labels


def train_step(state: TrainState, batch, frozen, *, network: str, spec: inference.Spec, config):
  """One Adam step on a per-device batch {'image': [b, H, W, 3], 'mask': [b, H, W]}.

  Runs under pmap(axis_name='batch'): each device augments its own examples with its own key;
  gradients and metrics are averaged over all devices, so the new state is the same everywhere.
  `frozen` is stage 1's parameters when training stage 2 (else None).
  """
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  aug_key, sample_key = jax.random.split(jax.random.fold_in(key, lax.axis_index('batch')))
  images, masks = augment.augment(
      aug_key, batch['image'], batch['mask'], flip=config.train.flip,
      brightness_contrast=config.train.brightness_contrast, rotate=config.train.rotate)
  inputs, labels = network_inputs(network, sample_key, images, masks, frozen, spec=spec,
                                  sampling=config.train.patch_sampling)

  def loss_fn(params):
    logits = spec.unet().apply({'params': params}, inputs)
    return losses.segmentation_loss(logits, labels, num_classes=spec.num_classes,
                                    alpha=config.train.focal_alpha, gamma=config.train.focal_gamma)

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = lax.pmean(grads, 'batch')
  tx = create_optimizer(config)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = lax.pmean({'loss': loss, 'focal': aux['focal'], 'dice': aux['dice']}, 'batch')
  metrics['grad_norm'] = optax.tree.norm(grads)
  metrics['param_norm'] = optax.tree.norm(params)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def make_train_step(network: str, spec: inference.Spec, config):
  """train_step pmapped over the local devices: state and frozen replicated, batch split."""
  step = functools.partial(train_step, network=network, spec=spec, config=config)
  return jax.pmap(step, axis_name='batch', in_axes=(None, 0, None), out_axes=(None, None),
                  donate_argnums=0)


def replicate(tree):
  """`tree` copied to every local device, laid out as the pmapped step returns its state.

  Giving the step its own output layout from the first call on means one compilation (not one for
  a fresh or restored state and another for the rest), and no resharding of the donated state,
  which multi-host pmap cannot do in place.
  """
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ('batch',))
  return jax.device_put(tree, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


# --- Logging ---------------------------------------------------------------------------------


def write_metrics(workdir: str, record: dict):
  """Appends one JSON line to <workdir>/metrics.jsonl (process 0 only)."""
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
      f.write(json.dumps(record) + '\n')


def save_config(config, workdir: str):
  """The resolved config beside the metrics: <workdir>/config.json (process 0 only)."""
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    tmp = os.path.join(workdir, 'config.json.tmp')
    with open(tmp, 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
    os.replace(tmp, os.path.join(workdir, 'config.json'))


def trim_metrics(workdir: str, name: str, step: int):
  """Drops the metric lines of `name` after `step` (process 0 only), and any line cut short.

  A run killed after its last checkpoint logged steps that the resumed run repeats: without this,
  metrics.jsonl would hold them twice.
  """
  path = os.path.join(workdir, 'metrics.jsonl')
  if jax.process_index() != 0 or not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  keep = []
  for line in lines:
    try:
      record = json.loads(line)
    except ValueError:  # The last line of a killed run may be cut short.
      continue
    if not (record.get('network') == name and record.get('step', 0) > step):
      keep.append(line if line.endswith('\n') else line + '\n')
  if keep != lines:
    with open(path + '.tmp', 'w') as f:
      f.writelines(keep)
    os.replace(path + '.tmp', path)


def _check_finite(metrics: dict, name: str, step: int, workdir: str):
  if not np.isfinite(metrics['loss']):
    raise TrainingError(
        f'{name}: the loss became {metrics["loss"]} at step {step}; stopped. The last good '
        f'checkpoint is kept in {checkpoints.network_dir(workdir, name)}. Lower '
        f'config.train.learning_rate or check the data for NaN/inf.')


# --- Loop --------------------------------------------------------------------------------------


def train_network(config, workdir: str, network: str, *, num_patches: Optional[int] = None,
                  frozen=None, source=None) -> Any:
  """Trains one network to its configured number of epochs, resuming from its latest checkpoint.

  Returns its parameters. `source` (the train split) defaults to data.load_split(config, 'train').
  """
  name = checkpoints.network_name(network, num_patches)
  spec = inference.spec_from_config(config, num_patches)
  source = source if source is not None else data.load_split(config, 'train')
  batch_size = config.train.batch_size
  per_epoch = pipeline.steps_per_epoch(len(source), batch_size)
  total = per_epoch * int(config.train[f'{network}_epochs'])

  state = create_train_state(config, network, num_patches)
  manager = checkpoints.manager(workdir, name, config)
  try:
    state = replicate(checkpoints.restore_latest(manager, state, name))
    step = int(state.step)
    if step >= total:
      logging.info('%s: already trained (%d steps).', name, step)
      return state.params
    trim_metrics(workdir, name, step)

    frozen = None if frozen is None else replicate(frozen)
    p_step = make_train_step(network, spec, config)
    kill_at = os.environ.get('ITERSEG_TEST_KILL_AT')  # '<name>:<step>', for tests/test_resume.py.
    images_per_step = batch_size * (spec.refine_count if network == 'stage2' else 1)
    unit = 'patches' if network == 'stage2' else 'images'
    bar = tqdm(total=total, initial=step, desc=f'train {name}', unit='step',
               disable=jax.process_index() != 0, dynamic_ncols=True)
    pending, t0, seen = None, time.perf_counter(), 0
    while step < total:
      epoch, start = divmod(step, per_epoch)
      for batch in pipeline.batches(source, batch_size=batch_size, seed=config.seed, epoch=epoch,
                                    start_batch=start):
        state, metrics = p_step(state, batch, frozen)
        step += 1
        seen += images_per_step
        if pending is not None:  # Check the previous step while this one runs.
          _check_finite(jax.device_get(pending[1]), name, pending[0], workdir)
        pending = (step, metrics)
        bar.update(1)
        if step % config.train.log_every == 0 or step == total:
          m = {k: float(v) for k, v in jax.device_get(metrics).items()}
          _check_finite(m, name, step, workdir)
          rate = seen / (time.perf_counter() - t0)
          bar.set_postfix(loss=f'{m["loss"]:.4f}', dice=f'{m["dice"]:.3f}',
                          **{f'{unit}/s': f'{rate:.1f}'})
          write_metrics(workdir, {'network': name, 'step': step, 'epoch': step / per_epoch,
                                  f'{unit}_per_s': rate, **m})
        if step % config.train.checkpoint_every == 0 or step == total:
          _check_finite(jax.device_get(metrics), name, step, workdir)
          manager.save(step, args=checkpoints.save_args(state))
        if kill_at == f'{name}:{step}':  # Preemption, mid-step or mid-checkpoint-write (async).
          os.kill(os.getpid(), signal.SIGKILL)
        if step >= total:
          break
    bar.close()
    return state.params
  finally:
    manager.close()  # Waits for the checkpoint being written, also when training stopped on an error.


def check_config(config, workdir: str):
  """ValueError, before anything is written, if `config` cannot train (more) in `workdir`."""
  unknown = set(config.train.networks) - set(NETWORKS)
  if unknown:
    raise ValueError(f'config.train.networks has unknown names {sorted(unknown)}; use {NETWORKS}.')
  for n in (config.num_patches, *config.train.num_patches_list):
    inference.spec_from_config(config, n)
  if checkpoints.trained_networks(workdir) and os.path.exists(os.path.join(workdir, 'config.json')):
    from iterseg import evaluate  # pylint: disable=g-import-not-at-top  # (what weights depend on)
    evaluate.check_same_geometry(config, checkpoints.read_config(workdir), workdir)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains stage 1, stage 2 for each Np, then the baseline (as config.train.networks says), then
  evaluates them on the test split (iterseg.evaluate) and returns its results."""
  check_config(config, workdir)
  save_config(config, workdir)
  source = data.load_split(config, 'train')
  stage1 = None
  if 'stage1' in config.train.networks:
    stage1 = train_network(config, workdir, 'stage1', source=source)
  if 'stage2' in config.train.networks:
    if stage1 is None:
      stage1 = checkpoints.load_params(workdir, 'stage1', config)
    for n in config.train.num_patches_list:
      train_network(config, workdir, 'stage2', num_patches=n, frozen=stage1, source=source)
  if 'baseline' in config.train.networks:
    train_network(config, workdir, 'baseline', source=source)
  from iterseg import evaluate  # Imported here: evaluation pulls in matplotlib.
  return evaluate.run(config, workdir)
