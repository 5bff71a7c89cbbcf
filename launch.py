"""iterseg's command line: `python launch.py --config=configs/ph2.py --mode=train`.

With no flags it runs the embedded demo (configs/demo.py): synthetic data, the three networks
trained on CPU in minutes, then their Dice and FLOPs. Everything else is a library function.
"""

import os
import re
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from iterseg.settings import MODES

_HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(_HERE, 'configs', 'demo.py')

# No default here: ml_collections would load it (and check the --config.* overrides) at import,
# where a mistake is a traceback. `parse_flags` gives --config=DEFAULT_CONFIG when it is absent.
config_flags.DEFINE_config_file(
    'config', None, 'A configs/*.py file (default: configs/demo.py); fields can be overridden as '
    '--config.train.batch_size=8.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and results (default runs/<config>).')
flags.DEFINE_enum('mode', 'train', MODES, 'train (then evaluate), evaluate, benchmark, prepare '
                  '(the dataset), predict (config.predict.input), calibrate (the operating point), '
                  'ablate (each feature beyond the paper off and on), or export (a jax.export '
                  'artifact of two-stage inference).')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize(): it reads the cluster '
                  'from SLURM, TPU pod or Open MPI environment variables, or the flags below.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-host).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-host).')
flags.DEFINE_integer('process_id', None, 'This process (multi-host).')
FLAGS = flags.FLAGS


def parse_flags(argv):
  """absl's flag parsing, with any mistake in the flags or the config as one line and exit status 1:
  an unknown config key, a value of the wrong type, a config file that is missing or fails."""
  if not any(re.match(r'-{1,2}config(=|$)', arg) for arg in argv[1:]):
    argv = [argv[0], f'--config={DEFAULT_CONFIG}', *argv[1:]]
    sys.argv = argv  # ml_collections reads the --config.* overrides from sys.argv.
  try:
    rest = FLAGS(argv)
    config = FLAGS.config  # A config file that failed to load raises only when first used.
  except Exception as e:  # pylint: disable=broad-except
    sys.exit(f'iterseg: error: {_flag_error(e, argv)}')
  if not isinstance(config, ml_collections.ConfigDict):
    path = config_flags.get_config_filename(FLAGS['config'])
    sys.exit(f'iterseg: error: {path}: get_config() returned {type(config).__name__}, not an '
             f'ml_collections.ConfigDict (start from configs/default.py: c = default.get_config(); '
             f'...; return c).')
  return rest


def _flag_error(error: Exception, argv) -> str:
  """One line for a flag parsing error; an unknown config key names its flag; a config file that
  fails names its line and the error, not the traceback ml_collections flattens into the text."""
  while isinstance(error, AttributeError) and error.args and isinstance(error.args[0], Exception):
    error = error.args[0]  # ml_collections wraps the KeyError of an unknown key.
  if not isinstance(error, KeyError):
    text = ' '.join(str(error).split())
    head, traceback, frames = text.partition(' Traceback (most recent call last): ')
    if not traceback:
      return text
    where = [f'{path}, line {line}: {code.strip()}' for path, line, code in re.findall(
        r'File "([^"]+)", line (\d+), in get_config (.*?)'
        r'(?: \^| File "| [A-Za-z_.]*(?:Error|Exception): |$)', frames)]
    last = re.findall(r'(?:^| )([A-Za-z_.]*(?:Error|Exception)): (.*?)(?= File "|$)', frames)
    cause = ': '.join(last[-1]) if last else frames[-200:]
    return (f'{where[-1] if where else head.rstrip(":")}: {cause} '
            f'(configs/default.py lists every field and its type).')

  message = ' '.join(str(error.args[0] if error.args else error).split())
  key = message.split()[0].strip('\'"') if message else ''
  names = [arg.split('=')[0] for arg in argv if arg.startswith('--config.')]
  named = [n for n in names if key in n[len('--config.'):].split('.')] or ['--config.*']
  return f'{named[-1]}: unknown config key {message} (configs/default.py lists every key).'


def _hide_closed_loop_noise(unraisable, report=sys.unraisablehook):
  """After a failed restore, orbax's reads still in flight report to its closed asyncio loop, each
  with a traceback that would bury the one-line error; nothing else is hidden."""
  error = unraisable.exc_value
  if not (isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'):
    report(unraisable)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  sys.unraisablehook = _hide_closed_loop_noise
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
  except cli.USER_ERRORS as e:  # One clear line instead of a traceback (--verbosity=1 logs it).
    logging.debug('Traceback:', exc_info=True)
    sys.exit(f'iterseg: error: {" ".join(str(e).split())}')
  except KeyboardInterrupt:  # Outside training (which saves first): nothing to save.
    sys.exit(f'iterseg: error: interrupted during --mode={FLAGS.mode}; nothing was lost.')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
