"""--mode=ablate: each feature off and on, the variant that is not the workdir's trained in its own
folder from copies of the networks it does not touch, all evaluated on the same test split."""

import json

import numpy as np

from iterseg import ablation, settings
from iterseg.data.synthetic import make_synthetic_example
from tests.helpers import save_random_networks, tiny


def _ablate(data_dir, tmp_path, features):
  config = tiny(num_patches=4, **{'train.num_patches_list': (4,), 'data.num_examples': 16,
                                  'data.data_dir': str(data_dir), 'eval.batch_size': 5,
                                  'ablation.features': features})
  workdir = save_random_networks(config, tmp_path / 'run')
  out = ablation.run(settings.from_config(config), str(workdir))
  saved = json.loads((workdir / 'results.json').read_text())
  assert saved['ablation'] == json.loads(json.dumps(out['rows']))
  assert (workdir / 'ablation.png').read_bytes()[:4] == b'\x89PNG'
  return workdir, {(r['feature'], r['state']): r for r in out['rows']}


def test_ablation_reports_an_inference_feature_off_and_on_without_training(data_dir, tmp_path):
  workdir, rows = _ablate(data_dir, tmp_path, ('refine_budget',))
  assert set(rows) == {('refine_budget', 'off'), ('refine_budget', 'on')}
  assert rows[('refine_budget', 'off')]['workdir'] == str(workdir)  # The configured variant.
  assert rows[('refine_budget', 'on')]['value'] == 'batch'
  assert not (workdir / 'ablation' / 'refine_budget-on' / 'checkpoints' / 'stage2_np4' /
              'plan.json').exists()  # Inference only: nothing trained.


def test_ablation_retrains_what_a_training_feature_changes(data_dir, tmp_path):
  workdir, rows = _ablate(data_dir, tmp_path, ('stage2_init',))
  assert rows[('stage2_init', 'off')]['workdir'] == str(workdir)  # The configured variant.
  assert rows[('stage2_init', 'on')]['workdir'].endswith('ablation/stage2_init-on')
  retrained = workdir / 'ablation' / 'stage2_init-on'
  assert (retrained / 'checkpoints' / 'stage2_np4').is_dir()
  np.testing.assert_array_equal(  # Stage 1 copied, not retrained.
      sorted(p.name for p in (retrained / 'checkpoints' / 'stage1').iterdir()), ['1'])


def test_the_recipe_choices_have_their_paper_value_off_and_the_configured_one_on():
  from iterseg.configs import fundus  # pylint: disable=g-import-not-at-top
  s = settings.from_config(fundus.get_config())
  names = ('patch_sampling', 'rotate', 'brightness_contrast', 'gamma', 'lr_schedule',
           'select_checkpoint')
  pairs = {(name, state): (value, own) for name, state, value, own in ablation.variants(s, names)}
  assert pairs == {
      ('patch_sampling', 'off'): ('random', False),
      ('patch_sampling', 'on'): ('entropy_weighted', True),
      ('rotate', 'off'): (False, False), ('rotate', 'on'): (True, True),
      ('brightness_contrast', 'off'): (0.0, False), ('brightness_contrast', 'on'): (0.2, True),
      ('gamma', 'off'): (0.0, True), ('gamma', 'on'): (0.2, False),  # The recipe has none.
      ('lr_schedule', 'off'): ('constant', False), ('lr_schedule', 'on'): ('cosine', True),
      ('select_checkpoint', 'off'): ('last', False), ('select_checkpoint', 'on'): ('best', True)}


def test_synthetic_data_has_classes_when_asked():
  binary = make_synthetic_example(3, 64)
  classes = make_synthetic_example(3, 64, num_classes=3)
  np.testing.assert_array_equal(binary['image'], classes['image'])
  assert set(np.unique(classes['mask'])) == {0, 1, 2}
  np.testing.assert_array_equal(binary['mask'], classes['mask'] > 0)
