"""launch.py with one more training hook, which acts right after a given step:

  python tests/kill_during_training.py <network>:<step>[:<action>] <launch.py flags>

action SIGKILL (the default), SIGINT or SIGTERM: the process signals itself. The hook runs after the
built-in ones, so at a checkpoint step orbax is still writing that step (asynchronously) when a
SIGKILL lands, a preemption at the worst moment; SIGINT and SIGTERM go through the training loop's
own handling (save, then one line).
action 'wait': the hook prints 'waiting at <network>:<step>' and waits (at most 120 s) until a
signal arrives from outside, so that a test can signal the run at a known step without a race.
"""

import functools
import os
import signal
import sys
import time

from absl import app

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import launch  # noqa: E402  pylint: disable=g-import-not-at-top
from iterseg import cli  # noqa: E402  pylint: disable=g-import-not-at-top


def act_after(name: str, step: int, action: str):
  def hook(s):
    if s.name != name or s.step != step:
      return
    if action != 'wait':
      os.kill(os.getpid(), getattr(signal, action))
      return
    arrived = []
    for sig in (signal.SIGINT, signal.SIGTERM):  # Chained to the loop's own handlers.
      previous = signal.getsignal(sig)
      signal.signal(sig, lambda n, f, p=previous: (arrived.append(n), p(n, f)))
    print(f'waiting at {name}:{step}', flush=True)
    deadline = time.monotonic() + 120
    while not arrived and time.monotonic() < deadline:
      time.sleep(0.01)
  return hook


if __name__ == '__main__':
  network, at, *rest = sys.argv.pop(1).split(':')
  cli.run = functools.partial(cli.run, hooks=(act_after(network, int(at), rest[0] if rest else
                                                        'SIGKILL'),))
  app.run(launch.main, flags_parser=launch.parse_flags)
