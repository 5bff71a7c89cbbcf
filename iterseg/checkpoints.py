"""A workdir's checkpoints: one orbax CheckpointManager per network, and loading trained networks.

Layout of a workdir:
  config.json                      the resolved config of the run
  checkpoints/stage1/<step>/       TrainState of stage 1
  checkpoints/stage2_np<N>/<step>/ TrainState of stage 2 for Np = N
  checkpoints/baseline/<step>/     TrainState of the baseline
  checkpoints/<network>/plan.json  {"total_steps": n}: how far its training was planned to go
Orbax writes each step into a temporary folder and renames it when complete, so a run killed
mid-write leaves no step that looks complete; `restore_latest` takes the newest complete one.
"""

import json
import logging as std_logging
import math
import os
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from iterseg import files, models, settings, state
from iterseg.errors import CheckpointError
from iterseg.models import Networks
from iterseg.settings import Settings
from iterseg.spec import GEOMETRY


class _QuietFailedReads(std_logging.Filter):
  """Drops the log records that orbax's worker threads and asyncio write when a read or write of a
  checkpoint fails, tracebacks included: the same error reaches the caller, who turns it into one
  CheckpointError or TrainingError line. Only at the default verbosity (--verbosity=1 shows all)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if logging.get_verbosity() >= logging.INFO:
      return True
    message = str(record.msg)
    orbax_thread = (record.pathname.endswith(os.path.join('futures', 'future.py')) and
                    'raised an exception' in message)
    unretrieved = record.name == 'asyncio' and 'exception was never retrieved' in message
    return not (orbax_thread or unretrieved)


for _name in ('absl', 'asyncio'):
  std_logging.getLogger(_name).addFilter(_QuietFailedReads())


def network_dir(workdir: str, name: str) -> str:
  return os.path.join(os.path.abspath(os.path.expanduser(workdir)), 'checkpoints', name)


def manager(workdir: str, name: str, keep: int) -> ocp.CheckpointManager:
  """The network's manager; it deletes what a killed run left half-written (`<step>.orbax-*-tmp`)."""
  options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.LatestN(keep), create=True,
      cleanup_tmp_directories=True)
  return ocp.CheckpointManager(network_dir(workdir, name), options=options)


def save_args(train_state):
  """Orbax's arguments to save `train_state`, whose arrays are replicated on the local devices.

  With several processes, orbax saves global arrays only: each process's replicated copy is then
  wrapped (not copied) as one array over all devices, which orbax writes once.
  """
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
  path = network_dir(workdir, name)
  steps = [int(d) for d in os.listdir(path) if d.isdigit()] if os.path.isdir(path) else []
  if steps:
    _check_shapes(os.path.join(path, str(max(steps))), template, name)


def _check_shapes(path: str, template, name: str):
  label = f'{name or "the"} checkpoint {path}'
  abstract = jax.tree.map(_on_this_host, template)
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
  return label, abstract


def restore_latest(mngr: ocp.CheckpointManager, template, name: str = ''):
  """`template` restored from the latest complete checkpoint of `mngr`, or `template` if none.

  A checkpoint whose arrays differ from the template in name or shape (another config) is a
  CheckpointError found from the checkpoint's metadata, before any array is read; so is one that
  cannot be read (damaged, e.g. truncated by a copy).
  """
  step = mngr.latest_step()
  if step is None:
    return template
  label, abstract = _check_shapes(os.path.join(str(mngr.directory), str(step)), template, name)
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


# --- What a workdir holds -----------------------------------------------------------------------------


def read_settings(workdir: str) -> Settings:
  """The Settings of the workdir's config.json, completed with today's defaults for fields it
  predates; CheckpointError naming the file if it is missing or cannot be read."""
  path = os.path.join(os.path.expanduser(workdir), 'config.json')
  if not os.path.exists(path):
    raise CheckpointError(f'{path} not found: {workdir} is not a trained workdir '
                          f'(run `python launch.py --mode=train --workdir={workdir}` first).')
  try:
    with open(path) as f:
      saved = json.load(f)
    if not isinstance(saved, dict):
      raise ValueError('not a JSON object')
  except (OSError, ValueError) as e:
    raise CheckpointError(f'{path} cannot be read ({" ".join(str(e).split())[:120]}): restore it '
                          f'from a backup, or delete the workdir and train again.') from e
  return settings.from_json(saved)


def save_config(s: Settings, workdir: str):
  """The resolved config beside the metrics: <workdir>/config.json (process 0 only)."""
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    files.atomic_write_json(os.path.join(workdir, 'config.json'), settings.to_dict(s), indent=2)


def with_run_statistics(s: Settings, workdir: str) -> Settings:
  """`s` with the input statistics (model.input_mean, input_std) of the run in `workdir` when `s`
  standardises without statistics of its own: the networks' inputs are the run's. CheckpointError
  for a run whose networks learnt per-image standardisation (before the statistics were fixed):
  no statistics reproduce its inputs at native size, so it must be trained again."""
  if not os.path.exists(os.path.join(os.path.expanduser(workdir), 'config.json')):
    return s
  saved = read_settings(workdir).spec
  if saved.input_norm == 'standardize' and saved.input_mean is None and trained_networks(workdir):
    raise CheckpointError(
        f"{workdir} was trained with model.input_norm='standardize' per image, which iterseg no "
        f'longer does (each image\'s own statistics differ between a crop and the whole image): '
        f'train it again in a new workdir (the training images\' statistics are then measured '
        f'and saved with it).')
  if s.spec.input_norm == 'standardize' and s.spec.input_mean is None and (
      saved.input_norm == 'standardize'):
    return s.vary('spec', input_mean=saved.input_mean, input_std=saved.input_std)
  return s


def check_same_geometry(current: Settings, saved: Settings, workdir: str = ''):
  """CheckpointError unless both agree on what the weights depend on (GEOMETRY)."""
  ours, theirs = current.spec.geometry(), saved.spec.geometry()
  for field in GEOMETRY:
    if ours[field] != theirs[field]:
      raise CheckpointError(
          f'config.{field}={ours[field]!r} but the networks in {workdir or "the workdir"} were '
          f'trained with {theirs[field]!r}: use the training config (or '
          f'--config.{field}={theirs[field]!r}).')


def trained_networks(workdir: str) -> list:
  """The names of the networks with at least one complete checkpoint in `workdir`."""
  root = network_dir(workdir, '')
  if not os.path.isdir(root):
    return []
  return sorted(n for n in os.listdir(root) if _has_step(os.path.join(root, n)))


def _has_step(path: str) -> bool:
  return os.path.isdir(path) and any(d.isdigit() for d in os.listdir(path))


def write_plan(workdir: str, name: str, total_steps: int):
  """Records how many steps network `name` is to train (process 0 only)."""
  if jax.process_index() == 0:
    os.makedirs(network_dir(workdir, name), exist_ok=True)
    files.atomic_write_json(os.path.join(network_dir(workdir, name), 'plan.json'),
                            {'total_steps': int(total_steps)})


def progress(workdir: str, name: str) -> tuple:
  """(latest complete step, planned total steps or None) of network `name`."""
  path = network_dir(workdir, name)
  steps = [int(d) for d in os.listdir(path) if d.isdigit()] if os.path.isdir(path) else []
  try:
    with open(os.path.join(path, 'plan.json')) as f:
      total = int(json.load(f)['total_steps'])
  except (OSError, ValueError, KeyError, TypeError):
    total = None
  return max(steps, default=0), total


def check_finished(workdir: str, names, *, strict: bool) -> list:
  """The networks among `names` whose training stopped before its planned step (or never made a
  checkpoint); each named in one warning, or a CheckpointError when `strict`."""
  unfinished = []
  for name in names:
    step, total = progress(workdir, name)
    if not step:
      unfinished.append(f'{name} (no checkpoint in {network_dir(workdir, name)})')
    elif total is not None and step < total:
      unfinished.append(f'{name} (step {step} of {total})')
  if unfinished:
    message = (f'training of {", ".join(unfinished)} in {workdir} did not finish: rerun '
               f'`--mode=train` with the same config to complete it')
    if strict:
      raise CheckpointError(message + ', or pass partial=True to use them as they are.')
    logging.warning('%s; using the networks as they are.', message)
    print(f'iterseg: warning: {message}; using the networks as they are.')
  return unfinished


def load_network(workdir: str, name: str, s: Settings):
  """The parameters of network `name` ('stage1', 'stage2_np8', 'baseline') at its latest step."""
  path = network_dir(workdir, name)
  if not _has_step(path):
    raise CheckpointError(f'no checkpoint of {name} in {path}; train it first.')
  network, n = models.parse(name)
  spec = s.spec_for(n) if n else s.spec
  template = jax.eval_shape(lambda: state.create_train_state(s.train, spec, network))
  mngr = ocp.CheckpointManager(path)
  try:
    return restore_latest(mngr, template, name).params
  finally:
    mngr.close()


def trained_num_patches(workdir: str) -> list:
  """The Np of every stage 2 trained in `workdir`, sorted."""
  return sorted(n for network, n in map(models.parse, trained_networks(workdir))
                if network == 'stage2')


def load_networks(workdir: str, current: Optional[Settings] = None, *,
                  num_patches=None, strict: bool = False) -> Networks:
  """Every network trained in `workdir` (or stage 2 only at `num_patches`), as Networks.

  `current` (the settings of the command) must agree with the saved config on the geometry.
  A network whose training did not finish is a warning, or a CheckpointError when `strict`.
  """
  saved = read_settings(workdir)
  if current is not None:
    check_same_geometry(current, saved, workdir)
  names = trained_networks(workdir)
  nps = trained_num_patches(workdir)
  if num_patches is not None:
    nps = [n for n in nps if n in set(num_patches)]
  stage2 = [models.name('stage2', n) for n in nps]
  if stage2 and 'stage1' not in names:
    raise CheckpointError(
        f'{network_dir(workdir, "stage1")} is missing, but {", ".join(stage2)} refine(s) its map '
        f'and cannot be used without it: delete {", ".join(network_dir(workdir, n) for n in stage2)} '
        f'too and rerun `--mode=train` to train stage 1 and stage 2 again (the baseline is kept).')
  if not {'stage1', 'baseline'} & set(names):
    raise CheckpointError(f'no trained network in {network_dir(workdir, "")}: run '
                          f'`python launch.py --mode=train --workdir={workdir}` first.')
  chosen = [n for n in ('stage1', 'baseline') if n in names] + stage2
  planned = [models.name(network, n) for network, n in saved.jobs()
             if num_patches is None or n in (None, *num_patches)]
  check_finished(workdir, chosen if strict else list(dict.fromkeys(chosen + planned)),
                 strict=strict)
  return Networks(**{network: (load_network(workdir, network, saved) if network in names else None)
                     for network in ('stage1', 'baseline')},
                  stage2={n: load_network(workdir, models.name('stage2', n), saved) for n in nps})


POINT_FIELDS = ('num_patches', 'refine_count', 'refine_fraction', 'threshold')


def operating_point(workdir: str) -> Optional[dict]:
  """The point --mode=calibrate chose (calibration.json), one schema for both protocols:
  {'num_patches', 'refine_count' (square; else None), 'refine_fraction' (native; else None),
  'threshold' (or None)}. None if never calibrated or no point met its target. A file that cannot
  be read, or a field of the wrong type or out of range, is a CheckpointError naming it."""
  path = os.path.join(os.path.expanduser(workdir), 'calibration.json')
  if not os.path.exists(path):
    return None
  redo = (f'run --mode=calibrate again, or delete {path} to use the config\'s Np, refine_count and '
          f'threshold')
  try:
    with open(path) as f:
      saved = json.load(f)
    point = saved['operating_point']
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f'{path} cannot be read ({" ".join(str(e).split())[:100]}): '
                          f'{redo}.') from e
  if point is None:
    return None
  if not isinstance(point, dict):
    raise CheckpointError(f'{path}: operating_point is {point!r}, not an object: {redo}.')
  checks = {'num_patches': (int, 1, None), 'refine_count': (int, 1, None),
            'refine_fraction': (float, 0.0, 1.0), 'threshold': (float, 0.0, None)}
  out = {}
  for field, (kind, low, high) in checks.items():
    value = point.get(field)
    if value is None and field != 'num_patches':
      out[field] = None
      continue
    good = (not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int)
            and math.isfinite(value) and value >= low and (kind is int or value > low)
            and (high is None or value <= high)) if value is not None else False
    if not good:
      valid = f'a whole number >= {low}' if kind is int else (
          f'a number in ({low}, {high}]' if high else f'a number >= {low}')
      raise CheckpointError(f'{path}: operating_point.{field}={value!r} is not valid ({valid}): '
                            f'{redo}.')
    out[field] = kind(value)
  return out


def inference_settings(workdir: str, s: Optional[Settings] = None,
                       num_patches: Optional[int] = None, *, fallback: bool = True) -> Settings:
  """The settings two-stage inference with `workdir`'s networks runs at.

  `s` (default: the workdir's config.json) at the operating point of --mode=calibrate when the
  workdir has one and `num_patches` is None or its Np; else at Np = `num_patches`, or s's Np if a
  stage 2 is trained there, else (with `fallback`) the largest trained Np. CheckpointError if that
  stage 2 is missing.
  """
  saved = read_settings(workdir)  # CheckpointError first if workdir was never trained.
  s = saved if s is None else s
  trained = trained_num_patches(workdir)
  if not trained:
    raise CheckpointError(f'{workdir} has no trained stage 2 (networks: '
                          f'{trained_networks(workdir) or "none"}): train it with --mode=train '
                          f'(config.train.networks includes "stage2").')
  point = operating_point(workdir)
  if point is not None and num_patches in (None, point['num_patches']):
    s = s.at_operating_point(point)  # What --mode=calibrate chose.
  elif num_patches is not None or (fallback and s.spec.num_patches not in trained):
    s = s.vary('spec', num_patches=max(trained) if num_patches is None else int(num_patches))
  if s.spec.num_patches not in trained:
    raise CheckpointError(f'no stage 2 trained for Np={s.spec.num_patches} in {workdir} (trained: '
                          f'{trained}); set --config.num_patches (or num_patches=) to one of them.')
  return s


def load(workdir: str, num_patches: Optional[int] = None, *, partial: bool = False):
  """(Networks, config) of a trained workdir, for `iterseg.infer`.

  Stage 2 at `num_patches` (default: the calibrated operating point of --mode=calibrate when the
  workdir has one, which also sets refine_count and threshold; else config.num_patches if trained,
  else the largest trained Np); config.num_patches is set to it. A workdir without stage 2 is an
  error (it cannot run the two-stage method), and so is a network whose training did not finish
  unless partial=True.
  """
  s = with_run_statistics(inference_settings(workdir, num_patches=num_patches), workdir)
  nets = load_networks(workdir, num_patches=[s.spec.num_patches], strict=not partial)
  return nets, settings.to_config(s)
