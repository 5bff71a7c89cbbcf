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
from etils import epath
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
  """A checkpoint is missing, damaged, or belongs to another config."""


def network_name(network: str, num_patches: Optional[int] = None) -> str:
  return f'stage2_np{num_patches}' if network == 'stage2' else network


def network_dir(workdir: str, name: str) -> str:
  return os.path.join(os.path.abspath(os.path.expanduser(workdir)), 'checkpoints', name)


def manager(workdir: str, name: str, config) -> ocp.CheckpointManager:
  """The network's manager; it deletes what a killed run left half-written (`<step>.orbax-*-tmp`)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=config.train.keep_checkpoints, create=True,
                                         cleanup_tmp_directories=True)
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

  `state` is the template. A checkpoint whose arrays differ from it in name or shape (another config)
  is a CheckpointError found from the checkpoint's metadata, before any array is read; so is one that
  cannot be read (damaged, e.g. truncated by a copy).
  """
  step = mngr.latest_step()
  if step is None:
    return state
  path = os.path.join(str(mngr.directory), str(step))
  label = f'{name or "the"} checkpoint {path}'
  abstract = jax.tree.map(_on_this_host, state)
  try:
    stored = _stored_shapes(path)
  except Exception as e:  # Orbax raises many types; all mean the same to a user.
    raise CheckpointError(_damaged(label, e)) from e
  wanted = {_leaf_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(abstract)}
  if stored != wanted:
    differ = sorted((k for k in stored.keys() | wanted.keys() if stored.get(k) != wanted.get(k)),
                    key=lambda k: (not k.startswith('params.'), k))
    raise CheckpointError(
        f'{label} was written with another config: {len(differ)} arrays differ, e.g. {differ[0]} '
        f'is {stored.get(differ[0], "absent")} there but {wanted.get(differ[0], "absent")} with '
        f'this config. Use the config it was trained with, or another --workdir.')
  try:
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(_damaged(label, e)) from e


def _stored_shapes(path: str) -> dict:
  """{array name: shape} from a checkpoint's metadata, e.g. {'params.down0.kernel': (3, 3, 3, 4)}."""
  metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(path) / 'default')
  return {leaf.name: tuple(leaf.shape) for leaf in jax.tree.leaves(metadata)}


def _leaf_name(path) -> str:
  """A key path as orbax names the array: 'params.down0.kernel', 'opt_state.0.count'."""
  return '.'.join(str(getattr(k, 'name', getattr(k, 'key', getattr(k, 'idx', k)))) for k in path)


def _damaged(label: str, error: Exception) -> str:
  return (f'{label} is damaged or incomplete ({type(error).__name__}: '
          f'{" ".join(str(error).split())[:200]}). Delete that folder to resume from the checkpoint '
          f'before it, or use another --workdir.')


def _on_this_host(x) -> jax.ShapeDtypeStruct:
  """The restore target of one leaf: its own sharding, else this process's first device.

  Never the sharding stored in the checkpoint, which names the devices of the run that wrote it
  (another host count or device count could not restore it).
  """
  sharding = getattr(x, 'sharding', None)
  if not isinstance(sharding, jax.sharding.Sharding):
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(os.path.expanduser(workdir), 'config.json')
  if not os.path.exists(path):
    raise CheckpointError(f'{path} not found: {workdir} is not a trained workdir '
                          f'(run `python launch.py --mode=train --workdir={workdir}` first).')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def trained_num_patches(workdir: str) -> list:
  """The Np values for which the workdir holds a stage-2 checkpoint."""
  return sorted(int(m.group(1)) for n in trained_networks(workdir)
                if (m := re.fullmatch(r'stage2_np(\d+)', n)))


def trained_networks(workdir: str) -> list:
  """The names of the networks with at least one checkpoint in `workdir`."""
  root = network_dir(workdir, '')
  if not os.path.isdir(root):
    return []
  return sorted(n for n in os.listdir(root) if _has_step(os.path.join(root, n)))


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
