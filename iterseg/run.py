"""A run's directory: the one object that knows its layout and reads back what it holds, checked.

  <workdir>/config.json                      the settings the networks were trained with
  <workdir>/checkpoints/<network>/<step>/    orbax steps (checkpoints.py reads and writes them)
  <workdir>/checkpoints/<network>/plan.json  {"total_steps": n}: how far its training was planned
  <workdir>/calibration.json                 the operating point --mode=calibrate chose
  <workdir>/metrics.jsonl, results.*, benchmark.json, predictions/, export/: what the modes write
"""

import os
from typing import Optional

import jax
from absl import logging

from iterseg import files, models, settings
from iterseg.errors import CheckpointError, SettingsError
from iterseg.settings import Settings
from iterseg.spec import GEOMETRY

# An operating point, as files.read_json checks it; a field null or absent is the config's.
POINT_SCHEMA = {'num_patches': files.number(1, whole=True),
                'refine_count': (files.number(1, whole=True), *files.MAYBE),
                'refine_fraction': (files.number(0, 1, low_open=True), *files.MAYBE),
                'threshold': (files.number(0), *files.MAYBE)}
POINT_FIELDS = tuple(POINT_SCHEMA)


class Run:
  """The directory of one run (see the module docstring). Writes are process 0's."""

  def __init__(self, workdir):
    self.workdir = str(workdir)
    self.path = os.path.abspath(os.path.expanduser(self.workdir))

  def file(self, name: str) -> str:
    return os.path.join(self.path, name)

  def network_dir(self, name: str) -> str:
    """checkpoints/<name> ('' for the folder of every network)."""
    return os.path.join(self.path, 'checkpoints', name)

  def settings(self) -> Settings:
    """The Settings of config.json, completed with today's defaults for fields it predates;
    CheckpointError naming the file if it is missing or cannot be read."""
    path = self.file('config.json')
    if not os.path.exists(path):
      raise CheckpointError(f'{path} not found: {self.workdir} is not a trained workdir (run '
                            f'`python launch.py --mode=train --workdir={self.workdir}` first).')
    fix = 'restore it from a backup, or delete the workdir and train again'
    saved = files.read_json(path, fix, CheckpointError)
    try:
      return settings.from_json(saved)
    except SettingsError as e:  # A field of another type or out of range: the file is named.
      raise CheckpointError(f'{path} cannot be read ({e}): {fix}.') from e

  def save_settings(self, s: Settings) -> None:
    """config.json (process 0 only)."""
    if jax.process_index() == 0:
      os.makedirs(self.path, exist_ok=True)
      files.atomic_write_json(self.file('config.json'), settings.to_dict(s), indent=2)

  def with_statistics(self, s: Settings) -> Settings:
    """`s` with this run's input statistics (model.input_mean, input_std) where `s` standardises
    without its own: the networks' inputs are the run's. CheckpointError for a run whose networks
    learnt per-image standardisation, which no statistics reproduce at native size."""
    if not os.path.exists(self.file('config.json')):
      return s
    saved = self.settings().spec
    if saved.input_norm == 'standardize' and saved.input_mean is None and self.trained_networks():
      raise CheckpointError(
          f"{self.workdir} was trained with model.input_norm='standardize' per image, which "
          f"iterseg no longer does (an image's own statistics differ between a crop and the whole "
          f"image): train it again in a new workdir (the training images' statistics are saved).")
    if s.spec.input_norm == saved.input_norm == 'standardize' and s.spec.input_mean is None:
      return s.vary('spec', input_mean=saved.input_mean, input_std=saved.input_std)
    return s

  def check_geometry(self, current: Settings, saved: Optional[Settings] = None) -> None:
    """CheckpointError unless `current` agrees with the run's settings on what the weights depend
    on (spec.GEOMETRY)."""
    ours, theirs = current.spec.geometry(), (saved or self.settings()).spec.geometry()
    differ = [field for field in GEOMETRY if ours[field] != theirs[field]]
    if differ:
      field, more = differ[0], f' ({len(differ) - 1} more fields differ)' if differ[1:] else ''
      flags = ' '.join(f'--config.{f}={theirs[f]!r}' for f in differ)
      raise CheckpointError(
          f'config.{field}={ours[field]!r} but the networks in {self.workdir} were trained with '
          f'{theirs[field]!r}{more}: use the training config (or {flags}).')

  def steps(self, name: str) -> list:
    """The complete checkpoint steps of network `name`, unsorted."""
    path = self.network_dir(name)
    return [int(d) for d in os.listdir(path) if d.isdigit()] if os.path.isdir(path) else []

  def has_step(self, name: str) -> bool:
    return bool(self.steps(name))

  def trained_networks(self) -> list:
    """The names of the networks with at least one complete checkpoint."""
    root = self.network_dir('')
    return sorted(n for n in os.listdir(root) if self.has_step(n)) if os.path.isdir(root) else []

  def trained_num_patches(self) -> list:
    """The Np of every stage 2 trained here, sorted."""
    return sorted(n for network, n in map(models.parse, self.trained_networks())
                  if network == 'stage2')

  def write_plan(self, name: str, total_steps: int) -> None:
    """Records how many steps network `name` is to train (process 0 only)."""
    if jax.process_index() == 0:
      os.makedirs(self.network_dir(name), exist_ok=True)
      files.atomic_write_json(os.path.join(self.network_dir(name), 'plan.json'),
                              {'total_steps': int(total_steps)})

  def progress(self, name: str) -> tuple:
    """(latest complete step, planned total steps or None when no plan.json) of network `name`;
    CheckpointError naming plan.json if it cannot be read or its total is not a count."""
    step = max(self.steps(name), default=0)
    plan = os.path.join(self.network_dir(name), 'plan.json')
    if not os.path.exists(plan):
      return step, None
    fix = 'rerun --mode=train with the same config (it writes it again and resumes)'
    return step, files.read_json(plan, fix, CheckpointError, {'total_steps': files.COUNT})[
        'total_steps']

  def check_finished(self, names, *, strict: bool) -> list:
    """The networks among `names` whose training stopped before its planned step (or never made a
    checkpoint); each named in one warning, or a CheckpointError when `strict`."""
    unfinished = []
    for name in names:
      step, total = self.progress(name)
      if not step:
        unfinished.append(f'{name} (no checkpoint in {self.network_dir(name)})')
      elif total is not None and step < total:
        unfinished.append(f'{name} (step {step} of {total})')
    if unfinished:
      message = (f'training of {", ".join(unfinished)} in {self.workdir} did not finish: rerun '
                 f'`--mode=train` with the same config to complete it')
      if strict:
        raise CheckpointError(message + ', or pass partial=True to use them as they are.')
      logging.warning('%s; using the networks as they are.', message)
      print(f'iterseg: warning: {message}; using the networks as they are.')
    return unfinished

  def operating_point(self) -> Optional[dict]:
    """The point --mode=calibrate chose (calibration.json): {'num_patches', 'refine_count' (square;
    else None), 'refine_fraction' (native; else None), 'threshold' (or None)}, or None if none was
    (or met its target). An unreadable file or a bad field is a CheckpointError naming it."""
    path = self.file('calibration.json')
    if not os.path.exists(path):
      return None
    redo = (f"run --mode=calibrate again, or delete {path} to use the config's Np, refine_count "
            f'and threshold')
    point = files.read_json(path, redo, CheckpointError,
                            {'operating_point': (None, POINT_SCHEMA)})['operating_point']
    if point is None:
      return None
    out = {k: point.get(k) for k in POINT_FIELDS}
    return dict(out, **{k: float(out[k]) for k in ('refine_fraction', 'threshold')
                        if out[k] is not None})

  def inference_settings(self, s: Optional[Settings] = None, num_patches: Optional[int] = None,
                         *, fallback: bool = True) -> Settings:
    """The settings that two-stage inference with this run's networks runs at: `s` (default:
    config.json's) at --mode=calibrate's operating point where there is one and `num_patches` is
    None or its Np; else at Np = `num_patches`, or s's Np if a stage 2 is trained there, else (with
    `fallback`) the largest trained Np. CheckpointError if that stage 2 is missing."""
    saved = self.settings()  # CheckpointError first if the run was never trained.
    s = saved if s is None else s
    trained = self.trained_num_patches()
    if not trained:
      raise CheckpointError(f'{self.workdir} has no trained stage 2 (networks: '
                            f'{self.trained_networks() or "none"}): train it with --mode=train '
                            f'(config.train.networks includes "stage2").')
    point = self.operating_point()
    if point is not None and num_patches in (None, point['num_patches']):
      s = s.at_operating_point(point)  # What --mode=calibrate chose.
    elif num_patches is not None or (fallback and s.spec.num_patches not in trained):
      s = s.vary('spec', num_patches=max(trained) if num_patches is None else int(num_patches))
    if s.spec.num_patches not in trained:
      raise CheckpointError(f'no stage 2 trained for Np={s.spec.num_patches} in {self.workdir} '
                            f'(trained: {trained}); set --config.num_patches (or num_patches=) to '
                            f'one of them.')
    return s
