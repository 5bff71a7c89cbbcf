"""input_norm='standardize': one rule, the training images' fixed statistics, the same in training
and at inference at any size, measured by --mode=train and saved with the run."""

import json

import jax
import numpy as np
import pytest

from iterseg import augment, checkpoints, cli, errors, inference, models, native, settings, train
from iterseg.data import synthetic
from iterseg.run import Run
from tests import launch_runs
from tests.helpers import save_random_networks, tiny

STATS = {'model.input_norm': 'standardize', 'model.input_mean': (0.6, 0.4, 0.3),
         'model.input_std': (0.2, 0.15, 0.1)}


def native_standardized(**overrides):
  """Crops of 64 px, stage 1 at 1/8, tiles of 32 px, the dense window the crop's side."""
  return tiny(**{'resolution': 'native', 'hi_size': 64, 'stage1_size': 8, 'num_patches': 2,
                 'refine_count': 2, 'train.num_patches_list': (2,), 'native.bucket': 8,
                 'native.chunk': 4, **STATS, **overrides})


def test_a_training_crop_and_the_same_pixels_at_inference_are_the_same_network_input():
  """An image of exactly the crop's side: what stage 1 and the baseline see of it in training
  (network_inputs on the normalised crop) is what native inference gives them, so their outputs
  agree. Per-image statistics (the crop's in training, the thumbnail's at inference) broke this."""
  s = settings.from_config(native_standardized())
  nets = models.random_networks(s.spec, jax.random.key(0))
  image = synthetic.make_synthetic_example(3, 64)['image']
  batch, masks = image[None], np.zeros((1, 64, 64), np.uint8)
  normalized = inference.normalize(batch, s.spec)
  key = jax.random.key(1)
  small, _ = train.network_inputs('stage1', key, normalized, masks, None, spec=s.spec,
                                  sampling='random')
  stage1 = inference.stage1_outputs(models.unet(s.spec, 'stage1').apply(
      {'params': nets.stage1}, small), s.spec)[0]
  dense, _ = train.network_inputs('baseline', key, normalized, masks, None, spec=s.spec,
                                  sampling='random')
  baseline = models.probabilities(models.unet(s.spec).apply({'params': nets.baseline}, dense))[0]

  model = native.NativeModel(nets, s.spec)
  np.testing.assert_allclose(model.two_stage(image).coarse, stage1, atol=1e-5)
  np.testing.assert_allclose(model.sliding_window(image).probs, baseline, atol=1e-5)


def test_brightness_and_contrast_jitter_survive_the_normalization():
  """A brightness shift b moves every standardised pixel by b / std (per-image standardisation
  removed it entirely), and a contrast change scales the deviations from the mean."""
  spec = settings.from_config(tiny(**STATS)).spec
  rng = np.random.default_rng(0)
  images = rng.uniform(0.3, 0.6, (64, 16, 16, 3)).astype(np.float32)
  masks = np.zeros((64, 16, 16), np.uint8)
  jittered, _ = augment.augment(jax.random.key(0), images, masks, flip=False,
                                brightness_contrast=0.1, rotate=False, p=0.5)
  moved = np.asarray(inference.normalize(jittered, spec) - inference.normalize(images, spec))
  changed = np.abs(moved).max(axis=(1, 2, 3)) > 1e-3
  assert 10 < changed.sum() < 64  # About three in four examples get at least one of the two.
  for i in np.flatnonzero(changed):  # In raw units the change is the augmentation's, undone by none.
    np.testing.assert_allclose(moved[i] * np.asarray(spec.input_std),
                               np.asarray(jittered[i]) - images[i], atol=1e-5)
  per_image = lambda x: (x - x.mean((1, 2), keepdims=True)) / x.std((1, 2), keepdims=True)
  brightened = np.clip(images + 0.05, 0, 1)
  np.testing.assert_allclose(per_image(brightened), per_image(images), atol=1e-4)  # The old rule.
  assert np.abs(inference.normalize(brightened, spec) - inference.normalize(images, spec)).min() > 0.2


def test_input_statistics_are_the_mean_and_std_over_every_pixel_of_every_image():
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((5, 7), (20, 3))]
  mean, std = inference.input_statistics(images)
  pixels = np.concatenate([i.reshape(-1, 3) for i in images]) / 255.0
  np.testing.assert_allclose(mean, pixels.mean(0), rtol=1e-9)
  np.testing.assert_allclose(std, pixels.std(0), rtol=1e-9)


def test_standardize_without_statistics_is_one_line_naming_the_fields():
  s = settings.from_config(tiny(**{'model.input_norm': 'standardize'}))
  nets = models.random_networks(s.spec, jax.random.key(0))
  with pytest.raises(errors.InputError, match='input_mean and input_std are unset'):
    inference.infer(nets, np.zeros((1, 64, 64, 3), np.uint8), settings.to_config(s))
  with pytest.raises(settings.SettingsError, match='set both'):
    settings.from_config(tiny(**{'model.input_mean': (0.5, 0.5, 0.5)}))
  with pytest.raises(settings.SettingsError, match='model.input_std'):
    settings.from_config(tiny(**{'model.input_mean': (0.5, 0.5, 0.5),
                                 'model.input_std': (0.1, 0.0, 0.1)}))


def test_training_measures_the_statistics_saves_them_and_evaluate_uses_them(data_dir, tmp_path):
  """--mode=train on a config without statistics measures them on the train split, saves them in
  config.json, and a later --mode=evaluate with the same (statistics-free) config uses the run's;
  a config with other statistics is refused in one line."""
  from iterseg import data  # pylint: disable=g-import-not-at-top
  one_step = {'model.input_norm': 'standardize', 'train.networks': ('baseline',),
              'train.baseline_epochs': 1}
  config = launch_runs.tiny_config(data_dir, **one_step)  # The session's prepared data.
  workdir = str(tmp_path / 'run')
  results = cli.run('train', config, workdir)
  saved = json.loads((tmp_path / 'run' / 'config.json').read_text())['model']
  source = data.load_split(settings.from_config(config).data, 'train')
  mean, std = inference.input_statistics(source[i]['image'] for i in range(len(source)))
  np.testing.assert_allclose(saved['input_mean'], mean, rtol=1e-6)
  np.testing.assert_allclose(saved['input_std'], std, rtol=1e-6)
  again = cli.run('evaluate', config, workdir)
  assert again['rows'][0]['soft_dice'] == pytest.approx(results['rows'][0]['soft_dice'])
  other = launch_runs.tiny_config(data_dir, **{**one_step, **STATS})
  with pytest.raises(checkpoints.CheckpointError, match='model.input_mean'):
    cli.run('evaluate', other, workdir)


def test_a_run_trained_with_per_image_standardisation_is_refused_in_one_line(tmp_path):
  """Its config.json says 'standardize' without statistics (what iterseg wrote before they were
  fixed): evaluating or loading it is refused, naming the rule and what to do."""
  save_random_networks(tiny(**STATS), tmp_path)
  path = tmp_path / 'config.json'
  saved = json.loads(path.read_text())
  saved['model'].pop('input_mean'), saved['model'].pop('input_std')
  path.write_text(json.dumps(saved))
  for attempt in (lambda: cli.run('evaluate', tiny(**{'model.input_norm': 'standardize'}),
                                  str(tmp_path)),
                  lambda: Run(str(tmp_path)).with_statistics(settings.from_config(tiny()))):
    with pytest.raises(checkpoints.CheckpointError, match='per image.*train it again') as e:
      attempt()
    assert '\n' not in str(e.value)
