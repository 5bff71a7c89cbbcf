"""The modes of launch.py, each a library function of (Settings, workdir). The config is checked
here, once (`settings.from_config`), before anything is written; the modes that write into the
workdir hold its lock, and preparing a dataset (--mode=prepare, or its first use) the dataset's
(data.prepare). Imports nothing heavy at import time, so that launch.py's --help stays quick.
"""

import importlib

from iterseg import errors, files, lock, settings
from iterseg.settings import MODES

# What launch.py shows as one `iterseg: error:` line: errors a user can act on, and the file
# system's (each names its file). Anything else is a bug and keeps its traceback.
USER_ERRORS = (errors.Error, OSError)


def run(mode: str, config, workdir: str, *, hooks=()):
  """Runs `mode` ('train' then evaluates; see settings.MODES). `hooks` are extra training hooks."""
  if mode not in MODES:
    raise settings.SettingsError(f'unknown mode {mode!r}; choose one of {MODES}')
  s = settings.from_config(config)
  import jax  # pylint: disable=g-import-not-at-top
  if mode == 'prepare':
    from iterseg import data  # pylint: disable=g-import-not-at-top
    stats = data.prepare(s.data)
    print(', '.join(f'{k}: {v:.1f}' if isinstance(v, float) else f'{k}: {v}'
                    for k, v in stats.items()))
    return stats
  from iterseg.run import Run  # pylint: disable=g-import-not-at-top
  s = Run(workdir).with_statistics(s)  # The inputs the run's networks learnt from.
  if mode == 'predict':
    from iterseg import predict  # pylint: disable=g-import-not-at-top
    return predict.run(s, workdir)
  main = jax.process_index() == 0
  created = files.Undo([], folders=[workdir])  # A refused command leaves no new, empty workdir.
  try:
    if main:
      files.check_writable(workdir)
    with lock.WorkdirLock(workdir, enabled=main):
      return _locked(mode, s, workdir, hooks)
  except errors.Error:
    if main:
      created.restore()
    raise


def _locked(mode: str, s, workdir: str, hooks):
  """The modes that write into the workdir, run while holding its lock."""
  if mode == 'train':
    from iterseg import evaluate, train  # pylint: disable=g-import-not-at-top
    return evaluate.run(train.train(s, workdir, extra_hooks=hooks), workdir)
  if mode == 'benchmark':
    import jax  # pylint: disable=g-import-not-at-top
    from iterseg import benchmark, predict  # pylint: disable=g-import-not-at-top
    images = 16 if jax.default_backend() == 'cpu' else 64
    return benchmark.run(s, workdir,
                         predict_throughput=lambda: predict.throughput(s, num_images=images))
  module = 'ablation' if mode == 'ablate' else mode  # evaluate, export, calibrate: just their run.
  return importlib.import_module(f'iterseg.{module}').run(s, workdir)
