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


def start_cluster(flags, subprocess_env) -> list:
  """launch.py with `flags` as processes 0 and 1 of a localhost cluster (2 CPU devices each, gloo).

  Without the persistent compilation cache: with jax 0.12.1 (Python 3.13), a cluster that loaded
  its cross-process collectives from the cache an earlier cluster wrote hung in them (evaluate's
  process_allgather, the pmapped step); compiled afresh they pass (jax 0.10.2 passed either way).
  """
  env = dict(subprocess_env, XLA_FLAGS='--xla_force_host_platform_device_count=2 '
                                          + launch_runs.COMPILE_FLAGS,
             JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo', JAX_ENABLE_COMPILATION_CACHE='false')
  return [subprocess.Popen(launch_runs.command(*flags, f'--process_id={i}'), cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for i in range(2)]


def finish(processes, timeout: float, returncode=0) -> list:
  """[(stdout, stderr)] of both processes, each checked to end with `returncode` (or its own of a
  list); killed if not."""
  try:
    outputs = [p.communicate(timeout=timeout) for p in processes]
  finally:
    for p in processes:
      p.kill()
  codes = returncode if isinstance(returncode, list) else [returncode] * len(processes)
  for p, (_, stderr), code in zip(processes, outputs, codes):
    assert p.returncode == code, stderr[-3000:]
  return outputs


def test_two_processes_with_two_devices_train_like_one_with_four(reference, subprocess_env,
                                                                tmp_path):
  """`reference` is one process with 4 devices (tests/conftest.py)."""
  workdir = tmp_path / 'run'
  flags = launch_runs.tiny_flags(  # data_dir not prepared yet: process 0 prepares, 1 waits.
      workdir, tmp_path / 'data', f'--coordinator_address=localhost:{free_port()}',
      '--num_processes=2', **{'train.networks': ('stage1',)})
  outputs = finish(start_cluster(flags, subprocess_env), timeout=300)

  ours = helpers.read_checkpoint(workdir, 'stage1', STAGE1_STEPS)
  theirs = helpers.read_checkpoint(reference, 'stage1', STAGE1_STEPS)
  for a, b in zip(jax.tree.leaves(ours['params']), jax.tree.leaves(theirs['params'])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert int(ours['step']) == STAGE1_STEPS

  with open(workdir / 'metrics.jsonl') as f:  # Written by process 0 only: each step once.
    assert [r['step'] for r in map(json.loads, f)] == list(range(1, STAGE1_STEPS + 1))
  assert (workdir / 'config.json').exists() and (workdir / 'results.json').exists()
  assert 'train stage1' in outputs[0][1] and 'train stage1' not in outputs[1][1]  # Progress bar.


def test_sigterm_to_one_process_stops_both_at_the_same_saved_step(subprocess_env, tmp_path):
  """JAX's preemption notifier owns SIGTERM under jax.distributed (iterseg's own handler replaced
  it before, and a two-process job ran on to its last step): one process is signalled, both reach
  the sync point at the same step, save it, and stop with one line saying how to resume."""
  import os  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'run'
  total = 2 * 150
  flags = launch_runs.tiny_flags(
      workdir, tmp_path / 'data', f'--coordinator_address=localhost:{free_port()}',
      '--num_processes=2', **{'train.networks': ('stage1',), 'train.stage1_epochs': 150,
                              'train.checkpoint_every': 1000})
  processes = start_cluster(flags, subprocess_env)
  try:
    metrics, start = workdir / 'metrics.jsonl', time.monotonic()
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
      assert time.monotonic() - start < 240 and all(p.poll() is None for p in processes)
      time.sleep(0.2)
    processes[1].send_signal(signal.SIGTERM)
  except BaseException:
    for p in processes:
      p.kill()
    raise
  outputs = finish(processes, timeout=240, returncode=1)
  steps = set()
  for _, stderr in outputs:
    line = helpers.one_line_error(subprocess.CompletedProcess([], 1, '', stderr))
    assert 'rerun the same command to resume' in line
    steps.add(int(line.split(' at step ')[1].split()[0]))
  assert len(steps) == 1 and steps.pop() < total
  saved = [int(d) for d in os.listdir(workdir / 'checkpoints' / 'stage1') if d.isdigit()]
  assert len(saved) == 1 and saved[0] < total


def test_predict_splits_a_folder_over_two_processes_and_writes_one_merged_summary(
    subprocess_env, tmp_path):
  """Every other file each; a broken file in process 1's share is skipped with its reason (that
  process exits 1, the other 0); a summary part an earlier run left is replaced."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  config = helpers.tiny(num_patches=4, **{'train.num_patches_list': (4,)})
  helpers.save_random_networks(config, tmp_path / 'run')
  rng = np.random.default_rng(0)
  (tmp_path / 'in').mkdir()
  for i in range(5):
    Image.fromarray(rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)).save(
        tmp_path / 'in' / f'{i}.png')
  (tmp_path / 'in' / '3.png').write_bytes((tmp_path / 'in' / '3.png').read_bytes()[:100])
  out = tmp_path / 'run' / 'predictions'
  out.mkdir()
  (out / 'summary.1.json').write_text(json.dumps({  # From an earlier run.
      'images': [], 'failed': 0, 'skipped': 0, 'total': 0, 'interrupted': None, 'compiles': None,
      'run': 7}))
  flags = ['--config=configs/default.py', f'--workdir={tmp_path / "run"}', '--mode=predict',
           *(f'--config.{k}={v}' for k, v in {
               'hi_size': 64, 'num_patches': 4, 'model.width': 4, 'model.depth': 3,
               'train.num_patches_list': (4,), 'predict.input': tmp_path / 'in',
               'predict.batch_size': 2}.items()),
           f'--coordinator_address=localhost:{free_port()}', '--num_processes=2']
  processes = start_cluster(flags, subprocess_env)
  outputs = [p.communicate(timeout=240) for p in processes]
  assert [p.returncode for p in processes] == [0, 1], outputs[1][1][-2000:]
  assert 'iterseg: error: 1 of 2 image(s) failed' in outputs[1][1] and '3.png' in outputs[1][1]
  parts = [json.loads((out / f'summary.{i}.json').read_text()) for i in range(2)]
  assert [part['total'] for part in parts] == [3, 2]  # Every other file each.
  merged = json.loads((out / 'summary.json').read_text())
  assert merged['total'] == 5 and merged['failed'] == 1 and merged['processes'] == 2
  assert [r['input'].rsplit('/', 1)[1] for r in merged['images']] == [f'{i}.png' for i in range(5)]
  assert 'error' in merged['images'][3] and '3.png' in merged['images'][3]['error']
  assert all((out / f'{i}_mask.png').exists() == (i != 3) for i in range(5))


def test_evaluate_gives_each_process_its_share_and_writes_the_merged_results_once(
    random_workdir, subprocess_env, tmp_path):
  """Two processes evaluate every other test image each; results.json (written by process 0 only)
  holds the same per-image metrics, in the split's order, as one process evaluating them all."""
  import shutil  # pylint: disable=g-import-not-at-top
  from iterseg import evaluate, settings  # pylint: disable=g-import-not-at-top
  config, workdir = random_workdir
  one = evaluate.run(settings.from_config(config), str(shutil.copytree(workdir, tmp_path / 'one')))
  two = shutil.copytree(workdir, tmp_path / 'two')
  flags = ['--config=configs/default.py', f'--workdir={two}', '--mode=evaluate',
           *(f'--config.{k}={v}' for k, v in {
               'hi_size': 64, 'num_patches': 4, 'model.width': 4, 'model.depth': 3,
               'train.num_patches_list': (2, 4), 'train.batch_size': 8, 'data.num_examples': 16,
               'data.data_dir': config.data.data_dir, 'eval.batch_size': 2}.items()),
           f'--coordinator_address=localhost:{free_port()}', '--num_processes=2']
  outputs = finish(start_cluster(flags, subprocess_env), timeout=240)
  merged = json.loads((two / 'results.json').read_text())
  assert merged['num_images'] == one['num_images'] == len(one['names']) and (
      merged['names'] == one['names']) and merged['skipped'] == one['skipped'] == {}
  for key, values in one['per_image'].items():
    assert len(merged['per_image'][key]['seconds']) == len(values['seconds'])  # Timed: not equal.
    for metric, expected in values.items():
      if metric != 'seconds':
        np.testing.assert_allclose(merged['per_image'][key][metric], expected, rtol=1e-5)
  assert 'Test split' in outputs[0][0] and 'Test split' not in outputs[1][0]  # Printed once.


def test_two_processes_split_a_slide_by_bands_and_process_0_writes_the_one_mask(
    subprocess_env, tmp_path):
  """A slide of 3 bands (1100 rows): process 0 makes bands 0 and 2, process 1 band 1 (the plain
  images split by file as before); process 0 assembles the mask, the one a single process makes.
  A slide that fails is reported once, and the processes go on together."""
  import tifffile  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from iterseg import checkpoints, native, settings, slides  # pylint: disable=g-import-not-at-top
  fields = {'resolution': 'native', 'hi_size': 64, 'stage1_size': 8, 'num_patches': 2,
            'refine_count': 2, 'train.num_patches_list': (2,), 'native.bucket': 8, 'halo': 4,
            'model.width': 4, 'model.depth': 3}
  config = helpers.tiny(**fields)
  helpers.save_random_networks(config, tmp_path / 'run', networks=('stage1', 'stage2'))
  image = np.random.default_rng(0).integers(0, 256, (1100, 300, 3), dtype=np.uint8)
  (tmp_path / 'in').mkdir()
  slides.write_pyramid(tmp_path / 'in' / 'slide.tif', 1100, 300,
                       (image[y:y + 128] for y in range(0, 1100, 128)), tile=128, levels=0)
  for name in ('a.png', 'b.png'):
    Image.fromarray(image[:40, :50]).save(tmp_path / 'in' / name)
  bad = tmp_path / 'in' / 'bad.tif'
  bad.write_bytes((tmp_path / 'in' / 'slide.tif').read_bytes())
  with tifffile.TiffFile(bad) as tif:
    offset = tif.pages[0].dataoffsets[4]
  with open(bad, 'r+b') as f:  # A damaged tile: stage 1 fails on both, before the other slide.
    f.seek(offset)
    f.write(b'damaged' * 8)
  flags = ['--config=configs/default.py', f'--workdir={tmp_path / "run"}', '--mode=predict',
           *(f'--config.{k}={v}' for k, v in {**fields, 'predict.input': tmp_path / 'in',
                                                'predict.outputs': ('mask',)}.items()),
           f'--coordinator_address=localhost:{free_port()}', '--num_processes=2']
  finish(start_cluster(flags, subprocess_env), 240, [1, 0])  # Process 0 reports the failed slide.
  out = tmp_path / 'run' / 'predictions'
  parts = [json.loads((out / f'summary.{i}.json').read_text()) for i in range(2)]
  assert [[r['input'].rsplit('/', 1)[1] for r in part['images']] for part in parts] == [
      ['a.png', 'bad.tif', 'slide.tif'], ['b.png']] and [part['total'] for part in parts] == [3, 1]
  assert 'cannot decode' in parts[0]['images'][1]['error']
  assert parts[0]['images'][2]['bands'] == [2, 1]
  s = settings.from_config(config)
  model = native.NativeModel(checkpoints.load_networks(str(tmp_path / 'run'), s, num_patches=[2]),
                             s.spec)
  expected = ((model.two_stage(image).probs[..., 0] > 0.5) * 255).astype(np.uint8)
  np.testing.assert_array_equal(tifffile.imread(out / 'slide_mask.ome.tif'), expected)
  assert not (out / 'slide_mask.ome.tif.partial').exists()
