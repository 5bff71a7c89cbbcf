import csv
import json

import jax
import numpy as np
import pytest
from PIL import Image

import shutil

from iterseg import (checkpoints, errors, evaluate, inference, methods, metrics, native, plots,
                     report, settings)
from iterseg.run import Run
from tests import helpers
from tests.helpers import save_random_networks, tiny


def numpy_metrics(probs, mask):
  """Binary soft Dice (smooth 1), hard Dice and IoU of one image, by hand."""
  p, y = probs.astype(np.float64).ravel(), mask.astype(np.float64).ravel()
  soft = (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)
  hard = (p > 0.5).astype(np.float64)
  inter, total = (hard * y).sum(), hard.sum() + y.sum()
  union = total - inter
  return soft, (2 * inter / total if total else 1.0), (inter / union if union else 1.0)


def random_examples(num_images=5, size=64, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (num_images, size, size, 3), dtype=np.uint8)
  masks = (rng.random((num_images, size, size)) < 0.3).astype(np.uint8)
  masks[0] = 0  # An image without foreground.
  return [{'image': images[i], 'mask': masks[i], 'name': f'im{i}', 'original_size': (size, size)}
          for i in range(num_images)], images, masks


def square(comparison, batch_size=2, **kwargs):
  return native.Square(comparison, 1, batch_size=batch_size, **kwargs)


def test_image_metrics_match_numpy_by_hand():
  rng = np.random.default_rng(1)
  probs = rng.random((4, 16, 16, 1)).astype(np.float32)
  masks = (rng.random((4, 16, 16)) < 0.4).astype(np.uint8)
  probs[1], masks[1] = 0.1, 0  # Empty prediction of an empty mask: hard Dice and IoU are 1.
  masks[2] = 0  # Empty mask, non-empty prediction: hard Dice and IoU are 0.
  got = jax.device_get(metrics.image_metrics(probs, masks, 1))
  for i in range(4):
    soft, hard, iou = numpy_metrics(probs[i, ..., 0], masks[i])
    assert got['soft_dice'][i] == pytest.approx(soft, rel=1e-5)
    assert got['hard_dice'][i] == pytest.approx(hard, rel=1e-5)
    assert got['iou'][i] == pytest.approx(iou, rel=1e-5)
  assert got['hard_dice'][1] == got['iou'][1] == 1.0
  assert got['hard_dice'][2] == got['iou'][2] == 0.0


def test_multiclass_metrics_average_the_foreground_classes():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(2, 8, 8, 3))
  probs = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
  masks = rng.integers(0, 3, (2, 8, 8)).astype(np.uint8)
  got = jax.device_get(metrics.image_metrics(probs, masks, 3))
  for i in range(2):
    per_class = []
    for c in (1, 2):  # Class 0 (background) is left out.
      soft, _, _ = numpy_metrics(probs[i, ..., c], masks[i] == c)
      pred, y = probs[i].argmax(-1) == c, masks[i] == c
      inter, total = (pred & y).sum(), pred.sum() + y.sum()
      per_class.append((soft, 2 * inter / total, inter / (total - inter), inter / y.sum(),
                        (~pred & ~y).sum() / (~y).sum()))  # One class against the rest.
    np.testing.assert_allclose([got[k][i] for k in metrics.METRICS], np.mean(per_class, 0),
                               rtol=1e-5)


def test_a_perfect_predictor_scores_one_on_every_image():
  examples, _, masks = random_examples(num_images=5, size=16)
  for e in examples:  # The "image" carries its mask, so the predictor can return it.
    e['image'] = np.repeat(e['mask'][..., None] * np.uint8(255), 3, -1)
  perfect = methods.Method('perfect', None, lambda p, x, spec: (x[..., :1] / 255.0, None), None,
                           None)
  result = evaluate.evaluate(square([perfect]), examples, progress=False)
  m = result['methods']['perfect']
  assert result['num_images'] == 5 and result['names'] == [f'im{i}' for i in range(5)]
  for k in metrics.METRICS:  # Soft Dice with smooth 1 is exactly 1 too when p == y in {0, 1}.
    assert m['per_image'][k] == pytest.approx([1.0] * 5)
    assert m[k] == pytest.approx(1.0)
  assert m['refined_fraction'] is None and len(m['per_image']['seconds']) == 5
  assert masks[0].sum() == 0  # The empty image counted as perfect, not as 1/1 by chance.


@pytest.fixture(scope='module')
def tiny_run():
  """Random tiny networks evaluated on 5 images in batches of 2 (the last one partial)."""
  config = tiny(num_patches=4)
  params = inference.init_params(config, jax.random.key(0))
  examples, images, masks = random_examples()
  result = evaluate.evaluate(square(methods.methods(params, settings.from_config(config)),
                                    seam_np=4), examples, progress=False)
  return config, params, images, masks, result


def test_evaluation_matches_dice_computed_by_hand(tiny_run):
  config, params, images, masks, result = tiny_run
  spec = settings.from_config(config).spec
  pred = jax.device_get(inference.two_stage(params, images, spec))
  base = np.asarray(inference.baseline(params.baseline, images, spec))
  for method, probs in [('two_stage_np4', pred.probs), ('stage1', pred.coarse),
                        ('baseline', base)]:
    by_hand = np.array([numpy_metrics(probs[i, ..., 0], masks[i]) for i in range(5)])
    m = result['methods'][method]
    np.testing.assert_allclose(m['per_image']['soft_dice'], by_hand[:, 0], rtol=1e-4)
    np.testing.assert_allclose(m['per_image']['hard_dice'], by_hand[:, 1], rtol=1e-4)
    np.testing.assert_allclose(m['per_image']['iou'], by_hand[:, 2], rtol=1e-4)
    assert m['soft_dice'] == pytest.approx(by_hand[:, 0].mean(), rel=1e-4)
  assert result['num_images'] == 5
  assert result['methods']['two_stage_np4']['refined_fraction'] == pytest.approx(4 / 16)


def test_refined_fraction_counts_only_patches_over_the_threshold():
  config = tiny(num_patches=2, refine_count=2, threshold=0.3)
  params = inference.init_params(config, jax.random.key(0))
  images = np.full((1, 64, 64, 3), 0.5, np.float32)
  pred = inference.two_stage(params.replace(stage2={2: params.stage2[2]}), images,
                             settings.from_config(config).spec)
  chosen = np.asarray(pred.scores[0]) >= np.sort(np.asarray(pred.scores[0]))[-2]
  expected = (chosen & (np.asarray(pred.scores[0]) >= 0.3)).mean()
  comparison = methods.methods(params, settings.from_config(config))
  _, fraction = [m for m in comparison if m.name == 'two_stage'][0](images)
  assert float(fraction[0]) == pytest.approx(expected)
  assert float(fraction[0]) == pytest.approx(np.asarray(pred.refined[0]).mean())


def test_run_writes_results_csv_and_plots(random_workdir, tmp_path):
  config, workdir = random_workdir
  workdir = shutil.copytree(workdir, tmp_path / 'run')
  results = evaluate.run(settings.from_config(config), str(workdir))

  rows = {(r['method'], r['num_patches']): r for r in results['rows']}
  assert set(rows) == {('baseline', None), ('stage1', None), ('two_stage', 2), ('two_stage', 4)}
  assert results['num_images'] == 5  # 30 % of 16: two full batches of 2 and a partial one.
  for r in rows.values():
    assert 0 <= r['soft_dice'] <= 1 and 0 <= r['hard_dice'] <= 1 and 0 <= r['iou'] <= 1
    assert r['gflops'] > 0 and 'latency_ms' not in r  # Speed is the benchmark's.
  assert rows[('two_stage', 4)]['gflops'] < rows[('baseline', None)]['gflops']
  assert rows[('two_stage', 4)]['refined_fraction'] == pytest.approx(0.25)
  assert rows[('two_stage', 2)]['refined_fraction'] == pytest.approx(0.5)

  saved = json.loads((workdir / 'results.json').read_text())
  assert saved['rows'] == json.loads(json.dumps(results['rows']))
  with open(workdir / 'results.csv') as f:
    table = list(csv.DictReader(f))
  assert [(r['method'], r['num_patches']) for r in table] == [
      ('baseline', ''), ('stage1', ''), ('two_stage', '2'), ('two_stage', '4')]
  assert float(table[3]['soft_dice']) == pytest.approx(rows[('two_stage', 4)]['soft_dice'])
  for name in ('dice.png', 'flops.png', 'tradeoff.png'):
    assert (workdir / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_run_refuses_a_config_that_disagrees_with_the_trained_networks(tmp_path):
  Run(str(tmp_path)).save_settings(settings.from_config(tiny()))
  with pytest.raises(errors.CheckpointError, match=r'config.model.width=8 .* trained with 4'):
    evaluate.run(settings.from_config(tiny(**{'model.width': 8})), str(tmp_path))


def test_run_without_checkpoints_says_to_train_first(tmp_path):
  Run(str(tmp_path)).save_settings(settings.from_config(tiny()))
  with pytest.raises(errors.CheckpointError, match='train'):
    checkpoints.load_networks(str(tmp_path), settings.from_config(tiny()))


def test_plots_draw_figures_3_and_4_and_the_tradeoff(tmp_path):
  row = dict(soft_dice=0.8, hard_dice=0.82, iou=0.7, refined_fraction=None, gflops=10.0,
             gflops_compiled=10.0, latency_ms=50.0)
  rows = [dict(row, method='baseline', num_patches=None),
          dict(row, method='stage1', num_patches=None, soft_dice=0.7, gflops=0.2, latency_ms=2.0)]
  rows += [dict(row, method='two_stage', num_patches=n, soft_dice=0.78, gflops=1 + 4 / n,
                latency_ms=5.0 + n, refined_fraction=1 / n) for n in (2, 4, 8)]
  paths = plots.plot_all(rows, str(tmp_path))
  assert sorted(p.split('/')[-1] for p in paths) == ['dice.png', 'flops.png', 'tradeoff.png']
  no_latency = [dict(r, latency_ms=None) for r in rows]
  assert plots.plot_tradeoff(no_latency, str(tmp_path / 't.png'), x='latency_ms') is None
  assert plots.plot_tradeoff(rows, str(tmp_path / 't.png'), x='latency_ms') == str(tmp_path / 't.png')


def test_seam_band_marks_the_pixels_near_inner_patch_borders():
  band = metrics.seam_band(8, 2, 1)  # One inner border at 4, in each direction.
  assert band[3].all() and band[4].all() and band[:, 3].all() and band[:, 4].all()
  assert band.sum() == 2 * 8 * 2 - 4 and not band[0, 0] and not band[7, 7]
  assert metrics.seam_band(8, 1, 1).sum() == 0  # Np = 1: no seam.


def test_seam_dice_is_the_dice_of_the_band_alone(tiny_run):
  config, params, images, masks, result = tiny_run
  m = result['methods']['two_stage_np4']
  probs = jax.device_get(inference.two_stage(params, images, settings.from_config(config).spec).probs)
  band = metrics.seam_band(64, 4, 2)
  by_hand = [numpy_metrics(probs[i, ..., 0][band], masks[i][band])[0] for i in range(5)]
  np.testing.assert_allclose(m['per_image']['seam_soft_dice'], by_hand, rtol=1e-4)


def test_a_network_whose_training_stopped_half_way_is_refused_by_load_and_flagged_by_evaluate(
    tmp_path, capsys):
  import iterseg  # pylint: disable=g-import-not-at-top
  config = tiny(num_patches=4, **{'train.num_patches_list': (4,)})
  save_random_networks(config, tmp_path)
  Run(str(tmp_path)).write_plan('stage2_np4', 10)  # Planned 10 steps; the checkpoint is 1.
  with pytest.raises(errors.CheckpointError, match=r'stage2_np4 \(step 1 of 10\).* did not '
                     r'finish.*partial=True'):
    iterseg.load(str(tmp_path))
  params, _ = iterseg.load(str(tmp_path), partial=True)
  assert sorted(params.stage2) == [4]
  nets = checkpoints.load_networks(str(tmp_path), settings.from_config(config))
  assert 'stage2_np4 (step 1 of 10)' in capsys.readouterr().out and nets.stage2
  save_random_networks(config, tmp_path / 'nostage2', networks=('stage1', 'baseline'))
  with pytest.raises(errors.CheckpointError, match='has no trained stage 2'):
    iterseg.load(str(tmp_path / 'nostage2'))


def test_a_corrupt_config_json_is_named(tmp_path):
  (tmp_path / 'config.json').write_text('{"hi_size": 64,')
  with pytest.raises(errors.CheckpointError, match=f'{tmp_path / "config.json"} cannot be read'):
    Run(str(tmp_path)).settings()


def test_evaluate_refuses_an_unwritable_workdir_before_computing(tmp_path):
  (tmp_path / 'file').write_text('not a folder')
  with pytest.raises(errors.WriteError, match='cannot write to'):
    evaluate.run(settings.from_config(tiny()), str(tmp_path / 'file' / 'run'))


def test_sensitivity_and_specificity_by_hand_and_inside_a_region():
  rng = np.random.default_rng(3)
  probs = rng.random((3, 16, 16, 1)).astype(np.float32)
  masks = (rng.random((3, 16, 16)) < 0.4).astype(np.uint8)
  masks[2] = 0  # No positives: sensitivity 1 by convention.
  region = rng.random((3, 16, 16)) < 0.7
  for inside in (None, region):
    got = jax.device_get(metrics.image_metrics(probs, masks, 1, inside))
    for i in range(3):
      keep = np.ones((16, 16), bool) if inside is None else inside[i]
      p, y = probs[i, ..., 0][keep] > 0.5, masks[i][keep] > 0
      sens = (p & y).sum() / y.sum() if y.sum() else 1.0
      assert got['sensitivity'][i] == pytest.approx(sens, rel=1e-5)
      assert got['specificity'][i] == pytest.approx((~p & ~y).sum() / (~y).sum(), rel=1e-5)
      assert got['hard_dice'][i] == pytest.approx(2 * (p & y).sum() / (p.sum() + y.sum()), rel=1e-5)


def test_field_of_view_metrics_and_error_images_at_each_image_s_size(tmp_path):
  """A dark frame outside the field of view: the FOV metrics leave it out, and each image's errors
  are drawn in their colours."""
  config = tiny(num_patches=4)
  params = inference.init_params(config, jax.random.key(0))
  examples, images, masks = random_examples(num_images=3)
  for e in examples:
    e['image'][:, :8] = 0  # The frame: left of x = 8.
  result = evaluate.evaluate(square(methods.methods(params, settings.from_config(config))),
                             examples, progress=False, fov=True, errors=str(tmp_path))
  base = jax.device_get(inference.baseline(params.baseline, np.stack([e['image'] for e in examples]),
                                           settings.from_config(config).spec))
  for i, e in enumerate(examples):
    inside = metrics.field_of_view(e['image'])
    assert not inside[:, :8].any() and inside[:, 8:].mean() > 0.9
    by_hand = metrics.one_image_metrics(base[i], e['mask'], 1, inside)
    assert result['methods']['baseline']['per_image']['fov_hard_dice'][i] == pytest.approx(
        by_hand['hard_dice'], rel=1e-5)
    drawn = np.asarray(Image.open(tmp_path / f'im{i}_baseline.png'))
    pred, truth = base[i, ..., 0] > 0.5, e['mask'] > 0
    for where, colour in ((pred & ~truth, 'false_positive'), (~pred & truth, 'false_negative'),
                          (pred & truth, 'true_positive')):
      if where.any():
        assert (drawn[where] == report.ERROR_COLOURS[colour]).all()


def test_an_example_that_cannot_be_read_is_skipped_named_and_the_others_evaluated(
    random_workdir, tmp_path, monkeypatch, capsys):
  """One bad input never stops evaluate: the example is named with its reason in results.json and
  in a line, the others are evaluated (a first batch one short included), and the exit status says
  so (a DataError after everything is written)."""
  config, workdir = random_workdir
  workdir = shutil.copytree(workdir, tmp_path / 'run')
  helpers.unreadable(monkeypatch, bad=0)  # The first batch (eval.batch_size 2) is one short.
  with pytest.raises(errors.DataError, match=r'^1 of 5 images could not be read or segmented and '
                     r'were skipped \(listed above and in .*results.json\), e.g. example 0: '
                     r'example 0 of the prepared dataset cannot be read') as e:
    evaluate.run(settings.from_config(config), str(workdir))
  assert '\n' not in str(e.value)
  assert '  skipped example 0: example 0 of the prepared' in capsys.readouterr().out
  saved = json.loads((workdir / 'results.json').read_text())
  assert list(saved['skipped']) == ['example 0'] and saved['num_images'] == 4
  assert len(saved['names']) == 4 and len(saved['per_image']['two_stage_np4']['soft_dice']) == 4
