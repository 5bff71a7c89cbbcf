"""--mode=calibrate: the held-out train subset, the Pareto front, the target rules, the calibrate.*
config fields, and one sweep end to end on random tiny networks."""

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest

from iterseg import calibrate, data, errors, methods, native, settings
from iterseg.run import Run
from tests.helpers import set_fields, tiny


def calibrate_plan(**fields):
  """The calibrate plan of the default config, with `fields` changed."""
  return dataclasses.replace(settings.from_config(tiny()).calibrate, **fields)


def point(dice, gflops, latency, n=4, k=1, t=None):
  return {'num_patches': n, 'refine_count': k, 'threshold': t, 'soft_dice': dice,
          'hard_dice': dice, 'gflops': gflops, 'latency_ms': latency, 'refined_fraction': k / n**2}


def test_holdout_indices_are_a_seeded_sorted_subset_of_the_right_size():
  a = data.holdout_indices(50, 0.2, seed=3)
  assert len(a) == 10 and np.all(np.diff(a) > 0) and a.min() >= 0 and a.max() < 50
  np.testing.assert_array_equal(a, data.holdout_indices(50, 0.2, seed=3))
  assert not np.array_equal(a, data.holdout_indices(50, 0.2, seed=4))
  assert len(data.holdout_indices(7, 0.2, 0)) == 2  # ceil(1.4).
  assert len(data.holdout_indices(10, 0.7, 0)) == 7  # Not ceil(7.000000000000001) = 8.
  np.testing.assert_array_equal(data.holdout_indices(5, 1.0, 0), np.arange(5))


def test_refine_counts_are_powers_of_two_and_np_unless_configured():
  assert calibrate.refine_counts(4) == [1, 2, 4, 8, 16]
  assert calibrate.refine_counts(3) == [1, 2, 3, 4, 8]
  assert calibrate.refine_counts(2, (1, 3, 16, 3)) == [1, 3]  # 16 > 2 * 2: skipped at Np=2.


def test_pareto_front_keeps_exactly_the_non_dominated_points():
  a = point(0.90, 10.0, 5.0)
  b = point(0.85, 2.0, 5.0)
  c = point(0.80, 2.0, 5.0)  # Dominated by b (same cost, worse Dice).
  d = point(0.95, 20.0, 1.0)  # Best Dice and latency, most FLOPs.
  e = point(0.85, 2.0, 5.0)  # Equal to b: neither dominates the other.
  f = point(0.89, 10.0, 6.0)  # Dominated by a in all three.
  assert calibrate.pareto_front([a, b, c, d, e, f]) == [a, b, d, e]
  assert calibrate.pareto_front([]) == []
  assert calibrate.dominates(a, f) and not calibrate.dominates(f, a)
  assert not calibrate.dominates(b, e)


def test_dice_drop_picks_the_fewest_flops_within_the_drop():
  points = [point(0.79, 1.0, 1.0), point(0.80, 2.0, 1.0, k=2), point(0.81, 4.0, 3.0, k=4),
            point(0.805, 4.0, 3.0, k=8)]
  plan = calibrate_plan(max_dice_drop=0.01)
  assert calibrate.choose(points, 0.80, plan)['refine_count'] == 1  # 0.79 is on the floor.
  assert calibrate.choose(points, 0.805, plan)['refine_count'] == 2
  assert calibrate.choose(points, 0.815, plan)['refine_count'] == 4  # Same FLOPs: better Dice.
  assert calibrate.choose(points, 0.83, plan) is None
  assert calibrate.choose(points, None, plan) is None


def test_latency_picks_the_best_dice_under_the_budget():
  points = [point(0.80, 1.0, 1.0), point(0.85, 2.0, 2.0, k=2), point(0.90, 4.0, 5.0, k=4)]
  plan = calibrate_plan(target='latency', latency_budget_ms=2.0)
  assert calibrate.choose(points, None, plan)['refine_count'] == 2
  assert calibrate.choose(points, 0.9, calibrate_plan(target='latency',
                                                     latency_budget_ms=10.0))['refine_count'] == 4
  assert calibrate.choose(points, None, calibrate_plan(target='latency',
                                                      latency_budget_ms=0.5)) is None


def test_operating_point_reads_calibration_json(tmp_path):
  assert Run(str(tmp_path)).operating_point() is None  # Absent.
  (tmp_path / 'calibration.json').write_text(json.dumps({'operating_point': None}))
  assert Run(str(tmp_path)).operating_point() is None  # No point met the target.
  chosen = {'num_patches': 4, 'refine_count': 2, 'threshold': 0.1}  # Written before the one schema.
  (tmp_path / 'calibration.json').write_text(json.dumps({'operating_point': chosen}))
  assert Run(str(tmp_path)).operating_point() == dict(chosen, refine_fraction=None)


@pytest.mark.parametrize('content, words', [
    ('{"operating_point": ', 'cannot be read'),  # Truncated mid-write: never silently ignored.
    ('[1, 2]', 'cannot be read'),
    (json.dumps({'operating_point': {'num_patches': 2, 'refine_fraction': 1.5}}),
     r'operating_point.refine_fraction=1.5 is not valid \(a finite number in \(0, 1\] or null\)'),
    (json.dumps({'operating_point': {'num_patches': '4', 'refine_count': 2}}),
     "operating_point.num_patches='4' is not valid"),
    (json.dumps({'operating_point': {'num_patches': 4, 'refine_count': 0}}),
     'operating_point.refine_count=0 is not valid'),
    (json.dumps({'operating_point': {'num_patches': 4, 'threshold': -1}}),
     'operating_point.threshold=-1 is not valid'),
])
def test_a_damaged_calibration_json_is_one_line_naming_the_file_the_field_and_the_way_out(
    tmp_path, content, words):
  (tmp_path / 'calibration.json').write_text(content)
  with pytest.raises(errors.CheckpointError, match=words) as e:
    Run(str(tmp_path)).operating_point()
  message = str(e.value)
  assert 'calibration.json' in message and 'run --mode=calibrate again, or delete' in message
  assert '\n' not in message
  (tmp_path / 'calibration.json').unlink()  # Doing what it says works: the config's point is used.
  assert Run(str(tmp_path)).operating_point() is None


def test_measure_averages_over_the_real_images_of_padded_batches():
  rng = np.random.default_rng(0)
  masks = (rng.random((5, 8, 8)) < 0.3).astype(np.uint8)
  images = np.repeat(masks[..., None] * np.uint8(255), 3, -1)  # The image carries its mask.
  examples = [{'image': images[i], 'mask': masks[i], 'name': str(i), 'original_size': (8, 8)}
              for i in range(5)]
  half_fn = jax.jit(lambda p, x, spec: (x[..., :1] / 510.0, None), static_argnames='spec')
  half = methods.Method('half', None, half_fn, None, None)
  got = calibrate.measure(native.Square([half], 1, batch_size=2), examples)  # 2 + 2 + 1 (padded).
  p, y = masks.reshape(5, -1) * 0.5, masks.reshape(5, -1)
  soft = (2 * (p * y).sum(1) + 1) / (p.sum(1) + y.sum(1) + 1)  # Only the 5 real images count.
  assert got['soft_dice'] == pytest.approx(soft.mean(), rel=1e-5)
  assert got['hard_dice'] == pytest.approx(np.mean([float(m.sum() == 0) for m in masks]))
  assert got['refined_fraction'] is None and got['latency_ms'] > 0


def test_the_latency_target_needs_a_budget():
  with pytest.raises(settings.SettingsError, match=r'calibrate.latency_budget_ms=None .*latency'):
    settings.from_config(tiny(**{'calibrate.target': 'latency'}))
  s = settings.from_config(tiny(**{'calibrate.target': 'latency',
                                   'calibrate.latency_budget_ms': 5.0}))
  assert s.calibrate.latency_budget_ms == 5.0


def test_calibrate_defaults_and_a_config_without_the_section():
  old = tiny().to_dict()
  del old['calibrate']
  assert settings.from_config(old).calibrate == calibrate_plan()
  s = settings.from_config(tiny(**{'calibrate.thresholds': (0.1, None, 0.1),
                                   'calibrate.refine_counts': (4, 1, 4)}))
  assert s.calibrate.thresholds == (0.1, None) and s.calibrate.refine_counts == (1, 4)


def test_run_sweeps_every_np_and_k_and_writes_the_calibration(random_workdir, tmp_path, capsys):
  config, workdir = random_workdir
  workdir = shutil.copytree(workdir, tmp_path / 'run')
  config = set_fields(config.copy_and_resolve_references(), **{
      'calibrate.refine_counts': (1, 4, 16),  # A short sweep: each k compiles.
      'calibrate.max_dice_drop': 1.0, 'benchmark.repeats': 2})
  result = calibrate.run(settings.from_config(config), str(workdir))

  saved = json.loads((workdir / 'calibration.json').read_text())
  assert saved['points'] == json.loads(json.dumps(result['points']))
  assert (workdir / 'calibration.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert (workdir / 'calibration.csv').exists()
  assert saved['num_images'] == 3  # ceil(0.2 * 11 training examples).
  assert saved['target'] == 'dice_drop' and saved['baseline']['gflops'] > 0
  points = saved['points']
  assert sorted((p['num_patches'], p['refine_count']) for p in points) == [
      (2, 1), (2, 4), (4, 1), (4, 4), (4, 16)]  # k = 16 > 2 * 2 is skipped at Np = 2.
  assert saved['front'] and all(p in points for p in saved['front'])
  for p in saved['front']:
    assert not any(calibrate.dominates(q, p) for q in points)
  for p in points:
    assert 0 <= p['soft_dice'] <= 1 and p['latency_ms'] > 0
    assert p['refined_fraction'] == pytest.approx(p['refine_count'] / p['num_patches'] ** 2)
  by_k = {(p['num_patches'], p['refine_count']): p for p in points}
  assert by_k[(4, 16)]['gflops'] > by_k[(4, 1)]['gflops']
  per_patch = (by_k[(4, 16)]['gflops'] - by_k[(4, 1)]['gflops']) / 15  # stage1 + k * stage2.
  assert by_k[(4, 4)]['gflops'] == pytest.approx(by_k[(4, 1)]['gflops'] + 3 * per_patch)
  # Any Dice is within a drop of 1.0: the operating point is the point of fewest GFLOPs, Np=4, k=1
  # (a 16-px patch costs less than a 32-px one).
  expected = {'num_patches': 4, 'refine_count': 1, 'refine_fraction': None, 'threshold': None}
  assert saved['operating_point'] == expected
  assert min(points, key=lambda p: p['gflops'])['refine_count'] == 1
  assert ('Operating point (dice_drop): num_patches=4, refine_count=1, threshold=None'
          in capsys.readouterr().out)
  assert Run(str(workdir)).operating_point() == expected


def test_load_and_predict_use_the_calibrated_operating_point(random_workdir, tmp_path):
  import iterseg  # pylint: disable=g-import-not-at-top
  from iterseg import predict  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  config, workdir = random_workdir
  workdir = shutil.copytree(workdir, tmp_path / 'run')
  point = {'num_patches': 2, 'refine_count': 1, 'threshold': None}
  (workdir / 'calibration.json').write_text(json.dumps({'operating_point': point}))
  params, loaded = iterseg.load(str(workdir))
  assert (loaded.num_patches, loaded.refine_count) == (2, 1) and sorted(params.stage2) == [2]
  Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / 'a.png')
  config = set_fields(config.copy_and_resolve_references(),
                      **{'predict.input': str(tmp_path / 'a.png')})
  result = predict.run(settings.from_config(config), str(workdir))
  assert result['num_patches'] == 2 and result['images'][0]['refined_patches'] == 1
  assert Run(str(workdir)).operating_point() == dict(point, refine_fraction=None)
