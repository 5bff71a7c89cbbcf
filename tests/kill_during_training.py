"""launch.py with one more training hook, which SIGKILLs the process right after a given step:

  python tests/kill_during_training.py <network>:<step> <launch.py flags>

The hook runs after the built-in ones, so at a checkpoint step orbax is still writing that step
(asynchronously) when the process dies: a preemption at the worst moment.
"""

import functools
import os
import signal
import sys

from absl import app

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import launch  # noqa: E402  pylint: disable=g-import-not-at-top
from iterseg import cli  # noqa: E402  pylint: disable=g-import-not-at-top


def kill_after(name: str, step: int):
  def hook(s):
    if s.name == name and s.step == step:
      os.kill(os.getpid(), signal.SIGKILL)
  return hook


if __name__ == '__main__':
  network, at = sys.argv.pop(1).split(':')
  cli.run = functools.partial(cli.run, hooks=(kill_after(network, int(at)),))
  app.run(launch.main, flags_parser=launch.parse_flags)
