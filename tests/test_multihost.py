"""Multi-host training: two JAX processes on localhost (CPU, gloo collectives), 2 devices each, train
like one process with 4 devices, through `launch.py --coordinator_address=... --process_id=...`.

Device i of the 2 x 2 run sees the examples and the augmentation key of device i of the 1 x 4 run
(processes hold consecutive devices and consecutive slices of each global batch), so the parameters
agree up to the order in which gloo sums the gradients.
"""

import json
import socket
import subprocess

import jax
import numpy as np

from tests import helpers, launch_runs
from tests.launch_runs import ROOT, STAGE1_STEPS


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_with_two_devices_train_like_one_with_four(reference, subprocess_env,
                                                                tmp_path):
  """`reference` is one process with 4 devices (tests/conftest.py)."""
  workdir = tmp_path / 'run'
  flags = launch_runs.tiny_flags(  # data_dir not prepared yet: process 0 prepares, 1 waits.
      workdir, tmp_path / 'data', f'--coordinator_address=localhost:{free_port()}',
      '--num_processes=2', **{'train.networks': ('stage1',)})
  env = dict(subprocess_env, XLA_FLAGS='--xla_force_host_platform_device_count=2 '
                                          '--xla_backend_optimization_level=0',
             JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo')
  processes = [subprocess.Popen(launch_runs.command(*flags, f'--process_id={i}'), cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
  try:
    outputs = [p.communicate(timeout=300) for p in processes]
  finally:
    for p in processes:
      p.kill()
  for p, (_, stderr) in zip(processes, outputs):
    assert p.returncode == 0, stderr[-3000:]

  ours = helpers.read_checkpoint(workdir, 'stage1', STAGE1_STEPS)
  theirs = helpers.read_checkpoint(reference, 'stage1', STAGE1_STEPS)
  for a, b in zip(jax.tree.leaves(ours['params']), jax.tree.leaves(theirs['params'])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert int(ours['step']) == STAGE1_STEPS

  with open(workdir / 'metrics.jsonl') as f:  # Written by process 0 only: each step once.
    assert [r['step'] for r in map(json.loads, f)] == list(range(1, STAGE1_STEPS + 1))
  assert (workdir / 'config.json').exists() and (workdir / 'results.json').exists()
  assert 'train stage1' in outputs[0][1] and 'train stage1' not in outputs[1][1]  # Progress bar.
