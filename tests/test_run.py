"""A run's directory (iterseg/run.py): what it holds is read back checked, one line per damage."""

import json

import pytest

from iterseg import errors, settings
from iterseg.run import Run
from tests.helpers import save_random_networks, tiny


@pytest.mark.parametrize('content', ['{"total_steps": ', '{"total_steps": "ten"}', '{}', '[]',
                                     '{"total_steps": -1}'])
def test_a_damaged_plan_is_one_line_naming_it_and_retraining_mends_it(tmp_path, content):
  save_random_networks(tiny(**{'train.networks': ('baseline',)}), tmp_path,
                       networks=('baseline',))
  run = Run(tmp_path)
  run.write_plan('baseline', 5)
  assert run.progress('baseline') == (1, 5)
  (tmp_path / 'checkpoints' / 'baseline' / 'plan.json').write_text(content)
  with pytest.raises(errors.CheckpointError, match='plan.json cannot be read.*rerun --mode=train') as e:
    run.check_finished(['baseline'], strict=False)
  assert '\n' not in str(e.value)
  run.write_plan('baseline', 5)  # What --mode=train does first.
  assert run.check_finished(['baseline'], strict=False) == ['baseline (step 1 of 5)']


def test_a_run_knows_its_networks_its_settings_and_its_plan(tmp_path):
  config = tiny()
  save_random_networks(config, tmp_path)
  run = Run(tmp_path)
  assert run.trained_networks() == ['baseline', 'stage1', 'stage2_np2', 'stage2_np4']
  assert run.trained_num_patches() == [2, 4]
  assert run.settings() == settings.from_config(config)
  assert run.progress('stage2_np4') == (1, None)  # No plan.json: nothing was planned.
  assert json.loads((tmp_path / 'config.json').read_text())['hi_size'] == 64


@pytest.mark.parametrize('damage, words', [
    (lambda text: text[:text.index(',', len(text) // 2) + 1],  # Truncated mid-write.
     'cannot be read (Expecting property name'),
    (lambda text: text.replace('"width": 4', '"width": "4"'),
     "config.model.width='4' is not valid"),
    (lambda text: text.replace('"hi_size": 64', '"hi_size": -64'), 'config.hi_size=-64 is not valid')],
                         ids=['truncated', 'mistyped', 'out-of-range'])
def test_a_damaged_config_json_names_the_file_and_the_field_and_its_backup_mends_it(tmp_path, damage,
                                                                                    words):
  run = Run(tmp_path)
  run.save_settings(settings.from_config(tiny()))
  backup = (tmp_path / 'config.json').read_text()
  (tmp_path / 'config.json').write_text(damage(backup))
  with pytest.raises(errors.CheckpointError, match='restore it from a backup') as e:
    run.settings()
  message = str(e.value)
  assert message.startswith(f'{tmp_path / "config.json"} cannot be read (') and words in message
  assert '\n' not in message
  (tmp_path / 'config.json').write_text(backup)  # What the line says.
  assert run.settings() == settings.from_config(tiny())
