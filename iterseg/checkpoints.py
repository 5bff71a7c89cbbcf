"""Orbax checkpoints, one CheckpointManager per network, and `load` for inference.

Layout of a workdir:
  config.json                      the resolved config of the run
  checkpoints/stage1/<step>/       TrainState of stage 1
  checkpoints/stage2_np<N>/<step>/ TrainState of stage 2 for Np = N
  checkpoints/baseline/<step>/     TrainState of the baseline
Orbax writes each step into a temporary folder and renames it when complete, so a run killed
mid-write leaves no step that looks complete; `restore_latest` takes the newest complete one.
"""

import json
import os
import re
from typing import Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
  """A checkpoint is missing, damaged, or belongs to another config."""


def network_name(network: str, num_patches: Optional[int] = None) -> str:
  return f'stage2_np{num_patches}' if network == 'stage2' else network


def network_dir(workdir: str, name: str) -> str:
  return os.path.join(os.path.abspath(os.path.expanduser(workdir)), 'checkpoints', name)


def manager(workdir: str, name: str, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=config.train.keep_checkpoints, create=True)
  return ocp.CheckpointManager(network_dir(workdir, name), options=options)


def save_args(state):
  """Orbax's arguments to save `state`, whose arrays are replicated on the local devices.

  With several processes, orbax saves global arrays only: each process's replicated copy is then
  wrapped (not copied) as one array over all devices, which orbax writes once.
  """
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    devices = [d for p in range(jax.process_count()) for d in jax.local_devices(process_index=p)]
    mesh = jax.sharding.Mesh(np.array(devices), ('batch',))
    state = multihost_utils.host_local_array_to_global_array(state, mesh,
                                                             jax.sharding.PartitionSpec())
  return ocp.args.StandardSave(state)


def restore_latest(mngr: ocp.CheckpointManager, state, name: str = ''):
  """`state` restored from the latest complete checkpoint of `mngr`, or `state` itself if none.

  `state` is the template: a checkpoint whose tree or shapes differ is a CheckpointError.
  """
  step = mngr.latest_step()
  if step is None:
    return state
  abstract = jax.tree.map(_on_this_host, state)
  path = os.path.join(str(mngr.directory), str(step))
  try:
    restored = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as e:  # Orbax raises many types; all mean the same to a user.
    raise CheckpointError(
        f'cannot restore {name or "checkpoint"} from {path}: it is damaged or was written with '
        f'another config (shapes or structure differ): {type(e).__name__}: {str(e)[:300]}. '
        f'Use the config it was trained with, or another --workdir.') from e
  _check_shapes(abstract, restored, path)
  return restored


def _on_this_host(x) -> jax.ShapeDtypeStruct:
  """The restore target of one leaf: its own sharding, else this process's first device.

  Never the sharding stored in the checkpoint, which names the devices of the run that wrote it
  (another host count or device count could not restore it).
  """
  sharding = getattr(x, 'sharding', None)
  if not isinstance(sharding, jax.sharding.Sharding):
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _check_shapes(abstract, restored, path):
  want = [(x.shape, x.dtype) for x in jax.tree.leaves(abstract)]
  got = [(x.shape, x.dtype) for x in jax.tree.leaves(restored)]
  if want != got:
    raise CheckpointError(f'checkpoint {path} holds other shapes than the config gives; '
                          f'use the config it was trained with, or another --workdir.')


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(os.path.expanduser(workdir), 'config.json')
  if not os.path.exists(path):
    raise CheckpointError(f'{path} not found: {workdir} is not a trained workdir '
                          f'(run `python launch.py --mode=train --workdir={workdir}` first).')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def trained_num_patches(workdir: str) -> list:
  """The Np values for which the workdir holds a stage-2 checkpoint."""
  root = os.path.join(os.path.expanduser(workdir), 'checkpoints')
  names = os.listdir(root) if os.path.isdir(root) else []
  found = [int(m.group(1)) for n in names if (m := re.fullmatch(r'stage2_np(\d+)', n))]
  return sorted(n for n in found if _has_step(os.path.join(root, f'stage2_np{n}')))


def _has_step(path: str) -> bool:
  return os.path.isdir(path) and any(d.isdigit() for d in os.listdir(path))


def load_params(workdir: str, name: str, config):
  """The parameters of network `name` ('stage1', 'stage2_np8', 'baseline') at its latest step."""
  from iterseg import train  # train imports this module.
  path = network_dir(workdir, name)
  if not _has_step(path):
    raise CheckpointError(f'no checkpoint of {name} in {path}; train it first.')
  network, _, n = name.partition('_np')
  template = jax.eval_shape(lambda: train.create_train_state(config, network, int(n) if n else None))
  mngr = ocp.CheckpointManager(path)
  try:
    return restore_latest(mngr, template, name).params
  finally:
    mngr.close()


def load(workdir: str, num_patches: Optional[int] = None):
  """(params, config) of a trained workdir for `iterseg.infer`.

  params: {'stage1', 'stage2', 'baseline'}, whichever were trained, with stage 2 for `num_patches`
  (default: config.num_patches if trained, else the largest trained Np); config.num_patches is set
  to that Np.
  """
  config = read_config(workdir)
  trained = trained_num_patches(workdir)
  if num_patches is None and trained:
    num_patches = config.num_patches if config.num_patches in trained else trained[-1]
  if num_patches is not None:
    config.num_patches = int(num_patches)
  params = {}
  for network in ('stage1', 'stage2', 'baseline'):
    name = network_name(network, num_patches)
    if network == 'stage2' and num_patches is not None and num_patches not in trained:
      raise CheckpointError(f'no stage 2 trained for Np={num_patches} in {workdir}; '
                            f'trained: {trained}.')
    if _has_step(network_dir(workdir, name)):
      params[network] = load_params(workdir, name, config)
  if not params:
    raise CheckpointError(f'no checkpoints in {network_dir(workdir, "")}; train first.')
  return params, config
