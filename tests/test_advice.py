"""Advice that works: every error message that tells the user what to do is triggered here, then its
advice is followed literally (the value it names, the file it says to delete, the command it says to
run), and what failed then works.

Followed elsewhere, beside the test that triggers them: a damaged calibration.json, plan.json,
config.json, results.json, metrics.jsonl line, summary part or prepared dataset (test_calibrate,
test_run, test_benchmark, test_train, test_predict, test_data), a truncated checkpoint
(test_errors), an image above native.max_pixels (test_native), an interrupted training or predict
(test_interruptions, test_predict), a prepare with bad pairs (test_errors, test_data), a workdir or
dataset in use (test_lock), a checkpoint that cannot be written (test_interruptions), an export
into a folder of other files (test_export), a network whose training stopped (test_evaluate).
"""

import ast
import errno
import os
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import iterseg
from iterseg import cli, errors, files, native, predict, settings
from iterseg.data import pipeline
from iterseg.run import Run
from tests import launch_runs
from tests.helpers import save_random_networks, set_fields, tiny


def advice(error_type, call) -> str:
  """The one-line message of the `error_type` that `call()` raises."""
  with pytest.raises(error_type) as e:
    call()
  assert '\n' not in str(e.value)
  return str(e.value)


def listed(message: str, after: str) -> list:
  """The values `message` lists after `after`: a list or tuple literal, or 'a', 'b' to its end."""
  rest = message.split(after, 1)[1].strip()
  literal = re.match(r'[\[(].*?[\])]', rest)
  return list(ast.literal_eval(literal.group(0) if literal else f'({rest.rstrip(".")},)'))


# --- The config -----------------------------------------------------------------------------------


def test_choose_one_of_the_configs_modes_and_datasets_listed():
  for name in listed(advice(errors.SettingsError, lambda: iterseg.get_config('nope')),
                     'choose one of'):
    assert settings.from_config(iterseg.get_config(name))
  modes = listed(advice(errors.SettingsError, lambda: cli.run('nope', tiny(), '/nowhere')),
                 'choose one of')
  for mode in modes:  # Each is a mode: the config is read next (and its mistake named).
    assert 'unknown field' in advice(errors.SettingsError, lambda: cli.run(
        mode, set_fields(tiny(), **{'train.nope': 1}), '/nowhere'))
  from iterseg import data  # pylint: disable=g-import-not-at-top
  message = advice(errors.SettingsError,
                   lambda: settings.from_config(tiny(**{'data.name': 'nope'})))
  for name in listed(message, 'choose one of'):
    try:  # Known: at most its own files are missing.
      data.make_builder(settings.from_config(tiny(**{'data.name': name})).data)
    except errors.DataError as e:
      assert 'unknown dataset' not in str(e)


def test_an_unknown_field_or_a_whole_section_set_as_the_message_says():
  message = advice(errors.SettingsError,
                   lambda: settings.from_config(set_fields(tiny(), **{'model.widht': 8})))
  close = re.search(r'did you mean (\S+)\?', message).group(1)
  assert settings.from_config(set_fields(tiny(), **{close: 8})).spec.width == 8
  saved = settings.to_dict(settings.from_config(tiny()))  # As a config.json holds it.
  assert 'set its fields instead' in advice(errors.SettingsError,
                                            lambda: settings.from_json(dict(saved, model=8)))
  assert settings.from_json(dict(saved, model=dict(saved['model'], width=8))).spec.width == 8


def test_np_among_the_divisors_it_lists_and_the_depth_it_allows(data_dir):
  config = launch_runs.tiny_config(data_dir, num_patches=5)
  message = advice(errors.SettingsError, lambda: settings.from_config(config))
  suggested = listed(message, '(e.g.')
  assert suggested
  for n in suggested:  # Each divisor it names fits the rest of the config (a 3-level U-Net).
    assert settings.from_config(set_fields(config, num_patches=n)).spec.num_patches == n
  deep = tiny(**{'model.depth': 6})
  depth = int(re.search(r'Use depth <= (\d+)', advice(
      errors.SettingsError, lambda: settings.from_config(deep))).group(1))
  assert settings.from_config(set_fields(deep, **{'model.depth': depth})).spec.depth == depth


def test_input_statistics_both_or_neither_and_a_latency_budget():
  half = lambda **more: tiny(**{'model.input_norm': 'standardize',
                                'model.input_mean': (0.5, 0.5, 0.5), **more})
  assert 'set both' in advice(errors.SettingsError, lambda: settings.from_config(half()))
  assert settings.from_config(half(**{'model.input_std': (0.2, 0.2, 0.2)}))  # Both.
  assert settings.from_config(half(**{'model.input_mean': None}))  # Neither.
  latency = tiny(**{'calibrate.target': 'latency'})
  assert 'set it > 0' in advice(errors.SettingsError, lambda: settings.from_config(latency))
  assert settings.from_config(set_fields(latency, **{'calibrate.latency_budget_ms': 10.0}))


@pytest.mark.parametrize('batch_size, examples, devices', [(6, 11, 4), (11, 11, 4), (12, 11, 4),
                                                           (10, 9, 4), (8, 50, 3), (3, 3, 4)])
def test_the_batch_sizes_it_suggests_split_over_the_devices_and_fit_the_examples(
    batch_size, examples, devices):
  message = advice(errors.SettingsError, lambda: pipeline.check_batch_size(
      batch_size, examples, 1, devices))
  if 'add training examples' in message:  # Fewer examples than devices: no batch size can do.
    pipeline.check_batch_size(devices, devices, 1, devices)
    return
  found = re.search(r'\(e\.g\. (\d+)(?: or (\d+))?\)|at most (\d+)\.', message)
  for suggested in filter(None, found.groups()):
    pipeline.check_batch_size(int(suggested), examples, 1, devices)


# --- Inference ------------------------------------------------------------------------------------


def test_the_statistics_of_the_trained_run_from_load_and_a_trained_np(tmp_path):
  config = tiny(**{'model.input_norm': 'standardize', 'model.input_mean': (0.4, 0.5, 0.6),
                   'model.input_std': (0.2, 0.2, 0.2), 'train.num_patches_list': (4,)})
  save_random_networks(config, tmp_path, networks=('stage1', 'stage2'))
  params, _ = iterseg.load(str(tmp_path))
  images = np.zeros((1, 64, 64, 3), np.uint8)
  bare = set_fields(config.copy_and_resolve_references(), **{'model.input_mean': None,
                                                             'model.input_std': None})
  message = advice(errors.InputError, lambda: iterseg.infer(params, images, bare))
  assert 'iterseg.load(workdir) returns it' in message
  _, loaded = iterseg.load(str(tmp_path))  # What it says.
  assert iterseg.infer(params, images, loaded).probs.shape == (1, 64, 64, 1)
  message = advice(errors.InputError, lambda: iterseg.infer(params, images, loaded, num_patches=8))
  for n in listed(message, 'pass num_patches= one of'):
    assert iterseg.infer(params, images, loaded, num_patches=n).probs.shape == (1, 64, 64, 1)
  message = advice(errors.CheckpointError, lambda: Run(tmp_path).inference_settings(
      settings.from_config(tiny(num_patches=8, **{'train.num_patches_list': (8,)})),
      fallback=False))
  n = listed(message, '(trained:')[0]  # 'set --config.num_patches ... to one of them'.
  assert Run(tmp_path).inference_settings(settings.from_config(tiny(num_patches=n)),
                                          fallback=False).spec.num_patches == n
  message = advice(errors.CheckpointError, lambda: Run(tmp_path).check_geometry(
      settings.from_config(tiny(**{'model.width': 8}))))
  flags = re.findall(r'--config\.(\S+?)=(.+?)(?= --config\.|\)\.$)', message)
  assert len(flags) == 4  # input_norm, input_mean, input_std and width: all, not the first.
  Run(tmp_path).check_geometry(settings.from_config(set_fields(
      tiny(**{'model.width': 8}), **{field: ast.literal_eval(value) for field, value in flags})))


def test_native_num_patches_left_out_and_an_image_cut_into_the_rows_that_fit(monkeypatch):
  config = tiny(**{'resolution': 'native', 'hi_size': 64, 'stage1_size': 8, 'num_patches': 2,
                   'refine_count': 2, 'train.num_patches_list': (2,), 'native.bucket': 8})
  params = iterseg.init_params(config, jax.random.key(0))
  image = np.zeros((60, 100, 3), np.uint8)
  assert 'leave num_patches out' in advice(
      errors.InputError, lambda: iterseg.infer(params, image, config, num_patches=4))
  assert iterseg.infer(params, image, config).probs.shape == (60, 100, 1)
  s = settings.from_config(config)
  working = 256 * 2 ** 20 + native.BAND_ROWS * 100 * 4 * (1 + 3)  # native.check_fits's.
  monkeypatch.setattr(native, 'memory_available', lambda: working + 4 * 2555)  # 25.55 rows.
  message = advice(errors.InputError, lambda: native.check_fits(60, 100, s.spec))
  rows = int(re.search(r'parts of at most (\d+) rows of 100 px', message).group(1))
  for top in range(0, 60, rows):  # What it says: each part fits.
    native.check_fits(len(image[top:top + rows]), 100, s.spec)


# --- Files and folders ----------------------------------------------------------------------------


def test_another_folder_when_one_cannot_be_written_or_replaced(tmp_path, monkeypatch):
  real_open, real_replace = os.open, os.replace

  def full(path, *args, **kwargs):
    if str(tmp_path / 'full') in str(path):
      raise OSError(errno.ENOSPC, 'No space left on device', path)
    return real_open(path, *args, **kwargs)
  monkeypatch.setattr(files.os, 'open', full)
  assert 'choose another --workdir' in advice(errors.WriteError,
                                              lambda: files.check_writable(tmp_path / 'full'))
  files.check_writable(tmp_path / 'another')

  def busy(src, dst):  # A mount point cannot be renamed.
    if os.path.basename(src) == 'mount':
      raise OSError(errno.EBUSY, 'Device or resource busy')
    return real_replace(src, dst)
  monkeypatch.setattr(os, 'replace', busy)
  (tmp_path / 'mount').mkdir()

  def replace(folder):
    with files.replaced_folder(folder) as tmp:
      Path(tmp, 'a').write_text('1')
  assert 'choose a folder inside it' in advice(errors.WriteError,
                                               lambda: replace(tmp_path / 'mount'))
  replace(tmp_path / 'mount' / 'inside')
  assert (tmp_path / 'mount' / 'inside' / 'a').read_text() == '1'


def test_predict_input_set_to_a_file_or_a_folder_of_images(tmp_path):
  image = tmp_path / 'images' / 'a.png'
  image.parent.mkdir()
  assert 'set --config.predict.input=' in advice(errors.InputError,
                                                 lambda: predict.list_inputs(''))
  assert 'point it at an image file' in advice(
      errors.InputError, lambda: predict.list_inputs(str(tmp_path / 'nowhere')))
  assert 'put images there' in advice(errors.InputError,
                                      lambda: predict.list_inputs(str(image.parent)))
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(image)
  assert predict.list_inputs(str(image.parent)) == predict.list_inputs(str(image)) == [image]


# --- Data -----------------------------------------------------------------------------------------


def test_a_damaged_split_deleted_as_said_is_prepared_anew(data_dir, tmp_path):
  from iterseg import data  # pylint: disable=g-import-not-at-top
  copy = shutil.copytree(data_dir, tmp_path / 'tfds')
  (path,) = copy.rglob('*-test.array_record-*')
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  spec = settings.from_config(launch_runs.tiny_config(copy)).data

  def read():
    examples = data.load_split(spec, 'test')
    return [examples[i] for i in range(len(examples))]
  message = advice(errors.DataError, read)
  assert 'Delete that folder and run again' in message
  shutil.rmtree(re.search(r'the prepared dataset (\S+) ', message).group(1))
  assert len(read()) == 5


def test_the_raw_files_set_as_manual_dir_prepare_a_dataset(tmp_path):
  import fixtures  # pylint: disable=g-import-not-at-top
  from iterseg import data  # pylint: disable=g-import-not-at-top
  spec = fixtures.config(tmp_path / 'tfds', 'ph2', '')
  assert 'set config.data.manual_dir to the raw files' in advice(errors.DataError,
                                                                 lambda: data.prepare(spec))
  manual = fixtures.write_ph2(tmp_path / 'raw', num_cases=4)
  stats = data.prepare(fixtures.config(tmp_path / 'tfds', 'ph2', manual))
  assert stats['train'] + stats['test'] == 4


# --- A workdir ------------------------------------------------------------------------------------


def test_training_as_the_messages_say_mends_a_workdir(trained, data_dir, capsys):
  """Another config: the flags it names (or the training config) work again; stage 1 deleted:
  deleting the stage 2 it names and training again gives a workdir that loads; no baseline for
  'dice_drop': the 'latency' target (with the budget its config then asks for) calibrates."""
  from iterseg import checkpoints  # pylint: disable=g-import-not-at-top
  config = launch_runs.tiny_config(data_dir)
  other = lambda: launch_runs.tiny_config(data_dir, **{'model.width': 8, 'model.depth': 2})
  message = advice(errors.CheckpointError, lambda: cli.run('train', other(), str(trained)))
  flags = re.findall(r'--config\.(\S+?)=(.+?)(?= --config\.|\)\.$)', message)
  assert len(flags) == 2  # Every field that differs, not the first alone.
  cli.run('train', set_fields(other(), **{f: ast.literal_eval(v) for f, v in flags}), str(trained))
  assert 'Use the config it was trained with' in advice(errors.CheckpointError, lambda: (
      checkpoints.load_network(str(trained), 'stage1', settings.from_config(other()))))
  assert checkpoints.load_network(str(trained), 'stage1', settings.from_config(config))
  shutil.rmtree(trained / 'checkpoints' / 'stage1')
  message = advice(errors.CheckpointError, lambda: iterseg.load(str(trained)))
  named = re.search(r'delete (.*) too and rerun `--mode=train`', message).group(1)
  for folder in named.split(', '):
    shutil.rmtree(folder)
  cli.run('train', config, str(trained))
  params, _ = iterseg.load(str(trained))
  assert params.stage1 is not None and sorted(params.stage2) == [4]
  message = advice(errors.CheckpointError, lambda: cli.run('calibrate', config, str(trained)))
  assert "use calibrate.target='latency'" in message
  latency = set_fields(config, **{'calibrate.target': 'latency', 'calibrate.refine_counts': (1,),
                                  'calibrate.latency_budget_ms': 1e6})
  assert cli.run('calibrate', latency, str(trained))['operating_point']['refine_count'] == 1
  capsys.readouterr()
