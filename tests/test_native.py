"""resolution='native': inference on any H x W with bounded memory and compute that follows the tiles
refined, the dense sliding-window reference, native data, crops for training, and the modes."""

import dataclasses
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from iterseg import errors, evaluate, inference, models, native, predict, settings
from iterseg.data import pipeline, synthetic
from iterseg.run import Run
from tests import helpers
from tests.helpers import save_random_networks, set_fields, tiny


def native_config(**overrides):
  """Crops of 64 px, stage 1 at 1/8, tiles of 32 px (4 stage-1 px), a 3-level U-Net of width 4."""
  return tiny(**{'resolution': 'native', 'hi_size': 64, 'stage1_size': 8, 'num_patches': 2,
                 'refine_count': 2, 'train.num_patches_list': (2,), 'native.bucket': 8,
                 'native.chunk': 4, 'train.batch_size': 4, **overrides})


@pytest.fixture(scope='module')
def model():
  s = settings.from_config(native_config(halo=4))
  nets = models.random_networks(s.spec, jax.random.key(0))
  return native.NativeModel(nets, s.spec)


def images(*shapes, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for shape in shapes]


def test_on_an_image_of_the_crop_size_native_inference_is_the_square_method(model):
  """The same networks and geometry through the jitted square two_stage (spec resolution native)
  and through the host-driven native pipeline give the same selection and probabilities (within
  the uint8 rounding of the native thumbnail)."""
  spec = model.spec
  (image,) = images((64, 64))
  pred = model.two_stage(image, refine_fraction=spec.refine_count / spec.num_patches ** 2)
  square = inference.two_stage(model.nets.at(spec.num_patches), jnp.asarray(image)[None], spec)
  np.testing.assert_array_equal(pred.refined.reshape(-1), np.asarray(square.refined[0]))
  np.testing.assert_allclose(pred.probs, np.asarray(square.probs[0]), atol=2e-3)


def test_any_size_and_aspect_gives_probabilities_of_that_size(model):
  for image in images((5, 7), (64, 64), (70, 130), (200, 33)):
    pred = model.two_stage(image)
    h, w = image.shape[:2]
    assert pred.probs.shape == (h, w, 1) and pred.probs.dtype == np.float32
    assert np.isfinite(pred.probs).all() and 0 <= pred.probs.min() and pred.probs.max() <= 1
    assert pred.refined.shape == (-(-h // 32), -(-w // 32)) == pred.scores.shape
    assert pred.stats['refined'] == max(1, int(np.ceil(0.1 * pred.stats['tiles'])))


def test_outside_the_refined_tiles_the_output_is_stage_1_upsampled(model):
  (image,) = images((100, 150))
  pred = model.two_stage(image, refine_fraction=0.25)
  coarse = model.stage1_only(image).probs
  tiles = np.kron(pred.refined, np.ones((32, 32), bool))[:100, :150]
  np.testing.assert_array_equal(pred.probs[~tiles], coarse[~tiles])
  assert (pred.probs[tiles] != coarse[tiles]).mean() > 0.5


def test_a_refined_tile_is_stage_2_by_hand_on_the_tile_its_halo_and_the_coarse_map(model):
  spec = model.spec
  (image,) = images((96, 96), seed=3)
  pred = model.two_stage(image, refine_fraction=1.0)
  r, c = 1, 1  # An inner tile (its 4-px halo is all inside the image).
  y, x = r * 32 - 4, c * 32 - 4
  coarse = model.stage1_only(image).probs[y:y + 40, x:x + 40]
  tile = inference.as_float(jnp.asarray(image[y:y + 40, x:x + 40]))
  by_hand = models.probabilities(inference.stage2_logits(
      model.stage2_params, jnp.concatenate([tile, coarse], -1)[None], spec))[0]
  np.testing.assert_allclose(pred.probs[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32], by_hand,
                             atol=1e-5)


def test_a_threshold_refines_fewer_tiles_and_the_flops_count_what_ran(model):
  (image,) = images((256, 256), seed=1)
  every = model.two_stage(image, refine_fraction=1.0)
  scores = np.sort(every.scores.reshape(-1))
  half = model.two_stage(image, refine_fraction=1.0, threshold=float(scores[len(scores) // 2]))
  assert every.stats['refined'] == 64 and half.stats['refined'] == 32
  assert every.stats['stage2_calls'] == 16 and half.stats['stage2_calls'] == 8  # Chunks of 4.
  assert half.stats['gflops']['stage2'] == pytest.approx(every.stats['gflops']['stage2'] / 2)
  assert half.stats['gflops']['stage1'] == every.stats['gflops']['stage1']


def test_the_last_chunk_holds_only_the_tiles_left_so_compute_follows_every_tile():
  """Chunks of 8 tiles, the last cut to a multiple of 2: 11 tiles run as 8 + 4 (not 8 + 8), and
  the stage-2 FLOPs are those two calls', the same values as one tile at a time."""
  s = settings.from_config(native_config(**{'native.chunk': 8}))
  model = native.NativeModel(models.random_networks(s.spec, jax.random.key(0)), s.spec)
  assert model.chunk_sizes == (2, 4, 6, 8)
  (image,) = images((96, 128), seed=2)  # 3 x 4 tiles of 32 px.
  pred = model.two_stage(image, refine_fraction=11 / 12)
  assert pred.stats['refined'] == 11 and pred.stats['stage2_calls'] == 2
  per_call = {next(shape[0] for shape, dtype in key if dtype == np.uint8):
              model.stage2.compiled.cache[key][1] for key in model.stage2.keys}  # {tiles: FLOPs}
  assert model.stage2.compiles == 2 and sorted(per_call) == [4, 8]
  assert pred.stats['gflops']['stage2'] == pytest.approx((per_call[4] + per_call[8]) / 1e9)
  one_at_a_time = native.NativeModel(model.nets, s.vary('spec', chunk=1).spec)
  np.testing.assert_allclose(one_at_a_time.two_stage(image, refine_fraction=11 / 12).probs,
                             pred.probs, atol=1e-6)


def test_the_thumbnail_is_the_mean_of_each_block_in_every_band_and_at_ragged_edges():
  """Several bands of 64 block rows (cut on every core), a partial last row and column of blocks."""
  (image,) = images((2 * 64 * 3 + 5, 3 * 40 + 2))
  thumb = native.thumbnail(image, 3)
  assert thumb.shape == (2 * 64 + 2, 41, 3) and thumb.dtype == np.float32
  for r, c in [(0, 0), (63, 7), (64, 7), (127, 40), (128, 0), (129, 40), (129, 13)]:
    block = image[3 * r:3 * r + 3, 3 * c:3 * c + 3].astype(np.float64)
    np.testing.assert_allclose(thumb[r, c], block.mean((0, 1)) / 255, rtol=1e-6)


def test_compilations_follow_the_size_buckets_not_the_sizes():
  s = settings.from_config(native_config())
  model = native.NativeModel(models.random_networks(s.spec, jax.random.key(0)), s.spec)
  for image in images((60, 60), (57, 63), (64, 50)):  # One bucket: 8 x 8 stage-1 px.
    model.two_stage(image)
  counts = lambda: (model.stage1.compiles, model.band.compiles, model.stage2.compiles,
                    model.paste.compiles)
  assert counts() == (1, 1, 1, 1)
  model.two_stage(images((130, 60))[0])  # A taller bucket: stage 1, bands and paste again.
  assert counts() == (2, 2, 1, 2) and model.compiles == 7


@pytest.mark.parametrize('image,words', [
    (np.full((40, 30, 3), 0.5, np.float32), None),  # Floats in [0, 1]: accepted.
    (np.where(np.eye(40, 30)[..., None] > 0, np.nan, np.full((40, 30, 3), 0.5, np.float32)),
     'NaN or inf'),  # A few NaN pixels among good ones.
    (np.full((40, 30, 3), 200.0, np.float32), 'look like 0..255'),
    (np.zeros((40, 30, 3), np.uint16), 'dtype uint16'),
    (np.zeros((40, 30), np.uint8), 'got shape (40, 30)'),
    (np.zeros((40, 30, 4), np.uint8), 'got shape (40, 30, 4)'),
])
def test_an_image_the_method_cannot_take_is_refused_in_one_line(model, image, words):
  if words is None:
    assert model.two_stage(image).probs.shape == (40, 30, 1)
    return
  with pytest.raises(errors.InputError, match=re.escape(words)) as info:
    model.two_stage(image)
  assert '\n' not in str(info.value)


def test_an_image_too_large_is_refused_before_any_work():
  s = settings.from_config(native_config(**{'native.max_pixels': 5000}))
  model = native.NativeModel(models.random_networks(s.spec, jax.random.key(0)), s.spec)
  with pytest.raises(errors.InputError, match=r'an image of 100 x 60 \(0.006 Mpx\) is above config'
                     r'.native.max_pixels=5000 .*raise it to at least 6000, or set it to 0'):
    model.two_stage(np.zeros((60, 100, 3), np.uint8))
  assert model.compiles == 0
  raised = native.NativeModel(model.nets, settings.from_config(native_config(**{
      'native.max_pixels': 6000})).spec)  # Doing what the message says works.
  assert raised.two_stage(np.zeros((60, 100, 3), np.uint8)).probs.shape == (60, 100, 1)
  with pytest.raises(errors.InputError, match=r'16384 x 16384 .* GB are free'):
    native.check_fits(16384, 16384, settings.from_config(native_config()).spec,
                      extra_per_pixel=2 ** 10)  # As if each pixel needed a KiB.


@pytest.mark.parametrize('blend', ['gaussian', 'constant'])
def test_the_sliding_window_blends_overlapping_windows_of_the_baseline(model, blend):
  spec = dataclasses.replace(model.spec, blend=blend)
  (image,) = images((64, 112), seed=2)  # Windows of 64 px every 48 px: x = 0, 48 (flush).
  dense = native.NativeModel(model.nets, spec).sliding_window(image)
  x = inference.as_float(jnp.asarray(image))[None]
  left = models.probabilities(models.unet(spec).apply({'params': model.nets.baseline},
                                                      x[:, :, :64]))[0]
  right = models.probabilities(models.unet(spec).apply({'params': model.nets.baseline},
                                                       x[:, :, 48:]))[0]
  w = native.blend_weights(64, blend)[..., None]
  np.testing.assert_allclose(dense.probs[:, :48], left[:, :48], atol=1e-5)
  both = (left[:, 48:] * w[:, 48:] + right[:, :16] * w[:, :16]) / (w[:, 48:] + w[:, :16])
  np.testing.assert_allclose(dense.probs[:, 48:64], both, atol=1e-5)
  np.testing.assert_allclose(dense.probs[:, 64:], right[:, 16:], atol=1e-5)
  assert dense.stats['windows'] == 2


def test_the_gaussian_weights_are_monai_s_importance_map():
  w = native.blend_weights(64, 'gaussian')
  assert w.max() == pytest.approx(1.0, rel=1e-3) and w.min() > 0 and w.shape == (64, 64)
  np.testing.assert_allclose(w, w.T)
  np.testing.assert_allclose(w, w[::-1, ::-1], rtol=1e-6)
  d = lambda i: (i - 31.5) / (64 / 8)  # From the centre, in sigmas (MONAI: sigma_scale 0.125).
  assert w[31, 23] / w[31, 31] == pytest.approx(np.exp(-(d(23) ** 2 - d(31) ** 2) / 2), rel=1e-4)
  np.testing.assert_array_equal(native.blend_weights(8, 'constant'), 1)


def test_high_resolution_scenes_are_pure_and_keep_pixel_scale_detail():
  a = synthetic.make_highres_example(5, 600, 900)
  b = synthetic.make_highres_example(5, 600, 900)
  np.testing.assert_array_equal(a['image'], b['image'])
  np.testing.assert_array_equal(a['mask'], b['mask'])
  assert a['image'].shape == (600, 900, 3) and set(np.unique(a['mask'])) <= {0, 1}
  scenes = [synthetic.make_highres_example(i, 600, 900, num_classes=3)['mask'] for i in range(6)]
  classes = next(m for m in scenes if set(np.unique(m)) == {0, 1, 2})  # Lesions and vessels.
  thin = classes == 2
  padded = np.pad(thin, 2)
  eroded = np.ones_like(thin)
  for dy in range(5):
    for dx in range(5):
      eroded &= padded[dy:dy + 600, dx:dx + 900]
  assert eroded.sum() < 0.05 * thin.sum()  # Thin: a 5 x 5 erosion leaves (almost) nothing.


def test_native_data_keeps_each_image_at_its_own_size_times_the_scale(tmp_path):
  from iterseg import data  # pylint: disable=g-import-not-at-top
  config = native_config(**{'data.num_examples': 4, 'data.synthetic_sides': (80, 120),
                            'data.data_dir': str(tmp_path), 'data.scale': 0.5})
  s = settings.from_config(config)
  stats = data.prepare(s.data)
  assert 'native_x0.5' in stats['dataset'] and 'sides80-120' in stats['dataset']
  examples = list(data.load_split(s.data, 'train')) + list(data.load_split(s.data, 'test'))
  for example in sorted(examples, key=lambda e: e['name']):
    index = int(example['name'].split('/')[1])
    h, w = synthetic.native_size(index, (80, 120))
    assert example['image'].shape == (round(h * 0.5), round(w * 0.5), 3)
    assert example['mask'].shape == (round(h * 0.5), round(w * 0.5))


def test_training_crops_are_a_pure_function_of_seed_epoch_and_example():
  source = [synthetic.make_highres_example(i, 90 + 10 * i, 70) for i in range(3)]
  crops = pipeline.Crops(source, 64, seed=1, epoch=2)
  again = pipeline.Crops(source, 64, seed=1, epoch=2)
  other = pipeline.Crops(source, 64, seed=1, epoch=3)
  for i in range(3):
    np.testing.assert_array_equal(crops[i]['image'], again[i]['image'])
    assert crops[i]['image'].shape == (64, 64, 3) and crops[i]['mask'].shape == (64, 64)
  assert any(not np.array_equal(crops[i]['image'], other[i]['image']) for i in range(3))
  batch = next(iter(pipeline.batches(source, batch_size=2, seed=0, epoch=0, crop=64,
                                     num_local_devices=2)))
  assert batch['image'].shape == (2, 1, 64, 64, 3) and batch['mask'].shape == (2, 1, 64, 64)


def test_one_pmapped_native_step_of_stage_1_and_stage_2():
  """The native parts of training: stage 1 learns from block-averaged crops, stage 2 from tiles
  scored on the low-resolution map (the baseline's step is the square one)."""
  from iterseg import state, train  # pylint: disable=g-import-not-at-top
  s = settings.from_config(native_config())
  source = [synthetic.make_highres_example(i, 100, 120) for i in range(8)]
  batch = next(iter(pipeline.batches(source, batch_size=4, seed=0, epoch=0, crop=64)))
  frozen = models.init_unet(jax.random.key(1), s.spec, 'stage1')
  for network in ('stage1', 'stage2'):
    spec = s.spec_for(2) if network == 'stage2' else s.spec
    fresh = state.create_train_state(s.train, spec, network)
    stepped, metrics = train.make_train_step(network, spec, s.train, 1)(
        fresh, batch, frozen if network == 'stage2' else None)
    assert int(stepped.step) == 1 and np.isfinite(float(metrics['loss']))


@pytest.fixture(scope='module')
def native_workdir(tmp_path_factory):
  root = tmp_path_factory.mktemp('native')
  config = native_config(**{'data.num_examples': 5, 'data.synthetic_sides': (70, 140),
                            'data.data_dir': str(root / 'tfds')})
  return config, save_random_networks(config, root / 'run')


def test_evaluate_scores_each_image_on_its_own_mask(native_workdir, tmp_path):
  from iterseg import data, metrics  # pylint: disable=g-import-not-at-top
  config, workdir = native_workdir
  workdir = shutil.copytree(workdir, tmp_path / 'run')
  s = settings.from_config(config)
  results = evaluate.run(s, str(workdir))
  rows = {r['method']: r for r in results['rows']}
  assert set(rows) == {'baseline', 'stage1', 'two_stage'} and results['resolution'] == 'native'
  from iterseg import checkpoints  # pylint: disable=g-import-not-at-top
  first = data.load_split(s.data, 'test')[0]
  nets = checkpoints.load_networks(str(workdir), s)
  pred = native.NativeModel(nets, s.spec).two_stage(first['image'])
  by_hand = metrics.one_image_metrics(pred.probs, first['mask'], 1)
  assert results['per_image']['two_stage_np2']['soft_dice'][0] == pytest.approx(
      by_hand['soft_dice'], rel=1e-5)
  assert rows['two_stage']['gflops'] < rows['baseline']['gflops']
  assert json.loads((workdir / 'results.json').read_text())['rows'] == json.loads(
      json.dumps(results['rows']))


def test_predict_writes_each_image_at_its_own_size(native_workdir, tmp_path):
  config, workdir = native_workdir
  for name, (h, w) in {'a.png': (50, 90), 'b.jpg': (130, 40), 'c.png': (60, 60)}.items():
    Image.fromarray(images((h, w))[0]).save(tmp_path / name)
  config = set_fields(config.copy_and_resolve_references(), **{
      'predict.input': str(tmp_path), 'predict.output': str(tmp_path / 'out')})
  result = predict.run(settings.from_config(config), str(workdir))
  for record in result['images']:
    h, w = record['height'], record['width']
    assert Image.open(record['mask']).size == (w, h) == Image.open(record['overlay']).size
  # Stage-1 px 7x12, 17x5, 8x8 -> buckets (8, 16), (24, 8), (8, 8): stage 1, the bands and the
  # paste three times each, stage 2 once.
  assert result['compiles'] == 3 + 3 + 3 + 1
  summary = json.loads((tmp_path / 'out' / 'summary.json').read_text())
  assert summary['resolution'] == 'native' and summary['compiles'] == result['compiles']


def test_the_native_benchmark_times_both_methods_against_size(native_workdir, tmp_path):
  from iterseg import benchmark  # pylint: disable=g-import-not-at-top
  config, workdir = native_workdir
  workdir = shutil.copytree(workdir, tmp_path / 'run')
  config = set_fields(config.copy_and_resolve_references(), **{'benchmark.native_sides': (64, 128),
                                                               'benchmark.repeats': 3})
  results = benchmark.run(settings.from_config(config), str(workdir))
  keys = [(r['size'], r['method']) for r in results['rows']]
  assert keys == [('64x64', 'two_stage'), ('64x64', 'baseline'), ('128x128', 'two_stage'),
                  ('128x128', 'baseline')]
  for r in results['rows']:
    assert r['latency_ms'] > 0 and 0 <= r['soft_dice'] <= 1 and r['gflops_per_image'] > 0
    assert r['repeats'] == 3  # Tiny images: every round fits the budget; the median of three.
    assert r['peak_rss_gb'] is None or r['peak_rss_gb'] > 0
  two_stage, dense = results['rows'][:2]
  assert two_stage['speedup_vs_baseline'] == dense['latency_ms'] / two_stage['latency_ms']
  assert (workdir / 'benchmark.png').read_bytes()[:4] == b'\x89PNG'


@pytest.mark.parametrize('fields, words', [
    ({'stage1_size': 12}, 'multiple of it'),
    ({'stage1_size': 4, 'model.depth': 2, 'num_patches': 8, 'train.num_patches_list': (8,)},
     'multiple of the downscale factor'),
    ({'train.num_patches_list': (2, 4)}, 'the one tile size'),
    ({'native.bucket': 6}, 'native.bucket=6'),
])
def test_native_geometry_is_checked(fields, words):
  with pytest.raises(settings.SettingsError, match=words):
    settings.from_config(native_config(**fields))


def test_calibrate_sweeps_the_share_of_tiles_and_load_uses_its_point(native_workdir, tmp_path):
  import iterseg  # pylint: disable=g-import-not-at-top
  from iterseg import calibrate  # pylint: disable=g-import-not-at-top
  config, workdir = native_workdir
  workdir = shutil.copytree(workdir, tmp_path / 'run')
  config = set_fields(config.copy_and_resolve_references(), **{
      'calibrate.refine_fractions': (0.25, 1.0), 'calibrate.max_dice_drop': 1.0,
      'calibrate.holdout': 0.5})
  result = calibrate.run(settings.from_config(config), str(workdir))
  assert [p['refine_fraction'] for p in result['points']] == [0.25, 1.0]
  fewer, every = result['points']
  assert fewer['gflops'] < every['gflops'] and every['refined_fraction'] == 1.0
  assert result['operating_point'] == {'num_patches': 2, 'refine_count': None,
                                       'refine_fraction': 0.25, 'threshold': None}
  assert Run(str(workdir)).operating_point() == result['operating_point']
  params, loaded = iterseg.load(str(workdir))
  assert loaded.native.refine_fraction == 0.25
  preds = iterseg.infer(params, images((40, 70), (90, 33)), loaded)  # A list of sizes.
  assert [p.probs.shape for p in preds] == [(40, 70, 1), (90, 33, 1)]


def test_native_infer_refuses_another_grid_instead_of_ignoring_it():
  config = native_config()
  nets = models.random_networks(settings.from_config(config).spec, jax.random.key(0))
  image = images((40, 50))[0]
  with pytest.raises(errors.InputError, match='num_patches=4: at native resolution.*leave'):
    native.infer(nets, image, config, num_patches=4)
  assert native.infer(nets, image, config, num_patches=2).probs.shape == (40, 50, 1)


def test_both_protocols_go_through_the_same_steps(monkeypatch):
  """normalize, select (lax.top_k), tile/patch scores, stage 2 and the U-Nets: the square batch and
  a native image call the same functions of `inference`, not copies."""
  calls = []
  for name in ('normalize', 'select', 'stage1_outputs', 'stage2_logits'):
    real = getattr(inference, name)
    monkeypatch.setattr(inference, name, lambda *a, _real=real, _name=name, **k: (
        calls.append(_name), _real(*a, **k))[1])
  config = native_config(halo=4, **{'model.width': 3})  # A width of its own: traced afresh.
  s = settings.from_config(config)
  nets = models.random_networks(s.spec, jax.random.key(0))
  native.NativeModel(nets, s.spec).two_stage(images((70, 90))[0], refine_fraction=0.5)
  native_calls, calls[:] = set(calls), []
  inference.two_stage(nets.at(2), jnp.zeros((1, 64, 64, 3), jnp.uint8), s.spec)
  assert native_calls == set(calls) == {'normalize', 'select', 'stage1_outputs', 'stage2_logits'}


@pytest.mark.parametrize('answer_at', [1, 2, 4, 6])
def test_a_stop_is_honoured_after_stage_1_between_bands_and_between_chunks(answer_at):
  """The stop is asked after stage 1 (1st question), between the bands of the upsampled map (2nd
  and 3rd: 2 bands of 512 rows) and between stage-2 chunks (4th on); the call ends at once."""
  s = settings.from_config(native_config(**{'native.chunk': 2}))
  model = native.NativeModel(models.random_networks(s.spec, jax.random.key(0)), s.spec)
  (image,) = images((600, 64))  # 19 x 2 tiles of 32 px; 20 % -> 8 tiles, 4 chunks of 2.
  asked = []

  def stop():
    asked.append(1)
    return len(asked) >= answer_at
  assert model.two_stage(image, refine_fraction=0.2, stop=stop) is None
  assert len(asked) == answer_at
  asked.clear()
  whole = model.two_stage(image, refine_fraction=0.2, stop=lambda: asked.append(1) and False)
  assert whole is not None and len(asked) == 1 + 2 + 4


def test_evaluate_skips_an_image_above_max_pixels_and_raising_the_limit_as_said_evaluates_it(
    native_workdir, tmp_path):
  """An image the native method refuses (above native.max_pixels) is skipped, named with its reason
  in results.json, the others are evaluated and the exit status says so; doing what the reason
  says (raise the limit to the number it names) evaluates every image."""
  config, workdir = native_workdir
  workdir = shutil.copytree(workdir, tmp_path / 'run')
  config = set_fields(config.copy_and_resolve_references(), **{  # Test: 95 x 125 and 106 x 91.
      'data.num_examples': 8, 'data.data_dir': str(tmp_path / 'tfds'), 'native.max_pixels': 10_000})
  with pytest.raises(errors.DataError, match=r'^1 of 2 images could not be read or segmented .*'
                     r'e.g. synthetic/00001: an image of 95 x 125 .* above config.native.max_pixels'
                     ) as e:
    evaluate.run(settings.from_config(config), str(workdir))
  saved = json.loads((workdir / 'results.json').read_text())
  assert saved['names'] == ['synthetic/00005'] and list(saved['skipped']) == ['synthetic/00001']
  at_least = int(re.search(r'raise it to at least (\d+)', str(e.value)).group(1))
  config.native.max_pixels = at_least  # What the line says.
  results = evaluate.run(settings.from_config(config), str(workdir))
  assert results['names'] == ['synthetic/00001', 'synthetic/00005'] and not results['skipped']


def test_calibrate_leaves_out_an_image_it_cannot_read_or_segment_and_names_both(
    native_workdir, tmp_path, monkeypatch):
  from iterseg import calibrate  # pylint: disable=g-import-not-at-top
  config, workdir = native_workdir
  workdir = shutil.copytree(workdir, tmp_path / 'run')
  config = set_fields(config.copy_and_resolve_references(), **{  # Held out: train 3, 4 and 5.
      'data.num_examples': 8, 'data.data_dir': str(tmp_path / 'tfds'), 'native.max_pixels': 15_000,
      'calibrate.refine_fractions': (0.25, 1.0), 'calibrate.holdout': 0.5})
  helpers.unreadable(monkeypatch, bad=5, split='train')
  with pytest.raises(errors.DataError, match=r'^2 of 3 images could not be read or segmented .*'
                     r'calibration.json'):
    calibrate.run(settings.from_config(config), str(workdir))
  saved = json.loads((workdir / 'calibration.json').read_text())
  assert sorted(saved['skipped']) == ['example 5', 'synthetic/00004']  # 130 x 139 px.
  assert 'above config.native.max_pixels=15000' in saved['skipped']['synthetic/00004']
  assert saved['num_images'] == 1 and len(saved['points']) == 2


def test_each_network_is_scored_on_the_validation_images_as_evaluate_measures_it(tmp_path):
  from iterseg import checkpoints, train  # pylint: disable=g-import-not-at-top
  config = native_config(**{'data.num_examples': 8, 'data.synthetic_sides': (70, 140),
                            'data.data_dir': str(tmp_path / 'tfds'), 'train.exclude_holdout': True,
                            'train.select_checkpoint': 'best', 'calibrate.holdout': 0.3})
  s = settings.from_config(config)
  workdir = str(tmp_path / 'run')
  train.train(s, workdir)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    scored = {r['network']: r[checkpoints.METRIC] for r in map(json.loads, f)
              if checkpoints.METRIC in r}
  assert set(scored) == {'stage1', 'stage2_np2', 'baseline'}
  _, validation = train.training_data(s)
  assert len(validation) == 2
  nets = checkpoints.load_networks(workdir, s)
  for network, params, key in (('baseline', nets.baseline, 'baseline'),
                               ('stage1', nets.stage1, 'stage1'),
                               ('stage2', nets.stage2[2], 'stage2_np2')):
    by_hand = evaluate.validation_score(s, network, params, validation, num_patches=2,
                                        stage1=nets.stage1)
    assert scored[key] == pytest.approx(by_hand, abs=1e-6)


def test_evaluate_times_each_whole_call_not_the_stats_of_its_async_steps(model, monkeypatch):
  import time  # pylint: disable=g-import-not-at-top
  (image,) = images((100, 90))
  real, stats = model.run, {}

  def slow(key, image, sink=None):  # Still working after its steps were dispatched.
    pred = real(key, image, sink)
    stats[key] = sum(pred.stats['seconds'].values())
    time.sleep(0.3)
    return pred
  monkeypatch.setattr(model, 'run', slow)
  segmenter = native.Native(model, 1)
  out = segmenter.measure({'image': [image], 'mask': [np.zeros((100, 90), np.uint8)],
                           'name': ['a']})
  assert set(out) == {'baseline', 'stage1', 'two_stage_np2'}
  for key, values in out.items():
    assert values['seconds'][0] >= 0.3 + stats[key] * 0.99
