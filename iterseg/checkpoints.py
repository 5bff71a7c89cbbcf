"""A run's checkpoints: one orbax CheckpointManager per network, and loading trained networks.

  checkpoints/stage1/<step>/       TrainState of stage 1 (the run's layout: run.py)
  checkpoints/stage2_np<N>/<step>/ TrainState of stage 2 for Np = N
  checkpoints/baseline/<step>/     TrainState of the baseline
Orbax writes each step into a temporary folder and renames it when complete, so a run killed
mid-write leaves no step that looks complete; `restore_latest` takes the newest complete one.
With train.select_checkpoint='best', each step also holds its validation score (`METRIC`), the best
step is kept beside the latest ones, and `load_network` restores it.
"""

import logging as std_logging
import os
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from iterseg import models, settings, state
from iterseg.errors import CheckpointError
from iterseg.models import Networks
from iterseg.run import Run
from iterseg.settings import Settings


def _quiet_failed_reads(record: std_logging.LogRecord) -> bool:
  """Drops what orbax's worker threads and asyncio log (tracebacks too) when a checkpoint read or
  write fails: the same error reaches the caller, as one CheckpointError or TrainingError line.
  Only at the default verbosity (--verbosity=1 shows all)."""
  if logging.get_verbosity() >= logging.INFO:
    return True
  message = str(record.msg)
  orbax_thread = (record.pathname.endswith(os.path.join('futures', 'future.py')) and
                  'raised an exception' in message)
  unretrieved = record.name == 'asyncio' and 'exception was never retrieved' in message
  return not (orbax_thread or unretrieved)


for _name in ('absl', 'asyncio'):
  std_logging.getLogger(_name).addFilter(_quiet_failed_reads)


METRIC = 'val_hard_dice'  # A step's validation score (train.select_checkpoint='best').


def _score(metrics: dict) -> float:
  return metrics[METRIC]


def manager(workdir: str, name: str, keep: int, *, best: bool = False) -> ocp.CheckpointManager:
  """The network's manager, keeping the `keep` latest steps (and with `best` the step of the highest
  `METRIC` too); it deletes what a killed run left half-written (<step>.orbax-*-tmp)."""
  policies = ocp.checkpoint_managers
  keeping = policies.LatestN(keep)
  if best:
    keeping = policies.AnyPreservationPolicy([keeping, policies.BestN(get_metric_fn=_score, n=1)])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=keeping, create=True, cleanup_tmp_directories=True,
      best_fn=_score if best else None, best_mode='max')
  return ocp.CheckpointManager(Run(workdir).network_dir(name), options=options)


def save_args(train_state):
  """Orbax's arguments to save `train_state`, replicated on the local devices. With several
  processes (orbax saves global arrays only) each process's copy is wrapped, not copied, as one
  array over all devices, which orbax writes once."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    devices = [d for p in range(jax.process_count()) for d in jax.local_devices(process_index=p)]
    mesh = jax.sharding.Mesh(np.array(devices), ('batch',))
    train_state = multihost_utils.host_local_array_to_global_array(
        train_state, mesh, jax.sharding.PartitionSpec())
  return ocp.args.StandardSave(train_state)


def check_latest(workdir: str, name: str, template) -> None:
  """CheckpointError, reading only metadata and writing nothing, if the latest complete checkpoint
  of network `name` cannot be restored into `template` (another config, or unreadable metadata)."""
  run = Run(workdir)
  if run.has_step(name):
    _check_shapes(os.path.join(run.network_dir(name), str(max(run.steps(name)))), template, name)


def _check_shapes(path: str, template, name: str):
  """(label, restore target) for `path`; CheckpointError if unreadable or of another config."""
  label = f'{name or "the"} checkpoint {path}'
  abstract = jax.tree.map(_on_this_host, template)
  try:
    metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(path) / 'default')
  except Exception as e:  # Orbax raises many types; all mean the same to a user.
    raise CheckpointError(_damaged(label, e)) from e
  stored = {leaf.name: tuple(leaf.shape) for leaf in jax.tree.leaves(metadata)}
  wanted = {_leaf_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(abstract)}
  if stored != wanted:
    differ = sorted((k for k in stored.keys() | wanted.keys() if stored.get(k) != wanted.get(k)),
                    key=lambda k: (not k.startswith('params.'), k))
    raise CheckpointError(
        f'{label} was written with another config: {len(differ)} arrays differ, e.g. {differ[0]} '
        f'is {stored.get(differ[0], "absent")} there but {wanted.get(differ[0], "absent")} with '
        f'this config. Use the config it was trained with, or another --workdir.')
  return label, abstract


def restore_latest(mngr: ocp.CheckpointManager, template, name: str = '', *, best: bool = False):
  """`template` restored from the latest complete checkpoint of `mngr` (with `best`, the step of the
  highest validation score where steps have one), or `template` if none. One of another config
  (arrays differ in name or shape) is a CheckpointError found from its metadata before any array is
  read; so is one that cannot be read (damaged, e.g. truncated)."""
  step = (best and mngr.best_step()) or mngr.latest_step()
  if step is None:
    return template
  label, abstract = _check_shapes(os.path.join(str(mngr.directory), str(step)), template, name)
  try:
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(_damaged(label, e)) from e


def _leaf_name(path) -> str:
  """A key path as orbax names the array: 'params.down0.kernel', 'opt_state.0.count'."""
  return '.'.join(str(getattr(k, 'name', getattr(k, 'key', getattr(k, 'idx', k)))) for k in path)


def _damaged(label: str, error: Exception) -> str:
  return (f'{label} is damaged or incomplete ({type(error).__name__}: '
          f'{" ".join(str(error).split())[:200]}). Delete that folder to resume from the '
          f'checkpoint before it, or use another --workdir.')


def _on_this_host(x) -> jax.ShapeDtypeStruct:
  """The restore target of one leaf: its own sharding, else this process's first device; never
  the stored sharding, which names the devices of the run that wrote it."""
  sharding = getattr(x, 'sharding', None)
  if not isinstance(sharding, jax.sharding.Sharding):
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def load_network(workdir: str, name: str, s: Settings):
  """The parameters of network `name` ('stage1', 'stage2_np8', 'baseline') at its latest step, or
  its best with train.select_checkpoint='best'."""
  run = Run(workdir)
  path = run.network_dir(name)
  if not run.has_step(name):
    raise CheckpointError(f'no checkpoint of {name} in {path}; train it first.')
  network, n = models.parse(name)
  spec = s.spec_for(n) if n else s.spec
  template = jax.eval_shape(lambda: state.create_train_state(s.train, spec, network))
  best = s.train.select_checkpoint == 'best'
  options = ocp.CheckpointManagerOptions(best_fn=_score if best else None)
  with ocp.CheckpointManager(path, options=options) as mngr:
    return restore_latest(mngr, template, name, best=best).params


def load_networks(workdir: str, current: Optional[Settings] = None, *,
                  num_patches=None, strict: bool = False) -> Networks:
  """Every network trained in `workdir` (or stage 2 only at `num_patches`), as Networks. `current`
  (the command's settings) must agree with the saved config on the geometry. A network whose
  training did not finish is a warning, or a CheckpointError when `strict`."""
  run = Run(workdir)
  saved = run.settings()
  if current is not None:
    run.check_geometry(current, saved)
  names = run.trained_networks()
  nps = [n for n in run.trained_num_patches() if num_patches is None or n in num_patches]
  stage2 = [models.name('stage2', n) for n in nps]
  if stage2 and 'stage1' not in names:
    raise CheckpointError(
        f'{run.network_dir("stage1")} is missing, but {", ".join(stage2)} refine(s) its map '
        f'and cannot be used without it: delete {", ".join(run.network_dir(n) for n in stage2)} '
        f'too and rerun `--mode=train` to train stage 1 and stage 2 again (the baseline is kept).')
  if not {'stage1', 'baseline'} & set(names):
    raise CheckpointError(f'no trained network in {run.network_dir("")}: run '
                          f'`python launch.py --mode=train --workdir={workdir}` first.')
  chosen = [n for n in ('stage1', 'baseline') if n in names] + stage2
  planned = [models.name(network, n) for network, n in saved.jobs()
             if num_patches is None or n in (None, *num_patches)]
  run.check_finished(chosen if strict else list(dict.fromkeys(chosen + planned)), strict=strict)
  return Networks(**{network: (load_network(workdir, network, saved) if network in names else None)
                     for network in ('stage1', 'baseline')},
                  stage2={n: load_network(workdir, models.name('stage2', n), saved) for n in nps})


def load(workdir: str, num_patches: Optional[int] = None, *, partial: bool = False):
  """(Networks, config) of a trained workdir, for `iterseg.infer`: stage 2 at `num_patches`
  (default: --mode=calibrate's operating point where there is one, which also sets refine_count
  and threshold; else config.num_patches if trained, else the largest trained Np), and
  config.num_patches set to it. A workdir without stage 2 is an error, and so is a network whose
  training did not finish unless partial=True."""
  run = Run(workdir)
  s = run.with_statistics(run.inference_settings(num_patches=num_patches))
  nets = load_networks(workdir, num_patches=[s.spec.num_patches], strict=not partial)
  return nets, settings.to_config(s)
