"""The modes of launch.py, each a library function of (config, workdir)."""

from iterseg import checkpoints, train
from iterseg.data import common

# Errors that mean "the user asked for something that cannot work": shown as one line.
USER_ERRORS = (common.DataError, checkpoints.CheckpointError, train.TrainingError, ValueError,
               FileNotFoundError)


def run(mode: str, config, workdir: str):
  if mode == 'prepare':
    from iterseg import data
    stats = data.prepare(config)
    print(', '.join(f'{k}: {v:.1f}' if isinstance(v, float) else f'{k}: {v}'
                    for k, v in stats.items()))
    return stats
  if mode == 'train':
    return train.train_and_evaluate(config, workdir)
  if mode == 'evaluate':
    from iterseg import evaluate
    return evaluate.run(config, workdir)
  if mode == 'benchmark':
    from iterseg import benchmark
    return benchmark.run(config, workdir)
  if mode == 'predict':
    from iterseg import predict
    return predict.run(config, workdir)
  raise ValueError(f'unknown mode {mode!r}')
