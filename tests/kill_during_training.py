"""launch.py with one more training hook, which signals the process right after a given step:

  python tests/kill_during_training.py <network>:<step>[:<SIGNAL>] <launch.py flags>

SIGKILL by default: the hook runs after the built-in ones, so at a checkpoint step orbax is still
writing that step (asynchronously) when the process dies, a preemption at the worst moment.
SIGINT or SIGTERM go through the training loop's own handling (save, then one line).
"""

import functools
import os
import signal
import sys

from absl import app

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import launch  # noqa: E402  pylint: disable=g-import-not-at-top
from iterseg import cli  # noqa: E402  pylint: disable=g-import-not-at-top


def signal_after(name: str, step: int, signum: int):
  def hook(s):
    if s.name == name and s.step == step:
      os.kill(os.getpid(), signum)
  return hook


if __name__ == '__main__':
  network, at, *name = sys.argv.pop(1).split(':')
  signum = getattr(signal, name[0] if name else 'SIGKILL')
  cli.run = functools.partial(cli.run, hooks=(signal_after(network, int(at), signum),))
  app.run(launch.main, flags_parser=launch.parse_flags)
