"""iterseg's command line: `python launch.py --config=configs/ph2.py --mode=train`.

With no flags it runs the embedded demo (configs/demo.py): synthetic data, the three networks
trained on CPU in minutes, then their Dice and FLOPs. Everything else is a library function.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
MODES = ('train', 'evaluate', 'benchmark', 'prepare', 'predict')

config_flags.DEFINE_config_file(
    'config', os.path.join(_HERE, 'configs', 'demo.py'), 'A configs/*.py file; fields can be '
    'overridden as --config.train.batch_size=8.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and results (default runs/<config>).')
flags.DEFINE_enum('mode', 'train', MODES, 'train (then evaluate), evaluate, benchmark, prepare '
                  '(the dataset), or predict (config.predict.input).')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize(): it reads the cluster '
                  'from SLURM, TPU pod or Open MPI environment variables, or the flags below.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-host).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-host).')
flags.DEFINE_integer('process_id', None, 'This process (multi-host).')
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:  # Orbax and TFDS log every file at INFO.
    logging.set_verbosity(logging.WARNING)
  import jax  # After absl parsed the flags, so that --help is quick.

  if FLAGS.distributed or FLAGS.coordinator_address:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  logging.info('JAX process %d / %d, local devices %s', jax.process_index(), jax.process_count(),
               jax.local_devices())
  config = FLAGS.config
  name = os.path.splitext(os.path.basename(config_flags.get_config_filename(FLAGS['config'])))[0]
  workdir = FLAGS.workdir or os.path.join('runs', name)

  from iterseg import cli  # noqa: E402  (the modes, as library functions)
  try:
    cli.run(FLAGS.mode, config, workdir)
  except cli.USER_ERRORS as e:  # One clear line instead of a traceback; --verbosity=1 shows it.
    logging.debug('Traceback:', exc_info=True)
    sys.exit(f'iterseg: error: {e}')


if __name__ == '__main__':
  app.run(main)
