"""What the training loop does around each step, and the signals that stop it cleanly.

A hook (as flax's examples' periodic actions) is a callable of `Step`, run after each step in the
order given: `train.train_network` installs FiniteCheck, Validator (train.select_checkpoint='best'),
Checkpointer, MetricsWriter and, when asked, Profiler; a caller may add its own
(tests/kill_during_training.py does).
"""

import contextlib
import dataclasses
import json
import os
import signal
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from iterseg import checkpoints, files
from iterseg.errors import CheckpointError, TrainingError
from iterseg.run import Run


@dataclasses.dataclass
class Step:
  """What a hook sees after each step. `metrics` are device arrays: fetching them waits."""
  name: str
  step: int
  total: int
  state: Any
  metrics: dict
  last: bool  # The final step of this network (or the step at which it was interrupted).
  scores: Optional[dict] = None  # Validator's, for the checkpoint of this step.

  def due(self, every: int) -> bool:
    """Whether a hook acting every `every` steps and at the last one acts now."""
    return self.step % every == 0 or self.last


Hook = Callable[[Step], None]


class Checkpointer:
  """Saves every `every` steps and at the last step; stops training at the first failed save.
  (FiniteCheck, run before it, has checked the loss of every step it saves.)"""

  def __init__(self, manager, every: int):
    self.manager, self.every = manager, every

  def __call__(self, s: Step):
    if not s.due(self.every):
      return
    try:
      self.manager.save(s.step, args=checkpoints.save_args(s.state), metrics=s.scores, force=True)
      self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except  # Orbax wraps the OSError differently.
      cause = e
      while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
      reason = files.describe_os_error(cause) if cause else ' '.join(str(e).split())[:160]
      raise TrainingError(
          f'cannot write the checkpoint of step {s.step} to {self.manager.directory} ({reason}); '
          'stopped. The last complete checkpoint there is kept: free space or fix the permissions, '
          'then rerun the same command to resume.') from e


class Validator:
  """At the checkpoints every `every` steps and the last (not one made because training was
  interrupted, so that a resumed run scores the steps an uninterrupted one does): `score(params)`,
  the network's validation score (`evaluate.validation_score`), kept on the step for the
  Checkpointer as checkpoints.METRIC and logged to metrics.jsonl."""

  def __init__(self, workdir: str, every: int, score: Callable[[Any], float]):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.every, self.score = every, score

  def __call__(self, s: Step):
    if s.step % self.every and s.step < s.total:
      return
    s.scores = {checkpoints.METRIC: float(self.score(jax.device_get(s.state.params)))}
    if jax.process_index() == 0:
      with open(self.path, 'a') as f:
        f.write(json.dumps({'network': s.name, 'step': s.step, **s.scores}) + '\n')


class MetricsWriter:
  """Every `every` steps and at the last: one JSON line in <workdir>/metrics.jsonl (process 0), and
  the loss, Dice and throughput on the progress bar."""

  def __init__(self, workdir: str, every: int, per_epoch: int, unit: str, per_step: int, bar):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.every, self.per_epoch, self.unit, self.per_step, self.bar = (every, per_epoch, unit,
                                                                     per_step, bar)
    self.start, self.first = time.perf_counter(), None

  def __call__(self, s: Step):
    self.first = s.step - 1 if self.first is None else self.first
    if not s.due(self.every):
      return
    m = {k: float(v) for k, v in jax.device_get(s.metrics).items()}
    rate = (s.step - self.first) * self.per_step / (time.perf_counter() - self.start)
    self.bar.set_postfix(loss=f'{m["loss"]:.4f}', dice=f'{m["dice"]:.3f}',
                         **{f'{self.unit}/s': f'{rate:.1f}'})
    if jax.process_index() == 0:
      with open(self.path, 'a') as f:
        f.write(json.dumps({'network': s.name, 'step': s.step, 'epoch': s.step / self.per_epoch,
                            f'{self.unit}_per_s': rate, **m}) + '\n')


class FiniteCheck:
  """Stops training at the first non-finite loss, the one place that checks it. Each step's loss is
  fetched while the next step runs (one step behind: no extra wait), except at the steps that are
  saved (every `save_every` and the last), checked at once: no checkpoint holds a NaN's state."""

  def __init__(self, workdir: str, save_every: int):
    self.workdir, self.save_every, self.pending = workdir, save_every, None

  def __call__(self, s: Step):
    if self.pending is not None:
      self._check(s.name, *self.pending)
    self.pending = None if s.due(self.save_every) else (s.step, s.metrics)
    if self.pending is None:
      self._check(s.name, s.step, s.metrics)

  def _check(self, name: str, step: int, metrics: dict):
    loss = float(jax.device_get(metrics['loss']))
    if not np.isfinite(loss):
      raise TrainingError(
          f'{name}: the loss became {loss} at step {step}; stopped. The last good checkpoint is '
          f'kept in {Run(self.workdir).network_dir(name)}. Lower '
          f'config.train.learning_rate or check the data for NaN/inf.')


class Profiler:
  """A jax.profiler trace of steps [first, last] into <workdir>/profile (TensorBoard/Perfetto)."""

  def __init__(self, workdir: str, first: int, last: int):
    self.dir, self.first, self.last = os.path.join(workdir, 'profile'), first, last
    self.active = False

  def __call__(self, s: Step):
    if s.step == self.first and not self.active:
      jax.profiler.start_trace(self.dir)
      self.active = True
    if self.active and (s.step >= self.last or s.last):
      jax.block_until_ready(s.state)
      jax.profiler.stop_trace()
      self.active = False


def trim_metrics(workdir: str, name: str, step: int):
  """Drops the metric lines of `name` after `step` (process 0 only), and a last line cut short: a
  run killed after its last checkpoint logged steps that the resumed run logs again. Any other
  line that is not a record {'network': str, 'step': count, ...} is a CheckpointError naming it."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if jax.process_index() != 0 or not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  keep = []
  for number, line in enumerate(lines, 1):
    try:
      record = json.loads(line)
      problem = (files.invalid(record, {'network': str, 'step': files.COUNT})
                 if isinstance(record, dict) else 'not a JSON object')
    except ValueError as e:
      if number == len(lines) and not line.endswith('\n'):  # A killed run's last line, cut short.
        continue
      problem = ' '.join(str(e).split())[:160]
    if problem:
      raise CheckpointError(f'{path} line {number} cannot be read ({problem}): delete that line '
                            f'(the log is not needed to resume) and rerun the same command.')
    if not (record['network'] == name and record['step'] > step):
      keep.append(line if line.endswith('\n') else line + '\n')
  if keep != lines:
    files.atomic_write(path, lambda f: f.writelines(keep))


# --- Interruptions ---------------------------------------------------------------------------


class StopSignals:
  """While active, SIGINT and SIGTERM set `received` (the loop saves, then stops), not killing; a
  second Ctrl-C while saving is ignored until the save is done. With `coordinated` (training) under
  several processes, SIGTERM is left to JAX's preemption notifier (from jax.distributed.initialize;
  a Python handler would replace it and lose the signal) and Ctrl-C is passed on to it as SIGTERM:
  every process then reaches orbax's preemption sync point at the same step and saves it."""

  def __init__(self, coordinated: bool = False):
    self.received, self.previous = None, {}
    self.coordinated = coordinated and jax.process_count() > 1

  def __enter__(self):
    signals = (signal.SIGINT,) if self.coordinated else (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
      with contextlib.suppress(ValueError):  # Not the main thread: leave signals alone.
        self.previous[sig] = signal.signal(sig, self._handle)
    return self

  def requested(self, manager, step: int) -> bool:
    """Whether to stop after `step`: a signal came (several processes: orbax's preemption sync)."""
    if jax.process_count() > 1:
      return bool(manager.reached_preemption(step))
    return self.received is not None

  def _handle(self, signum, _):
    self.received = signal.Signals(signum).name
    if self.coordinated:  # Ctrl-C: a preemption notice, so that all processes stop together.
      os.kill(os.getpid(), signal.SIGTERM)

  def __exit__(self, *exc):
    for sig, handler in self.previous.items():
      signal.signal(sig, handler)
