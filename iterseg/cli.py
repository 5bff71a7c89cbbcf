"""The modes of launch.py, each a library function of (Settings, workdir).

The config is read and checked here, once (`settings.from_config`), before anything is written;
train, evaluate, benchmark and calibrate hold the workdir's lock while they run.
"""

import jax

from iterseg import files, settings
from iterseg.data.common import DataError

MODES = ('train', 'evaluate', 'benchmark', 'prepare', 'predict', 'calibrate', 'ablate')
LOCKED = ('train', 'evaluate', 'benchmark', 'calibrate', 'ablate')


def user_errors() -> tuple:
  """Errors that mean "the user asked for something that cannot work": shown as one line."""
  from iterseg import checkpoints, predict, train  # pylint: disable=g-import-not-at-top
  return (settings.SettingsError, DataError, checkpoints.CheckpointError, train.TrainingError,
          train.Interrupted, predict.PredictError, files.WriteError, files.LockedError, ValueError,
          FileNotFoundError, PermissionError)


def run(mode: str, config, workdir: str, *, hooks=()):
  """Runs `mode` ('train' then evaluates; see MODES). `hooks` are extra training hooks."""
  if mode not in MODES:
    raise ValueError(f'unknown mode {mode!r}; choose one of {MODES}')
  s = settings.from_config(config)
  if mode == 'prepare':
    from iterseg import data  # pylint: disable=g-import-not-at-top
    stats = data.prepare(s.data)
    print(', '.join(f'{k}: {v:.1f}' if isinstance(v, float) else f'{k}: {v}'
                    for k, v in stats.items()))
    return stats
  if mode == 'predict':
    from iterseg import predict  # pylint: disable=g-import-not-at-top
    return predict.run(s, workdir)
  lock = files.WorkdirLock(workdir, enabled=jax.process_index() == 0)
  if jax.process_index() == 0:
    files.check_writable(workdir)
  with lock:
    if mode == 'train':
      from iterseg import evaluate, train  # pylint: disable=g-import-not-at-top
      train.train(s, workdir, hooks=hooks)
      return evaluate.run(s, workdir)
    if mode == 'evaluate':
      from iterseg import evaluate  # pylint: disable=g-import-not-at-top
      return evaluate.run(s, workdir)
    if mode == 'benchmark':
      from iterseg import benchmark, predict  # pylint: disable=g-import-not-at-top
      images = 16 if jax.default_backend() == 'cpu' else 64
      return benchmark.run(s, workdir,
                           predict_throughput=lambda: predict.throughput(s, num_images=images))
    if mode == 'ablate':
      from iterseg import ablation  # pylint: disable=g-import-not-at-top
      return ablation.run(s, workdir)
    from iterseg import calibrate  # pylint: disable=g-import-not-at-top
    return calibrate.run(s, workdir)
