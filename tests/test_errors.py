"""Bad input: one error that names the thing and what to do, and nothing good overwritten.

In-process through `cli.run`, as launch.py calls it: every refusal is an `errors.Error` whose message
is one line (launch.py prints it as `iterseg: error: <message>` and exits 1). Two subprocess tests
pin that contract end to end: exit status, exactly one error line, no traceback on stderr.

Covered elsewhere, through the library: NaN or inf images given to `iterseg.infer`
(test_inference.py::test_bad_images_get_a_clear_error), every data-layer error with its file names
(test_data.py: missing files and folders, truncated images, size mismatches), grey, palette and RGBA
inputs converted (test_data.py::test_folder_reads_mixed_formats_exactly,
test_predict.py::test_outputs_have_the_size_of_each_input_whatever_its_mode).
"""

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from iterseg import checkpoints, cli, errors, settings
from tests import helpers, launch_runs
from tests.helpers import tiny
from tests.launch_runs import STAGE2_STEPS


def refused(mode, config, workdir, *words) -> str:
  """The one-line message of the errors.Error that `cli.run(mode, ...)` raises; it holds `words`."""
  with pytest.raises(errors.Error) as error:
    cli.run(mode, config, str(workdir))
  message = str(error.value)
  assert '\n' not in message, message
  for word in words:
    assert word in message, message
  return message


def write_cases(root, shapes: dict) -> dict:
  """root/images/<stem>.png and root/masks/<stem>.png; shapes: {stem: (image mode, h, w, mask h)}."""
  rng = np.random.default_rng(0)
  paths = {}
  for stem, (mode, h, w, mask_h) in shapes.items():
    for kind in ('images', 'masks'):
      (root / kind).mkdir(parents=True, exist_ok=True)
    channels = {'L': 1, 'RGB': 3, 'RGBA': 4}[mode]
    pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode).save(root / 'images' / f'{stem}.png')
    mask = (rng.random((mask_h, w)) < 0.3).astype(np.uint8) * 255
    Image.fromarray(mask).save(root / 'masks' / f'{stem}.png')
    paths[stem] = root / 'images' / f'{stem}.png'
  return paths


def folder_config(tmp_path, manual_dir):
  return tiny(hi_size=32, **{'model.depth': 2, 'data.name': 'folder',
                             'data.manual_dir': str(manual_dir),
                             'data.data_dir': str(tmp_path / 'tfds')})


# --- The one-line contract, end to end -----------------------------------------------------------


def test_a_config_mistake_on_the_command_line_or_in_a_file_is_one_line(subprocess_env, tmp_path):
  (tmp_path / 'typo.py').write_text('from iterseg.configs import default\n\n\ndef get_config():\n'
                                    '  c = default.get_config()\n  c.train.bach_size = 8\n'
                                    '  return c\n')
  (tmp_path / 'nothing.py').write_text('def get_config():\n  pass\n')
  (tmp_path / 'mistyped.py').write_text('from iterseg.configs import default\n\n\ndef get_config():\n'
                                        '  c = default.get_config()\n  c.model.width = 8.5\n'
                                        '  return c\n')
  for flags, expected in [
      ([f'--config={tmp_path}/mistyped.py'], 'mistyped.py, line 6: c.model.width = 8.5: TypeError: '
                                             "Could not override field 'width'"),
      (['--config.train.nope=1'], '--config.train.nope: unknown config key'),
      (['--config.model.widht=8'], 'Did you mean "width"'),
      (['--config=configs/ph2.py', '--config.nope.deeper=1'],
       '--config.nope.deeper: unknown config key'),
      ([f'--config={tmp_path}/typo.py'], 'unknown field train.bach_size; did you mean '
                                         'train.batch_size'),
      ([f'--config={tmp_path}/nothing.py'], 'get_config() returned NoneType, not an '
                                            'ml_collections.ConfigDict')]:
    result = launch_runs.run('--mode=prepare', *flags, f'--workdir={tmp_path}/run',
                             env=subprocess_env)
    line = helpers.one_line_error(result)
    assert expected in line and 'configs/default.py' in line and 'Traceback' not in line
    assert len(line) < 300 + len(str(tmp_path))
    assert not (tmp_path / 'run').exists()


def test_a_truncated_checkpoint_is_one_line_and_deleting_it_resumes(reference, trained, data_dir,
                                                                    subprocess_env):
  step_dir = trained / 'checkpoints' / 'stage2_np4' / str(STAGE2_STEPS)
  for path in (step_dir / 'default' / 'd').iterdir():
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  before = helpers.snapshot(trained)
  line = helpers.one_line_error(launch_runs.run(*launch_runs.tiny_flags(trained, data_dir),
                                                env=subprocess_env))
  assert f'{step_dir} is damaged or incomplete' in line and 'Delete that folder' in line
  assert helpers.snapshot(trained) == before
  shutil.rmtree(step_dir)  # As the message says: training resumes from the step before.
  cli.run('train', launch_runs.tiny_config(data_dir), str(trained))
  helpers.assert_same_bits(helpers.read_checkpoint(reference, 'stage2_np4', STAGE2_STEPS),
                           helpers.read_checkpoint(trained, 'stage2_np4', STAGE2_STEPS))


# --- Data -------------------------------------------------------------------------------------------


def test_a_missing_data_folder_is_named(tmp_path):
  refused('prepare', folder_config(tmp_path, tmp_path / 'nowhere'), tmp_path / 'run',
          f'manual_dir {tmp_path / "nowhere"} does not exist', 'images/')


def test_a_corrupted_image_is_named_and_the_good_pairs_are_prepared(tmp_path, capsys):
  """One bad pair never stops a prepare: it is named with its reason, the others are prepared, and
  the exit status says some failed; the next command goes on with them."""
  paths = write_cases(tmp_path / 'raw', {s: ('RGB', 40, 48, 40) for s in 'abcdef'})
  paths['b'].write_bytes(paths['b'].read_bytes()[:100])  # Truncated.
  config = folder_config(tmp_path, tmp_path / 'raw')
  refused('prepare', config, tmp_path / 'run', '1 of 6 cases could not be read',
          f'cannot read image {paths["b"]}', 'holds the other 5')
  assert 'left out b.png: ' in capsys.readouterr().out
  assert cli.run('prepare', config, str(tmp_path / 'run'))['train'] + cli.run(
      'prepare', config, str(tmp_path / 'run'))['test'] == 5


def test_an_image_and_mask_of_different_sizes_are_both_named(tmp_path):
  write_cases(tmp_path / 'raw', {'a': ('RGB', 40, 48, 40), 'b': ('RGB', 40, 48, 40),
                                 'c': ('RGB', 40, 48, 30)})
  refused('prepare', folder_config(tmp_path, tmp_path / 'raw'), tmp_path / 'run',
          'size mismatch', 'images/c.png is 48x40', 'masks/c.png is 48x30', 'left out')


def test_grey_and_rgba_images_are_converted_not_refused(tmp_path, capsys):
  write_cases(tmp_path / 'raw', {'a': ('L', 40, 48, 40), 'b': ('RGBA', 40, 48, 40),
                                 'c': ('RGB', 40, 48, 40)})
  stats = cli.run('prepare', folder_config(tmp_path, tmp_path / 'raw'), str(tmp_path / 'run'))
  assert (stats['train'], stats['test']) == (2, 1)
  assert 'train: 2, test: 1' in capsys.readouterr().out


# --- Config -----------------------------------------------------------------------------------------


def test_an_unknown_field_in_a_config_is_named_with_the_closest_one(trained, data_dir):
  before = helpers.snapshot(trained)
  config = launch_runs.tiny_config(data_dir)
  config.train.bach_size = 8  # As a config file would: c.train.bach_size = 8.
  refused('train', config, trained, 'unknown field train.bach_size', 'did you mean train.batch_size')
  assert helpers.snapshot(trained) == before


def test_hi_size_not_divisible_by_np_fails_before_touching_the_workdir(trained, data_dir):
  before = helpers.snapshot(trained)
  refused('train', launch_runs.tiny_config(data_dir, num_patches=5), trained,
          'hi_size=64 is not divisible by num_patches (Np)=5', 'divisors')
  assert helpers.snapshot(trained) == before


# --- Checkpoints ------------------------------------------------------------------------------------


def test_a_checkpoint_of_another_config_is_refused(trained, data_dir):
  before = helpers.snapshot(trained)
  refused('train', launch_runs.tiny_config(data_dir, **{'model.width': 8}), trained,
          'config.model.width=8', 'trained with 4')
  assert helpers.snapshot(trained) == before
  # Without the workdir's config.json to compare with, the checkpoint's own shapes say it.
  with pytest.raises(errors.CheckpointError, match=r'stage1/4 was written with another config: '
                     r'\d+ arrays differ, e.g. params\.\S+ is \(\S+\) there but \(\S+\)'):
    checkpoints.load_network(str(trained), 'stage1', settings.from_config(tiny(**{'model.width': 8})))


# --- Predict ----------------------------------------------------------------------------------------


def test_predict_on_an_empty_folder(trained, data_dir, tmp_path):
  (trained / 'predictions').mkdir()
  (trained / 'predictions' / 'earlier_mask.png').write_bytes(b'a result of an earlier run')
  (tmp_path / 'empty').mkdir()
  before = helpers.snapshot(trained)
  refused('predict', launch_runs.tiny_config(data_dir, **{'predict.input': str(tmp_path / 'empty')}),
          trained, f'no image files in folder {tmp_path / "empty"}')
  assert helpers.snapshot(trained) == before


def test_an_internal_error_is_not_shown_as_a_user_error(monkeypatch, data_dir, tmp_path):
  """A bug (here a ValueError from deep inside) keeps its traceback: launch.py shows only
  cli.USER_ERRORS as one line."""
  from iterseg import evaluate  # pylint: disable=g-import-not-at-top
  def broken(*args, **kwargs):
    raise ValueError('an internal bug')
  monkeypatch.setattr(evaluate, 'run', broken)
  with pytest.raises(ValueError, match='an internal bug') as error:
    cli.run('evaluate', launch_runs.tiny_config(data_dir), str(tmp_path / 'run'))
  assert not isinstance(error.value, cli.USER_ERRORS)
  assert isinstance(errors.SettingsError('x'), cli.USER_ERRORS)


def test_orbax_worker_tracebacks_are_not_shown_beside_the_one_line(capsys):
  """A failed checkpoint read reaches the caller (one CheckpointError line); the copies that orbax's
  worker threads and asyncio log, with tracebacks, are dropped at the default verbosity only."""
  import logging as std_logging  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  future_py = os.path.join(os.path.dirname(checkpoints.ocp.__file__), '_src', 'futures',
                           'future.py')

  def emitted(verbosity) -> list:
    kept = []
    handler = std_logging.Handler()
    handler.emit = kept.append
    previous = logging.get_verbosity()
    logging.set_verbosity(verbosity)
    try:
      for name, path, message in [
          ('absl', future_py, '_SignalingThread.run() raised an exception: OUT_OF_RANGE'),
          ('asyncio', 'asyncio/base_events.py', 'Task exception was never retrieved'),
          ('absl', 'train.py', 'something else')]:
        logger = std_logging.getLogger(name)
        logger.addHandler(handler)
        try:
          logger.handle(logger.makeRecord(name, std_logging.ERROR, path, 1, message, (), None))
        finally:
          logger.removeHandler(handler)
    finally:
      logging.set_verbosity(previous)
    return [r.getMessage() for r in kept]

  assert emitted(logging.WARNING) == ['something else']
  assert len(emitted(logging.INFO)) == 3


# --- A refused command leaves the workdir exactly as it was ----------------------------------------


def _delete(*names):
  def prepare(workdir, data_dir):
    for name in names:
      shutil.rmtree(workdir / 'checkpoints' / name)
    return data_dir
  return prepare


def _damaged_test_split(workdir, data_dir):
  copy = shutil.copytree(data_dir, workdir.parent / 'tfds-damaged')
  (path,) = copy.rglob('*-test.array_record-*')
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  return copy


def _no_dataset_info(workdir, data_dir):
  copy = shutil.copytree(data_dir, workdir.parent / 'tfds-no-info')
  (path,) = copy.rglob('dataset_info.json')
  path.unlink()
  return copy


REFUSALS = [  # (mode, config fields, how the workdir is prepared, words of the one line)
    ('train', {'train.batch_size': 6}, None, 'batch_size=6 does not split evenly over 1 process'),
    ('train', {'train.batch_size': 12}, None, 'larger than the 11 training examples'),
    ('train', {'model.width': 8}, None, 'trained with 4'),
    ('train', {'data.name': 'folder', 'data.manual_dir': '/nowhere'}, None, 'does not exist'),
    ('train', {'train.networks': ('stage2',)}, _delete('stage1'), 'no checkpoint of stage1'),
    ('train', {'train.stage1_epochs': 3, 'train.batch_size': 5}, None, 'does not split evenly'),
    ('evaluate', {}, _delete('stage1'), 'stage1 is missing'),
    ('evaluate', {'model.depth': 2}, None, 'config.model.depth=2'),
    ('evaluate', {}, _damaged_test_split, 'cannot be read'),
    ('evaluate', {}, _no_dataset_info, 'dataset_info.json is missing. Delete that folder'),
    ('predict', {'num_patches': 2}, None, 'no stage 2 trained for Np=2'),
    ('predict', {}, _delete('stage1'), 'stage1 is missing'),
    ('predict', {}, _delete('stage1', 'stage2_np4'), 'has no trained stage 2'),
    ('calibrate', {}, None, 'compares with the baseline'),
    ('ablate', {'train.batch_size': 6, 'ablation.features': ('stage2_init',)}, None,
     'does not split evenly'),
]


@pytest.mark.parametrize('mode, fields, prepare, words', REFUSALS,
                         ids=[f'{m}-{"-".join(f) or (p.__name__ if p else "")}'
                              for m, f, p, _ in REFUSALS])
def test_a_refused_command_leaves_the_workdir_exactly_as_it_was(trained, data_dir, tmp_path, capfd,
                                                                mode, fields, prepare, words):
  data = prepare(trained, data_dir) if prepare else data_dir
  image = tmp_path / 'in.png'
  Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(image)
  config = launch_runs.tiny_config(data, **{'predict.input': str(image), **fields})
  before = helpers.snapshot(trained)
  names = sorted(p.relative_to(trained) for p in trained.rglob('*'))
  capfd.readouterr()
  refused(mode, config, trained, words)
  assert helpers.snapshot(trained) == before  # Names, sizes and bytes of every file.
  assert sorted(p.relative_to(trained) for p in trained.rglob('*')) == names  # Folders too.
  assert 'Traceback' not in capfd.readouterr().err


def test_a_refused_command_leaves_no_new_workdir(data_dir, tmp_path):
  workdir = tmp_path / 'new'
  refused('train', launch_runs.tiny_config(data_dir, **{'train.batch_size': 6}), workdir,
          'does not split evenly')
  assert not workdir.exists()


def test_load_names_a_missing_network_and_how_to_recover(trained):
  import iterseg  # pylint: disable=g-import-not-at-top
  shutil.rmtree(trained / 'checkpoints' / 'stage1')
  with pytest.raises(errors.CheckpointError, match=r'checkpoints/stage1 is missing, but stage2_np4 '
                     r'refine\(s\) its map .* delete .*stage2_np4 too and rerun `--mode=train`'):
    iterseg.load(str(trained))
