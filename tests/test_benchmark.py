import json
import shutil

import jax
import numpy as np
import pytest

from iterseg import benchmark, evaluate, inference, methods, settings
from tests.helpers import save_random_networks, tiny


@pytest.fixture(scope='module')
def tiny_benchmark(tmp_path_factory):
  """benchmark.run on a tiny config in a workdir without checkpoints (so: random weights)."""
  config = tiny(**{'benchmark.repeats': 2, 'benchmark.batch_sizes': (1, 2),
                   'benchmark.sliding_window': True, 'train.num_patches_list': (2, 4),
                   'benchmark.peak_tflops': 0.5})
  workdir = tmp_path_factory.mktemp('bench')
  return config, workdir, benchmark.run(settings.from_config(config), str(workdir))


def test_benchmark_writes_every_method_np_and_batch_size(tiny_benchmark):
  config, workdir, results = tiny_benchmark
  saved = json.loads((workdir / 'benchmark.json').read_text())
  assert saved['rows'] == json.loads(json.dumps(results['rows']))
  keys = [(r['method'], r['num_patches'], r['batch_size']) for r in saved['rows']]
  expected = [(m, n, b) for b in (1, 2) for m, n in
              [('baseline', None), ('stage1', None), ('two_stage', 2), ('two_stage', 4),
               ('sliding_window', 2), ('sliding_window', 4)]]
  assert keys == expected
  assert saved['weights'] == {'baseline': 'random', 'stage1': 'random', 'stage2_np2': 'random',
                              'stage2_np4': 'random'}
  assert saved['backend'] == jax.default_backend() and 'cpu' in saved['device']
  assert saved['geometry']['hi_size'] == 64 and saved['repeats'] == 2 and saved['skipped'] == []


def test_benchmark_rows_are_consistent(tiny_benchmark):
  _, _, results = tiny_benchmark
  rows = {(r['method'], r['num_patches'], r['batch_size']): r for r in results['rows']}
  for (method, n, b), r in rows.items():
    assert len(r['times_ms']) == 2 and r['compile_s'] > 0
    assert r['call_ms'] == pytest.approx(float(np.median(r['times_ms'])))
    assert r['latency_ms'] == pytest.approx(r['call_ms'] / b)
    assert r['images_per_s'] == pytest.approx(1e3 / r['latency_ms'])
    base = rows[('baseline', None, b)]
    assert r['speedup_vs_baseline'] == pytest.approx(base['latency_ms'] / r['latency_ms'])
    assert r['gflops_per_image'] > 0 and r['achieved_gflops_per_s'] > 0
    assert r['peak_fraction'] == pytest.approx(r['achieved_gflops_per_s'] / 1e3 / 0.5)
  for b in (1, 2):  # Refining every patch costs more than refining Np of them.
    for n in (2, 4):
      assert rows[('sliding_window', n, b)]['gflops_per_image'] > rows[('two_stage', n, b)][
          'gflops_per_image']
    assert rows[('stage1', None, b)]['gflops_per_image'] < rows[('two_stage', 4, b)][
        'gflops_per_image']


def test_the_measured_latency_meets_the_dice_of_results_json(random_workdir, tmp_path, capsys):
  config, workdir = random_workdir
  workdir = shutil.copytree(workdir, tmp_path / 'run')
  s = settings.from_config(config)
  rows = [{'method': 'baseline', 'num_patches': None, 'batch_size': 1, 'latency_ms': 5.0},
          {'method': 'two_stage', 'num_patches': 4, 'batch_size': 1, 'latency_ms': 1.0},
          {'method': 'two_stage', 'num_patches': 4, 'batch_size': 2, 'latency_ms': 0.7}]
  # A damaged results.json is one line naming the file, the field and how to mend it; the plot
  # alone is left out.
  (workdir / 'results.json').write_text(json.dumps(
      {'geometry': s.spec.geometry(), 'rows': [{'method': 'baseline', 'num_patches': None,
                                                'soft_dice': 'high'}]}))
  assert benchmark.plot_with_dice(rows, s, str(workdir)) is None
  (line,) = capsys.readouterr().out.splitlines()
  assert (f'iterseg: warning: {workdir / "results.json"} cannot be read (rows[0].soft_dice=\'high\''
          f' is not valid' in line and 'run --mode=evaluate again' in line)
  evaluate.run(s, str(workdir))  # What the line says.
  path = benchmark.plot_with_dice(rows, s, str(workdir))
  assert path == str(workdir / 'tradeoff_latency.png')
  assert (workdir / 'tradeoff_latency.png').read_bytes()[:4] == b'\x89PNG'
  other = settings.from_config(tiny(**{'model.width': 8}))
  assert benchmark.plot_with_dice(rows, other, str(workdir)) is None  # Another geometry.


def test_sliding_window_refines_every_patch():
  config = tiny(threshold=0.1)
  s = settings.from_config(config)
  nets = inference.init_params(config, jax.random.key(0))
  every = [m for m in methods.methods(nets, s, sliding_window=True)
           if m.name == 'sliding_window'][0]
  assert every.spec.refine_count == 16 and every.spec.threshold is None
  _, fraction = every(np.zeros((1, 64, 64, 3), np.uint8))
  assert float(fraction[0]) == 1.0


def test_the_default_plan_fits_the_backend():
  s = settings.from_config(tiny(hi_size=128, **{'train.num_patches_list': (2, 4, 8, 16)}))
  cpu, gpu = benchmark.plan(s, 'cpu'), benchmark.plan(s, 'gpu')
  assert cpu == {'batch_sizes': (1,), 'sliding_window_nps': (2, 4, 8)}
  assert gpu == {'batch_sizes': (1, 16), 'sliding_window_nps': (2, 4, 8, 16)}
  forced = settings.from_config(tiny(**{'benchmark.batch_sizes': (4,),
                                        'benchmark.sliding_window': False}))
  assert benchmark.plan(forced, 'cpu') == {'batch_sizes': (4,), 'sliding_window_nps': ()}


def test_a_spent_time_budget_skips_and_says_what(tmp_path):
  config = tiny(**{'benchmark.repeats': 2, 'benchmark.batch_sizes': (1, 2),
                   'benchmark.max_seconds': 1e-3})
  results = benchmark.run(settings.from_config(config), str(tmp_path))
  assert results['rows'] == []  # Whether batch 1 starts before 1 ms are gone depends on the clock:
  assert any(line.startswith('batch 1: ') for line in results['skipped'])  # either way, each batch
  assert any(line.startswith('batch 2: every method') for line in results['skipped'])  # is named,
  assert all('time budget of 0.001 s' in line for line in results['skipped'])  # with the budget.


def test_benchmark_uses_trained_weights_when_the_workdir_has_them(tmp_path):
  config = tiny(**{'train.num_patches_list': (2,)})
  save_random_networks(config, tmp_path, networks=('stage1', 'stage2'))
  s = settings.from_config(tiny(**{'train.num_patches_list': (2, 4)}))
  nets, weights = benchmark.networks_for_benchmark(s, str(tmp_path))
  assert weights == {'baseline': 'random', 'stage1': 'trained', 'stage2_np2': 'trained',
                     'stage2_np4': 'random'}
  assert sorted(nets.stage2) == [2, 4]


def test_predict_throughput_is_measured_end_to_end_beside_the_compiled_function():
  from iterseg import predict  # pylint: disable=g-import-not-at-top
  s = settings.from_config(tiny(**{'predict.batch_size': 2}))
  out = predict.throughput(s, num_images=4, size=(30, 40))
  assert out['num_images'] == 4 and out['size'] == '30x40' and out['batch_size'] == 2
  assert 0 < out['images_per_s'] and 0 < out['compiled_images_per_s']
